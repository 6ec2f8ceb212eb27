"""Builds the one extension fused_backprop._C: the CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are present.

FUSED_BACKPROP_CUDA=auto (default) | 0 | 1. ``auto`` looks only for the toolkit and torch's CUDA
build, never for a visible GPU; ``1`` fails when they are missing; ``0`` builds CPU only.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def want_cuda() -> bool:
    mode = os.environ.get("FUSED_BACKPROP_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FUSED_BACKPROP_CUDA must be auto, 0 or 1, got {mode!r}")
    import torch

    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not have:
        sys.exit("FUSED_BACKPROP_CUDA=1 but no CUDA toolkit (CUDA_HOME) or torch is not a CUDA build")
    return mode != "0" and have


def cuda_include_dirs() -> list:
    """The CUDA headers torch's own headers need (cusparse.h, ...) ship in the nvidia-* wheels."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def cpu_capability_flags() -> list:
    """SIMD level for at::vec in the CPU kernels: the best one the build host runs, as ATen names
    them (override with FUSED_BACKPROP_CPU_CAPABILITY=DEFAULT|AVX2|AVX512). The extension is
    built where it runs, so the host's level is the right one; DEFAULT runs anywhere."""
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    best = ("AVX512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags
            else "AVX2" if {"avx2", "fma"} <= flags else "DEFAULT")
    level = os.environ.get("FUSED_BACKPROP_CPU_CAPABILITY", best).upper()
    table = {
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
        "AVX2": ["-mavx2", "-mfma"],
        "DEFAULT": [],
    }
    if level not in table:
        sys.exit(f"FUSED_BACKPROP_CPU_CAPABILITY must be one of {list(table)}, got {level!r}")
    if level == "DEFAULT":
        return []
    return table[level] + [f"-DCPU_CAPABILITY={level}", f"-DCPU_CAPABILITY_{level}"]


def extension():
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++20", "-fopenmp"] + cpu_capability_flags()
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if cuda_sources and want_cuda():
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["include_dirs"] += cuda_include_dirs()
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension("fused_backprop._C", sources + cuda_sources,
                                           extra_compile_args={"cxx": cxx + ["-DFUSED_BACKPROP_CUDA"], "nvcc": nvcc},
                                           **kwargs)
    return cpp_extension.CppExtension("fused_backprop._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["fused_backprop", "fused_backprop.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
