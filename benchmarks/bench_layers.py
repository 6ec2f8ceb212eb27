"""CPU benchmark of the fused layers: forward and forward+backward of
``fused_backprop.linear_act(..., backend="cpu")`` against eager ``act(F.linear(x, W, b))``, its
``torch.compile`` and the bare GEMMs as the floor (forward: ``addmm(b, x, Wᵀ)``; forward+backward:
the three GEMMs x·Wᵀ, dZ·W, dZᵀ·x on preallocated tensors).

Medians of one run (``torch.utils.benchmark``, all of torch's threads) are printed as a table with
the fused/provider ratios and written as one CSV row per (mode, activation, shape, provider).
Forward runs on inputs that don't require grad; forward+backward has x, W, b requiring grad and
calls ``out.backward(g)`` with a fixed g.

    python benchmarks/bench_layers.py                  # the full run (minutes)
    python benchmarks/bench_layers.py --quick          # a small smoke run (< 60 s)
    python benchmarks/bench_layers.py --shapes 4096x128x128,1024x512x512 --csv /tmp/layers.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fused_backprop

SHAPES = [(65536, 64, 64), (16384, 256, 256), (8192, 1024, 1024)]
QUICK_SHAPES = [(2048, 64, 64)]
ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid}
PROVIDERS = ("fused", "eager", "compile", "floor")
MODES = ("forward", "forward+backward")
DTYPE = torch.float32
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "layers.csv"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"MxKxN,MxKxN"`` -> [(M, K, N), ...]."""
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes must look like 65536x64x64,16384x256x256; got {text!r}")
    return shapes


def make_eager(activation: str):
    act = ACTIVATIONS[activation]

    def eager(x, w, b):
        return act(F.linear(x, w, b))

    return eager


def make_fused(activation: str):
    def fused(x, w, b):
        return fused_backprop.linear_act(x, w, b, activation, backend="cpu")

    return fused


def layer_tensors(m, k, n, requires_grad: bool):
    x = torch.randn(m, k, dtype=DTYPE)
    w = torch.randn(n, k, dtype=DTYPE) * k ** -0.5
    b = torch.randn(n, dtype=DTYPE)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


def check_fused(activation, fused, eager, x, w, b, g):
    """Fused forward against eager, and fused backward against the composite formula applied to the
    fused output (so a relu kink that rounds differently can't flip the comparison). Raises on a
    mismatch: a wrong kernel is never timed."""
    with torch.no_grad():
        out, expected = fused(x, w, b), eager(x, w, b)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"fused forward: {m}")
    xs = [t.detach().requires_grad_() for t in (x, w, b)]
    fused(*xs).backward(g)
    want = fused_backprop.backends.get("torch").backward(g, x.detach(), w.detach(), b.detach(), out, activation,
                                                         (True, True, True))
    for name, t, ref in zip(("dx", "dW", "db"), xs, want):
        torch.testing.assert_close(t.grad, ref, rtol=1e-4, atol=1e-4 * max(ref.abs().max().item(), 1.0),
                                   msg=lambda m, name=name: f"fused backward {name}: {m}")


def forward_stmts(activation, x, w, b, compiled):
    """The callables timed for the forward mode, one per provider."""
    fused, eager = make_fused(activation), make_eager(activation)
    return {"fused": lambda: fused(x, w, b), "eager": lambda: eager(x, w, b),
            "compile": lambda: compiled(x, w, b), "floor": lambda: torch.addmm(b, x, w.t())}


def forward_backward_stmts(activation, x, w, b, g, compiled):
    """The callables timed for forward+backward (grads cleared each call), one per provider."""
    def train_step(fn):
        def step():
            x.grad = w.grad = b.grad = None
            fn(x, w, b).backward(g)
        return step

    z, dx, dw = torch.empty_like(g), torch.empty_like(x), torch.empty_like(w)
    xd, wd = x.detach(), w.detach()

    def three_gemms():
        torch.mm(xd, wd.t(), out=z)
        torch.mm(g, wd, out=dx)
        torch.mm(g.t(), xd, out=dw)

    return {"fused": train_step(make_fused(activation)), "eager": train_step(make_eager(activation)),
            "compile": train_step(compiled), "floor": three_gemms}


def time_median(stmt, min_run_time: float, warmup: int = 2) -> benchmark.Measurement:
    for _ in range(warmup):  # also compiles the torch.compile provider
        stmt()
    timer = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time)


def run(shapes, min_run_time: float) -> list[dict]:
    rows = []
    for m, k, n in shapes:
        for activation in ACTIVATIONS:
            # A fresh compile per case: dynamo caches per code object and would otherwise hit its
            # recompile limit across shapes and fall back to eager.
            torch._dynamo.reset()
            compiled = torch.compile(make_eager(activation), dynamic=False)
            torch.manual_seed(0)
            x, w, b = layer_tensors(m, k, n, requires_grad=True)
            g = torch.randn(m, n, dtype=DTYPE)
            check_fused(activation, make_fused(activation), make_eager(activation), x, w, b, g)
            xd, wd, bd = (t.detach() for t in (x, w, b))
            for mode, stmts in (("forward", forward_stmts(activation, xd, wd, bd, compiled)),
                                ("forward+backward",
                                 forward_backward_stmts(activation, x, w, b, g, compiled))):
                medians = {}
                for provider, stmt in stmts.items():
                    meas = time_median(stmt, min_run_time)
                    medians[provider] = meas.median * 1e3
                    rows.append(dict(mode=mode, activation=activation, M=m, K=k, N=n, provider=provider,
                                     median_ms=meas.median * 1e3, iqr_ms=meas.iqr * 1e3, runs=len(meas.times),
                                     threads=torch.get_num_threads()))
                for row in rows[-len(stmts):]:
                    row["fused_over_provider"] = medians["fused"] / row["median_ms"]
                print_row(mode, activation, (m, k, n), medians)
    return rows


def print_header():
    print(f"{'mode':<17}{'act':<8}{'M x K x N':<18}" + "".join(f"{p + ' ms':>12}" for p in PROVIDERS)
          + "".join(f"{'fused/' + p:>15}" for p in PROVIDERS[1:]))


def print_row(mode, activation, shape, medians):
    print(f"{mode:<17}{activation:<8}{'x'.join(map(str, shape)):<18}"
          + "".join(f"{medians[p]:>12.3f}" for p in PROVIDERS)
          + "".join(f"{medians['fused'] / medians[p]:>15.2f}" for p in PROVIDERS[1:]), flush=True)


def write_csv(rows, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and short timings (a smoke run)")
    parser.add_argument("--shapes", type=parse_shapes, help="comma-separated MxKxN (default: the issue's three)")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help=f"output CSV (default: {DEFAULT_CSV})")
    parser.add_argument("--min-run-time", type=float, help="seconds per measurement (default 1.0; 0.05 with --quick)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    if "cpu" not in fused_backprop.available_backends():
        print("bench_layers: the 'cpu' backend is not built (available: "
              f"{fused_backprop.available_backends()}); build the extension first", file=sys.stderr)
        return 1
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    print(f"fused_backprop CPU layers, {DTYPE}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"medians of blocked_autorange(min_run_time={min_run_time})")
    print_header()
    rows = run(shapes, min_run_time)
    write_csv(rows, args.csv)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
