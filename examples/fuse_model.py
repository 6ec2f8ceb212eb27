"""``fb.fuse`` on a model built from timm's layers (no weights downloaded), trained on scikit-learn's
handwritten digits (8×8 images, 10 classes, shipped inside scikit-learn) next to its unfused copy.

The model: two ``timm.layers.Mlp`` blocks (``fc1 -> act -> drop -> norm -> fc2``, called from
timm's own ``forward``) with an ``nn.ReLU`` between them, plus a ``torch.sigmoid`` gate written as
a function call in a small module of our own. ``fb.fuse`` traces each module's forward, fuses
every Linear whose output goes only to ReLU/sigmoid, and reports the others with the reason (here
each block's ``fc2``: the first one's ReLU is applied by the parent Sequential, outside the
block's forward, so fuse leaves it; the last one gives the logits).

Both copies start from the same weights, see the same batches and take turns step by step; the
loss curves agree to float32 rounding, and the median step times are printed side by side (on a
2-core CPU at batch 256 both take ~2.2 ms a step: at this size the step is mostly per-op overhead,
which fusing does not remove; train_digits.py shows where fusion pays).

    python examples/fuse_model.py            # 300 steps, ~4 s on a 2-core CPU (98% test accuracy)
    python examples/fuse_model.py --quick    # a smoke run
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
from fused_backprop.bench.report import save_example

DEFAULT_OUT = Path("results") / "examples"


class Gate(nn.Module):
    """``x * sigmoid(fc(x))``: the activation is a function call in forward."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


def make_model(hidden: int = 256, width: int = 128) -> nn.Module:
    from timm.layers import Mlp

    return nn.Sequential(Mlp(64, hidden, width, act_layer=nn.ReLU, drop=0.1), nn.ReLU(), Gate(width),
                         Mlp(width, hidden, 10, act_layer=nn.ReLU))


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="60 steps (a smoke run)")
    p.add_argument("--steps", type=int, help="default 300 (60 with --quick)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)

    x_train, y_train, x_test, y_test = load_digits(args.seed)
    torch.manual_seed(args.seed)
    eager = make_model(args.hidden)
    records = fb.fuse_report(eager)
    fused = fb.fuse(copy.deepcopy(eager), verbose=True)  # same weights; a deep copy, since fuse works in place
    assert eager.state_dict().keys() == fused.state_dict().keys()

    models = {"eager": eager, "fused": fused}
    opts = {name: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for name, m in models.items()}
    losses = {name: [] for name in models}
    seconds = {name: [] for name in models}
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
        seed = torch.randint(0, 2**31, (), generator=gen).item()
        for name, model in models.items():
            torch.manual_seed(seed)  # the same dropout masks
            start = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opts[name].step()
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())

    result = dict(steps=steps, batch_size=args.batch_size, hidden=args.hidden, threads=torch.get_num_threads(),
                  report=[dict(name=r.name, activation=r.activation, reason=r.reason) for r in records],
                  fused_layers=sum(r.fused for r in records), linear_layers=len(records))
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        times = seconds[name][1:] or seconds[name]  # the first step pays one-off costs
        result[name] = dict(losses=losses[name], test_accuracy=accuracy, median_step_ms=1e3 * statistics.median(times))
        print(f"{name}: final loss {losses[name][-1]:.4f}, test accuracy {100 * accuracy:.1f}%, "
              f"median step {result[name]['median_step_ms']:.2f} ms")
    result["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["eager"], losses["fused"]))
    result["speedup"] = result["eager"]["median_step_ms"] / result["fused"]["median_step_ms"]
    print(f"{result['fused_layers']} of {result['linear_layers']} Linear layers fused; loss curves agree to "
          f"{result['max_loss_diff']:.1e}; fused step at {result['speedup']:.2f}x eager's speed")
    save_example(args.out, "fuse_model", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
