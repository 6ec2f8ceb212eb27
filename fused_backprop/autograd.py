"""Autograd for the fused layer.

The public path is ``LinearActFunction`` (an ``autograd.Function`` that only calls a backend, as
FlashAttention's fused_dense does); the registered ops get the same formula through
``torch.library.register_autograd``. Both end in ``linear_act_backward``, which also decides
when a differentiable backward is needed: if a graph is being built during backward
(``create_graph=True``, double backward), it runs the composite ``torch`` backend instead of the
kernels, whose outputs autograd cannot see through.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends, sign_mask
from .backends import Backend


def linear_act_backward(grad_out, x, weight, bias, out, activation, output_mask, backend: Backend):
    """(dx, dw, db) of ``act(x @ weight.T + bias)``; ``out=None`` recomputes the pre-activation,
    and a uint8 ``out`` is relu's packed sign mask."""
    if torch.is_grad_enabled() and not backend.differentiable:
        backend = backends.get("torch")
    if out is not None and out.dtype == torch.uint8 and not backend.accepts_sign_mask:
        out = sign_mask.unpack(out, grad_out.shape, x.dtype)
    return backend.backward(grad_out, x, weight, bias, out, activation, output_mask)


def _output_mask(needs_input_grad, bias) -> tuple[bool, bool, bool]:
    return bool(needs_input_grad[0]), bool(needs_input_grad[1]), bool(needs_input_grad[2]) and bias is not None


class LinearActFunction(torch.autograd.Function):
    """``act(x @ weight.T + bias)`` for a 2-D x on a chosen backend. Saves (x, weight, bias, out),
    or with ``recompute=True`` only (x, weight, bias) — plus, for relu, the 1-bit sign mask of the
    output, which spares backward the pre-activation GEMM (``sign_mask``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation: str, recompute: bool, backend: Backend):
        out = backend.forward(x, weight, bias, activation)
        ctx.activation, ctx.backend = activation, backend
        if not recompute:
            ctx.save_for_backward(x, weight, bias, out)
        elif activation == "relu":
            ctx.save_for_backward(x, weight, bias, sign_mask.pack(out))
        else:
            ctx.save_for_backward(x, weight, bias, None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, out = ctx.saved_tensors
        dx, dw, db = linear_act_backward(grad_out, x, weight, bias, out, ctx.activation,
                                         _output_mask(ctx.needs_input_grad, bias), ctx.backend)
        return dx, dw, db, None, None, None


def register_op_autograd(op_name: str, backend_name: Optional[str]) -> None:
    """Registers the backward of a registered forward op ``op(x, weight, bias, activation)``.

    ``backend_name`` is the backend whose backward runs (None: the compiled backend of the
    tensors' device, i.e. "cpu" or "cuda")."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        ctx.activation = activation
        ctx.save_for_backward(x, weight, bias, output)

    def backward(ctx, grad_out):
        x, weight, bias, out = ctx.saved_tensors
        backend = backends.get(backend_name or x.device.type)
        dx, dw, db = linear_act_backward(grad_out, x, weight, bias, out, ctx.activation,
                                         _output_mask(ctx.needs_input_grad, bias), backend)
        return dx, dw, db, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def register_backward_op_autograd(op_name: str) -> None:
    """Makes a registered backward op ``op(grad_out, x, weight, bias, out, activation, output_mask)``
    differentiable (so calling it directly on tensors that require grad is never silently wrong):
    its vector-Jacobian product is that of the composite ``torch`` backend's backward formula."""
    tensor_names = ("grad_out", "x", "weight", "bias", "out")

    def setup_context(ctx, inputs, output):
        *tensors, activation, output_mask = inputs
        ctx.activation, ctx.output_mask = activation, output_mask
        ctx.save_for_backward(*tensors)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        wanted = [i for i, t in enumerate(saved) if t is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(saved)]
            outs = backends.get("torch").backward(*inputs, ctx.activation, ctx.output_mask)
            pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and o.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                        [g for _, g in pairs], allow_unused=True) if pairs else [None] * len(wanted)
        result = [None] * (len(tensor_names) + 2)
        for i, g in zip(wanted, found):
            result[i] = g if g is not None else torch.zeros_like(saved[i])
        return tuple(result)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
