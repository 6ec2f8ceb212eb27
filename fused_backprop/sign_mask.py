"""A 1-bit packed mask of where relu passes the gradient (``~(y <= 0)``: NaN passes, as in torch).

ReLU's backward needs only this sign, so a layer that does not keep its output (``recompute=True``)
can keep these bits instead: 32x smaller than a float32 output, and no pre-activation GEMM to
recompute in backward."""

from __future__ import annotations

import math

import torch

from . import _ops

_BITS = 8


def _weights(device):
    return torch.tensor([1 << i for i in range(_BITS)], dtype=torch.uint8, device=device)


def pack(out: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of ceil(out.numel() / 8) bytes; bit i of byte j is element 8j + i."""
    if out.device.type == "cpu" and _ops.has_kernel("CPU"):
        return torch.ops.fused_backprop.sign_mask_pack.default(out)  # one pass in C++
    return pack_composite(out)


def pack_composite(out: torch.Tensor) -> torch.Tensor:
    """``pack`` from torch ops, on any device."""
    bits = (out <= 0).logical_not_().flatten()
    pad = -bits.numel() % _BITS
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, _BITS).to(torch.uint8) * _weights(out.device)).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The mask as 0/1 values of ``dtype`` and ``shape``: relu's derivative, and a stand-in for
    the layer output in relu's backward (relu'(0/1) = 0/1)."""
    numel = math.prod(shape)
    bits = (packed[:, None] & _weights(packed.device)) != 0
    return bits.flatten()[:numel].view(shape).to(dtype)
