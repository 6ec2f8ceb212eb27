"""Static checks of the CUDA kernels: nvcc compiles the torch-free kernel translation units
(csrc/cuda/kernels_<dtype>.cu) for sm_80 and sm_90 with -Xptxas -v; the report must show no
register spills, no stack frame and no local memory for any kernel. Registers and shared memory
per kernel are printed (pytest -s, or in the failure message). Where cuobjdump + nvdisasm are
found (PATH, CUDA_HOME/bin, or the PyPI wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm),
the tensor-core kernels must contain HMMA instructions.

Needs nvcc only (no GPU, no torch headers); skipped with the reason when nvcc is absent. The
cubins and reports are cached under build/cuda_static/<hash of sources and flags>/.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
# what the torch-free kernel units compile from (the glue, linear_act_cuda.cu, is not among them)
KERNEL_SOURCES = [*sorted(CUDA_DIR.glob("kernels*")), CUDA_DIR / "instantiate.cuh", CUDA_DIR / "launch.h",
                  ROOT / "csrc" / "activation.h", ROOT / "csrc" / "activations.def"]
# activations.def's enum names in order: Activation's value i is ACTIVATION_NAMES[i]
ACTIVATION_NAMES = re.findall(r'^FB_ACTIVATION\(\w+, "(\w+)"', (ROOT / "csrc" / "activations.def").read_text(), re.M)
DTYPES = ("f32", "f64", "f16", "bf16")
ARCHS = ("sm_80", "sm_90")
# the flags torch's CUDAExtension passes, so the kernels are checked as the extension builds them
NVCC_FLAGS = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# kernel families each dtype must produce
EXPECTED = {
    "f32": ["gemm_fma_kernel", "db_partial_kernel", "db_finalize_kernel"],
    "f64": ["gemm_fma_kernel", "db_partial_kernel", "db_finalize_kernel"],
    "f16": ["gemm_wmma_kernel", "db_partial_kernel", "db_finalize_kernel"],
    "bf16": ["gemm_wmma_kernel", "db_partial_kernel", "db_finalize_kernel"],
}


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 shutil.which("nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _tool(name: str) -> str | None:
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")]
    for p in sys.path:
        dirs += glob.glob(os.path.join(p, "nvidia", "cu*", "bin")) + glob.glob(os.path.join(p, "nvidia", "*", "bin"))
    found = shutil.which(name)
    if found:
        return found
    for d in dirs:
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or NVCC): static CUDA checks need it")


def _cache_dir() -> Path:
    h = hashlib.sha256()
    for p in KERNEL_SOURCES:
        h.update(p.name.encode() + p.read_bytes())
    h.update(" ".join(NVCC_FLAGS).encode())
    h.update(subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.encode())
    d = ROOT / "build" / "cuda_static" / h.hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compile(dtype: str, arch: str, out: Path) -> tuple[str, str, Path, str]:
    cubin = out / f"{dtype}.{arch}.cubin"
    log = out / f"{dtype}.{arch}.ptxas.txt"
    if not (cubin.exists() and log.exists()):
        cmd = [NVCC, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-Xptxas", "-v",
               str(CUDA_DIR / f"kernels_{dtype}.cu"), "-o", str(cubin) + ".tmp"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"nvcc failed:\n{' '.join(cmd)}\n{r.stderr[-8000:]}")
        log.write_text(r.stdout + r.stderr)
        os.replace(str(cubin) + ".tmp", cubin)
    return dtype, arch, cubin, log.read_text()


@pytest.fixture(scope="session")
def reports():
    out = _cache_dir()
    jobs = [(d, a) for d in DTYPES for a in ARCHS]
    workers = max(1, min(len(jobs), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda j: _compile(*j, out), jobs))
    return {(d, a): (cubin, log) for d, a, cubin, log in results}


def parse_ptxas(text: str) -> dict[str, dict]:
    """{mangled kernel name: {regs, smem, stack, spill_stores, spill_loads, lmem, cumulative_stack}}"""
    kernels: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([A-Za-z0-9_$.]+)'?", line)
        if m:
            current = kernels.setdefault(m.group(1), dict(regs=None, smem=0, stack=0, spill_stores=0, spill_loads=0,
                                                          lmem=0, cumulative_stack=0))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
            lm = re.search(r"(\d+) bytes lmem", line)
            current["lmem"] = int(lm.group(1)) if lm else 0
            cs = re.search(r"(\d+) bytes cumulative stack size", line)
            current["cumulative_stack"] = int(cs.group(1)) if cs else 0
    return kernels


def _demangle(names):
    cf = shutil.which("c++filt")
    if not cf:
        return {n: n for n in names}
    r = subprocess.run([cf], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> str:
    s = demangled.replace("fused_backprop::cuda::", "").replace("fused_backprop::", "")
    s = re.sub(r"\(Activation\)(\d+)", lambda m: ACTIVATION_NAMES[int(m.group(1))], s)
    return re.sub(r"\(.*\)$", "", s)


def test_no_spills_no_local_memory(reports):
    rows, problems = [], []
    for (dtype, arch), (_, log) in sorted(reports.items()):
        kernels = parse_ptxas(log)
        assert kernels, f"no kernels in the ptxas report for {dtype} {arch}:\n{log[-3000:]}"
        names = _demangle(list(kernels))
        for fam in EXPECTED[dtype]:
            assert any(fam in n for n in kernels), f"{fam} missing from the {dtype} {arch} build"
        for name, k in kernels.items():
            assert k["regs"] is not None, f"no register count parsed for {name}"
            rows.append((arch, dtype, k["regs"], k["smem"], _short(names[name])))
            bad = {key: k[key] for key in ("stack", "spill_stores", "spill_loads", "lmem", "cumulative_stack") if k[key]}
            if bad:
                problems.append(f"{arch} {_short(names[name])}: {bad}")
    table = "\n".join(f"{a:6} {d:5} {r:4d} regs {s:6d} B smem  {n}" for a, d, r, s, n in rows)
    print("\nptxas resource report (registers / static shared memory per kernel):\n" + table)
    assert not problems, "register spills / local memory:\n" + "\n".join(problems) + "\n\n" + table


def test_every_activation_instantiated(reports):
    # instantiate.cuh expands activations.def: each dtype has the forward epilogue, the recompute
    # epilogue and the saved-operand backward of every activation
    for (dtype, arch), (_, log) in sorted(reports.items()):
        names = [_short(n) for n in _demangle(list(parse_ptxas(log))).values()]
        for act in ACTIVATION_NAMES:
            for part in ("ForwardEpilogue", "RecomputeDzEpilogue", "DzFromSavedOperand", "DzFromSavedElem"):
                assert any(re.search(rf"{part}<[^<>]*, {act}\b", n) for n in names), \
                    f"{dtype} {arch}: no {part} kernel for activation {act!r}"


@pytest.fixture(scope="session")
def sass(reports):
    """{(dtype, arch): {short kernel name: its SASS opcodes in order (with modifiers: STS.128, HMMA.16816.F32)}}"""
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("cuobjdump/nvdisasm not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    env = {**os.environ, "PATH": os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", "")}
    out = {}
    for (dtype, arch), (cubin, _) in sorted(reports.items()):
        r = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        counts: dict[str, list[str]] = {}
        fn = None
        for line in r.stdout.splitlines():
            m = re.search(r"Function : (\S+)", line)
            if m:
                fn = m.group(1)
                counts[fn] = []
                continue
            m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if fn is not None and m:
                counts[fn].append(m.group(1))
        names = _demangle(list(counts))
        out[dtype, arch] = {_short(names[k]): v for k, v in counts.items()}
    return out


def _count(ops, prefix: str) -> int:
    return sum(op == prefix or op.startswith(prefix + ".") for op in ops)


def test_tensor_core_kernels_use_hmma(sass):
    for (dtype, arch), kernels in sass.items():
        gemms = {k: _count(ops, "HMMA") for k, ops in kernels.items() if "gemm_" in k}
        assert gemms, f"no GEMM kernels in the {dtype} {arch} build"
        for name, n in gemms.items():
            if dtype in ("f16", "bf16"):
                assert n > 0, f"{arch} {dtype}: {name} has no HMMA instruction"
            else:
                assert n == 0, f"{arch} {dtype}: FMA-path kernel {name} contains HMMA"
        print(f"{arch} {dtype}: HMMA per GEMM kernel: {sorted(set(gemms.values()))}")


def _wmma_kernels(sass):
    """(arch, dtype, short name, SASS opcodes) of every fp16/bf16 WMMA GEMM kernel."""
    for (dtype, arch), kernels in sorted(sass.items()):
        if dtype in ("f16", "bf16"):
            yield from ((arch, dtype, name, ops) for name, ops in kernels.items() if "gemm_wmma_kernel" in name)


def test_wmma_tiles_stored_as_vectors(sass):
    # Every fp16/bf16 operand tile lies in shared memory as it was loaded, so the k loop writes
    # only 16-byte vectors: cp.async copies (LDGSTS.128, test_wmma_k_loop_pipelined_with_cp_async)
    # for aligned plain operands, STS.128 for the register-staged ones (dZ formed from dY and the
    # saved tensor, and the unaligned fallback, which stages the same vectors). A transposed
    # scalar store (STS.U16 at S[(r + j) * LDS + k]) puts a warp's lanes on one bank: ~128 store
    # wavefronts per k step instead of 8-16. Besides them the kernel has only the accumulator
    # staging (STS.64) and no local memory (LDL/STL).
    rows = []
    for arch, dtype, name, ops in _wmma_kernels(sass):
        sts = collections.Counter(op for op in ops if op.startswith("STS"))
        other = {op: n for op, n in sts.items() if op not in ("STS.128", "STS.64")}
        assert not other and sts.get("STS.128", 0) > 0, f"{arch} {dtype} {name}: shared stores {sts}"
        assert not (_count(ops, "LDL") or _count(ops, "STL")), f"{arch} {dtype} {name}: local memory"
        rows.append(f"{arch} {dtype} STS.128 {sts['STS.128']:2d} / HMMA {_count(ops, 'HMMA'):2d}  {name}")
    assert rows, "no WMMA kernels"
    print("\nWMMA k-loop tile stores per HMMA:\n" + "\n".join(rows))


def test_wmma_k_loop_pipelined_with_cp_async(sass):
    # The WMMA operand tiles go through a STAGES-deep shared-memory ring filled by cp.async
    # (cp.async.cg 16 bytes: LDGSTS.E.BYPASS.128; commit: LDGDEPBAR; wait_group: DEPBAR.LE): the
    # prologue commits STAGES - 1 groups before the first wait, and each k step waits (DEPBAR),
    # passes its one barrier and issues the copies of the tile STAGES - 1 steps ahead before its
    # MMAs, so those copies fly while this tile is multiplied. Every WMMA kernel has an aligned
    # plain operand (x, W or the recompute dZ), so every one has the pipeline.
    src = (CUDA_DIR / "kernels.cuh").read_text()
    stages = int(re.search(r"struct WmmaConfig \{.*?STAGES = (\d+);", src, re.S).group(1))
    assert stages >= 2
    rows = []
    for arch, dtype, name, ops in _wmma_kernels(sass):
        what = f"{arch} {dtype} {name}"
        copies = [op for op in ops if op.startswith("LDGSTS")]
        assert copies and all(op == "LDGSTS.E.BYPASS.128" for op in copies), f"{what}: cp.async copies {set(copies)}"
        waits = [i for i, op in enumerate(ops) if op.startswith("DEPBAR")]
        assert waits, f"{what}: no cp.async.wait_group (DEPBAR)"
        assert ops[:waits[0]].count("LDGDEPBAR") >= stages - 1, f"{what}: fewer than {stages - 1} groups before the first wait"
        # the k loop: a wait, then its barrier, then copies + commit, then the MMAs
        loop = [w for w in waits if any(op.startswith("BAR.SYNC") for op in ops[w:w + 4])]
        assert loop, f"{what}: no wait_group followed by a barrier"
        hmma = next(i for i in range(loop[0], len(ops)) if ops[i].startswith("HMMA"))
        head = ops[loop[0]:hmma]
        assert any(op.startswith("LDGSTS") for op in head) and "LDGDEPBAR" in head, \
            f"{what}: the k step does not issue the next tiles' copies before its MMAs"
        rows.append(f"{arch} {dtype} LDGSTS {len(copies):2d} / LDGDEPBAR {ops.count('LDGDEPBAR')} / "
                    f"DEPBAR {len(waits)} / HMMA {_count(ops, 'HMMA'):2d}  {name}")
    assert rows, "no WMMA kernels"
    print(f"\nWMMA cp.async ring ({stages} stages):\n" + "\n".join(rows))


def _sts64_accumulator_conflicts(ldc: int) -> int:
    """Worst bank multiplicity of wmma::store_matrix_sync's 64-bit shared stores of an fp32
    accumulator at row stride `ldc` floats. Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix
    Fragments for mma.m16n8k16"): lane l holds c0, c1 at row l / 4, columns 2 (l % 4) + {0, 1}
    (c2, c3 eight rows below). A 64-bit access is served in two phases of 16 lanes."""
    worst = 1
    for phase in (range(0, 16), range(16, 32)):
        banks = collections.Counter()
        for lane in phase:
            word = (lane // 4) * ldc + 2 * (lane % 4)
            banks.update([word % 32, (word + 1) % 32])
        worst = max(worst, max(banks.values()))
    return worst


def test_wmma_accumulator_staging_free_of_bank_conflicts(sass):
    src = (CUDA_DIR / "kernels.cuh").read_text()
    cfg = re.search(r"struct WmmaConfig \{.*?BN = (\d+),.*?CPAD = (\d+);", src, re.S)
    ldc = int(cfg.group(1)) + int(cfg.group(2))
    assert _sts64_accumulator_conflicts(68) == 2  # the model sees the old padding's conflicts
    assert _sts64_accumulator_conflicts(ldc) == 1, f"LDC = {ldc}: 2-way bank conflicts in the accumulator staging"
    # the binary stores as the model assumes: STS.64, the c2/c3 half 8 rows (8 * LDC * 4 bytes) below
    for (dtype, arch), kernels in sass.items():
        for name, ops in kernels.items():
            if "gemm_wmma_kernel" in name:
                assert ops.count("STS.64") == 16, f"{arch} {dtype} {name}: accumulator stores {ops.count('STS.64')}"


def test_gemm_k_loop_loads_one_tile_ahead(sass):
    # Both register paths of the tile loader (16-byte vectors, and the element loads of unaligned
    # or odd-sized operands) fetch the next tile into registers before this tile's MMAs / FMAs, so
    # the tile stores up to the barrier issue no global load into registers (LDG). (The old scalar
    # fallback loaded its elements there: nothing in flight during the math, latency-bound.) The
    # WMMA kernel's cp.async copies (LDGSTS, LDGDEPBAR) load nothing into registers and are
    # checked by test_wmma_k_loop_pipelined_with_cp_async; they are not counted here.
    n = 0
    for (dtype, arch), kernels in sorted(sass.items()):
        for name, ops in kernels.items():
            if "gemm_" not in name:
                continue
            head = next(i for i, op in enumerate(ops) if op.startswith("STS"))
            bar = next(i for i in range(head, len(ops)) if ops[i].startswith("BAR"))
            loads = [op for op in ops[head:bar] if _count([op], "LDG")]
            assert not loads, f"{arch} {dtype} {name}: global loads between the tile stores and the barrier: {loads}"
            n += 1
    assert n > 0, "no GEMM kernels"
