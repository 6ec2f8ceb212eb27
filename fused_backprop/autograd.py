"""Autograd for the fused layer.

The public path is ``LinearActFunction`` (an ``autograd.Function`` that only calls a backend, as
FlashAttention's fused_dense does); the registered ops get the same formula through
``torch.library.register_autograd``. What the forward keeps for backward is decided once, in
``linear_act_forward``. Both paths end in ``linear_act_backward``, which also decides when the
backward must itself be differentiable: when a graph is recorded during backward
(``create_graph=True``: double backward, gradient penalties), under a torch.func transform or in
a forward-mode AD level, it runs as ``LinearActBackward``, a Function of its own whose forward is
the fused first-order backward and whose backward (the double backward) and jvp
(forward-over-reverse) are ``func.linear_act_bwd_bwd``.

Each Function comes in two forms with one backward. The setup_context form (``LinearActFunction``,
``LinearActBackward``) is what torch.func requires, with ``vmap`` and ``jvp`` rules; but
``Function.apply`` binds the arguments of a setup_context-form forward with ``inspect.signature``
on every call (10-25 us, more than a small layer's whole step), so calls made outside any
transform or dual level take the combined (ctx) form, ``EagerLinearActFunction`` /
``EagerLinearActBackward``: the same saving policy and backward, no jvp (torch.compile cannot
trace an ``autograd.Function`` that defines one). ``func.transforms_active()`` picks between them
(about 0.1 us). Plain calls on CPU tensors come here only when the C++ call path
(csrc/call_path.cpp, tried first by ``functional.linear_act``) declines them: it keeps what
``linear_act_forward`` keeps, records a C++ node, and calls ``linear_act_backward`` when a
graph is recorded during backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends, func, sign_mask
from .activations import ACTIVATIONS, saves_output, uses_sign_mask
from .backends import Backend
from .func import jvp_rule_tensors, linear_act_bwd_bwd, linear_act_tangent, transforms_active


def backward_kernels(grad_out, x, weight, bias, out, activation, output_mask, negative_slope, backend: Backend):
    """(dx, dw, db) from ``backend``'s backward, which nothing differentiates."""
    if out is not None and out.dtype == torch.uint8 and not backend.accepts_sign_mask:
        out = sign_mask.unpack(out, grad_out.shape, x.dtype)
    return backend.backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope)


def linear_act_backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope,
                        backend: Backend):
    """(dx, dw, db) of ``act(x @ weight.T + bias)``; ``out`` is what the forward kept: the layer
    output or the pre-activation (``activations.saves_output``), a uint8 packed sign mask, or None
    to recompute the pre-activation. Differentiable (``LinearActBackward``) when that may be
    needed (``func.needs_graph()``), else the backend's kernels alone."""
    if not func.needs_graph():
        return backward_kernels(grad_out, x, weight, bias, out, activation, output_mask, negative_slope, backend)
    mask = (bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and bias is not None)
    return backward_function().apply(grad_out, x, weight, bias, out, activation, negative_slope, mask, backend)


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


def _linear_act_vjp(ctx, grad_out):
    x, weight, bias, kept = ctx.saved_tensors
    dx, dw, db = linear_act_backward(grad_out, x, weight, bias, kept, ctx.activation,
                                     _output_mask(ctx.needs_input_grad, bias), ctx.negative_slope, ctx.backend)
    return dx, dw, db, None, None, None, None


