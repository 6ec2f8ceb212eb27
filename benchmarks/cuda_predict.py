"""Predicted H100 (SXM5) time of each CUDA kernel from its tile shape and its ptxas resource report,
and of the Triton backend's launches from their tiles and their sm_90a compile (TRITON_FACTS),
beside the predicted time of the eager cuBLAS-based baseline and of backend="auto"; writes markdown
tables.

Model (a roofline with the kernel's structure folded into an achievable rate):
  time = max(FLOPs_padded / P_kernel, bytes_DRAM / BW, bytes_L2 / BW_L2) / wave_efficiency + t_launch
* FLOPs_padded counts whole tiles (a 64-wide output in a 128-wide tile costs the full tile);
* bytes_DRAM: every operand read once and every result written once (L2 catches the reuse);
* bytes_L2: the operand tiles every block streams through shared memory, (BM+BN)*BK per k step;
* occupancy (blocks per SM) from registers, static shared memory and threads of the report;
  wave_efficiency = blocks / (waves * 132 * saturating blocks per SM);
* P_kernel: the achievable arithmetic rate of each kernel design (argued in RESULTS.md, "CUDA backend");
  the pipelined WMMA kernel's from its shared-memory traffic per k step (wmma_eff).

    python benchmarks/cuda_predict.py [--out benchmarks/cuda_predictions_table.md] [--recorded] [--triton-compile]

(--recorded: the last recorded CUDA resource report instead of an nvcc run; --triton-compile:
recompile the Triton launches and print TRITON_FACTS as found.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# H100 SXM5 (spec sheet, dense): 132 SMs, 1.98 GHz boost
SMS = 132
PEAK = {"f32": 67e12, "f32n": 67e12, "f64": 34e12, "f16": 989e12, "bf16": 989e12,  # FMA pipes (f32/f64), tensor cores (16-bit)
        "f64_tc": 67e12}  # FP64 tensor cores (DMMA), which cuBLAS's DGEMM and Triton's fp64 tl.dot use
DRAM_BW = 3.35e12 * 0.80   # achievable HBM3
L2_BW = 5.5e12             # measured-class L2 bandwidth
SMEM_BW = 128 * 1.98e9 * SMS  # shared memory: 128 B per clock per SM
T_LAUNCH = 2.5e-6          # launch + ramp/tail of one kernel in a back-to-back stream
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, MAX_BLOCKS = 65536, 228 * 1024, 2048, 32
SIZE = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2}
ACC = {"f32": 4, "f64": 8, "f16": 4, "bf16": 4}
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64"}
# tile shapes: (BM, BN, BK, threads); f32 outputs with <= 64 rows or columns use the narrow tile
TILE = {"f32": (128, 128, 8, 256), "f32n": (64, 64, 16, 256), "f64": (64, 64, 8, 256), "f16": (64, 64, 32, 128),
        "bf16": (64, 64, 32, 128)}

def wmma_eff(bm=64, bn=64, bk=32, wm=32, wn=32, e=2, overlap=0.85):
    """Achievable fraction of the tensor-core peak of the cp.async-pipelined WMMA kernel. With the
    copies of tile k+2 in flight while tile k is multiplied, global latency is hidden and the
    k step is bound by shared memory: every warp reads its (wm + wn) x bk operand slice through
    ldmatrix and the block writes its (bm + bn) x bk tiles (cp.async or STS.128), against
    2 bm bn bk FLOPs; `overlap`: the share of that bound reached with one barrier per k step and
    3 resident blocks (12 warps) per SM."""
    warps = (bm // wm) * (bn // wn)
    smem_bytes = (warps * (wm + wn) * bk + (bm + bn) * bk) * e
    return overlap * 2.0 * bm * bn * bk / smem_bytes * SMEM_BW / PEAK["f16"]


# achievable fraction of PEAK for each GEMM design (see RESULTS.md, "CUDA backend")
EFF = {"f32": 0.65, "f32n": 0.55, "f64": 0.55, "f16": wmma_eff(), "bf16": wmma_eff()}
# cuBLAS (eager baseline) on H100: SGEMM on the FMA pipes (torch's default: no TF32), DGEMM on the
# FP64 tensor cores (67 TFLOP/s peak), HGEMM with wgmma
CUBLAS = {"f32": 0.75 * PEAK["f32"], "f64": 0.80 * PEAK["f64_tc"], "f16": 0.65 * PEAK["f16"], "bf16": 0.65 * PEAK["bf16"]}
SHAPES = [(65536, 64, 64), (16384, 256, 256), (8192, 1024, 1024)]
SPLIT_TARGET, SPLIT_MAX, SPLIT_MIN_STEPS = 264, 256, 4  # as in kernels.cuh


def cdiv(a, b):
    return -(-a // b)


def blocks_per_sm(regs, smem, threads):
    warps = cdiv(threads, 32)
    per_warp = cdiv(regs * 32, 256) * 256
    by_regs = REGS_PER_SM // (warps * per_warp)
    by_smem = SMEM_PER_SM // (smem + 1024) if smem else MAX_BLOCKS
    return max(1, min(by_regs, by_smem, THREADS_PER_SM // threads, MAX_BLOCKS))


def resource_report():
    """{(dtype, family): (max regs, smem)} for sm_90 from the static check's nvcc run."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_cuda_static as st  # noqa: E402

    if st.NVCC is None:
        return None
    out, rep = st._cache_dir(), {}
    for d in st.DTYPES:
        _, _, _, log = st._compile(d, "sm_90", out)
        for name, k in st.parse_ptxas(log).items():
            fam = next(f for f in ("gemm_fma_kernel", "gemm_wmma_kernel", "db_partial_kernel", "db_finalize_kernel",
                                   "splitk_reduce_kernel") if f in name)
            key = "f32n" if d == "f32" and "Li64ELi64ELi16E" in name else d
            r, s = rep.get((key, fam), (0, 0))
            rep[(key, fam)] = (max(r, k["regs"]), max(s, k["smem"]))
    return rep


