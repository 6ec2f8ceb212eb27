"""Composite eager PyTorch ops: runs anywhere, and its backward is differentiable, so it is the
backend every other one falls back to when a graph is built in backward (double backward)."""

from __future__ import annotations

import torch.nn.functional as F

from ..activations import ACTIVATIONS
from . import Backend, register


def forward(x, weight, bias, activation):
    return ACTIVATIONS[activation].forward(F.linear(x, weight, bias))


def backward(grad_out, x, weight, bias, out, activation, output_mask):
    act = ACTIVATIONS[activation]
    if out is None:
        dz = grad_out * act.grad_from_preact(F.linear(x, weight, bias))
    else:
        dz = grad_out * act.grad_from_output(out)
    dx = dz.mm(weight) if output_mask[0] else None
    dw = dz.t().mm(x) if output_mask[1] else None
    db = dz.sum(0) if output_mask[2] and bias is not None else None
    return dx, dw, db


register(Backend("torch", forward, backward, supports=lambda device: True,
                 auto_priority=10, differentiable=True))
