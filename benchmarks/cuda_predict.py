"""Predicted H100 (SXM5) time of each CUDA kernel from its tile shape and its ptxas resource report,
beside the predicted time of the eager cuBLAS-based baseline; writes a markdown table.

Model (a roofline with the kernel's structure folded into an achievable rate):
  time = max(FLOPs_padded / P_kernel, bytes_DRAM / BW, bytes_L2 / BW_L2) / wave_efficiency + t_launch
* FLOPs_padded counts whole tiles (a 64-wide output in a 128-wide tile costs the full tile);
* bytes_DRAM: every operand read once and every result written once (L2 catches the reuse);
* bytes_L2: the operand tiles every block streams through shared memory, (BM+BN)*BK per k step;
* occupancy (blocks per SM) from registers, static shared memory and threads of the report;
  wave_efficiency = blocks / (waves * 132 * saturating blocks per SM);
* P_kernel: the achievable arithmetic rate of each kernel design (argued in RESULTS.md, "CUDA backend");
  the pipelined WMMA kernel's from its shared-memory traffic per k step (wmma_eff).

    python benchmarks/cuda_predict.py [--out benchmarks/cuda_predictions_table.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# H100 SXM5 (spec sheet, dense): 132 SMs, 1.98 GHz boost
SMS = 132
PEAK = {"f32": 67e12, "f32n": 67e12, "f64": 34e12, "f16": 989e12, "bf16": 989e12}  # FMA pipes (f32/f64), tensor cores (16-bit)
DRAM_BW = 3.35e12 * 0.80   # achievable HBM3
L2_BW = 5.5e12             # measured-class L2 bandwidth
SMEM_BW = 128 * 1.98e9 * SMS  # shared memory: 128 B per clock per SM
T_LAUNCH = 2.5e-6          # launch + ramp/tail of one kernel in a back-to-back stream
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, MAX_BLOCKS = 65536, 228 * 1024, 2048, 32
SIZE = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2}
ACC = {"f32": 4, "f64": 8, "f16": 4, "bf16": 4}
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
CUBLAS = {"f32": 0.75 * 67e12, "f64": 0.80 * 67e12, "f16": 0.65 * 989e12, "bf16": 0.65 * 989e12}
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
    t += (s * rows * cols * ACC[d] + rows * cols * e) / DRAM_BW + T_LAUNCH  # reduce kernel
    return t, s


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


TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64"}


def auto_times(d, k, n, p):
    """Predicted (forward, backward) time of backend="auto" (fused_backprop/backends/auto_rule.py):
    the CUDA kernels' where the rule picks them, eager's (the torch backend) elsewhere."""
    import torch

    from fused_backprop.backends import auto_rule

    dtype = getattr(torch, TORCH_DTYPE[d])
    fwd = p["fwd"] if auto_rule.choose("forward", dtype, k, n) == "cuda" else p["e_fwd"]
    bwd = p["bwd"] if auto_rule.choose("backward", dtype, k, n) == "cuda" else p["e_bwd"]
    return fwd, bwd


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
    a = ap.parse_args()
    res = gemm_resources(resource_report())
    occ = {d: r[3] for d, r in res.items()}
    lines = ["| dtype | GEMM kernel | tile BMxBNxBK, threads | regs (max, sm_90) | smem B | blocks/SM | warps/SM |",
             "|---|---|---|---|---|---|---|"]
    for d, (fam, regs, smem, bps) in res.items():
        bm, bn, bk, nt = TILE[d]
        lines.append(f"| {'f32 (<= 64 wide)' if d == 'f32n' else d} | {fam} | {bm}x{bn}x{bk}, {nt} | {regs} | {smem} | {bps} | {bps * nt // 32} |")
    lines.append("")
    lines.append("| dtype | M x K x N | GFLOP/GEMM | fwd us (cuBLAS eager) | bwd us: dX + dW + db (split-K fwd/dX/dW) | bwd total (eager) | bwd recompute | fwd TFLOP/s | auto fwd / bwd us |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for d in ("f32", "f16", "bf16", "f64"):
        for m, k, n in SHAPES:
            p = predict(d, m, k, n, occ)
            fwd, bwd = auto_times(d, k, n, p)
            us = lambda t: f"{t * 1e6:.1f}"  # noqa: E731
            lines.append(
                f"| {d} | {m}x{k}x{n} | {p['flops'] / 1e9:.2f} | {us(p['fwd'])} ({us(p['e_fwd'])}) | "
                f"{us(p['dx'])} + {us(p['dw'])} + {us(p['db'])} ({p['sf']}/{p['sx']}/{p['sw']}) | {us(p['bwd'])} ({us(p['e_bwd'])}) | "
                f"{us(p['bwd_rc'])} | {p['flops'] / p['fwd'] / 1e12:.1f} | {us(fwd)} / {us(bwd)} |")
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
