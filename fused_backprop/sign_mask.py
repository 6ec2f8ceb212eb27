"""A 1-bit packed mask of which branch of relu or leaky relu each output element took.

Their backward needs only this bit, so a layer that does not keep its output (``recompute=True``)
can keep these bits instead: 32x smaller than a float32 output, and no pre-activation GEMM to
recompute in backward. The bit is relu's ``~(y <= 0)`` (NaN passes the gradient, as
threshold_backward) and leaky relu's ``y > 0`` (NaN takes the slope, as leaky_relu_backward);
where it is clear, dz is 0 (relu) or ``negative_slope * g`` (leaky relu)."""

from __future__ import annotations

import math

import torch

from . import _ops

_BITS = 8
_BIT = {"relu": lambda y: (y <= 0).logical_not_(), "leaky_relu": lambda y: y > 0}


def _weights(device):
    return torch.tensor([1 << i for i in range(_BITS)], dtype=torch.uint8, device=device)


def pack(out: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """uint8 tensor of ceil(out.numel() / 8) bytes; bit i of byte j is element 8j + i."""
    if out.device.type == "cpu" and _ops.has_kernel("CPU"):
        return torch.ops.fused_backprop.sign_mask_pack.default(out, activation)  # one pass in C++
    return pack_composite(out, activation)


def pack_composite(out: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """``pack`` from torch ops, on any device."""
    if activation not in _BIT:
        raise ValueError(f"activation must be one of {tuple(_BIT)} for a sign mask, got {activation!r}")
    bits = _BIT[activation](out).flatten()
    pad = -bits.numel() % _BITS
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, _BITS).to(torch.uint8) * _weights(out.device)).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The mask as 0/1 values of ``dtype`` and ``shape``: a stand-in for the layer output in relu's
    and leaky relu's backward (their derivative from y = 1 or 0 is that of the branch the bit
    names)."""
    numel = math.prod(shape)
    bits = (packed[:, None] & _weights(packed.device)) != 0
    return bits.flatten()[:numel].view(shape).to(dtype)
