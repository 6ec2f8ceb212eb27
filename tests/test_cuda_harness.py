"""The CUDA kernels (csrc/cuda/kernels.cuh) executed on the CPU by the host-execution harness
(tests/cuda_harness/cuda_host.h), built with g++ under AddressSanitizer + UBSan, against a plain
double-precision host reference. Needs g++ only: no nvcc, no GPU.

The harness binary is cached under build/cuda_harness/<hash of sources and flags>/, so repeated
runs only pay for the kernels' execution.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ODD_SHAPES

ROOT = Path(__file__).resolve().parents[1]
HARNESS_DIR = ROOT / "tests" / "cuda_harness"
# what the harness compiles from csrc/, by path relative to csrc/ (a mutant build copies them)
CSRC_FILES = ["activation.h", "activations.def", "cuda/launch.h", "cuda/kernels.cuh"]
KERNEL_SOURCES = [ROOT / "csrc" / f for f in CSRC_FILES]
# every activation of csrc/activations.def (the harness's --list prints the same)
ACTIVATIONS = tuple(re.findall(r'^FB_ACTIVATION\(\w+, "(\w+)"', (ROOT / "csrc" / "activations.def").read_text(), re.M))
# relu and leaky relu: their derivative from the 0/1 values the Python layer unpacks a sign mask to
SIGN_ACTIVATIONS = ("relu", "leaky_relu")
HARNESS_SOURCES = [HARNESS_DIR / "cuda_host.h", HARNESS_DIR / "harness_main.cpp"]
CXX = os.environ.get("CXX", "g++")
SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
FLAGS = ["-std=c++20", "-O1", "-g", "-Wall", "-Wno-unknown-pragmas", *SAN_FLAGS]
ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
       "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}

# odd shapes (0 rows, K=1, N=1, not multiples of any tile) plus tile-boundary shapes of both
# the FMA tiles (128x128x8 wide f32, 64x64x16 narrow f32, 64x64x8 f64) and the WMMA tiles (64x64x32);
# (150, 72, 140) takes the wide f32 tile in all three GEMMs
SHAPES = [*ODD_SHAPES, (64, 64, 64), (129, 32, 130), (128, 8, 128), (65, 33, 64), (150, 72, 140)]
# a long reduction under a small output: the forward and recompute dZ GEMMs take the split-K path
SHAPES += [(70, 300, 20)]
# aligned and 4 k steps of the WMMA tile without a split (forward, dX): the cp.async ring wraps
SHAPES += [(136, 128, 128)]
# tall-skinny: dW (and dX) take the split-K path with its deterministic second stage
TALL = [(2000, 20, 10), (700, 9, 3)]
DTYPES = ("f64", "f32", "f16", "bf16")
# fwd_preact runs the forward with and without the pre-activation output (y must be the same bits),
# so it covers plain fwd; bwd takes what the forward saves (y, or z for gelu, gelu_tanh, silu)
MODES = ("fwd_preact", "bwd", "recompute")
# layout / argument variants: aligned (16-byte vector loads), misaligned + padded rows (scalar
# path, strided), no bias with dw masked out, only dw with padded rows
VARIANTS = {
    "aligned": [],
    "misaligned-strided": ["--misalign", "1", "--pad", "3"],
    "nobias-mask101": ["--bias", "0", "--mask", "101"],
    "mask010-strided": ["--mask", "010", "--pad", "8"],
}


def _shape_args(shapes):
    return [f"{m},{k},{n}" for m, k, n in shapes]


def _have_sanitizers(build_dir: Path) -> str | None:
    probe = build_dir / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    r = subprocess.run([CXX, *SAN_FLAGS, str(probe), "-o", str(build_dir / "probe")], capture_output=True, text=True)
    return None if r.returncode == 0 else r.stderr[-2000:]


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_harness(kernel_header: Path | None = None, extra_flags=(), tag="harness", background=False) -> Path:
    """Compiles harness_main.cpp (with `kernel_header` in place of csrc/cuda/kernels.cuh if given);
    `background`: at a lower CPU priority (nice), so it takes only what the running tests leave."""
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}) to build the host-execution harness")
    h = hashlib.sha256()
    srcs = HARNESS_SOURCES + KERNEL_SOURCES + ([kernel_header] if kernel_header else [])
    for p in srcs:
        h.update(p.read_bytes())
    flags = FLAGS + list(extra_flags)
    h.update(" ".join(flags).encode())
    h.update(subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.encode())
    out_dir = ROOT / "build" / "cuda_harness" / h.hexdigest()[:16]
    exe = out_dir / tag
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock(out_dir / f"{tag}.lock"):
        if exe.exists():
            return exe
        problem = _have_sanitizers(out_dir)
        if problem is not None:
            pytest.skip(f"{CXX} cannot link -fsanitize=address,undefined here:\n{problem}")
        include = ["-I", str(ROOT / "csrc"), "-I", str(HARNESS_DIR)]
        if kernel_header is not None:
            # a private csrc/ tree with the replaced kernels.cuh, first on the include path
            alt = out_dir / f"{tag}-src"
            (alt / "cuda").mkdir(parents=True, exist_ok=True)
            for f in CSRC_FILES:
                shutil.copy(ROOT / "csrc" / f, alt / f)
            shutil.copy(kernel_header, alt / "cuda" / "kernels.cuh")
            include = ["-I", str(alt), "-I", str(HARNESS_DIR)]
        tmp = out_dir / f"{tag}.tmp"
        cmd = [CXX, *flags, *include, str(HARNESS_DIR / "harness_main.cpp"), "-o", str(tmp)]
        nice = shutil.which("nice") if background else None
        r = subprocess.run([nice, "-n", "10", *cmd] if nice else cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"harness build failed:\n{' '.join(cmd)}\n{r.stderr[-8000:]}")
        os.replace(tmp, exe)
    return exe


# Builds of the mutants (test_harness_catches_deliberate_bug) run on a thread pool, one g++
# process per core at a lower priority: started with the full harness's build, they compile on
# what it and the kernel tests leave of the CPUs instead of one after another at the end.
_BUILDS = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
_MUTANT_BUILDS: dict[str, concurrent.futures.Future] = {}


@pytest.fixture(scope="session")
def harness(request):
    if any(item.originalname == "test_harness_catches_deliberate_bug" for item in request.session.items):
        for name in MUTATIONS:
            if _anchor_count(name) == 1:  # (a lost anchor fails its own test)
                _mutant_build(name)
    yield build_harness()
    _BUILDS.shutdown(wait=False, cancel_futures=True)  # e.g. under -x: no builds nobody waits for


def run(exe: Path, *args, seed=None, timeout=600):
    env = dict(ENV)
    if seed is not None:
        env["CUDA_HOST_SEED"] = str(seed)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _report(r) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _check(exe, *args, seed=None):
    r = run(exe, *args, seed=seed)
    assert r.returncode == 0 and "PASS" in r.stdout, _report(r)


# The layout variants (vector and scalar paths of every operand) run for every activation; the
# output-mask variants, whose launcher logic no activation changes, for one activation of each
# saved kind (relu and sigmoid: y; gelu: z).
MATRIX = [(act, variant) for act in ACTIVATIONS for variant in VARIANTS
          if variant in ("aligned", "misaligned-strided") or act in ("relu", "sigmoid", "gelu")]


@pytest.mark.parametrize("act, variant", MATRIX)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_host_reference(harness, dtype, act, mode, variant):
    shapes = SHAPES + (TALL if mode != "fwd_preact" else [])
    _check(harness, "--dtype", dtype, "--act", act, "--mode", mode, *VARIANTS[variant], *_shape_args(shapes))


# SM counts of the GPUs the split-K plan must fill: A100, H100
SM_COUNTS = (108, 132)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_plan_fills_a100_and_h100(harness, dtype):
    # fp32 M=256, N=1024 is 16 output tiles: 16 blocks on 108-132 SMs unless the reduction is split
    shapes = [(256, 1024, 1024), (64, 4096, 256), (128, 512, 2048), (512, 2048, 512), (1000, 1000, 1000),
              (8192, 20, 10), (4096, 4096, 4096), (256, 64, 1024), (16, 100, 16)]
    r = run(harness, "--dtype", dtype, "--plan", *_shape_args(shapes))
    assert r.returncode == 0, _report(r)
    lines = [ln.split() for ln in r.stdout.splitlines()]
    assert len(lines) == 3 * len(shapes), _report(r)
    split_seen = False
    for gemm, *nums in lines:
        rows, cols, red, tiles, splits, split_len, bk = map(int, nums)
        blocks = tiles * splits
        where = f"{dtype} {gemm} {rows}x{cols} red {red}: {tiles} tiles x {splits} splits of {split_len}"
        assert blocks <= max(tiles, 264), where  # at most two waves of 132 SMs
        if splits == 1:
            assert split_len == red, where
        else:  # chunks of whole k steps, at least 4 of them, covering the reduction
            split_seen = True
            assert split_len % bk == 0 and split_len >= 4 * bk, where
            assert (splits - 1) * split_len < red <= splits * split_len, where
        if tiles >= 264:
            assert splits == 1, where
        elif tiles * math.ceil(red / (4 * bk)) >= 264:  # the reduction is long enough to fill the GPU
            for sms in SM_COUNTS:
                waves = math.ceil(blocks / sms)
                assert blocks >= sms and blocks / (waves * sms) >= 2 / 3, f"{where}: {blocks} blocks on {sms} SMs"
    assert split_seen
    fwd = next(ln for ln in lines if ln[0] == "fwd" and ln[1:4] == ["256", "1024", "1024"])
    assert int(fwd[4]) * int(fwd[5]) >= max(SM_COUNTS), fwd


def _plans(harness, dtype, shape):
    r = run(harness, "--dtype", dtype, "--plan", *_shape_args([shape]))
    assert r.returncode == 0, _report(r)
    return {ln.split()[0]: int(ln.split()[5]) for ln in r.stdout.splitlines()}


@pytest.mark.parametrize("mode", ["fwd", "bwd", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_launches_as_planned(harness, dtype, mode):
    # The forward and the recompute dZ GEMM (epilogues not linear in the sum) split as planned: one
    # GEMM launch, plus the reduction that applies the epilogue when split. db is folded into the
    # dW GEMM, which leaves db only its fixed-order final stage (one launch instead of two).
    shape = (70, 300, 20)
    splits = _plans(harness, dtype, shape)
    assert splits["fwd"] > 1
    gemms = {"fwd": ["fwd"], "bwd": ["dx", "dw"], "recompute": ["fwd", "dx", "dw"]}[mode]
    want = sum(1 + (splits[g] > 1) for g in gemms) + (mode != "fwd")  # + db_finalize_kernel
    r = run(harness, "--dtype", dtype, "--act", "gelu", "--mode", mode, *_shape_args([shape]))
    assert r.returncode == 0 and f"PASS ({want} kernel launches)" in r.stdout, _report(r)


def test_list_is_activations_def(harness):
    r = run(harness, "--list")
    assert r.returncode == 0 and tuple(r.stdout.split()) == ACTIVATIONS, _report(r)


@pytest.mark.parametrize("variant", ["aligned", "misaligned-strided"])
@pytest.mark.parametrize("act", SIGN_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_from_unpacked_sign_mask(harness, dtype, act, variant):
    # out = the 0/1 values of y > 0: grad_from_output maps them to act' (relu 1/0, leaky relu 1/a)
    _check(harness, "--dtype", dtype, "--act", act, "--mode", "bwd_mask", "--slope", "0.2", *VARIANTS[variant],
           *_shape_args(SHAPES + TALL))


@pytest.mark.parametrize("slope", ["0", "0.2", "1", "-0.5", "3"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ("f64", "f32", "bf16"))
def test_leaky_relu_slopes(harness, dtype, mode, slope):
    # the slope reaches every kernel; a negative one has no backward from y (the glue refuses it)
    if mode == "bwd" and float(slope) < 0:
        r = run(harness, "--dtype", dtype, "--act", "leaky_relu", "--mode", mode, "--slope", slope, "5,3,4")
        assert r.returncode == 2 and "use recompute" in r.stderr, _report(r)
        return
    _check(harness, "--dtype", dtype, "--act", "leaky_relu", "--mode", mode, "--slope", slope,
           *_shape_args(SHAPES + TALL))


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a != "leaky_relu"])
def test_other_activations_ignore_the_slope(harness, act):
    for mode in MODES:
        _check(harness, "--dtype", "f32", "--act", act, "--mode", mode, "--slope", "0.7",
               *_shape_args([(37, 13, 11), (130, 65, 33)]))


def test_bad_arguments_are_refused(harness):
    for args, expect in [(["--act", "swish"], "bad --act"), (["--mode", "bwd_mask", "--act", "gelu"], "bwd_mask"),
                         (["--mode", "fwd2"], "bad --mode")]:
        r = run(harness, *args, "5,3,4")
        assert r.returncode == 2 and expect in r.stderr, _report(r)


@pytest.mark.parametrize("seed", [2, 3])
def test_result_independent_of_schedule(harness, seed):
    # other shuffles of threads and blocks: same (correct) answers, from the saved y and the saved z
    for dtype in ("f32", "f16"):
        for act in ("sigmoid", "gelu"):
            _check(harness, "--dtype", dtype, "--act", act, "--mode", "bwd", *_shape_args([(130, 65, 33)]), seed=seed)


@pytest.mark.parametrize("act, mode", [("relu", "recompute"), ("silu", "bwd"), ("gelu_tanh", "fwd_preact")])
def test_wide_problem(harness, act, mode):
    # several blocks in every grid dimension, all three GEMM forms and both db stages
    _check(harness, "--dtype", "f32", "--act", act, "--mode", mode, *_shape_args([(300, 70, 260)]))


@pytest.mark.parametrize("name", ["schedule", "votes", "missing-sync", "epilogue-lanes", "cp-async"])
def test_harness_selftest(harness, name):
    r = run(harness, "--selftest", name)
    assert r.returncode == 0, _report(r)


@pytest.mark.parametrize("name, expect", [
    ("divergent-barrier", "divergent barrier"),
    ("exit-before-barrier", "has exited"),
    ("divergent-shfl", "deadlock"),
    ("shared-oob", "AddressSanitizer: heap-buffer-overflow"),
    ("local-oob", ("AddressSanitizer: stack-buffer-overflow", "insufficient space for an object")),
    ("cp-async-unwaited", "cp.async copies not waited for"),
])
def test_harness_fails_loudly(harness, name, expect):
    r = run(harness, "--selftest", name)
    assert r.returncode != 0, _report(r)
    expect = (expect,) if isinstance(expect, str) else expect  # (UBSan's object-size check may come first)
    assert any(e in r.stderr for e in expect), _report(r)


# Deliberate bugs: each mutation of kernels.cuh must make the harness fail. Built for one dtype
# (HARNESS_ONLY_F32, or HARNESS_ONLY_F16 for the WMMA kernel's) to keep these extra builds short;
# an entry is (old, new, harness arguments, expected output[, dtype]).
MUTATIONS = {
    "fma-missing-syncthreads": (
        "        for (int j = 0; j < C::TN; ++j) acc[i][j] = ra[i] * rb[j] + acc[i][j];\n    }\n    __syncthreads();",
        "        for (int j = 0; j < C::TN; ++j) acc[i][j] = ra[i] * rb[j] + acc[i][j];\n    }\n",
        ["--mode", "fwd"], "MISMATCH"),
    "fma-off-by-one-row-bound": (
        "if (r < M && c < N) e(r, c, at(rr, cc));", "if (r <= M && c < N) e(r, c, at(rr, cc));",
        ["--mode", "fwd"], "AddressSanitizer"),
    "tile-loader-off-by-one-k": (
        "if (r < rows && k < red) {\n      const T* q = KC", "if (r < rows && k <= red) {\n      const T* q = KC",
        ["--mode", "fwd", "--misalign", "1"], "AddressSanitizer"),
    "splitk-reduce-drops-last-slice": (
        "for (int64_t z = 1; z < splits; ++z)", "for (int64_t z = 1; z + 1 < splits; ++z)",
        ["--mode", "bwd", "700,9,3"], "MISMATCH"),
    "db-missing-syncthreads": (
        "  red[group * kDbCols + lane] = s;\n  __syncthreads();", "  red[group * kDbCols + lane] = s;\n",
        ["--mode", "bwd", "--mask", "101"], "MISMATCH"),  # without dW: the db kernels
    "db-fold-drops-a-k-step": (
        "for (int j = 0; j < BK / P; ++j)", "for (int j = 0; j + 1 < BK / P; ++j)", ["--mode", "bwd"], "MISMATCH"),
    "preact-stores-the-activation": (
        "preact[r * ldp + c] = Num<T>::from_acc(z);",
        "preact[r * ldp + c] = Num<T>::from_acc(Act<A>::template forward<acc_t<T>>(z, a));",
        ["--act", "gelu", "--mode", "fwd_preact"], "MISMATCH"),
    "saved-path-drops-the-slope": (
        "grad_from_saved<A, acc_t<T>>(Num<T>::to_acc(saved), a)", "grad_from_saved<A, acc_t<T>>(Num<T>::to_acc(saved), 0)",
        ["--act", "leaky_relu", "--slope", "0.2", "--mode", "bwd"], "MISMATCH"),
    # the cp.async ring (136x128x128: aligned, 4 k steps): a wait that leaves the tile about to be
    # multiplied in flight reads the 0xff fill / an older tile; without the k step's barrier
    # other threads' copies are not waited for and a stage is refilled while others still read it
    "wmma-waits-one-group-too-few": (
        "FB_CP_ASYNC_WAIT(S - 2);", "FB_CP_ASYNC_WAIT(S - 1);", ["--mode", "fwd", "136,128,128"], "MISMATCH", "f16"),
    "wmma-missing-syncthreads": (
        "    // the previous tile, whose stage the next copy overwrites.\n    __syncthreads();",
        "    // the previous tile, whose stage the next copy overwrites.\n",
        ["--mode", "bwd", "136,128,128"], "MISMATCH", "f16"),
}


def _mutation(name: str):
    """(old, new, args, expect, dtype) of MUTATIONS[name]; dtype f32 unless the entry names one."""
    old, new, args, expect, *dtype = MUTATIONS[name]
    return old, new, args, expect, dtype[0] if dtype else "f32"


def _anchor_count(name: str) -> int:
    return (ROOT / "csrc" / "cuda" / "kernels.cuh").read_text().count(MUTATIONS[name][0])


def _mutant_build(name: str) -> concurrent.futures.Future:
    """The (background) build of the harness with mutation `name` applied, started once."""
    if name not in _MUTANT_BUILDS:
        old, new, _, _, dtype = _mutation(name)
        mutated = ROOT / "build" / "cuda_harness" / "mutants" / f"{name}.cuh"
        mutated.parent.mkdir(parents=True, exist_ok=True)
        mutated.write_text((ROOT / "csrc" / "cuda" / "kernels.cuh").read_text().replace(old, new))
        _MUTANT_BUILDS[name] = _BUILDS.submit(build_harness, mutated, extra_flags=[f"-DHARNESS_ONLY_{dtype.upper()}"],
                                              tag=f"mutant-{name}", background=True)
    return _MUTANT_BUILDS[name]


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_harness_catches_deliberate_bug(name):
    _, _, args, expect, dtype = _mutation(name)
    assert _anchor_count(name) == 1, f"mutation anchor for {name} not found once in kernels.cuh"
    exe = _mutant_build(name).result()
    r = run(exe, "--dtype", dtype, "--act", "relu", *args, *_shape_args([(37, 13, 11), (130, 65, 33), (2000, 20, 10)]))
    assert r.returncode != 0, f"the harness did not notice {name}:\n{_report(r)}"
    assert expect in r.stdout + r.stderr, _report(r)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
