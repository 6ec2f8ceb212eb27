"""Block recomputation for a stack of layers (``FusedMLP(recompute="block")``).

One ``autograd.Function`` over the whole stack saves only the block input (and the parameters,
which the model holds anyway). Backward first reruns the fused forward kernels under no_grad to
rebuild the layer inputs (no autograd graph is built, unlike ``torch.utils.checkpoint``), then
runs each layer's fused backward from the last layer to the first, dropping every recomputed
activation as soon as the last layer that reads it is done.

When the backward must itself be differentiable (double backward, torch.func transforms), it
rebuilds the layer inputs through the layer's own Function and runs each layer's backward as
``LinearActBackward``: the same kernels, and the fused double backward. Like the layer's, the
Function comes in the setup_context form (``BlockFunction``: vmap, jvp) and the combined form
for plain calls (``EagerBlockFunction``); ``apply_block`` picks one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import sign_mask
from .activations import saves_output, uses_sign_mask
from .autograd import eager_form, linear_act_backward, linear_act_function
from .backends import Backend
from .func import (batch_first, batched_linear_act, fused_for, jvp_rule_tensors, linear_act_tangent, linear_tangent,
                   needs_graph, rows_of_batch, sample_shape, transforms_active)


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
    def forward(x, specs: tuple, backend: Backend, *params):
        return _stack_forward(backend, specs, x, _split_params(specs, params))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, specs, backend, *params = inputs
        ctx.specs, ctx.backend = specs, backend
        ctx.save_for_backward(x, *params)
        ctx.save_for_forward(x, *params)

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        grads = _fused_backward(ctx.backend, ctx.specs, x, _split_params(ctx.specs, params), grad_out,
                                ctx.needs_input_grad, composable=needs_graph())
        return (grads[0], None, None, *grads[1:])

    @staticmethod
    def jvp(ctx, x_tangent, _specs_t, _backend_t, *param_tangents):
        with jvp_rule_tensors(*ctx.saved_tensors, x_tangent, *param_tangents) as tensors:
            n = len(param_tangents)
            x, params, x_t, params_t = tensors[0], tensors[1:n + 1], tensors[n + 1], tensors[n + 2:]
            layers, tangents = _split_params(ctx.specs, params), _split_params(ctx.specs, params_t)
            h, h_t = x, x_t
            for spec, (w, b), (w_t, b_t) in zip(ctx.specs, layers, tangents):
                out = _layer_apply(ctx.backend, spec, h, w, b)
                if h_t is not None or w_t is not None or b_t is not None:
                    h_t = (linear_tangent(h, w, h_t, w_t, b_t) if spec.activation is None else
                           linear_act_tangent(h, w, b, h_t, w_t, b_t, out if _saves(spec) else None, spec.activation,
                                              spec.negative_slope, fused=fused_for(ctx.backend)))
                h = out
            return h_t if h_t is not None else h.new_zeros(h.shape)

    @staticmethod
    def vmap(info, in_dims, x, specs, backend, *params):
        x_dim, param_dims = in_dims[0], in_dims[3:]
        if all(d is None for d in param_dims):
            out = apply_block(rows_of_batch(x, x_dim, info.batch_size), specs, backend, *params)
            return out.view(info.batch_size, sample_shape(x, x_dim)[0], out.shape[-1]), 0
        h = batch_first(x, x_dim)
        layers = _split_params(specs, [batch_first(p, d) for p, d in zip(params, param_dims)])
        for spec, (w, b) in zip(specs, layers):
            h = batched_linear_act(h, w, b, spec.activation, spec.negative_slope)
        return h, 0


EagerBlockFunction = eager_form(BlockFunction, "``BlockFunction`` in the combined (ctx) form.")


def apply_block(x, specs: tuple, backend: Backend, *params):
    """``stack(x)`` through the form of the block's Function that runs here and now."""
    return (BlockFunction if transforms_active() else EagerBlockFunction).apply(x, specs, backend, *params)


def _saves(spec: LayerSpec) -> bool:
    return saves_output(spec.activation, spec.negative_slope)


def _layer_apply(backend: Backend, spec: LayerSpec, x, w, b):
    """One layer, differentiable: through the layer's Function (or F.linear)."""
    if spec.activation is None:
        return F.linear(x, w, b)
    return linear_act_function().apply(x, w, b, spec.activation, spec.negative_slope, False, backend)


def _fused_backward(backend, specs, x, layers, grad, needs_input_grad, composable=False):
    # Rebuild each layer's input: hidden[i] feeds layer i. What layer i's backward reads of its
    # output: the packed sign mask (relu, leaky relu: so hidden[i + 1] can go as soon as layer
    # i + 1 is done), the output itself (sigmoid, tanh), or nothing (gelu, silu: their backward
    # recomputes the pre-activation); the last layer's output is not rebuilt at all (its backward
    # recomputes the pre-activation in cache: the same GEMM, one activation less held).
    # ``composable``: the gradients will be differentiated again, so the layer inputs are rebuilt
    # in the graph (the layer's Function) and each backward reads the output itself (no mask:
    # the tensors may be torch.func wrappers); linear_act_backward then runs LinearActBackward.
    hidden, outs = [x], []
    for spec, (w, b) in zip(specs[:-1], layers[:-1]):
        if composable:
            hidden.append(_layer_apply(backend, spec, hidden[-1], w, b))
            outs.append(hidden[-1] if spec.activation is not None and _saves(spec) else None)
        else:
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
