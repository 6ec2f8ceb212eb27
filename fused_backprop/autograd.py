"""Autograd for the fused layer.

The public path is ``LinearActFunction`` (an ``autograd.Function`` that only calls a backend, as
FlashAttention's fused_dense does); the registered ops get the same formula through
``torch.library.register_autograd``. What the forward keeps for backward is decided once, in
``linear_act_forward``. Both paths end in ``linear_act_backward``, which also decides when a
differentiable backward is needed: if a graph is being built during backward
(``create_graph=True``, double backward), it runs the composite ``torch`` backend instead of the
kernels, whose outputs autograd cannot see through.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends, sign_mask
from .activations import ACTIVATIONS, saves_output, uses_sign_mask
from .backends import Backend


def linear_act_backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope,
                        backend: Backend):
    """(dx, dw, db) of ``act(x @ weight.T + bias)``; ``out`` is what the forward kept: the layer
    output or the pre-activation (``activations.saves_output``), a uint8 packed sign mask, or None
    to recompute the pre-activation."""
    if torch.is_grad_enabled() and not backend.differentiable:
        backend = backends.get("torch")
        if not saves_output(activation, negative_slope):
            out = None  # a kept pre-activation is not in the graph: rebuild it from x, weight, bias
    if out is not None and out.dtype == torch.uint8 and not backend.accepts_sign_mask:
        out = sign_mask.unpack(out, grad_out.shape, x.dtype)
    return backend.backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope)


def linear_act_forward(x, weight, bias, activation, negative_slope, recompute, backend: Backend):
    """(out, kept): the layer output and what backward will need of it (``linear_act_backward``'s
    ``out``): the output itself, or the pre-activation where the derivative is not a function of
    the output; under ``recompute``, relu's and leaky relu's packed sign mask, or None."""
    if saves_output(activation, negative_slope):
        out = backend.forward(x, weight, bias, activation, negative_slope)
        if not recompute:
            return out, out
        return out, sign_mask.pack(out, activation) if uses_sign_mask(activation, negative_slope) else None
    if recompute:
        return backend.forward(x, weight, bias, activation, negative_slope), None
    return backend.forward_preact(x, weight, bias, activation, negative_slope)


def _output_mask(needs_input_grad, bias) -> tuple[bool, bool, bool]:
    return bool(needs_input_grad[0]), bool(needs_input_grad[1]), bool(needs_input_grad[2]) and bias is not None


class LinearActFunction(torch.autograd.Function):
    """``act(x @ weight.T + bias)`` for a 2-D x on a chosen backend. Saves (x, weight, bias) and
    what ``linear_act_forward`` keeps."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation: str, negative_slope: float, recompute: bool, backend: Backend):
        out, kept = linear_act_forward(x, weight, bias, activation, negative_slope, recompute, backend)
        ctx.activation, ctx.negative_slope, ctx.backend = activation, negative_slope, backend
        ctx.save_for_backward(x, weight, bias, kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, kept = ctx.saved_tensors
        dx, dw, db = linear_act_backward(grad_out, x, weight, bias, kept, ctx.activation,
                                         _output_mask(ctx.needs_input_grad, bias), ctx.negative_slope, ctx.backend)
        return dx, dw, db, None, None, None, None


def register_op_autograd(op_name: str, backend_name: Optional[str]) -> None:
    """Registers the backward of a registered forward op ``op(x, weight, bias, activation,
    negative_slope)``. It keeps the output where the derivative is a function of it, else
    recomputes the pre-activation.

    ``backend_name`` is the backend whose backward runs (None: the compiled backend of the
    tensors' device, i.e. "cpu" or "cuda")."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, activation, negative_slope = inputs
        ctx.activation, ctx.negative_slope = activation, negative_slope
        ctx.save_for_backward(x, weight, bias, output if saves_output(activation, negative_slope) else None)

    def backward(ctx, grad_out):
        x, weight, bias, out = ctx.saved_tensors
        backend = backends.get(backend_name or x.device.type)
        dx, dw, db = linear_act_backward(grad_out, x, weight, bias, out, ctx.activation,
                                         _output_mask(ctx.needs_input_grad, bias), ctx.negative_slope, backend)
        return dx, dw, db, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def register_preact_op_autograd(op_name: str) -> None:
    """Registers the backward of ``op(x, weight, bias, activation, negative_slope) -> (out, z)``:
    both outputs' gradients reach z, dz = grad_out ⊙ act'(z) + grad_z, then the linear layer's."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, activation, negative_slope = inputs
        ctx.activation, ctx.negative_slope = activation, negative_slope
        ctx.save_for_backward(x, weight, bias, output[1])

    def backward(ctx, grad_out, grad_z):
        x, weight, bias, z = ctx.saved_tensors
        dz = grad_out * ACTIVATIONS[ctx.activation].grad_from_preact(z, ctx.negative_slope)
        if grad_z is not None:
            dz = dz + grad_z
        dx = dz.mm(weight) if ctx.needs_input_grad[0] else None
        dw = dz.t().mm(x) if ctx.needs_input_grad[1] else None
        db = dz.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def register_backward_op_autograd(op_name: str) -> None:
    """Makes a registered backward op ``op(grad_out, x, weight, bias, out, activation, output_mask,
    negative_slope)`` differentiable (so calling it directly on tensors that require grad is never
    silently wrong): its vector-Jacobian product is that of the composite ``torch`` backend's
    backward formula."""
    tensor_names = ("grad_out", "x", "weight", "bias", "out")

    def setup_context(ctx, inputs, output):
        *tensors, activation, output_mask, negative_slope = inputs
        ctx.activation, ctx.output_mask, ctx.negative_slope = activation, output_mask, negative_slope
        ctx.save_for_backward(*tensors)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        wanted = [i for i, t in enumerate(saved) if t is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(saved)]
            outs = backends.get("torch").backward(*inputs, ctx.activation, ctx.output_mask, ctx.negative_slope)
            pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and o.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                        [g for _, g in pairs], allow_unused=True) if pairs else [None] * len(wanted)
        result = [None] * (len(tensor_names) + 3)
        for i, g in zip(wanted, found):
            result[i] = g if g is not None else torch.zeros_like(saved[i])
        return tuple(result)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
