"""Builds the one extension fused_backprop._C: the CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are present.

FUSED_BACKPROP_CUDA=auto (default) | 0 | 1. ``auto`` looks only for the toolkit and torch's CUDA
build, never for a visible GPU; ``1`` fails when they are missing; ``0`` builds CPU only.
FUSED_BACKPROP_CPU_LEVELS narrows the SIMD levels the CPU kernels are built for (cpu_levels).
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


# The SIMD levels the CPU kernels are compiled for, lowest first, with the flags ATen gives its
# own kernels at each level (cmake/Codegen.cmake). csrc/cpu/kernels_<LEVEL>.cpp is compiled with
# them; the level that runs is chosen at run time (csrc/cpu/dispatch.cpp), so one build runs on
# every CPU of the architecture.
CPU_LEVELS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def cpu_levels() -> list:
    """DEFAULT, and on x86-64 AVX2 and AVX512 too. FUSED_BACKPROP_CPU_LEVELS=DEFAULT,AVX2 (say)
    builds fewer; DEFAULT is always built, it is what runs where nothing better does."""
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    levels = list(CPU_LEVELS) if x86 else ["DEFAULT"]
    asked = os.environ.get("FUSED_BACKPROP_CPU_LEVELS")
    if asked:
        wanted = {w.strip().upper() for w in asked.split(",") if w.strip()}
        unknown = wanted - set(levels)
        if unknown:
            sys.exit(f"FUSED_BACKPROP_CPU_LEVELS: {sorted(unknown)} not among the levels of this architecture, {levels}")
        levels = [lv for lv in levels if lv == "DEFAULT" or lv in wanted]
    return levels


def level_of(path: str):
    """The SIMD level of csrc/cpu/kernels_<LEVEL>.cpp (or its object file), else None."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return next((level for level in CPU_LEVELS if stem == f"kernels_{level}"), None)


def link_rank(obj: str) -> int:
    """Link order: the baseline objects, then the levels in ascending order. The linker keeps the
    first copy of an inline function that several objects define (std::vector's, at::Tensor's),
    so the copy kept is one that every CPU runs (ATen: NOTE [ Linking AVX and non-AVX files ])."""
    level = level_of(obj)
    return -1 if level is None else list(CPU_LEVELS).index(level)


def level_flags(level: str) -> list:
    return CPU_LEVELS[level] + [f"-DCPU_CAPABILITY={level}", f"-DCPU_CAPABILITY_{level}"]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) plus per-source flags for the kernels_<LEVEL>.cpp files:
    each build line of such a file in the generated build.ninja gets its level's flags appended,
    so ninja compiles all sources in parallel and rebuilds a level when its flags change. The
    objects are linked in link_rank order (setuptools sorts the sources by name)."""

    def build_extensions(self):
        if not self.use_ninja:
            sys.exit("fused_backprop needs ninja to build (pip install ninja): the per-SIMD-level "
                     "kernel files get their own compiler flags through build.ninja")
        write = cpp_extension._write_ninja_file

        def write_with_levels(path, **kwargs):
            write(path, **kwargs)
            with open(path) as f:
                lines = f.read().splitlines()
            out = []
            for line in lines:
                out.append(line)
                if line.startswith("build ") and ": compile " in line:
                    level = level_of(line.split(": compile ", 1)[1].strip())
                    if level is not None:
                        out.append("  post_cflags = $post_cflags " + " ".join(level_flags(level)))
            with open(path, "w") as f:
                f.write("\n".join(out) + "\n")

        link = self.compiler.link_shared_object

        def link_in_level_order(objects, *args, **kwargs):
            return link(sorted(objects, key=link_rank), *args, **kwargs)

        cpp_extension._write_ninja_file = write_with_levels
        self.compiler.link_shared_object = link_in_level_order
        try:
            super().build_extensions()
        finally:
            cpp_extension._write_ninja_file = write


def extension():
    levels = cpu_levels()
    # Every source but the kernels_<LEVEL>.cpp of levels not built (the link order is link_rank's).
    cpp = glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    sources = _rel(p for p in cpp if level_of(p) in (None, *levels))
    cxx = ["-O3", "-std=c++20", "-fopenmp"] + [f"-DFUSED_BACKPROP_HAVE_{level}" for level in levels]
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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
