"""``backend="auto"`` on CUDA: which backend runs each pass, per dtype, layer size and rows.

Written from the predicted H100 times of benchmarks/RESULTS.md ("CUDA backend: predicted H100
times" and "Triton: predicted rates and the auto rule"; ``python benchmarks/cuda_predict.py``, whose
"auto" column applies this rule), to be replaced by measurements the day a GPU run exists
(``scripts/gpu_check.sh``). A pass runs the handwritten CUDA kernels (``"cuda"``) or the Triton
kernels (``"triton"``) where they are predicted faster than eager's cuBLAS GEMM + activation
(forward) or its backward, and the cuBLAS-based ``"torch"`` backend, eager's own sequence of calls,
everywhere else, so that auto is predicted no slower than eager anywhere. Where the first choice is
not available in this installation (Triton not importable, the CUDA kernels not built), the next
one in its entry runs, and every entry lists only backends predicted faster than eager: auto never
falls back to something predicted slower.

Triton is predicted ahead of both others only in the float16/bfloat16 forward of wide layers
(8192x1024x1024: 40.2 µs against eager's 44.2 and the CUDA kernels' 103.2): elsewhere its host
time per call (a custom op and an autotuned launch: ~36 µs forward, 60-85 µs backward) or its
tiles (FMA dot for float32, L2-bound 64x64 dW tiles) keep it behind. Where it runs, its first
call per M bucket (``triton.kernels.m_bucket``: at most 14 buckets) compiles and times the pruned
tiles (Triton's do_bench, ~0.1 s each): a one-off stall of about a second per bucket and kernel,
none during CUDA-graph capture, and not in the steady state these predictions are of.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import Backend

# dtype -> pass -> ((largest in_features * out_features, the backends to run there in order of
# predicted time, each predicted faster than eager), ...); above the last size, or where none of
# them is available, "torch". In the comments the predicted µs at K = N = 64, 256, 1024 (M = 65536,
# 16384, 8192) of cuda / triton / eager; backward from the saved output (dX + dW with db folded in).
_HALF = {  # float16 and bfloat16: the same kernels and predictions
    # 9.0 / 36.0 / 17.5, 15.1 / 36.0 / 17.6, 103.2 / 40.2 / 44.2
    "forward": ((256 * 256, ("cuda",)), (1024 * 1024, ("triton",))),
    "backward": ((64 * 64, ("cuda",)),),         # 32.6 / 60.0 / 35.0, 36.8 / 85.0 / 35.1, 208.8 / 231.5 / 88.5
}
RULE = {
    torch.float32: {
        "forward": ((256 * 256, ("cuda",)),),    # 17.5 / 36.0 / 30.0, 53.4 / 76.0 / 60.3, 409.3 / 590.1 / 371.9
        "backward": ((256 * 256, ("cuda",)),),   # 51.9 / 85.0 / 60.1, 118.1 / 158.6 / 120.5, 831.5 / 1180.2 / 743.9
    },
    torch.float16: _HALF,
    torch.bfloat16: _HALF,
    torch.float64: {
        "forward": ((64 * 64, ("cuda", "triton")),),  # 32.1 / 36.0 / 55.1, 120.9 / 76.0 / 70.1, 949.9 / 590.1 / 375.6
        "backward": ((64 * 64, ("cuda",)),),     # 93.9 / 128.6 / 110.2, 250.2 / 164.3 / 140.2, 1902 / 1213 / 751
    },
}
# Triton runs a pass only with at least this many rows: at the one size it is picked for (M = 8192)
# its GPU time (40 µs) barely covers its host time (36 µs); with fewer rows it is host-bound.
TRITON_MIN_ROWS = 8192
BACKENDS = ("triton", "cuda", "torch")
PASSES = ("forward", "backward")


def choices(pass_: str, dtype: torch.dtype, in_features: int, out_features: int, rows: int) -> tuple[str, ...]:
    """The backends auto may run for ``pass_`` ("forward" or "backward") of a layer on CUDA, in order
    of preference; the last is always "torch"."""
    size = in_features * out_features
    for limit, names in RULE.get(dtype, {}).get(pass_, ()):
        if size <= limit:
            return tuple(n for n in names if n != "triton" or rows >= TRITON_MIN_ROWS) + ("torch",)
    return ("torch",)


def choose(pass_: str, dtype: torch.dtype, in_features: int, out_features: int, rows: int,
           available=BACKENDS) -> str:
    """The backend auto runs for this pass when the backends in ``available`` are."""
    return next(n for n in choices(pass_, dtype, in_features, out_features, rows) if n in available or n == "torch")


def cuda_auto(get: Callable[[str], Backend], device=torch.device("cuda")) -> Backend:
    """The Backend auto gives on CUDA: each call runs the backend ``choose`` names among those that
    ``get`` finds and that run on ``device`` here. Every backend takes the same arguments, and
    backward is handed what forward saved (the output or the pre-activation; a sign mask unpacked,
    as for any backend that does not accept it)."""
    available = tuple(n for n in BACKENDS if get(n) is not None and get(n).supports(device))

    def pick(pass_, x, weight):
        return get(choose(pass_, x.dtype, weight.shape[1], weight.shape[0], x.shape[0], available))

    def forward(x, weight, bias, activation, negative_slope):
        return pick("forward", x, weight).forward(x, weight, bias, activation, negative_slope)

    def forward_preact(x, weight, bias, activation, negative_slope):
        return pick("forward", x, weight).forward_preact(x, weight, bias, activation, negative_slope)

    def backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope):
        return pick("backward", x, weight).backward(grad_out, x, weight, bias, out, activation, output_mask,
                                                    negative_slope)

    return Backend("auto", forward, forward_preact, backward, supports=lambda device: device.type == "cuda")


def describe() -> list[str]:
    """The rule in words, one line per dtype (``python -m fused_backprop.bench --list``)."""
    def side(limit):
        return f"{int(limit ** 0.5)}x{int(limit ** 0.5)}"

    def rule(entries):
        return ", ".join(f"{' then '.join(names)} up to {side(limit)}" for limit, names in entries) + ", torch above"

    lines = [f"{str(dtype).removeprefix('torch.'):<9} forward: {rule(r['forward'])}; backward: {rule(r['backward'])}"
             for dtype, r in RULE.items()]
    return lines + [f"(in*out sizes; triton only from {TRITON_MIN_ROWS} rows; where the first named is not "
                    "available here the next runs, then torch)"]