def cfg(d, rows, cols):
    return "f32n" if d == "f32" and (rows <= 64 or cols <= 64) else d


def gemm_time(d, rows, cols, red, in_bytes, out_bytes, occ, splits=1):
    e = SIZE[d]
    d = cfg(d, rows, cols)
    bps = occ[d]
    bm, bn, bk, _ = TILE[d]
    tiles = cdiv(rows, bm) * cdiv(cols, bn) * splits
    flops_padded = 2.0 * cdiv(rows, bm) * bm * cdiv(cols, bn) * bn * red
    l2 = tiles * cdiv(cdiv(red, splits), bk) * (bm + bn) * bk * e
    # blocks an SM needs resident to run at the design rate: one 8-warp FMA block (f32), two
    # blocks for the f64 and WMMA kernels; more resident blocks only help to balance the tail
    slots = SMS * min(bps, 1 if d == "f32" else 2)  # (f32n: 2 blocks of 8 warps)
    wave_eff = tiles / (cdiv(tiles, slots) * slots)
    t = max(flops_padded / (EFF[d] * PEAK[d]), (in_bytes + out_bytes) / DRAM_BW, l2 / L2_BW) / wave_eff
    return t + T_LAUNCH


def split_plan(d, rows, cols, red):
    bm, bn, bk, _ = TILE[cfg(d, rows, cols)]
    tiles = cdiv(rows, bm) * cdiv(cols, bn)
    if tiles >= SPLIT_TARGET:
        return 1
    s = min(SPLIT_TARGET // tiles, SPLIT_MAX, cdiv(red, SPLIT_MIN_STEPS * bk))
    if s <= 1:
        return 1
    ln = cdiv(cdiv(red, s), bk) * bk
    return cdiv(red, ln)


def store_gemm(d, rows, cols, red, in_bytes, occ):
    s = split_plan(d, rows, cols, red)
    e = SIZE[d]
    if s == 1:
        return gemm_time(d, rows, cols, red, in_bytes, rows * cols * e, occ), 1
    t = gemm_time(d, rows, cols, red, in_bytes, s * rows * cols * ACC[d], occ, s)
    return t + reduce_time(d, s, rows * cols), s


def reduce_time(d, s, elems):
    """A kernel that adds s partial sums of ``elems`` accumulator-type elements in a fixed order."""
    return (s * elems * ACC[d] + elems * SIZE[d]) / DRAM_BW + T_LAUNCH


def predict(d, m, k, n, occ):
    e = SIZE[d]
    # the forward and the recompute dZ GEMM split K like dX / dW (the epilogue after the reduction)
    fwd, sf = store_gemm(d, m, n, k, (m * k + n * k + n) * e, occ)
    # backward from the saved output: dZ formed in the loaders from dY and Y (2 MN reads per GEMM)
    dx, sx = store_gemm(d, m, k, n, (2 * m * n + n * k) * e, occ)
    dw, sw = store_gemm(d, n, k, m, (2 * m * n + m * k) * e, occ)
    # db: summed by the dW GEMM's first column of blocks from the dZ it stages; one final launch
    # adds the per-block partial sums in a fixed order
    db = T_LAUNCH
    bwd = dx + dw + db
    # recompute: one GEMM writes dZ, then dX / dW (with db) read it
    rc, _ = store_gemm(d, m, n, k, (m * k + n * k + m * n) * e, occ)
    rdx, _ = store_gemm(d, m, k, n, (m * n + n * k) * e, occ)
    rdw, _ = store_gemm(d, n, k, m, (m * n + m * k) * e, occ)
    rdb = T_LAUNCH
    # eager: cuBLAS GEMMs + elementwise passes
    def cub(rows, cols, red, nbytes):
        return max(2.0 * rows * cols * red / CUBLAS[d], nbytes / DRAM_BW) + T_LAUNCH

    e_fwd = cub(m, n, k, (m * k + n * k + m * n) * e) + 2 * m * n * e / DRAM_BW + T_LAUNCH
    e_bwd = (3 * m * n * e / DRAM_BW + T_LAUNCH                       # act backward
             + cub(m, k, n, (m * n + n * k + m * k) * e)              # dX
             + cub(n, k, m, (m * n + m * k + n * k) * e)              # dW
             + m * n * e / DRAM_BW + T_LAUNCH)                         # db = sum
    return dict(fwd=fwd, dx=dx, dw=dw, db=db, bwd=bwd, bwd_rc=rc + rdx + rdw + rdb, e_fwd=e_fwd, e_bwd=e_bwd,
                sf=sf, sx=sx, sw=sw, flops=2.0 * m * n * k)


# ---------------------------------------------------------------------------------------------------
# The Triton backend (fused_backprop/triton) in the same model (RESULTS.md, "Triton: predicted rates
# and the auto rule"). Each pass is the launches fused_backprop/triton/ops.py makes on an H100, each at
# the tile kernels.prune_tiles keeps first: the one a CUDA-graph capture runs untimed; the autotuner
# times the others it keeps and runs the fastest, so the first tile is the conservative prediction.
# Its first call per M bucket (kernels.m_bucket) times those tiles: a one-off stall, not steady state.
# Registers and shared memory of every launch come from compiling it for sm_90a with Triton's
# compiler and ptxas (``--triton-compile`` prints this table; the helpers are the AOT test's,
# tests/test_triton.py::AOT_HELPERS). Key: (dtype compiled, role, tile); float16 runs bfloat16's
# kernels (the same tiles, wgmma of the same shapes). Value: (registers, shared memory in bytes, what
# tl.dot became in the PTX: "fma" (fma.rn.f32), "mma" (mma.sync.m8n8k4.f64: the FP64 tensor cores),
# "ss" / "rs" (wgmma with the A operand from shared memory / from registers, where dZ is formed)).
TRITON_FACTS = {
    ('bf16', 'dw', (64, 64, 64, 4, 4)): (143, 82432, 'rs'),
    ('bf16', 'dx', (128, 64, 64, 4, 4)): (239, 131072, 'rs'),
    ('bf16', 'dx', (128, 128, 64, 8, 3)): (156, 114688, 'rs'),
    ('bf16', 'dz', (128, 64, 64, 4, 4)): (140, 98304, 'ss'),
    ('bf16', 'dz', (128, 128, 64, 8, 4)): (160, 131072, 'ss'),
    ('bf16', 'fwd', (64, 32, 64, 4, 4)): (48, 49152, 'ss'),
    ('bf16', 'fwd', (128, 64, 64, 4, 4)): (130, 98304, 'ss'),
    ('bf16', 'fwd', (128, 256, 64, 8, 3)): (181, 147456, 'ss'),
    ('bf16', 'narrow', (64, 4, 3)): (217, 59392, 'rs'),
    ('f32', 'dw', (32, 32, 32, 2, 3)): (94, 28928, 'fma'),
    ('f32', 'dw', (64, 64, 32, 4, 3)): (111, 58368, 'fma'),
    ('f32', 'dx', (64, 32, 32, 4, 3)): (96, 49152, 'fma'),
    ('f32', 'dx', (64, 64, 16, 4, 4)): (128, 24576, 'fma'),
    ('f32', 'dx', (64, 64, 32, 4, 3)): (128, 57344, 'fma'),
    ('f32', 'dz', (64, 32, 32, 4, 3)): (112, 24576, 'fma'),
    ('f32', 'dz', (64, 64, 32, 4, 3)): (162, 32768, 'fma'),
    ('f32', 'fwd', (64, 32, 32, 4, 3)): (96, 24576, 'fma'),
    ('f32', 'fwd', (64, 64, 32, 4, 3)): (164, 32768, 'fma'),
    ('f64', 'dw', (32, 32, 32, 2, 3)): (124, 49664, 'mma'),
    ('f64', 'dw', (64, 64, 32, 4, 3)): (168, 100352, 'mma'),
    ('f64', 'dx', (64, 32, 32, 4, 3)): (80, 81920, 'mma'),
    ('f64', 'dx', (64, 64, 16, 4, 4)): (128, 49152, 'mma'),
    ('f64', 'dx', (64, 64, 32, 4, 3)): (128, 98304, 'mma'),
    ('f64', 'dz', (64, 32, 32, 4, 3)): (108, 49152, 'mma'),
    ('f64', 'dz', (64, 64, 32, 4, 3)): (204, 65536, 'mma'),
    ('f64', 'fwd', (64, 32, 32, 4, 3)): (80, 49152, 'mma'),
    ('f64', 'fwd', (64, 64, 32, 4, 3)): (128, 65536, 'mma'),
}
# What tl.dot runs on, by dtype: fp32 with input_precision="ieee" (the default: TF32 off, as torch)
# and fp64 take the "fma" tiles, 16-bit inputs the "hopper" ones; the PEAK its rate is a share of.
TRITON_FAMILY = {"f32": "fma", "f64": "fma", "f16": "hopper", "bf16": "hopper"}
TRITON_PEAK = {"f32": PEAK["f32"], "f64": PEAK["f64_tc"], "f16": PEAK["f16"], "bf16": PEAK["bf16"]}
# Achievable share of that peak (RESULTS.md argues each):
# * f32, FMA: per 32-deep k step a thread issues 1024 FMAs for 1664 B of ld.shared (64x64x32 tile;
#   512 for 1088 B at 64x32x32): ~0.6 FMA per shared byte, the class of the CUDA kernels' 64x64x16
#   tile (16 FMAs per 32 B, 55 %); compiler-scheduled, without its register double buffering: 45 %.
# * f64, DMMA through mma.sync: 128 m8n8k4 per k step per warp (65.5 kFLOP) against 32 KB of
#   fragment loads (ld.shared, no ldmatrix for f64): 2 FLOP per shared byte, i.e. shared memory as
#   busy as the tensor cores at their peak, so at most half of it: 45 % (cuBLAS's DGEMM: 80 %).
# * 16-bit, wgmma: the shared-memory bound of the tile (``triton_wgmma_eff``) times 60 % for a
#   pipeline without warp specialisation (the math warps issue the cp.async copies and wait on them).
TRITON_EFF = {"f32": 0.45, "f64": 0.45}
WGMMA_OVERLAP = 0.60
# Host time per call, which the GPU work hides only when it is longer (measured on the shared
# 2-core Intel Xeon development machine at nice 19, and Triton's own JIT dispatch as its maintainers measure it):
# a torch.library.custom_op call 11 µs; an autotuned launch 25 µs (tune_key 7.5, the heuristics'
# constexprs 3, JITFunction.run 12 (meta-pytorch/tritonbench#1002: ~11 µs; facebookexperimental/
# triton#1231: ~12.5 µs for 19 arguments), output allocation and the wrapper 2.5); a plain launch
# (_sum_splits_kernel) 12 µs.
# The CUDA backend's _C bindings and eager's aten calls cost a few µs each and are not modelled.
TRITON_CPU_OP, TRITON_CPU_TUNED, TRITON_CPU_PLAIN = 11e-6, 25e-6, 12e-6
TRITON_VARIANT = {"fwd": "sigmoid", "dz": "sigmoid", "dx": "sigmoid:output", "dw": "sigmoid:output",
                  "narrow": "sigmoid:output"}  # the heavier of the grid's two activations


def _triton():
    from fused_backprop.triton import kernels, ops

    return kernels, ops


def _on_h100():
    """torch.cuda.get_device_properties answering as an H100 does (ops.py's split rules ask it)."""
    from types import SimpleNamespace
    from unittest import mock

    return mock.patch("torch.cuda.get_device_properties", lambda device: SimpleNamespace(multi_processor_count=SMS))


def triton_plan(d, m, k, n, recompute=False):
    """[(role, tile, splits, variant)] of one pass ("fwd"; the backward from the saved output, or
    with ``recompute``) as ops.py launches it on an H100; splits > 1 adds _sum_splits_kernel launches."""
    import torch

    kernels, ops = _triton()
    e = SIZE[d]
    dtype = getattr(torch, TORCH_DTYPE[d])
    shape = dict(M=m, N=n, K=k)
    narrow = max(16, kernels._next_pow2(n)) <= ops.NARROW_MAX and max(16, kernels._next_pow2(k)) <= ops.NARROW_MAX
    act = kernels.ACTIVATION_CODES[TRITON_VARIANT["fwd"]]
    mode = (kernels.MODE_RECOMPUTE if recompute else kernels.MODE_OUTPUT).value
    if narrow and ops.narrow_on_gpu(kernels.NARROW_CAPABILITY, dtype, act, mode, n % 8 == 0):
        with _on_h100():
            s = ops._splits_narrow(m, n, k, e, torch.device("cuda"))
        rows = cdiv(cdiv(m, s), kernels.NARROW_MAX_BLOCK_M) * kernels.NARROW_MAX_BLOCK_M  # as _narrow_backward
        variant = kernels.spill_variant("narrow", dict(ACT=act, MODE=mode))
        tile = next(t for t in kernels.NARROW_TILES if kernels.spill_free("narrow", "hopper", t, variant))
        return [("narrow", tile, cdiv(m, rows), variant)]
    plan = []
    for role in (("dz", "dx", "dw") if recompute else ("dx", "dw")):
        s = 1
        if role != "dz":
            with _on_h100():
                s = ops._num_splits(role, m, n, k, e, torch.device("cuda"))
            length = ops._split_length(shape[kernels.DIMS[role][2]], s, False)
            s = cdiv(shape[kernels.DIMS[role][2]], length)
        variant = "dz" if recompute and role != "dz" else TRITON_VARIANT[role]
        plan.append((role, triton_tile(d, role, m, k, n, variant, s), s, variant))
    return plan


def triton_forward_plan(d, m, k, n):
    return [("fwd", triton_tile(d, "fwd", m, k, n, TRITON_VARIANT["fwd"]), 1, TRITON_VARIANT["fwd"])]


def triton_tile(d, role, m, k, n, variant, splits=1):
    kernels, _ = _triton()
    shape = dict(M=kernels.m_bucket(m), N=n, K=k)  # the autotuner's key and its pruning round M up
    return kernels.prune_tiles(role, TRITON_FAMILY[d], shape, SIZE[d], variant, SMS, 227 * 1024, splits)[0]


def triton_facts(d, role, tile):
    key = ("bf16" if d == "f16" else d, role, tuple(tile))
    if key not in TRITON_FACTS:
        raise KeyError(f"no sm_90a compile facts for the Triton launch {key}: run "
                       "python benchmarks/cuda_predict.py --triton-compile and paste its TRITON_FACTS")
    return TRITON_FACTS[key]


def triton_wgmma_eff(tile, form, streams):
    """Share of the 16-bit peak a wgmma tile (a, b, red) reaches: per k step the block writes its
    operand tiles to shared memory (cp.async: ``streams`` a x red tiles, dY and y for a dZ operand,
    and red x b), wgmma reads B once per m64 row block and A from shared memory ("ss") or ldmatrix
    loads the dZ sources into registers ("rs"), at 128 B per clock per SM; times WGMMA_OVERLAP."""
    a, b, red = tile[:3]
    nbytes = 2 * ((streams * a + b) * red + (streams if form == "rs" else 1) * a * red + (a // 64) * red * b)
    return _smem_share(2.0 * a * b * red, nbytes)


def _smem_share(flops, smem_bytes):
    """WGMMA_OVERLAP of the share of the 16-bit peak that moving ``smem_bytes`` through shared
    memory per ``flops`` allows."""
    return WGMMA_OVERLAP * min(1.0, flops / smem_bytes * SMEM_BW / PEAK["f16"])


def triton_launch(d, m, k, n, role, tile, splits, variant):
    """(predicted GPU time, programs, design rate) of one launch of the plan (the model of
    ``gemm_time`` with the Triton tile)."""
    kernels, _ = _triton()
    e, acc = SIZE[d], ACC[d]
    regs, smem, form = triton_facts(d, role, tile)
    warps = tile[-2]
    reads_dz = variant == "dz"
    if role == "narrow":
        # one program per SM loops over its rows; per row block of bm it stages dY and y (dY alone
        # with recompute), x and W (re-read from L2 every block), forms dZ in registers ("rs") and runs
        # dX = dZ W and dW += dZ^T x (and z = x W^T first with recompute)
        bm, streams = tile[0], (1 if variant.endswith(":recompute") else 2)
        np2, kp2 = max(16, kernels._next_pow2(n)), max(16, kernels._next_pow2(k))
        progs, slots = splits, SMS
        gemms = 3 if streams == 1 else 2
        flops = 2.0 * cdiv(m, bm) * bm * np2 * kp2 * gemms
        dram = (streams * m * n + 2 * m * k + n * k) * e + splits * (n * k + n) * acc
        l2 = cdiv(m, bm) * ((streams * n + k) * bm + n * k) * e
        staged = (streams * bm * np2 + bm * kp2 + np2 * kp2) * 2
        smem_reads = (streams * bm * np2 + (bm // 64) * np2 * kp2 + (np2 // 64) * bm * kp2 * (gemms - 1)) * 2
        eff = _smem_share(2.0 * bm * np2 * kp2 * gemms, staged + smem_reads)
    else:
        shape = dict(M=m, N=n, K=k)
        rows, cols, red = (shape[x] for x in kernels.DIMS[role])
        a, b, r = tile[:3]
        streams = 2 if role in ("dx", "dw") and not reads_dz else 1
        progs = kernels.programs(role, shape, tile, splits)
        # programs an SM needs resident to run at the design rate: 8 warps' worth
        slots = SMS * min(blocks_per_sm(regs, smem, 32 * warps), max(1, 8 // warps))
        flops = 2.0 * cdiv(rows, a) * a * cdiv(cols, b) * b * red
        ins = {"fwd": m * k + n * k + n, "dz": m * k + n * k + n + m * n,
               "dx": streams * m * n + n * k, "dw": streams * m * n + m * k}[role]
        dram = ins * e + (splits * rows * cols * acc if splits > 1 else rows * cols * e)
        l2 = progs * cdiv(cdiv(red, splits), r) * (streams * a + b) * r * e
        eff = triton_wgmma_eff(tile, form, streams) if form in ("ss", "rs") else TRITON_EFF[d]
    wave_eff = progs / (cdiv(progs, slots) * slots)
    t = max(flops / (eff * TRITON_PEAK[d]), dram / DRAM_BW, l2 / L2_BW) / wave_eff + T_LAUNCH
    if splits > 1:  # _sum_splits_kernel: dX's partials, or dW's and db's (two launches)
        t += (reduce_time(d, splits, rows * cols) if role == "dx" else
              reduce_time(d, splits, n * k) + reduce_time(d, splits, n))
    return t, progs, eff * TRITON_PEAK[d]


def triton_plans(d, m, k, n):
    """Every launch of the forward, the backward and the recompute backward."""
    return triton_forward_plan(d, m, k, n) + triton_plan(d, m, k, n) + triton_plan(d, m, k, n, recompute=True)


def triton_pass(d, m, k, n, recompute=None):
    """Predicted time of a Triton pass: forward (``recompute`` None) or backward: the GPU time of
    its launches, or the host time of its calls where that is longer."""
    plan = triton_plan(d, m, k, n, recompute) if recompute is not None else triton_forward_plan(d, m, k, n)
    gpu = sum(triton_launch(d, m, k, n, *step)[0] for step in plan)
    sums = sum((1 if role == "dx" else 2) for role, _, s, _ in plan if s > 1)
    host = TRITON_CPU_OP + len(plan) * TRITON_CPU_TUNED + sums * TRITON_CPU_PLAIN
    return max(gpu, host)


def triton_predict(d, m, k, n):
    """{fwd, bwd, bwd_rc} of the Triton backend, None where it does not run ``d``."""
    from fused_backprop.triton import ops

    import torch

    if getattr(torch, TORCH_DTYPE[d]) not in ops._DTYPES:
        return None
    return dict(fwd=triton_pass(d, m, k, n), bwd=triton_pass(d, m, k, n, False),
                bwd_rc=triton_pass(d, m, k, n, True))



# Runs after tests/test_triton.py's AOT_HELPERS (jobs: [dtype, role, tile, variant, (M, N, K)]).
_COMPILE_DRIVER = r"""
for dt, role, tile, variant, shape in json.loads(sys.argv[1]):
    ce = next(c for c in K.launch_variants(role) if K.spill_variant(role, c) == variant)
    consts = {**FIXED[role], **ce, "ACC_DTYPE": tl.float64 if dt == "f64" else tl.float32,
              "INPUT_PRECISION": "tf32" if dt == "bf16" else "ieee"}
    if role == "narrow":
        consts.update(BLOCK_N=max(16, K._next_pow2(shape[1])), BLOCK_K=max(16, K._next_pow2(shape[2])))
    family = "hopper" if dt == "bf16" else "fma"
    cfg = next(c for c in KERNEL[role].configs if K.config_tile(role, c) == tuple(tile)
               and (role == "narrow" or K._FAMILY[id(c)] == family))
    ptrs = {n: "fp64" if dt == "f64" and t == "fp32" else t
            for n, t in ptrs_of(role, {"f32": "fp32", "f64": "fp64"}.get(dt, dt), False).items()}
    print(json.dumps(dict(compile_report(KERNEL[role], ptrs, consts, cfg, 90, tuple(shape)), key=[dt, role, tile])))
"""


def triton_compile():
    """Compiles every Triton launch of the grid's plans for sm_90a (Triton's compiler and ptxas, no
    GPU) and returns TRITON_FACTS as found, checking that none spills."""
    import ast
    import json
    import os
    import subprocess

    src = (ROOT / "tests" / "test_triton.py").read_text()
    helpers = next(node.value.value for node in ast.parse(src).body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "AOT_HELPERS")
    jobs = {}
    for d in ("f32", "bf16", "f64"):
        for m, k, n in SHAPES:
            for role, tile, _, variant in triton_plans(d, m, k, n):
                jobs.setdefault((d, role, tuple(tile)), [d, role, list(tile), variant, (m, n, k)])
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", helpers + _COMPILE_DRIVER, json.dumps(list(jobs.values()))],
                         capture_output=True, text=True, env=env, check=True).stdout
    facts = {}
    for line in out.splitlines():
        r = json.loads(line)
        assert r["spill"] == 0, r
        ops = r["ops"]
        form = "rs" if ops["wgmma_rs"] else "ss" if ops["wgmma_ss"] else "mma" if ops["mma_sync"] else "fma"
        d, role, tile = r["key"]
        facts[(d, role, tuple(tile))] = (r["regs"], r["shared"], form)
    return facts


def auto_times(d, m, k, n, p, t, available=None):
    """Predicted (forward time, backward time, forward backend, backward backend) of backend="auto"
    (fused_backprop/backends/auto_rule.py) when the backends in ``available`` (default: all) are:
    each pass the time of the backend the rule picks, eager's for the torch backend."""
    import torch

    from fused_backprop.backends import auto_rule

    dtype = getattr(torch, TORCH_DTYPE[d])
    times = {"cuda": (p["fwd"], p["bwd"]), "torch": (p["e_fwd"], p["e_bwd"]), "triton": t and (t["fwd"], t["bwd"])}
    names = [auto_rule.choose(pass_, dtype, k, n, m, available or auto_rule.BACKENDS) for pass_ in auto_rule.PASSES]
    return times[names[0]][0], times[names[1]][1], *names


def gemm_resources(rep=None):
    """{design: (kernel family, registers, shared memory, blocks per SM)} from the resource report
    (None: the last recorded one)."""
    res = {}
    for d in ("f32", "f32n", "f64", "f16", "bf16"):
        fam = "gemm_wmma_kernel" if d in ("f16", "bf16") else "gemm_fma_kernel"
        regs, smem = rep[(d, fam)] if rep else ({"f32": 141, "f32n": 79, "f64": 124}.get(d, 168),
                                                 {"f32": 8448, "f32n": 8704, "f64": 8448}.get(d, 30720))
        bps = blocks_per_sm(regs, smem, TILE[d][3])
        res[d] = (fam, regs, smem, max(bps, 2) if d in ("f64", "f32n") else bps)  # __launch_bounds__(256, 2)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--recorded", action="store_true", help="the last recorded CUDA resource report (no nvcc run)")
    ap.add_argument("--triton-compile", action="store_true",
                    help="compile the Triton launches for sm_90a and print TRITON_FACTS as found")
    a = ap.parse_args()
    if a.triton_compile:
        found = triton_compile()
        print("TRITON_FACTS = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in sorted(found.items())) + "}")
        if found != TRITON_FACTS:
            print("(differs from the TRITON_FACTS in this file: paste the table above)")
        TRITON_FACTS.update(found)
    res = gemm_resources(None if a.recorded else resource_report())
    occ = {d: r[3] for d, r in res.items()}
    us = lambda t: f"{t * 1e6:.1f}"  # noqa: E731
    lines = ["| dtype | GEMM kernel | tile BMxBNxBK, threads | regs (max, sm_90) | smem B | blocks/SM | warps/SM |",
             "|---|---|---|---|---|---|---|"]
    for d, (fam, regs, smem, bps) in res.items():
        bm, bn, bk, nt = TILE[d]
        lines.append(f"| {'f32 (<= 64 wide)' if d == 'f32n' else d} | {fam} | {bm}x{bn}x{bk}, {nt} | {regs} | {smem} | {bps} | {bps * nt // 32} |")
    lines += ["", "Triton launches (float16 as bfloat16); tile: (a, b, reduction step, warps, stages), or "
              "(BLOCK_M, warps, stages) for the narrow kernel",
              "", "| dtype | M x K x N | kernel | tile | splits | programs | regs, smem B (sm_90a) | tl.dot | rate TFLOP/s | GPU us |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for d in ("f32", "bf16", "f64"):
        for m, k, n in SHAPES:
            for role, tile, splits, variant in triton_plans(d, m, k, n):
                t, progs, rate = triton_launch(d, m, k, n, role, tile, splits, variant)
                regs, smem, form = triton_facts(d, role, tile)
                lines.append(f"| {d} | {m}x{k}x{n} | {role} ({variant}) | {tile} | {splits} | {progs} | {regs}, {smem} | "
                             f"{form} | {rate / 1e12:.0f} | {us(t)} |")
    lines += ["", "| dtype | M x K x N | GFLOP/GEMM | fwd us (cuBLAS eager) | bwd us: dX + dW + db (split-K fwd/dX/dW) | "
              "bwd total (eager) | bwd recompute | fwd TFLOP/s | triton fwd / bwd / bwd recompute us | auto fwd / bwd us |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for d in ("f32", "f16", "bf16", "f64"):
        for m, k, n in SHAPES:
            p = predict(d, m, k, n, occ)
            t = triton_predict(d, m, k, n)
            fwd, bwd, fwd_by, bwd_by = auto_times(d, m, k, n, p, t)
            tri = f"{us(t['fwd'])} / {us(t['bwd'])} / {us(t['bwd_rc'])}" if t else "-"
            lines.append(
                f"| {d} | {m}x{k}x{n} | {p['flops'] / 1e9:.2f} | {us(p['fwd'])} ({us(p['e_fwd'])}) | "
                f"{us(p['dx'])} + {us(p['dw'])} + {us(p['db'])} ({p['sf']}/{p['sx']}/{p['sw']}) | {us(p['bwd'])} ({us(p['e_bwd'])}) | "
                f"{us(p['bwd_rc'])} | {p['flops'] / p['fwd'] / 1e12:.1f} | {tri} | {us(fwd)} {fwd_by} / {us(bwd)} {bwd_by} |")
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text)

if __name__ == "__main__":
    main()