class LinearActFunction(torch.autograd.Function):
    """``act(x @ weight.T + bias)`` for a 2-D x on a chosen backend, in the setup_context form that
    torch.func needs. Saves (x, weight, bias) and the output where act' is a function of it (else
    nothing: backward recomputes the pre-activation; ``recompute``'s memory savings, the sign mask
    and the kept pre-activation, are ``EagerLinearActFunction``'s)."""

    @staticmethod
    def forward(x, weight, bias, activation: str, negative_slope: float, recompute: bool, backend: Backend):
        return backend.forward(x, weight, bias, activation, negative_slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation, negative_slope, _, backend = inputs
        ctx.activation, ctx.negative_slope, ctx.backend = activation, negative_slope, backend
        saved = (x, weight, bias, output if saves_output(activation, negative_slope) else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    backward = staticmethod(_linear_act_vjp)

    @staticmethod
    def jvp(ctx, *tangents):
        with jvp_rule_tensors(*ctx.saved_tensors, *tangents[:3]) as (x, weight, bias, kept, x_t, weight_t, bias_t):
            return linear_act_tangent(x, weight, bias, x_t, weight_t, bias_t, kept, ctx.activation,
                                      ctx.negative_slope, fused=func.fused_for(ctx.backend))

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, activation, negative_slope, recompute, backend):
        def apply(x, weight, bias):
            return linear_act_function().apply(x, weight, bias, activation, negative_slope, recompute, backend)

        return func.forward_vmap(apply, info.batch_size, in_dims, x, weight, bias, activation, negative_slope)


class EagerLinearActFunction(torch.autograd.Function):
    """``LinearActFunction`` in the combined (ctx) form, for calls outside torch.func transforms
    and dual levels (see the module doc). Saves (x, weight, bias) and what ``linear_act_forward``
    keeps."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation: str, negative_slope: float, recompute: bool, backend: Backend):
        out, kept = linear_act_forward(x, weight, bias, activation, negative_slope, recompute, backend)
        ctx.activation, ctx.negative_slope, ctx.backend = activation, negative_slope, backend
        ctx.save_for_backward(x, weight, bias, kept)
        return out

    backward = staticmethod(_linear_act_vjp)


def linear_act_function():
    """The form of the layer's Function that runs here and now."""
    return LinearActFunction if transforms_active() else EagerLinearActFunction


class LinearActBackward(torch.autograd.Function):
    """The layer's backward ``(grad_out, x, weight, bias, kept) -> (dx, dw, db)`` as a Function
    (setup_context form): its forward is the backend's fused backward; its backward is the double
    backward and its jvp the forward-over-reverse product, both from ``func.linear_act_bwd_bwd``.
    ``kept`` is a cache of act(z) or z (what the forward kept): no gradient flows into it, the
    formulas differentiate through z = x Wᵀ + b themselves."""

    @staticmethod
    def forward(grad_out, x, weight, bias, kept, activation: str, negative_slope: float, output_mask: tuple,
                backend: Backend):
        return backward_kernels(grad_out, x, weight, bias, kept, activation, output_mask, negative_slope, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, bias, kept, activation, negative_slope, output_mask, backend = inputs
        ctx.activation, ctx.negative_slope = activation, negative_slope
        ctx.output_mask, ctx.backend = output_mask, backend
        ctx.save_for_backward(grad_out, x, weight, bias, kept)
        ctx.save_for_forward(grad_out, x, weight, bias, kept)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        grad_out, x, weight, bias, kept = ctx.saved_tensors
        grads = linear_act_bwd_bwd(grad_out, x, weight, bias, kept, ggx, ggw, ggb, ctx.activation, ctx.negative_slope,
                                   ctx.needs_input_grad[:4], fused=func.fused_for(ctx.backend))
        return (*grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        mask, fused = ctx.output_mask, func.fused_for(ctx.backend)
        with jvp_rule_tensors(*ctx.saved_tensors, *tangents[:4]) as tensors:
            grad_out, x, weight, bias, kept, grad_out_t, x_t, weight_t, bias_t = tensors
            # (dx, dW, db) is linear in grad_out: its tangent there is the backward of grad_out_t.
            # In (x, W, b) the Jacobian is the Hessian of <grad_out, y>, symmetric: the double
            # backward's product with the tangents.
            _, *tangents = linear_act_bwd_bwd(grad_out, x, weight, bias, kept, x_t, weight_t, bias_t, ctx.activation,
                                              ctx.negative_slope, (False, *mask), fused=fused)
            if grad_out_t is not None:
                linear = backward_function().apply(grad_out_t, x, weight, bias, kept, ctx.activation,
                                                   ctx.negative_slope, mask, ctx.backend)
                tangents = [func.add_maybe(t, u) for t, u in zip(tangents, linear)]
            return tuple(None if not wanted else t if t is not None else torch.zeros_like(like)
                         for t, wanted, like in zip(tangents, mask, (x, weight, bias)))

    @staticmethod
    def vmap(info, in_dims, grad_out, x, weight, bias, kept, activation, negative_slope, output_mask, backend):
        def apply(grad_out, x, weight, bias, kept, mask):
            return backward_function().apply(grad_out, x, weight, bias, kept, activation, negative_slope, mask, backend)

        return func.backward_vmap(apply, info.batch_size, in_dims, grad_out, x, weight, bias, kept, activation,
                                  negative_slope, output_mask)


def eager_form(cls, doc: str):
    """``cls`` (a setup_context-form Function) in the combined (ctx) form: the same forward,
    saving and backward, no jvp or vmap; for calls outside transforms (see the module doc)."""

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    return type(f"Eager{cls.__name__}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(cls.backward), "__doc__": doc,
                 "__module__": cls.__module__})


EagerLinearActBackward = eager_form(LinearActBackward, "``LinearActBackward`` in the combined (ctx) form.")


def backward_function():
    """The form of the backward's Function that runs here and now."""
    return LinearActBackward if transforms_active() else EagerLinearActBackward


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


def register_composite_op_autograd(op_name: str, n_tensors: int, composite) -> None:
    """Makes a registered op whose first ``n_tensors`` arguments are (optional) tensors
    differentiable (so calling it directly on tensors that require grad is never silently wrong):
    its vector-Jacobian product is that of ``composite(*tensors, *other_args)``, the same formula
    in torch ops (the backward, jvp and double-backward ops)."""

    def setup_context(ctx, inputs, output):
        ctx.others = inputs[n_tensors:]
        ctx.save_for_backward(*inputs[:n_tensors])

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        wanted = [i for i, t in enumerate(saved) if t is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(saved)]
            outs = composite(*inputs, *ctx.others)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and o.requires_grad and g is not None]
            found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                        [g for _, g in pairs], allow_unused=True) if pairs else [None] * len(wanted)
        result = [None] * (n_tensors + len(ctx.others))
        for i, g in zip(wanted, found):
            result[i] = g if g is not None else torch.zeros_like(saved[i])
        return tuple(result)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def register_backward_op_autograd(op_name: str) -> None:
    """``op(grad_out, x, weight, bias, out, activation, output_mask, negative_slope)``: the
    composite ``torch`` backend's backward formula gives its vector-Jacobian product."""
    register_composite_op_autograd(op_name, 5, lambda *args: backends.get("torch").backward(*args))
