"""The CPU kernels at every SIMD level: one build holds DEFAULT, AVX2 and AVX512 (x86-64), the level
torch runs is the one that runs, each level passes the kernel tests, no instruction of a level
escapes into code that runs at a lower one, and the DEFAULT level compiles for aarch64."""

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

import fused_backprop as fb
from fused_backprop import _ops

ROOT = Path(__file__).resolve().parent.parent
X86 = platform.machine().lower() in ("x86_64", "amd64")
LEVELS = ["DEFAULT", "AVX2", "AVX512"]  # ascending; what torch.backends.cpu.get_cpu_capability() says
HERE = torch.backends.cpu.get_cpu_capability()
# The tests of the kernels' results (parity, NaN/inf/extremes, 0 rows, odd sizes, the sign mask,
# gradcheck, errors, every activation, the torch.func kernels), rerun in a process per level.
KERNEL_TESTS = ["test_parity.py", "test_semantics.py", "test_sign_mask.py", "test_gradcheck.py", "test_ops.py",
                "test_autocast.py", "test_func.py", "test_activations.py"]

needs_build = pytest.mark.skipif(_ops.BUILD_ERROR is not None, reason="compiled extension not built")


def _level_env(level, tmp_path):
    # Its own torch.compile cache: inductor reuses kernels across levels, and the main process's
    # compiled graphs at a higher level abort after it (see bench.cli.separate_inductor_cache).
    return {**os.environ, "ATEN_CPU_CAPABILITY": level.lower(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}


def _run_kernel_tests(env, what):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         cwd=ROOT / "tests", env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"kernel tests {what}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert re.search(r"\d+ passed", run.stdout)


@needs_build
def test_cpu_capability_is_torchs_level():
    assert fb.cpu_capability() == (HERE if X86 else "DEFAULT")


@needs_build
@pytest.mark.parametrize("level", LEVELS)
def test_kernels_at_level(level, tmp_path):
    """The kernel tests pass with the kernels at ``level``, forced through ATEN_CPU_CAPABILITY."""
    if not X86 and level != "DEFAULT":
        pytest.skip(f"{level} is an x86-64 level")
    if X86 and LEVELS.index(level) > LEVELS.index(HERE):
        pytest.skip(f"this CPU (or ATEN_CPU_CAPABILITY) runs at most {HERE}")
    if level == HERE:
        pytest.skip(f"this process runs at {level}: the rest of the suite tests it")
    env = _level_env(level, tmp_path)
    got = subprocess.run([sys.executable, "-c", "import fused_backprop as fb; print(fb.cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert got == level
    _run_kernel_tests(env, f"at {level}")


def _cpu_vendor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


@needs_build
def test_tile_gemm_where_blas_runs_avx2():
    """The tile GEMM (csrc/cpu/tile_gemm.h) is on at AVX2 and AVX512 except on Intel CPUs (where
    MKL runs its AVX-512 kernels), unless FUSED_BACKPROP_TILE_GEMM says otherwise."""
    env = os.environ.get("FUSED_BACKPROP_TILE_GEMM")
    want = env == "1" if env in ("0", "1") else _cpu_vendor() != "GenuineIntel"
    assert _ops._C._tile_gemm() == (want and fb.cpu_capability() != "DEFAULT")


@needs_build
def test_kernels_with_the_other_gemm(tmp_path):
    """The kernel tests pass at this level with the GEMM choice flipped: the BLAS where the tile
    GEMM is the default (AMD), the tile GEMM where the BLAS is (Intel)."""
    if fb.cpu_capability() == "DEFAULT":
        pytest.skip("the DEFAULT level has no tile GEMM")
    flipped = "0" if _ops._C._tile_gemm() else "1"
    env = {**_level_env(HERE, tmp_path), "FUSED_BACKPROP_TILE_GEMM": flipped}
    got = subprocess.run([sys.executable, "-c", "from fused_backprop import _ops; print(_ops._C._tile_gemm())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert got == str(flipped == "1")
    _run_kernel_tests(env, f"with FUSED_BACKPROP_TILE_GEMM={flipped}")


# x86-64 prefixes that may precede a VEX (c4/c5) or EVEX (62) opcode byte.
_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "66", "67", "f0", "f2", "f3"}
# A function of namespace fused_backprop::cpu::<LEVEL> (or a template instantiated for one, or a
# lambda in one): its mangled name holds "3cpu" + the length-prefixed level.
# A level's namespace in a mangled name: ours (fused_backprop::cpu::<LEVEL>) or at::vec's
# (at::vec::<LEVEL>, whose inline functions only the TU of that level instantiates).
_LEVEL_IN_NAME = re.compile(r"(?:3cpu|2at3vec)(?:7|4|6)(DEFAULT|AVX2|AVX512)")


def simd_escapes(library: str) -> Counter:
    """(function, encoding) -> count of VEX/EVEX instructions (AVX and up, AVX-512) in functions
    that may run at a lower level than their instructions need: a global or weak symbol outside
    the level namespaces (the linker may have kept a level's copy of an inline function), one of
    level DEFAULT or AVX2 with instructions of a higher level, and a static initializer (which
    runs at load time on every CPU)."""
    local = set()
    for line in subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "t":
            local.add(parts[2])
    dump = subprocess.run(["objdump", "-d", "--no-addresses", "--insn-width=16", library], capture_output=True,
                          text=True, check=True).stdout
    escapes, func = Counter(), None
    for line in dump.splitlines():
        if line.endswith(">:"):
            func = line[1:-2]
            continue
        fields = line.lstrip("\t").split("\t")
        if func is None or len(fields) < 2:
            continue
        code = fields[0].split()
        i = 0
        while i < len(code) and code[i] in _PREFIXES:
            i += 1
        if i == len(code) or code[i] not in ("62", "c4", "c5"):
            continue
        enc = "EVEX" if code[i] == "62" else "VEX"
        symbol = func.split("@")[0]
        level = _LEVEL_IN_NAME.search(symbol)
        level = level.group(1) if level else None
        if symbol.startswith("_GLOBAL__sub_I") or "_GLOBAL__I" in symbol:
            escapes[(symbol, enc)] += 1
        elif level is None:
            if symbol not in local:
                escapes[(symbol, enc)] += 1
        elif level == "DEFAULT" or (level == "AVX2" and enc == "EVEX"):
            escapes[(symbol, enc)] += 1
    return escapes


@needs_build
@pytest.mark.skipif(not X86, reason="x86-64 instruction encodings")
def test_simd_instructions_stay_in_their_level():
    """No AVX/AVX-512 instruction where a CPU without them could execute it (a wheel built on an
    AVX-512 machine must run on an AVX2 or SSE-only one)."""
    library = _ops._C.__file__
    escapes = simd_escapes(library)
    assert not escapes, "SIMD instructions outside their level:\n" + "\n".join(
        f"  {n} {enc} in {name}" for (name, enc), n in escapes.most_common(20))
    # The check sees the levels' code at all: each level above DEFAULT has instructions of its own.
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True).stdout
    assert "zmm" in dump and "ymm" in dump


# The libm functions the activations would otherwise call once per element (float, and at
# DEFAULT double too, where at::vec's Vectorized maps them over its lanes).
_LIBM_MATH = re.compile(r"\s(?:call|jmp)\s.*<(expf?|erff?|tanhf?)(?:@plt)?>")


def libm_calls(library: str) -> Counter:
    """(function, libm function) -> count of calls in the level namespaces' code."""
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                          check=True).stdout
    calls, func = Counter(), None
    for line in dump.splitlines():
        if line.endswith(">:"):
            func = line.split("<", 1)[1][:-2]
        elif func is not None and _LEVEL_IN_NAME.search(func) and (m := _LIBM_MATH.search(line)):
            calls[(func, m.group(1))] += 1
    return calls


@needs_build
@pytest.mark.skipif(not X86, reason="x86-64 disassembly")
def test_no_libm_call_per_element():
    """The activations' exp, erf and tanh are vectorised at every level: no kernel calls libm's
    (csrc/cpu/portable_math.h serves the DEFAULT level, where at::vec's would)."""
    calls = libm_calls(_ops._C.__file__)
    assert not calls, "libm calls in the kernels:\n" + "\n".join(
        f"  {n} x {f} in {name[:160]}" for (name, f), n in calls.most_common(20))


def test_libm_call_check_finds_a_call(tmp_path):
    """The check above reports a level's loop that calls expf per element."""
    src = tmp_path / "lib.cpp"
    src.write_text("#include <cmath>\nnamespace fused_backprop::cpu::DEFAULT { void f(float* a, int n) {"
                   " for (int i = 0; i < n; ++i) a[i] = std::exp(a[i]); } }\n")
    lib = tmp_path / "lib.so"
    subprocess.run(["g++", "-O3", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    assert [f for _, f in libm_calls(str(lib))] == ["expf"]


def _cross_compiler():
    return shutil.which("aarch64-linux-gnu-g++")


def test_cpu_sources_compile_for_aarch64(tmp_path):
    """The CPU sources as setup.py builds them on aarch64 (the DEFAULT level, at::vec's NEON code)
    cross-compile against torch's headers: no x86 intrinsic escapes its guard."""
    cxx = _cross_compiler()
    if cxx is None:
        msg = "aarch64-linux-gnu-g++ not found (Debian: apt-get install g++-aarch64-linux-gnu; make test does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    include = Path(torch.__file__).parent / "include"
    sources = [p for p in sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
               if not re.fullmatch(r"kernels_(?!DEFAULT)\w+\.cpp", p.name)]
    assert any(p.name == "kernels_DEFAULT.cpp" for p in sources)
    flags = ["-std=c++20", "-O2", "-fopenmp", "-fPIC", "-c", f"-I{ROOT / 'csrc'}", f"-I{include}",
             f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
             "-DFUSED_BACKPROP_HAVE_DEFAULT", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    jobs = []
    for src in sources:
        level = ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"] if src.name == "kernels_DEFAULT.cpp" else []
        obj = tmp_path / (src.stem + ".o")
        jobs.append((src, obj, subprocess.Popen([cxx, *flags, *level, str(src), "-o", str(obj)],
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for src, obj, proc in jobs:
        out, _ = proc.communicate()
        assert proc.returncode == 0, f"{src.name} for aarch64:\n{out[-4000:]}"
        header = obj.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


@pytest.mark.skipif(not X86, reason="x86-64 instruction encodings")
def test_simd_escape_check_finds_an_escape(tmp_path):
    """The check above reports a global function compiled for AVX2 outside the level namespaces,
    and a level's function is not reported."""
    src = tmp_path / "lib.cpp"
    src.write_text("namespace fused_backprop::cpu::AVX2 { void inside(float* a, int n) { for (int i = 0; i < n; ++i)"
                   " a[i] *= 3; } }\nvoid outside(float* a, int n) { for (int i = 0; i < n; ++i) a[i] *= 3; }\n")
    lib = tmp_path / "lib.so"
    subprocess.run(["g++", "-O3", "-mavx2", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    found = {name for name, _ in simd_escapes(str(lib))}
    assert "_Z7outsidePfi" in found and not any("inside" in name for name in found)
