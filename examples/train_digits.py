"""Train an MLP classifier on scikit-learn's handwritten digits (8×8 images, 10 classes, 1797
samples, shipped inside scikit-learn) twice from the same seed:

* ``eager``: ``nn.Sequential(nn.Linear, nn.ReLU, ..., nn.Linear)``;
* ``fused``: the same model after ``fb.fuse(...)``, which swaps each Linear+ReLU pair for a
  ``FusedLinearReLU`` that shares its parameters (same init, same state-dict keys).

Same initial weights, same batches, same optimizer (the two runs take turns step by step, so both
see the same machine load): the two loss curves agree to float32 rounding,
and the fused run's time is printed next to the eager one. Writes ``train_digits.png`` (loss
curves, their difference, test accuracy) and ``train_digits.json`` to ``--out``.

The default is full-batch training (all 1438 training images per step) of a narrow MLP
64-128-128-10: on a CPU, fusion removes the elementwise passes over the (batch, width)
activations, which is what costs when layers are narrow next to the batch (here the fused step
ran at 1.04-1.18× eager's speed over 5 runs on 2 cores, median 1.09×). With wide layers and small
batches the GEMMs dominate and the two run alike: ``--batch-size 128 --hidden 1024 1024`` gave
1.00-1.02×.

    python examples/train_digits.py                 # ~1 s on a 2-core CPU
    python examples/train_digits.py --quick         # a smoke run
    python examples/train_digits.py --batch-size 128 --hidden 1024 1024 --epochs 12 --lr 0.05
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fused_backprop as fb
from fused_backprop.bench.plots import pyplot
from fused_backprop.bench.report import save_example

DEFAULT_OUT = Path("results") / "examples"
ACT = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def load_digits(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a fixed random split."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(sizes, activation: str) -> nn.Sequential:
    """Linear -> act -> ... -> Linear (logits), plain PyTorch."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACT[activation]())
    return nn.Sequential(*layers)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


class Trainer:
    """SGD with momentum on one model, one batch at a time. ``step`` trains on one batch and
    records its loss and how long it took; ``evaluate`` records the held-out accuracy."""

    def __init__(self, model, data, *, lr: float):
        self.model, self.data = model, data
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()
        self.losses, self.step_seconds, self.test_accuracy = [], [], []

    def step(self, idx) -> None:
        x_train, y_train = self.data[0], self.data[1]
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x_train[idx]), y_train[idx])
        loss.backward()
        self.opt.step()
        self.step_seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())

    def evaluate(self) -> None:
        self.test_accuracy.append(accuracy(self.model, self.data[2], self.data[3]))


