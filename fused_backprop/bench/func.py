"""``python -m fused_backprop.bench.func``: second-order and forward-mode costs of one fused layer.

    python -m fused_backprop.bench.func                       # 65536x64x64, relu and sigmoid, float32
    python -m fused_backprop.bench.func --quick               # a smaller shape, short timings
    python -m fused_backprop.bench.func --shapes 8192x256x256 --activations gelu,silu --threads 1

For ``y = act(x Wᵀ + b)`` and the loss ``L(W, b) = ½‖y‖²`` at a fixed x, three measurements,
each for the fused layer (``fb.linear_act``, backend "auto") and for ``F.linear`` + torch's own
activation in eager mode, on the same tensors:

* ``hvp-func``: the Hessian-vector product ``H·(V, v)`` of L as ``torch.func.jvp`` over
  ``torch.func.grad`` (forward-over-reverse);
* ``hvp-double``: the same product by double backward (``torch.autograd.grad`` with
  ``create_graph=True``, then the gradient of ⟨∇L, (V, v)⟩);
* ``jvp``: ``torch.func.jvp`` of the layer in (x, W, b) with tangents for all three.

Each statement is first checked against eager's result (normalized error, see
``cases.normalized_error``; a mismatch is reported as WRONG and not timed), then timed by
``timing.measure_interleaved``: ``--repeat`` samples round-robin, each at least
``--min-sample-ms`` long. The table shows medians, quartiles and fused/eager (time ÷ time: below
1 the fused layer is faster; the issue's target is 0.8); ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_backprop as fb

from . import cases, cli, timing

MODES = ("hvp-func", "hvp-double", "jvp")
SHAPES = [(65536, 64, 64)]
QUICK_SHAPES = [(4096, 64, 64)]
ACTIVATIONS = ("relu", "sigmoid")
FULL = dict(repeat=11, warmup=2, min_sample_ms=50.0)
QUICK = dict(repeat=5, warmup=1, min_sample_ms=5.0)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
TARGET = 0.8


def layers(activation: str):
    """{provider: f(x, w, b)}: the fused layer and eager F.linear + torch's activation."""
    slope = fb.activations.DEFAULT_NEGATIVE_SLOPE
    act = fb.activations.ACTIVATIONS[activation].forward
    return {"fused": lambda x, w, b: fb.linear_act(x, w, b, activation),
            "eager": lambda x, w, b: act(F.linear(x, w, b), slope)}


def statements(layer, x, w, b, tangents):
    """{mode: zero-argument callable returning its result} for one layer."""
    xt, wt, bt = tangents

    def loss(w, b):
        y = layer(x, w, b)
        return 0.5 * (y * y).sum()

    def hvp_func():
        return torch.func.jvp(torch.func.grad(loss, argnums=(0, 1)), (w, b), (wt, bt))[1]

    def hvp_double():
        wr, br = w.detach().requires_grad_(), b.detach().requires_grad_()
        grads = torch.autograd.grad(loss(wr, br), (wr, br), create_graph=True)
        return torch.autograd.grad(grads, (wr, br), (wt, bt))

    def jvp():
        return torch.func.jvp(layer, (x, w, b), (xt, wt, bt))[1]

    return {"hvp-func": hvp_func, "hvp-double": hvp_double, "jvp": jvp}


def check(got, want) -> float:
    """The worst normalized error of ``got`` against ``want`` (tensors or tuples of them)."""
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    return max(cases.normalized_error(g, e.detach().to(torch.float64)) for g, e in zip(got, want))


def run_case(shape, activation, dtype, args) -> list:
    m, k, n = shape
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    tangents = tuple(torch.randn(t.shape, generator=gen).to(dtype) for t in (x, w, b))
    stmts = {p: statements(layer, x, w, b, tangents) for p, layer in layers(activation).items()}
    rows = []
    for mode in args.modes:
        want = stmts["eager"][mode]()
        err = check(stmts["fused"][mode](), want)
        row = dict(mode=mode, activation=activation, M=m, K=k, N=n, dtype=cases.dtype_name(dtype), check_err=err,
                   status="ok" if err <= TOL[dtype] else "wrong")
        timed = {"eager": stmts["eager"][mode]}
        if row["status"] == "ok":
            timed["fused"] = stmts["fused"][mode]
        found = timing.measure_interleaved(timed, timing.clock_for("cpu"), warmup=args.warmup, repeat=args.repeat,
                                           min_sample_s=args.min_sample_ms / 1e3)
        for provider, meas in found.items():
            row.update({f"{provider}_ms": meas.median * 1e3, f"{provider}_q25_ms": meas.q25 * 1e3,
                        f"{provider}_q75_ms": meas.q75 * 1e3})
        row["fused_vs_eager"] = row["fused_ms"] / row["eager_ms"] if "fused_ms" in row else None
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (f"{'mode':<11} {'activation':<10} {'M x K x N':<16} {'fused ms':>10} {'(q25-q75)':>17} "
          f"{'eager ms':>10} {'(q25-q75)':>17} {'fused/eager':>12}  check")


def format_row(r) -> str:
    def timed(p):
        if f"{p}_ms" not in r:
            return f"{'-':>10} {'':>17}"
        quartiles = f"({r[f'{p}_q25_ms']:.3f}-{r[f'{p}_q75_ms']:.3f})"
        return f"{r[f'{p}_ms']:>10.3f} {quartiles:>17}"

    ratio = f"{r['fused_vs_eager']:>12.3f}" if r["fused_vs_eager"] is not None else f"{'-':>12}"
    shape = f"{r['M']}x{r['K']}x{r['N']}"
    return (f"{r['mode']:<11} {r['activation']:<10} {shape:<16} {timed('fused')} {timed('eager')} {ratio}  "
            f"{r['status'].upper()} ({r['check_err']:.1e})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fused_backprop.bench.func",
                                description="Hessian-vector products and jvp of the fused layer against eager "
                                            "F.linear + activation (CPU).")
    p.add_argument("--quick", action="store_true", help=f"shape {QUICK_SHAPES[0]} and short timings")
    p.add_argument("--shapes", type=cli.parse_shapes, help="M x K x N list (default 65536x64x64)")
    p.add_argument("--activations", type=cli._list_arg(fb.ACTIVATIONS, what="activation"), default=list(ACTIVATIONS),
                   help=f"any of {', '.join(fb.ACTIVATIONS)} (default {','.join(ACTIVATIONS)})")
    p.add_argument("--modes", type=cli._list_arg(MODES, what="mode"), default=list(MODES),
                   help=f"{', '.join(MODES)} (default all)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeat", type=cli._positive(int), help=f"timed samples (default {FULL['repeat']})")
    p.add_argument("--warmup", type=cli._nonnegative_int, help=f"untimed calls first (default {FULL['warmup']})")
    p.add_argument("--min-sample-ms", type=cli._positive(float),
                   help=f"each sample repeats the call until it lasts this long (default {FULL['min_sample_ms']:g})")
    p.add_argument("--threads", type=cli._positive(int), help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the rows and the machine to this JSON file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = cases.DTYPES[args.dtype]
    machine = cli.device_name("cpu")
    print(f"fused_backprop {fb.__version__} bench.func · torch {torch.__version__} · {machine}")
    print(f"medians of {args.repeat} samples (each >= {args.min_sample_ms:g} ms); fused/eager = time / time, "
          f"target <= {TARGET}")
    print(HEADER)
    rows = [row for shape in args.shapes for activation in args.activations
            for row in run_case(shape, activation, dtype, args)]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 1 if any(r["status"] == "wrong" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
