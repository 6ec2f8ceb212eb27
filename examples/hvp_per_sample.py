"""Hessian-vector products and per-sample gradients of a small fused MLP with torch.func.

The model is ``fb.FusedMLP([16, 64, 64, 1], "tanh", last_activation=False)`` (a regression MLP
whose fused layers run their forward, backward and second-order kernels), the loss the mean
squared error on a random batch. Two computations a plain ``nn.Module`` gets from torch.func, here
on the fused layers:

* the Hessian-vector product H·v of the loss in the parameters, as ``torch.func.jvp`` over
  ``torch.func.grad`` (forward-over-reverse), and again by double backward
  (``torch.autograd.grad(create_graph=True)``);
* per-sample gradients, ``torch.func.vmap(torch.func.grad(loss))`` over the batch.

Each is checked in float64 against central differences (of the gradient for H·v, of the loss for
one sample's gradient) and against the same model built from ``nn.Linear`` + ``torch.tanh``; then
timed in float32 on a larger batch next to that eager model (medians of a few samples, from
``fused_backprop.bench.timing``).

    python examples/hvp_per_sample.py            # under a minute on 2 cores
    python examples/hvp_per_sample.py --quick    # a few seconds

``main(argv)`` returns the results as a dict (and exits 1 from the command line if a check fails).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import fused_backprop as fb
from fused_backprop.bench import timing

SIZES = [16, 64, 64, 1]
THRESHOLD = 1e-6  # relative error that passes (float64; central differences are good to ~1e-9 here)


def eager_twin(mlp: fb.FusedMLP) -> nn.Sequential:
    """The same model from nn.Linear + torch.tanh, sharing no storage, equal parameters."""
    layers = []
    for layer in mlp.layers:
        linear = nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
        linear.load_state_dict(layer.state_dict())
        layers += [linear, nn.Tanh()] if isinstance(layer, fb.FusedLinearAct) else [linear]
    return nn.Sequential(*layers)


def make_loss(model):
    def loss(params, x, y):
        return (functional_call(model, params, (x,)) - y).square().mean()
    return loss


def hvp_func(loss, params, v, x, y):
    return jvp(lambda p: grad(loss)(p, x, y), (params,), (v,))[1]


def hvp_double(loss, params, v, x, y):
    leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
    grads = torch.autograd.grad(loss(leaves, x, y), list(leaves.values()), create_graph=True)
    return dict(zip(leaves, torch.autograd.grad(grads, list(leaves.values()), list(v.values()))))


def per_sample_grads(loss, params, x, y):
    return vmap(grad(loss), (None, 0, 0))(params, x[:, None], y[:, None])


def relative_error(got: dict, want: dict) -> float:
    num = max((got[k] - want[k]).abs().max().item() for k in want)
    return num / max(max(t.abs().max().item() for t in want.values()), 1e-300)


def shifted(params, v, eps):
    return {k: p + eps * v[k] for k, p in params.items()}


def checks(batch: int, seed: int) -> dict:
    """float64: H·v and one sample's gradient against central differences and nn.Linear."""
    torch.manual_seed(seed)
    mlp = fb.FusedMLP(SIZES, "tanh", last_activation=False, dtype=torch.float64)
    ref = eager_twin(mlp)
    x, y = torch.randn(batch, SIZES[0], dtype=torch.float64), torch.randn(batch, 1, dtype=torch.float64)
    params = {k: p.detach() for k, p in mlp.named_parameters()}
    ref_params = dict(zip(dict(ref.named_parameters()), params.values()))
    v = {k: torch.randn_like(p) for k, p in params.items()}
    loss, ref_loss = make_loss(mlp), make_loss(ref)

    hv = hvp_func(loss, params, v, x, y)
    eps = 1e-5
    plus, minus = grad(loss)(shifted(params, v, eps), x, y), grad(loss)(shifted(params, v, -eps), x, y)
    fd_hv = {k: (plus[k] - minus[k]) / (2 * eps) for k in params}
    ref_hv = dict(zip(params, hvp_func(ref_loss, ref_params, dict(zip(ref_params, v.values())), x, y).values()))

    per = per_sample_grads(loss, params, x, y)
    ref_per = dict(zip(params, per_sample_grads(ref_loss, ref_params, x, y).values()))
    # one sample's gradient in one direction, by central differences of its loss
    i, u = batch // 2, {k: torch.randn_like(p) for k, p in params.items()}
    sample = (lambda p: loss(p, x[i:i + 1], y[i:i + 1]))
    fd_dir = (sample(shifted(params, u, eps)) - sample(shifted(params, u, -eps))) / (2 * eps)
    dir_ = sum((per[k][i] * u[k]).sum() for k in params)
    return {
        "hvp_vs_finite_differences": relative_error(hv, fd_hv),
        "hvp_vs_eager": relative_error(hv, ref_hv),
        "hvp_double_backward_vs_func": relative_error(hvp_double(loss, params, v, x, y), hv),
        "per_sample_vs_eager": relative_error(per, ref_per),
        "per_sample_vs_finite_differences": abs(dir_.item() - fd_dir.item()) / max(abs(fd_dir.item()), 1e-300),
        "per_sample_sum_vs_batch_gradient": relative_error({k: per[k].mean(0) for k in params},
                                                           grad(loss)(params, x, y)),
    }