def train_side_by_side(trainers: dict, n_train: int, *, epochs: int, batch_size: int, seed: int) -> None:
    """Both models train on the same batches (one seeded order), taking turns step by step, so that
    a burst of load from elsewhere on the machine slows both alike."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train, batch_size):
            for trainer in trainers.values():
                trainer.step(perm[i:i + batch_size])
        for trainer in trainers.values():
            trainer.evaluate()


def warm_up(model, data, batch_size: int) -> None:
    """One forward+backward on a throwaway copy (allocator, thread pool, first-call costs)."""
    model = copy.deepcopy(model)
    x, y = data[0][:batch_size], data[1][:batch_size]
    nn.functional.cross_entropy(model(x), y).backward()


def plot(result: dict):
    """The figure of a result (saved by save_example)."""
    plt = pyplot()

    eager, fused = result["eager"], result["fused"]
    steps = range(1, len(eager["losses"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(steps, eager["losses"], label=f"nn.Linear + {result['activation']} (eager)", color="black", linewidth=1.2)
    ax.plot(steps, fused["losses"], label="fb.fuse(model) (fused kernels)", color="tab:blue", linewidth=1.0,
            linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (train batch)")
    ax.set_title("training loss: the curves lie on top of each other")
    ax.legend()
    ax.grid(True, alpha=0.3)

    ax = axes[1]
    diff = [abs(a - b) for a, b in zip(eager["losses"], fused["losses"])]
    nonzero = [(s, d) for s, d in zip(steps, diff) if d > 0]
    ax.plot([s for s, _ in nonzero], [d for _, d in nonzero], ".", color="tab:red", markersize=3,
            label=f"{len(diff) - len(nonzero)} of {len(diff)} steps agree exactly (not shown)")
    ax.set_yscale("log")
    ax.set_ylim(1e-10, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("training step")
    ax.set_ylabel("|loss(eager) - loss(fused)|")
    ax.set_title(f"difference (max {max(diff):.1e}: float32 rounding)")
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    epochs = range(1, len(eager["test_accuracy"]) + 1)
    ax.plot(epochs, [100 * a for a in eager["test_accuracy"]], "s-", color="black", label="eager", markersize=3)
    ax.plot(epochs, [100 * a for a in fused["test_accuracy"]], "o--", color="tab:blue", label="fused", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"held-out accuracy: {100 * eager['test_accuracy'][-1]:.1f}% vs {100 * fused['test_accuracy'][-1]:.1f}%")
    ax.legend(loc="lower right")
    ax.grid(True, alpha=0.3)

    fig.suptitle(f"MLP {'-'.join(map(str, result['sizes']))} on scikit-learn digits, {result['epochs']} epochs, "
                 f"batch {result['batch_size']}: training time eager {eager['seconds']:.2f} s, "
                 f"fused {fused['seconds']:.2f} s; median step {eager['median_step_ms']:.1f} vs "
                 f"{fused['median_step_ms']:.1f} ms (fused {result['speedup']:.2f}× eager's speed)"
                 f"  [{result['threads']} threads]", fontsize=10.5)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="40 epochs (a smoke run)")
    p.add_argument("--epochs", type=int, help="default 200 (40 with --quick)")
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="hidden widths (default 128 128)")
    p.add_argument("--activation", choices=tuple(ACT), default="relu")
    p.add_argument("--batch-size", type=int, help="samples per step (default: the whole training set)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    epochs = args.epochs or (40 if args.quick else 200)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_digits(args.seed)
    sizes = [data[0].shape[1], *args.hidden, 10]
    args.batch_size = args.batch_size or len(data[0])

    torch.manual_seed(args.seed)
    eager = make_model(sizes, args.activation)
    torch.manual_seed(args.seed)
    fused = fb.fuse(make_model(sizes, args.activation))  # same seed -> same initial weights
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fused.state_dict().values()))
    print(f"eager: {eager}\nfused: {fused}")

    warm_up(eager, data, args.batch_size)
    warm_up(fused, data, args.batch_size)
    result = dict(sizes=sizes, activation=args.activation, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, threads=torch.get_num_threads(), samples=dict(train=len(data[0]), test=len(data[2])))
    trainers = {name: Trainer(model, data, lr=args.lr) for name, model in (("eager", eager), ("fused", fused))}
    train_side_by_side(trainers, len(data[0]), epochs=epochs, batch_size=args.batch_size, seed=args.seed)
    for name, t in trainers.items():
        result[name] = dict(losses=t.losses, test_accuracy=t.test_accuracy, seconds=sum(t.step_seconds),
                            median_step_ms=1e3 * statistics.median(t.step_seconds))
        print(f"{name}: final train loss {t.losses[-1]:.4f}, test accuracy {100 * t.test_accuracy[-1]:.1f}%, "
              f"training time {result[name]['seconds']:.2f} s (median step {result[name]['median_step_ms']:.2f} ms)")
    result["max_loss_diff"] = max(abs(a - b) for a, b in zip(result["eager"]["losses"], result["fused"]["losses"]))
    # the median over steps of eager's time / fused's time on the same batch, taken back to back:
    # robust to the odd step slowed by something else on the machine
    result["speedup"] = statistics.median(
        e / f for e, f in zip(trainers["eager"].step_seconds, trainers["fused"].step_seconds))
    print(f"loss curves agree to {result['max_loss_diff']:.1e} (largest |difference| over "
          f"{len(result['eager']['losses'])} steps); a fused training step runs at {result['speedup']:.2f}× "
          f"eager's speed (median over the steps of eager time / fused time on the same batch)")

    save_example(args.out, "train_digits", result, plot=None if args.no_plot else plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
