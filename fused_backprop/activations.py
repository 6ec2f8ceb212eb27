"""Relu and sigmoid for the composite ``torch`` backend, each with its derivative written from the
layer output (what the fused kernels save) and from the pre-activation (what ``recompute``
rebuilds). The compiled kernels take theirs from ``csrc/activation.h``; the NumPy reference keeps
its own on purpose, as the independent oracle."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

NAMES = ("relu", "sigmoid")


class ActivationFns(NamedTuple):
    forward: Callable[[torch.Tensor], torch.Tensor]
    grad_from_output: Callable[[torch.Tensor], torch.Tensor]
    grad_from_preact: Callable[[torch.Tensor], torch.Tensor]


def _relu_grad(v: torch.Tensor) -> torch.Tensor:
    # 0 where v <= 0, else 1: relu'(0) = 0, and NaN passes the gradient like threshold_backward.
    # y <= 0 exactly where z <= 0, so the same function serves output and pre-activation.
    return (v <= 0).logical_not().to(v.dtype)


def _sigmoid_grad_from_output(y: torch.Tensor) -> torch.Tensor:
    return y * (1 - y)


ACTIVATIONS = {
    "relu": ActivationFns(torch.relu, _relu_grad, _relu_grad),
    "sigmoid": ActivationFns(torch.sigmoid, _sigmoid_grad_from_output,
                             lambda z: _sigmoid_grad_from_output(torch.sigmoid(z))),
}
