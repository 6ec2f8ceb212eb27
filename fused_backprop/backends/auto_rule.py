"""``backend="auto"`` on CUDA: which backend runs each pass, per dtype and layer size.

Written from the predicted H100 times of benchmarks/RESULTS.md ("CUDA backend: predicted H100
times"; ``python benchmarks/cuda_predict.py``, whose "auto" columns apply this rule), to be
replaced by measurements the day a GPU run exists (``scripts/gpu_check.sh``). The handwritten
CUDA kernels (``"cuda"``) run a pass where they are predicted faster than eager's cuBLAS
GEMM + activation (forward) or its backward; every other pass runs the cuBLAS-based ``"torch"``
backend, eager's own sequence of calls, so that auto is predicted no slower than eager anywhere. The Triton backend
has no predictions of that kind (its RESULTS.md section gives roofline floors, not rates), so
auto does not pick it until it is measured; ``backend="triton"`` runs it.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import Backend

# dtype -> the largest in_features * out_features (K·N) whose (forward, backward) runs the CUDA
# kernels; in the comments the predicted fused / eager µs at K = N = 64, 256, 1024 (M = 65536,
# 16384, 8192), forward; backward (dX + dW with db folded in).
FUSED_UP_TO = {
    torch.float32: (256 * 256, 256 * 256),  # 17.5 / 30.0, 53.4 / 60.3, 409.3 / 371.9; 51.9 / 60.1, 118.1 / 120.5, 831.5 / 743.9
    torch.float16: (256 * 256, 64 * 64),    # 9.0 / 17.5, 15.1 / 17.6, 103.2 / 44.2; 32.6 / 35.0, 36.8 / 35.1, 208.8 / 88.5
    torch.bfloat16: (256 * 256, 64 * 64),   # as float16
    torch.float64: (64 * 64, 64 * 64),      # 32.1 / 55.1, 120.9 / 70.1, 949.9 / 375.6; 93.9 / 110.2, 250.2 / 140.2, 1902 / 751
}
PASSES = ("forward", "backward")


def choose(pass_: str, dtype: torch.dtype, in_features: int, out_features: int) -> str:
    """The backend name auto runs for ``pass_`` ("forward" or "backward") of a layer on CUDA."""
    limits = FUSED_UP_TO.get(dtype)
    return "cuda" if limits is not None and in_features * out_features <= limits[PASSES.index(pass_)] else "torch"


def cuda_auto(get: Callable[[str], Backend]) -> Backend:
    """The Backend auto gives on CUDA: each call runs the backend ``choose`` names (found by ``get``).
    Every backend takes the same arguments, and backward is handed what forward saved (the output
    or the pre-activation; a sign mask unpacked, as for any backend that does not accept it)."""

    def pick(pass_, x, weight):
        return get(choose(pass_, x.dtype, weight.shape[1], weight.shape[0]))

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
    return [f"{str(dtype).removeprefix('torch.'):<9} forward: cuda up to in*out = {side(fwd)}; backward: cuda up to "
            f"{side(bwd)}; torch above" for dtype, (fwd, bwd) in FUSED_UP_TO.items()]
