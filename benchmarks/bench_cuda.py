"""GPU benchmark of the CUDA backend's kernels against eager PyTorch (cuBLAS GEMM + separate
activation / autograd kernels), per dtype and shape:

* ``fwd``: ``torch.ops.fused_backprop.linear_act_fwd`` vs ``act(F.linear(x, W, b))``;
* ``bwd``: ``linear_act_bwd`` from the saved output (dx, dw, db) vs eager autograd's backward of
  the same graph (``torch.autograd.grad``);
* ``bwd_recompute``: ``linear_act_bwd`` with ``out=None``;
* ``fwd+bwd``: ``fused_backprop.linear_act(..., backend="cuda")`` forward + ``backward`` vs eager.

Medians of ``torch.utils.benchmark`` (which synchronises the device). Needs a GPU and the
extension built with CUDA (``scripts/gpu_check.sh`` does both).

    python benchmarks/bench_cuda.py [--quick] [--dtypes float32,float16] [--shapes 8192x1024x1024] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fused_backprop as fb
from fused_backprop.bench.report import write_csv

SHAPES = [(65536, 64, 64), (16384, 256, 256), (8192, 1024, 1024)]
QUICK_SHAPES = [(4096, 128, 128)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
ACTS = {"relu": torch.relu, "sigmoid": torch.sigmoid}
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "cuda_gpu.csv"


def median_us(fn, min_run_time):
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return t.median * 1e6


def flops(mode, m, k, n):
    gemm = 2.0 * m * n * k
    return {"fwd": gemm, "bwd": 2 * gemm, "bwd_recompute": 3 * gemm, "fwd+bwd": 3 * gemm}[mode]


def cases(dtype, act, m, k, n):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype) * k ** -0.5
    b = torch.randn(n, device=dev, dtype=dtype)
    g = torch.randn(m, n, device=dev, dtype=dtype)
    op_f, op_b = torch.ops.fused_backprop.linear_act_fwd, torch.ops.fused_backprop.linear_act_bwd
    y = op_f(x, w, b, act)
    actf = ACTS[act]
    xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, w, b))

    def eager_bwd():
        out = actf(F.linear(xg, wg, bg))
        return torch.autograd.grad(out, (xg, wg, bg), g)

    # eager_bwd includes its forward; subtract the eager forward's time for the "bwd" row
    def fused_train():
        out = fb.linear_act(xg, wg, bg, act, backend="cuda")
        out.backward(g)

    def eager_train():
        out = actf(F.linear(xg, wg, bg))
        out.backward(g)

    return {
        "fwd": {"cuda": lambda: op_f(x, w, b, act), "eager": lambda: actf(F.linear(x, w, b))},
        "bwd": {"cuda": lambda: op_b(g, x, w, b, y, act, [True, True, True]), "eager": eager_bwd},
        "bwd_recompute": {"cuda": lambda: op_b(g, x, w, b, None, act, [True, True, True])},
        "fwd+bwd": {"cuda": fused_train, "eager": eager_train},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtypes", default="float32,float16,bfloat16,float64")
    p.add_argument("--acts", default="relu,sigmoid")
    p.add_argument("--shapes", default=None, help="comma-separated MxKxN")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    p.add_argument("--min-run-time", type=float, default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU")
    shapes = ([tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes
              else QUICK_SHAPES if a.quick else SHAPES)
    mrt = a.min_run_time or (0.05 if a.quick else 0.5)
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'dtype':9} {'act':8} {'M x K x N':>18} {'mode':14} {'cuda us':>10} {'eager us':>10} {'eager/cuda':>10} {'cuda TFLOP/s':>12}")
    for dname in a.dtypes.split(","):
        dtype = DTYPES[dname]
        for act in a.acts.split(","):
            for m, k, n in shapes:
                cs = cases(dtype, act, m, k, n)
                eager_fwd = median_us(cs["fwd"]["eager"], mrt)
                for mode, provs in cs.items():
                    res = {name: median_us(fn, mrt) for name, fn in provs.items()}
                    if mode == "bwd" and "eager" in res:
                        res["eager"] = max(res["eager"] - eager_fwd, 1e-3)  # autograd.grad ran the forward too
                    cu, ea = res["cuda"], res.get("eager")
                    tf = flops(mode, m, k, n) / (cu * 1e-6) / 1e12
                    print(f"{dname:9} {act:8} {f'{m}x{k}x{n}':>18} {mode:14} {cu:10.1f} "
                          f"{(f'{ea:.1f}' if ea else '-'):>10} {(f'{ea / cu:.2f}' if ea else '-'):>10} {tf:12.2f}")
                    for name, us in res.items():
                        rows.append(dict(dtype=dname, activation=act, M=m, K=k, N=n, mode=mode, provider=name,
                                         median_us=round(us, 2),
                                         tflops=round(flops(mode, m, k, n) / (us * 1e-6) / 1e12, 3),
                                         device=torch.cuda.get_device_name()))
    write_csv(rows, a.csv, columns=rows[0])
    print(f"wrote {a.csv}")


if __name__ == "__main__":
    main()