def timings(batch: int, seed: int, repeat: int, min_sample_ms: float) -> dict:
    """float32 medians (ms) of each computation, fused MLP and its nn.Linear twin."""
    torch.manual_seed(seed)
    mlp = fb.FusedMLP(SIZES, "tanh", last_activation=False)
    models = {"fused": mlp, "eager": eager_twin(mlp)}
    x, y = torch.randn(batch, SIZES[0]), torch.randn(batch, 1)
    stmts = {}
    for name, model in models.items():
        params = {k: p.detach() for k, p in model.named_parameters()}
        v = {k: torch.randn_like(p) for k, p in params.items()}
        loss = make_loss(model)
        stmts[f"hvp jvp(grad) {name}"] = lambda loss=loss, p=params, v=v: hvp_func(loss, p, v, x, y)
        stmts[f"hvp double backward {name}"] = lambda loss=loss, p=params, v=v: hvp_double(loss, p, v, x, y)
        stmts[f"per-sample grads {name}"] = lambda loss=loss, p=params: per_sample_grads(loss, p, x, y)
    found = timing.measure_interleaved(stmts, timing.clock_for("cpu"), warmup=1, repeat=repeat,
                                       min_sample_s=min_sample_ms / 1e3)
    return {name: meas.median * 1e3 for name, meas in found.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small batches, short timings")
    p.add_argument("--batch", type=int, help="rows of the timed batch (default 4096, --quick 256)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    batch = args.batch or (256 if args.quick else 4096)
    errors = checks(8 if args.quick else 32, args.seed)
    print(f"FusedMLP({SIZES}, tanh): float64 checks (relative error, pass <= {THRESHOLD:g})")
    for name, err in errors.items():
        print(f"  {name:<36} {err:.1e}  {'ok' if err <= THRESHOLD else 'FAIL'}")
    ms = timings(batch, args.seed, 3 if args.quick else 7, 5.0 if args.quick else 50.0)
    print(f"float32, batch {batch}, {torch.get_num_threads()} threads: median ms (fused / eager = time / time)")
    for what in ("hvp jvp(grad)", "hvp double backward", "per-sample grads"):
        fused, eager = ms[f"{what} fused"], ms[f"{what} eager"]
        print(f"  {what:<22} fused {fused:9.3f}   eager {eager:9.3f}   fused/eager {fused / eager:6.2f}")
    ok = all(err <= THRESHOLD for err in errors.values())
    print("all checks pass" if ok else "A CHECK FAILED")
    return {"ok": ok, "errors": errors, "ms": ms, "batch": batch, "threshold": THRESHOLD}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
