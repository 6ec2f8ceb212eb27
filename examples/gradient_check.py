"""Gradient checking of the fused layers with ``fb.reference.gradient_check``.

For every backend that runs on the CPU here, both activations, with and without ``recompute``: the
fused layer's analytic gradients (its backward kernel, through autograd) of a scalar loss
``L = Σ y ⊙ c`` (c fixed and random, so every output matters) are compared with central differences
of the same layer's forward, in float64, for x, W and b. A right gradient gives a relative error
between 1e-11 and 1e-7 (the finite differences' own rounding); anything above ``--threshold``
(1e-5) fails.

Last, a deliberately wrong backward — sigmoid' taken as y instead of y (1 - y) — shows what a bug
looks like to the same check (error of order 1).

    python examples/gradient_check.py            # every CPU backend, both activations, recompute on/off
    python examples/gradient_check.py --quick    # the default backend only

Writes ``gradient_check.json`` to ``--out``; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import fused_backprop as fb
from fused_backprop.bench.report import save_example

DEFAULT_OUT = Path("results") / "examples"


def layer_inputs(m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((n, k)) / np.sqrt(k)
    b = rng.standard_normal(n)
    c = rng.standard_normal((m, n))  # the loss weights
    return x, w, b, c


def check_layer(backend: str, activation: str, recompute: bool, x, w, b, c, eps: float) -> dict:
    """Relative errors of (dx, dW, db) from the fused backward against central differences."""
    c_t = torch.from_numpy(c)

    def loss(x_, w_, b_):
        y = fb.linear_act(x_, w_, b_, activation, recompute=recompute, backend=backend)
        return (y * c_t).sum()

    params = [torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b)]
    analytic = torch.autograd.grad(loss(*params), params)
    errors = {}
    for i, name in enumerate(("x", "W", "b")):
        arrays = [x.copy(), w.copy(), b.copy()]

        def f(a, i=i, arrays=arrays):  # the loss as a function of argument i alone (numpy in, float out)
            args = [torch.from_numpy(v) for v in arrays]
            args[i] = torch.from_numpy(a)
            with torch.no_grad():
                return loss(*args).item()

        errors[name] = fb.reference.gradient_check(f, arrays[i], analytic[i].numpy(), eps=eps)
    return errors


def buggy_sigmoid_error(x, w, b, c, eps: float) -> float:
    """dW of a sigmoid layer whose backward forgot the (1 - y) factor, checked the same way."""
    y = fb.reference.forward(x, w, b, "sigmoid")
    dz = c * y  # wrong: should be c * y * (1 - y)
    wrong_dw = dz.T @ x

    def f(w_):
        return float((fb.reference.forward(x, w_, b, "sigmoid") * c).sum())

    return fb.reference.gradient_check(f, w.copy(), wrong_dw, eps=eps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the default (auto) backend")
    p.add_argument("--backends", help="comma-separated (default: every backend that runs on the CPU here)")
    p.add_argument("--shape", default="6x5x4", help="M x K x N of the layer (default 6x5x4)")
    p.add_argument("--eps", type=float, default=1e-6, help="finite-difference step (default 1e-6)")
    p.add_argument("--threshold", type=float, default=1e-5, help="largest relative error that passes (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    m, k, n = (int(v) for v in args.shape.lower().split("x"))
    if args.backends:
        names = [v.strip() for v in args.backends.split(",") if v.strip()]
    elif args.quick:
        names = ["auto"]
    else:
        names = fb.available_backends("cpu")
    x, w, b, c = layer_inputs(m, k, n, args.seed)

    print(f"fused layer {m}x{k} -> {n}, float64, L = sum(y * c); relative error of the analytic gradient vs "
          f"central differences (eps {args.eps:g}); pass <= {args.threshold:g}")
    print(f"{'backend':<8} {'activation':<10} {'recompute':<9} {'dx':>9} {'dW':>9} {'db':>9}  result")
    results, failed = [], False
    for backend in names:
        for activation in ("relu", "sigmoid"):
            for recompute in (False, True):
                errors = check_layer(backend, activation, recompute, x, w, b, c, args.eps)
                ok = max(errors.values()) <= args.threshold
                failed |= not ok
                results.append(dict(backend=backend, activation=activation, recompute=recompute, errors=errors, ok=ok))
                print(f"{backend:<8} {activation:<10} {str(recompute):<9} "
                      + " ".join(f"{errors[v]:>9.1e}" for v in ("x", "W", "b")) + f"  {'ok' if ok else 'FAIL'}")
    bug = buggy_sigmoid_error(x, w, b, c, args.eps)
    print(f"\nand a deliberately wrong sigmoid backward (y instead of y(1-y)): dW error {bug:.2f} — "
          f"{'caught' if bug > args.threshold else 'NOT caught'}")
    save_example(args.out, "gradient_check", dict(shape=[m, k, n], eps=args.eps, threshold=args.threshold,
                                                  results=results, buggy_sigmoid_dw_error=bug))
    if failed:
        print("some gradient checks FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
