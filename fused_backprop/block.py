"""Block recomputation for a stack of layers (``FusedMLP(recompute="block")``).

One ``autograd.Function`` over the whole stack saves only the block input (and the parameters,
which the model holds anyway). Backward first reruns the fused forward kernels under no_grad to
rebuild the layer inputs (no autograd graph is built, unlike ``torch.utils.checkpoint``), then
runs each layer's fused backward from the last layer to the first, dropping every recomputed
activation as soon as the last layer that reads it is done.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import backends, sign_mask
from .activations import saves_output, uses_sign_mask
from .autograd import linear_act_backward
from .backends import Backend


class LayerSpec(NamedTuple):
    activation: Optional[str]  # None: a plain linear layer (the logits of last_activation=False)
    negative_slope: Optional[float]
    has_bias: bool


def _split_params(specs, params):
    """[(weight, bias or None)] per layer from the flat parameter list."""
    out, i = [], 0
    for spec in specs:
        w, b = params[i], params[i + 1] if spec.has_bias else None
        i += 2 if spec.has_bias else 1
        out.append((w, b))
    return out


def _layer_forward(backend: Backend, spec: LayerSpec, x, w, b):
    if spec.activation is None:
        return F.linear(x, w, b)
    return backend.forward(x, w, b, spec.activation, spec.negative_slope)


def _stack_forward(backend, specs, x, layers):
    for spec, (w, b) in zip(specs, layers):
        x = _layer_forward(backend, spec, x, w, b)
    return x


class BlockFunction(torch.autograd.Function):
    """``stack(x)`` for a 2-D x; saves x and the parameters only."""

    @staticmethod
    def forward(ctx, x, specs: tuple, backend: Backend, *params):
        ctx.specs, ctx.backend = specs, backend
        ctx.save_for_backward(x, *params)
        return _stack_forward(backend, specs, x, _split_params(specs, params))

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        specs, backend = ctx.specs, ctx.backend
        layers = _split_params(specs, params)
        if torch.is_grad_enabled():
            grads = _differentiable_backward(specs, x, params, layers, grad_out, ctx.needs_input_grad)
        else:
            grads = _fused_backward(backend, specs, x, layers, grad_out, ctx.needs_input_grad)
        return (grads[0], None, None, *grads[1:])


def _fused_backward(backend, specs, x, layers, grad, needs_input_grad):
    # Rebuild each layer's input: hidden[i] feeds layer i. What layer i's backward reads of its
    # output: the packed sign mask (relu, leaky relu: so hidden[i + 1] can go as soon as layer
    # i + 1 is done), the output itself (sigmoid, tanh), or nothing (gelu, silu: their backward
    # recomputes the pre-activation); the last layer's output is not rebuilt at all (its backward
    # recomputes the pre-activation in cache: the same GEMM, one activation less held).
    hidden, outs = [x], []
    for spec, (w, b) in zip(specs[:-1], layers[:-1]):
        hidden.append(_layer_forward(backend, spec, hidden[-1], w, b))
        outs.append(_kept(spec, hidden[-1]))
    outs.append(None)
    flags = iter(needs_input_grad[3:])
    param_needs = [(next(flags), next(flags) if b is not None else False) for _, b in layers]
    param_grads = []
    for i in reversed(range(len(specs))):
        spec, (w, b) = specs[i], layers[i]
        layer_in, out = hidden.pop(), outs.pop()
        mask = (i > 0 or needs_input_grad[0], *param_needs[i])
        if spec.activation is None:
            dx = grad.mm(w) if mask[0] else None
            dw = grad.t().mm(layer_in) if mask[1] else None
            db = grad.sum(0) if mask[2] else None
        else:
            dx, dw, db = linear_act_backward(grad, layer_in, w, b, out, spec.activation, mask, spec.negative_slope,
                                             backend)
        del layer_in, out
        param_grads[:0] = [dw] + ([db] if b is not None else [])
        grad = dx
    return [grad, *param_grads]


def _kept(spec: LayerSpec, out):
    """What a layer's backward reads of its rebuilt output (None: recompute the pre-activation)."""
    if spec.activation is None or not saves_output(spec.activation, spec.negative_slope):
        return None
    return sign_mask.pack(out, spec.activation) if uses_sign_mask(spec.activation, spec.negative_slope) else out


def _differentiable_backward(specs, x, params, layers, grad_out, needs_input_grad):
    """Double backward: the same gradients built from composite torch ops, so autograd can
    differentiate them again."""
    torch_backend = backends.get("torch")
    out = _stack_forward(torch_backend, specs, x, layers)
    wanted = [t for t, need in zip([x, *params], [needs_input_grad[0], *needs_input_grad[3:]]) if need]
    found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return [next(found) if need else None for need in [needs_input_grad[0], *needs_input_grad[3:]]]
