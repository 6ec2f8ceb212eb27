"""The NumPy reference (``fused_backprop.reference``) as a backend: computes in float64 on the CPU
and hands back tensors in the input's dtype. For tests and teaching; ``auto`` never picks it."""

from __future__ import annotations

import torch

from .. import reference
from ..activations import saves_output
from . import Backend, register


def _to_numpy(t):
    return None if t is None else t.detach().cpu().double().numpy()


def _to_tensor(a, like: torch.Tensor):
    return torch.from_numpy(a).to(dtype=like.dtype, device=like.device)


def forward(x, weight, bias, activation, negative_slope):
    out = reference.forward(_to_numpy(x), _to_numpy(weight), _to_numpy(bias), activation, negative_slope)
    return _to_tensor(out, x)


def forward_preact(x, weight, bias, activation, negative_slope):
    z = _to_numpy(x) @ _to_numpy(weight).T + (0 if bias is None else _to_numpy(bias))
    return _to_tensor(reference.ACTIVATIONS[activation].forward(z, negative_slope), x), _to_tensor(z, x)


def backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope):
    kept = {"y" if saves_output(activation, negative_slope) else "z": _to_numpy(out)}
    grads = reference.backward(_to_numpy(grad_out), _to_numpy(x), _to_numpy(weight), _to_numpy(bias),
                               activation=activation, negative_slope=negative_slope, **kept)
    return tuple(_to_tensor(g, x) if wanted and g is not None else None
                 for g, wanted in zip(grads, output_mask))


register(Backend("numpy", forward, forward_preact, backward, supports=lambda device: device.type == "cpu",
                 auto_priority=None, differentiable=False))
