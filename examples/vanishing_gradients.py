"""The vanishing-gradient picture: per-layer gradient norms of a deep sigmoid ``FusedMLP`` against a
deep ReLU one, on a batch of scikit-learn's handwritten digits.

Backprop multiplies the gradient by ``Wᵀ`` and by ``act'(z)`` once per layer. ``σ'(z) ≤ 1/4``, so
with weights scaled to keep the forward signal steady (Glorot/Xavier) the gradient of a sigmoid
stack still shrinks by about 4× per layer, while ``relu'`` is 0 or 1 and He/Kaiming init keeps the
ReLU stack's gradient the same size from the last layer to the first. The dotted lines use
``nn.Linear``'s default init for both (uniform ±1/√fan_in): too small for either, so even the ReLU
stack's gradient fades — the reason He init exists.

Writes ``vanishing_gradients.png`` (‖∂L/∂W‖ per layer and the RMS of ∂L/∂h per layer) and
``vanishing_gradients.json`` to ``--out``.

    python examples/vanishing_gradients.py               # 20 layers of width 256
    python examples/vanishing_gradients.py --quick       # 8 layers of width 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import fused_backprop as fb
from fused_backprop.bench.plots import pyplot
from fused_backprop.bench.report import save_example

DEFAULT_OUT = Path("results") / "examples"
STANDARD_INIT = {"relu": "kaiming", "sigmoid": "xavier"}


def load_batch(n: int, seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # standardized pixels
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def build(activation: str, depth: int, width: int, n_in: int, init: str, seed: int) -> fb.FusedMLP:
    """``depth`` fused hidden layers of ``width`` and a linear 10-way head."""
    torch.manual_seed(seed)
    mlp = fb.FusedMLP([n_in] + [width] * depth + [10], activation, last_activation=False)
    for layer in mlp.layers:
        if init == "kaiming":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_normal_(layer.weight)
        if init != "default":
            nn.init.zeros_(layer.bias)
    return mlp


def gradient_norms(mlp: fb.FusedMLP, x, y) -> dict:
    """One backward pass of the cross-entropy: ‖∂L/∂W_l‖ (Frobenius) and the RMS of ∂L/∂h_l, where
    h_l is hidden layer l's output, for l = 1 (next to the input) .. depth."""
    outputs = []

    def keep(module, inputs, out):  # returns None: the output is left as it is
        out.retain_grad()
        outputs.append(out)

    hooks = [layer.register_forward_hook(keep) for layer in mlp.layers[:-1]]
    try:
        loss = nn.functional.cross_entropy(mlp(x), y)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return dict(loss=loss.item(),
                weight_grad=[layer.weight.grad.norm().item() for layer in mlp.layers[:-1]],
                activation_grad=[out.grad.pow(2).mean().sqrt().item() for out in outputs])


def plot(result: dict):
    """The figure of a result (saved by save_example)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = {"relu": "tab:blue", "sigmoid": "tab:red"}
    for run in result["runs"]:
        layers = range(1, len(run["weight_grad"]) + 1)
        style = dict(color=colors[run["activation"]], linestyle="-" if run["standard"] else ":",
                     marker="o" if run["standard"] else "", markersize=3.5)
        label = f"{run['activation']}, {run['init']} init"
        axes[0].plot(layers, run["weight_grad"], label=label, **style)
        axes[1].plot(layers, run["activation_grad"], label=label, **style)
    for ax, what in zip(axes, ("‖∂L/∂W‖ of layer l (Frobenius norm)", "RMS of ∂L/∂h, h = output of layer l")):
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer l   (1 = next to the input; backprop runs right to left)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    sig = next(r for r in result["runs"] if r["activation"] == "sigmoid" and r["standard"])
    relu = next(r for r in result["runs"] if r["activation"] == "relu" and r["standard"])
    axes[0].set_title(f"weight gradients: first/last layer ratio sigmoid {sig['first_over_last']:.0e}, "
                      f"relu {relu['first_over_last']:.0e}", fontsize=10)
    axes[1].set_title("gradient reaching each layer's output", fontsize=10)
    fig.suptitle(f"Vanishing gradients: {result['depth']} fused hidden layers of width {result['width']} "
                 f"(fb.FusedMLP), one batch of {result['batch']} scikit-learn digits, at initialization",
                 fontsize=11)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 layers of width 64 (a smoke run)")
    p.add_argument("--depth", type=int, help="hidden layers (default 20; 8 with --quick)")
    p.add_argument("--width", type=int, help="hidden width (default 256; 64 with --quick)")
    p.add_argument("--batch", type=int, default=512, help="digits in the batch (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    depth = args.depth or (8 if args.quick else 20)
    width = args.width or (64 if args.quick else 256)

    x, y = load_batch(args.batch, args.seed)
    result = dict(depth=depth, width=width, batch=len(x), runs=[])
    print(f"{'activation':<10} {'init':<8} {'‖dW‖ layer 1':>14} {'‖dW‖ layer ' + str(depth):>15} {'first/last':>11}")
    for activation in ("sigmoid", "relu"):
        for init in (STANDARD_INIT[activation], "default"):
            mlp = build(activation, depth, width, x.shape[1], init, args.seed)
            run = dict(activation=activation, init=init, standard=init != "default", **gradient_norms(mlp, x, y))
            run["first_over_last"] = run["weight_grad"][0] / run["weight_grad"][-1]
            result["runs"].append(run)
            print(f"{activation:<10} {init:<8} {run['weight_grad'][0]:>14.3e} {run['weight_grad'][-1]:>15.3e} "
                  f"{run['first_over_last']:>11.2e}")
    save_example(args.out, "vanishing_gradients", result, plot=None if args.no_plot else plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
