"""Composite eager PyTorch ops: runs anywhere, its backward built from differentiable torch ops
(the other backends get double backward and torch.func from ``autograd.LinearActBackward``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import ACTIVATIONS, saves_output
from . import Backend, register


def forward(x, weight, bias, activation, negative_slope):
    return ACTIVATIONS[activation].forward(F.linear(x, weight, bias), negative_slope)


def forward_preact(x, weight, bias, activation, negative_slope):
    z = F.linear(x, weight, bias)
    return ACTIVATIONS[activation].forward(z, negative_slope), z


def backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope):
    act = ACTIVATIONS[activation]
    v = F.linear(x, weight, bias) if out is None else out
    grad = act.grad_from_output if out is not None and saves_output(activation, negative_slope) else act.grad_from_preact
    # act' in float for 16-bit types, as torch's own backward kernels (z² overflows float16 at 256)
    wide = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    dz = grad_out * grad(wide, negative_slope).to(v.dtype)
    dx = dz.mm(weight) if output_mask[0] else None
    dw = dz.t().mm(x) if output_mask[1] else None
    db = dz.sum(0) if output_mask[2] and bias is not None else None
    return dx, dw, db


register(Backend("torch", forward, forward_preact, backward, supports=lambda device: True,
                 auto_priority=10, differentiable=True))
