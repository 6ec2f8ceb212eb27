"""The compiled extension's kernels (C++ on the CPU, C++/CUDA on NVIDIA GPUs), reached through the
registered ops ``torch.ops.fused_backprop.linear_act_fwd`` / ``linear_act_bwd``; the dispatcher
picks the CPU or CUDA kernel from the tensors' device."""

from __future__ import annotations

import torch

from .. import _ops
from . import Backend, register


def forward(x, weight, bias, activation):
    return torch.ops.fused_backprop.linear_act_fwd.default(x, weight, bias, activation)


def backward(grad_out, x, weight, bias, out, activation, output_mask):
    mask = [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and bias is not None]
    dx, dw, db = torch.ops.fused_backprop.linear_act_bwd.default(grad_out, x, weight, bias, out, activation, mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None)


register(Backend("cpu", forward, backward, auto_priority=0, accepts_sign_mask=True,
                 supports=lambda device: device.type == "cpu" and _ops.has_kernel("CPU")))
register(Backend("cuda", forward, backward, auto_priority=2,
                 supports=lambda device: device.type == "cuda" and _ops.has_kernel("CUDA")))
