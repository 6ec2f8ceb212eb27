"""Memory benchmark: what each way of training an MLP stack keeps for backward, its peak memory
and its step time.

The model is ``--blocks`` consecutive blocks of ``--layers`` Linear+activation layers (``--activation``,
default relu) of width ``--width`` (default 8 x 4 x 1024, batch 4096, float32), trained as:

  eager       nn.Sequential of nn.Linear + nn.ReLU
  checkpoint  the same, each block under torch.utils.checkpoint (use_reentrant=False)
  fused-none  FusedMLP blocks, recompute="none"  (each layer keeps its output)
  fused-layer FusedMLP blocks, recompute="layer" (relu keeps a 1-bit sign mask instead)
  fused-block FusedMLP blocks, recompute="block" (each block keeps only its input)

Per variant, in a fresh subprocess: the bytes saved for backward (saved_tensors_hooks, distinct
storages, parameters excluded: the model holds them anyway), the peak memory of a training step
(forward, backward, SGD step) above the memory before it — ``torch.cuda.max_memory_allocated`` on
a GPU, ``ru_maxrss`` minus the resident size before the step on the CPU (the child runs with a
fixed glibc mmap threshold, so large blocks go back to the OS on free and RSS follows the live
tensors) — and the median step time.

    python benchmarks/bench_memory.py            # the full run (a few minutes on 2 cores)
    python benchmarks/bench_memory.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fused_backprop as fb
from fused_backprop.bench.report import write_csv

VARIANTS = ("eager", "checkpoint", "fused-none", "fused-layer", "fused-block")
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "memory.csv"


class Checkpointed(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def activation_module(activation: str) -> nn.Module:
    """torch's module for ``activation`` (nn.ReLU, nn.GELU(approximate="tanh"), ...), default parameters."""
    spec = fb.activations.ACTIVATIONS[activation]
    return spec.modules[0](**{k: v for k, v in spec.params.items() if v is not None})


def build(variant, blocks, layers, width, device, activation="relu"):
    def eager_block():
        return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width),
                                                                   activation_module(activation))])

    if variant == "eager":
        return nn.Sequential(*[eager_block() for _ in range(blocks)]).to(device)
    if variant == "checkpoint":
        return nn.Sequential(*[Checkpointed(eager_block()) for _ in range(blocks)]).to(device)
    mode = variant.removeprefix("fused-")
    return nn.Sequential(*[fb.FusedMLP([width] * (layers + 1), activation, recompute=mode, device=device)
                           for _ in range(blocks)])


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def saved_bytes(model, x):
    """Bytes of the distinct storages saved for backward by one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def measure(variant, blocks, layers, width, batch, steps, device, activation="relu"):
    """One variant, in this process: saved bytes, step peak bytes, median step seconds."""
    torch.manual_seed(0)
    model = build(variant, blocks, layers, width, device, activation)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation, gradient buffers
    opt.zero_grad(set_to_none=True)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return dict(variant=variant, saved_bytes=saved_bytes(model, x), peak_step_bytes=peak,
                step_s=statistics.median(times), block_input_bytes=blocks * batch * width * x.element_size())


def single_layer_rows(width, batch, device, activation="relu"):
    """What one fused layer keeps when its consumer keeps nothing: its output (or the
    pre-activation: gelu, silu), or with recompute=True relu's 1-bit sign mask (or nothing)."""
    x = torch.randn(batch, width, device=device, requires_grad=True)
    rows = []
    for recompute in (False, True):
        layer = fb.FusedLinearAct(width, width, recompute=recompute, device=device, activation=activation)
        rows.append(dict(variant=f"one layer, recompute={recompute}",
                         saved_bytes=saved_bytes(nn.Sequential(layer), x) - x.numel() * x.element_size()))
    return rows


def run_in_subprocess(variant, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--blocks", str(args.blocks), "--layers", str(args.layers),
           "--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps),
           "--device", args.device, "--activation", args.activation]
    # A fixed mmap threshold makes glibc map every large block and unmap it on free, so the
    # resident size follows the live tensors (its default, dynamic threshold keeps freed blocks).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--activation", choices=fb.ACTIVATIONS, default="relu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="2 blocks of width 128, batch 256")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.batch, args.steps = 2, 128, 256, 2
    for name in ("blocks", "layers", "width", "batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants must be a comma-separated subset of {','.join(VARIANTS)}, got {unknown}")
    if args.child:
        print(json.dumps(measure(args.child, args.blocks, args.layers, args.width, args.batch, args.steps,
                                 torch.device(args.device), args.activation)))
        return 0

    mib = 2 ** 20
    print(f"{args.blocks} blocks x {args.layers} Linear+{args.activation} layers, width {args.width}, batch {args.batch}, "
          f"float32, {args.device}, {torch.get_num_threads()} threads; median of {args.steps} steps")
    print(f"{'variant':<13}{'saved MiB':>11}{'saved/inputs':>14}{'peak MiB':>10}{'step ms':>10}")
    rows = []
    for variant in variants:
        r = run_in_subprocess(variant, args)
        rows.append(r)
        print(f"{variant:<13}{r['saved_bytes'] / mib:>11.1f}{r['saved_bytes'] / r['block_input_bytes']:>14.2f}"
              f"{r['peak_step_bytes'] / mib:>10.1f}{r['step_s'] * 1e3:>10.1f}", flush=True)
    print(f"\nsaved beyond the input by one Linear+{args.activation} layer whose output nobody else keeps:")
    for r in single_layer_rows(args.width, args.batch, torch.device(args.device), args.activation):
        print(f"  {r['variant']:<28}{r['saved_bytes'] / mib:>9.2f} MiB")
    write_csv(rows, args.csv, columns=rows[0])
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
