"""The fused layer under torch.func: the derivatives the autograd Functions need beyond the
first-order kernels, and the batched (vmap) forms.

* ``linear_act_tangent``: the layer's jvp (forward-mode AD), ẏ = act'(z) ⊙ (ẋ Wᵀ + x Ẇᵀ + ḃ).
* ``linear_act_bwd_bwd``: the vector-Jacobian product of the layer's backward (double backward,
  gradient penalties, reverse-over-reverse Hessian-vector products). With dz = g ⊙ act'(z) and
  the cotangents ġx, ġW, ġb of (dx, dW, db): t = ġx Wᵀ + x ġWᵀ + ġb, and
  grad_g = t ⊙ act'(z), gz = t ⊙ g ⊙ act''(z), grad_x = gz W + dz ġW, grad_W = gzᵀ x + dzᵀ ġx,
  grad_b = Σ gz. The backward's Jacobian in (x, W, b) is the Hessian of ⟨g, y⟩, which is
  symmetric, so the same product with tangents in place of cotangents is the backward's jvp
  there (``autograd.LinearActBackward.jvp`` adds the part linear in ġ: the backward of ġ).
* ``batched_linear_act`` / ``batched_linear_act_backward``: the layer and its backward over a
  batch of weights (``torch.func.stack_module_state`` ensembles), as batched GEMMs; the vmap
  rules of the Functions and of the registered ops (``register_op_vmap``) take them when the
  batch cannot fold into the rows of one fused call.

What backward's ``kept`` means is ``autograd.linear_act_backward``'s ``out``: the layer output or
the pre-activation z (``activations.saves_output``), relu's / leaky relu's uint8 packed sign
mask, or None (recompute z from x, W, b). act' and act'' come from ``activations.ACTIVATIONS``.

The two functions named first run the fused CPU kernels ``linear_act_jvp`` / ``linear_act_bwd_bwd``
(csrc/cpu) where nothing will differentiate their result (``kernel_values``: also inside a
torch.func rule whose tensors are that level's wrappers of plain tensors, as in
``torch.func.jvp(torch.func.grad(f))``), and otherwise their composite forms (torch ops,
differentiable to any order, composable with every transform).
"""

from __future__ import annotations

import contextlib

import torch
import torch._C._functorch as ft
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from . import _ops, sign_mask
from .activations import ACTIVATIONS, saves_output

__all__ = ["linear_act_tangent", "linear_act_bwd_bwd", "linear_act_tangent_composite", "linear_act_bwd_bwd_composite",
           "kernel_values", "jvp_rule_tensors", "batched_linear_act", "batched_linear_act_backward",
           "transforms_active", "needs_graph", "register_op_vmap"]


def transforms_active() -> bool:
    """Whether a torch.func transform or a forward-mode AD level is active: then only the
    setup_context-form Functions (with vmap and jvp rules) may run."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


@contextlib.contextmanager
def jvp_rule_tensors(*tensors):
    """For the body of a Function's jvp rule: the rule's tensors as the enclosing transforms see
    them, with forward-mode AD on. torch.func runs a jvp rule with forward AD off, so a rule's
    result carries no tangent of an enclosing jvp level and forward-over-forward products
    (``jacfwd(jacfwd(f))``) come out zero (pytorch/pytorch#197867). Forward AD cannot simply be
    switched back on: a tangent of the rule's own level may not have a tangent at that level
    itself. So the tensors are unwrapped from that level first; the result is a tangent for it
    and a value, with tangents, for the levels around it."""
    level = ft.maybe_current_level()
    if level is None:  # forward_ad.dual_level: one level only
        yield tensors
        return
    with _set_fwd_grad_enabled(True):
        yield tuple(None if t is None else ft._unwrap_for_grad(t, level) for t in tensors)


def needs_graph() -> bool:
    """Whether what is computed now may be differentiated again (a graph is being recorded, or a
    transform or dual level is active): then a kept pre-activation, which no graph connects to
    x, W and b, is recomputed instead of read."""
    return torch.is_grad_enabled() or transforms_active()


# ------------------------------------------------------------------------------------- the cores

def linear_act_tangent(x, weight, bias, x_t, weight_t, bias_t, kept, activation: str, negative_slope: float, *,
                       fused: bool = True) -> torch.Tensor:
    """The jvp of ``act(x @ weight.T + bias)``: ``act'(z) ⊙ (x_t Wᵀ + x W_tᵀ + b_t)``, (M, N).
    A tangent of None is zero; ``kept`` is what the forward kept (see the module doc). The fused
    CPU kernel (``linear_act_jvp``) computes it where it may (``fused``, and ``kernel_values``),
    else ``linear_act_tangent_composite``."""
    values = kernel_values(x, weight, bias, x_t, weight_t, bias_t, kept) if fused else None
    if values is not None:
        return torch.ops.fused_backprop.linear_act_jvp.default(*values, activation, negative_slope)
    return linear_act_tangent_composite(x, weight, bias, x_t, weight_t, bias_t, kept, activation, negative_slope)


def linear_act_bwd_bwd(grad_out, x, weight, bias, kept, ggx, ggw, ggb, activation: str, negative_slope: float,
                       output_mask, *, fused: bool = True) -> tuple:
    """The vector-Jacobian product of the layer's backward ``(g, x, W, b) -> (dx, dW, db)`` with
    the cotangents ``ggx, ggw, ggb`` (None: zero): ``(g_grad_out, g_x, g_w, g_b)``; an entry whose
    ``output_mask`` flag (4 bools) is False, or that is zero by structure (None), is None. The
    fused CPU kernel (``linear_act_bwd_bwd``) computes it where it may, as ``linear_act_tangent``."""
    if ggx is None and ggw is None and ggb is None:
        return None, None, None, None
    values = kernel_values(grad_out, x, weight, bias, kept, ggx, ggw, ggb) if fused else None
    if values is not None:
        mask = [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]), bool(output_mask[3])]
        grads = torch.ops.fused_backprop.linear_act_bwd_bwd.default(*values, activation, mask, negative_slope)
        return tuple(g if wanted else None for g, wanted in zip(grads, (*mask[:3], mask[3] and bias is not None)))
    return linear_act_bwd_bwd_composite(grad_out, x, weight, bias, kept, ggx, ggw, ggb, activation, negative_slope,
                                        output_mask)


def kernel_values(*tensors):
    """The tensors as a fused CPU kernel may take them, or None where only composite ops will do.
    A kernel's result is a value that nothing differentiates, so every tensor must be None, or a
    plain CPU tensor that neither requires grad (with grad mode on) nor carries a forward-AD
    tangent, nor is batched by ``torch.autograd.grad(is_grads_batched=True)``'s vmap, or a
    torch.func wrapper of such a tensor at the level the rule runs at: a rule's
    result is that level's own (a jvp's tangent, a backward's gradients), so its wrapping is
    dropped; a wrapper of a wrapper, a batched tensor or another level's wrapper means other
    transforms see through the result."""
    if not _SECOND_ORDER_KERNELS:
        return None
    level, grad_mode, dual = ft.maybe_current_level(), torch.is_grad_enabled(), forward_ad._current_level >= 0
    values = []
    for t in tensors:
        if t is not None:
            if ft.is_functorch_wrapped_tensor(t):
                if not ft.is_gradtrackingtensor(t) or ft.maybe_get_level(t) != level:
                    return None
                t = ft.get_unwrapped(t)
                if ft.is_functorch_wrapped_tensor(t):
                    return None
            if (t.device.type != "cpu" or (grad_mode and t.requires_grad) or ft.is_legacy_batchedtensor(t)
                    or (dual and forward_ad.unpack_dual(t).tangent is not None)):
                return None
        values.append(t)
    return values


def _has_cpu_kernels(*names) -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU") for n in names)
    except RuntimeError:  # an extension built before the op existed
        return False


_SECOND_ORDER_KERNELS = _ops.BUILD_ERROR is None and _has_cpu_kernels("fused_backprop::linear_act_jvp",
                                                                        "fused_backprop::linear_act_bwd_bwd")


def fused_for(backend) -> bool:
    """Whether the rules of a layer on ``backend`` may run the fused second-order kernels: the
    compiled CPU backend's; the composite and other backends keep to composite ops."""
    return backend.name == "cpu"


def linear_act_tangent_composite(x, weight, bias, x_t, weight_t, bias_t, kept, activation: str,
                                 negative_slope: float) -> torch.Tensor:
    """``linear_act_tangent`` from torch ops (differentiable to any order, composable with every
    transform)."""
    t = linear_tangent(x, weight, x_t, weight_t, bias_t)
    if t is None:
        return x.new_zeros((x.shape[0], weight.shape[0]))
    act_grad, _ = _derivatives(x, weight, bias, kept, activation, negative_slope, second=False)
    return t * act_grad


def linear_act_bwd_bwd_composite(grad_out, x, weight, bias, kept, ggx, ggw, ggb, activation: str,
                                 negative_slope: float, output_mask) -> tuple:
    """``linear_act_bwd_bwd`` from torch ops (differentiable to any order, composable with every
    transform)."""
    want_g, want_x, want_w, want_b = (bool(m) for m in output_mask)
    t = linear_tangent(x, weight, ggx, ggw, ggb)
    if t is None:
        return None, None, None, None
    second = want_x or want_w or (want_b and bias is not None)
    act_grad, act_grad2 = _derivatives(x, weight, bias, kept, activation, negative_slope, second=second)
    gz = t * grad_out * act_grad2 if act_grad2 is not None else None
    dz = grad_out * act_grad if (want_x and ggw is not None) or (want_w and ggx is not None) else None
    g_grad_out = t * act_grad if want_g else None
    g_x = add_maybe(_mm(gz, weight), _mm(dz, ggw)) if want_x else None
    g_w = add_maybe(_mm(_t(gz), x), _mm(_t(dz), ggx)) if want_w else None
    g_b = gz.sum(0) if want_b and bias is not None and gz is not None else None
    return g_grad_out, g_x, g_w, g_b


def linear_tangent(x, weight, x_t, weight_t, bias_t):
    """``x_t Wᵀ + x W_tᵀ + b_t`` (None when all three are None)."""
    t = None
    if x_t is not None:
        t, bias_t = F.linear(x_t, weight, bias_t), None
    if weight_t is not None:
        t = F.linear(x, weight_t, bias_t) if t is None else torch.addmm(t, x, weight_t.t())
        bias_t = None
    if bias_t is not None:
        t = bias_t.expand(x.shape[0], weight.shape[0])
    return t


def _derivatives(x, weight, bias, kept, activation, negative_slope, *, second: bool):
    """(act'(z), act''(z)) at z = x Wᵀ + b from what the forward kept; act'' is None unless
    ``second``, and for the piecewise-linear activations (relu, leaky relu: act'' = 0)."""
    spec = ACTIVATIONS[activation]
    z = None
    if kept is not None and kept.dtype == torch.uint8:
        kept = sign_mask.unpack(kept, (x.shape[0], weight.shape[0]), x.dtype)
    if kept is not None and saves_output(activation, negative_slope):
        act_grad = spec.grad_from_output(kept, negative_slope)
    else:
        z = kept if kept is not None and not needs_graph() else F.linear(x, weight, bias)
        act_grad = spec.grad_from_preact(z, negative_slope)
    if not second or spec.sign_decides:
        return act_grad, None
    if z is None:
        z = F.linear(x, weight, bias)
    return act_grad, spec.grad2_from_preact(z, negative_slope)


def add_maybe(a, b):
    """a + b, where None is zero."""
    return b if a is None else a if b is None else a + b


def _mm(a, b):
    return None if a is None or b is None else a.mm(b)


def _t(a):
    return None if a is None else a.t()


# ------------------------------------------------------------------------------- batched forms

def batched_linear_act(x, weight, bias, activation, negative_slope):
    """``act(x @ weight.mT + bias)`` where any of x (B, M, K), weight (B, N, K), bias (B, N) may
    carry a batch dim in front (or lack it: x (M, K), weight (N, K), bias (N,) are shared by the
    batch; none batched is one layer); ``activation`` None is a plain linear layer. One batched
    GEMM, then the activation."""
    batch = [t.shape[0] for t, d in ((x, 3), (weight, 3), (bias, 2)) if t is not None and t.dim() == d]
    if not batch:
        z = F.linear(x, weight, bias)
    else:
        x3 = x.expand(batch[0], *x.shape) if x.dim() == 2 else x
        w3 = weight.expand(batch[0], *weight.shape) if weight.dim() == 2 else weight
        if bias is None:
            z = torch.bmm(x3, w3.mT)
        else:
            z = torch.baddbmm(bias.unsqueeze(-2).expand(batch[0], 1, w3.shape[1]), x3, w3.mT)
    return z if activation is None else ACTIVATIONS[activation].forward(z, negative_slope)


def batched_linear_act_backward(grad_out, x, weight, bias, kept, activation, negative_slope, output_mask):
    """``(dx, dW, db)`` of the layer where any argument may carry a batch dim in front, as in
    ``batched_linear_act`` (``kept`` as backward's ``out``; a packed sign mask must be shared by
    the batch). Entries left out by ``output_mask`` (or a missing bias) are None."""
    spec = ACTIVATIONS[activation]
    if kept is not None and kept.dtype == torch.uint8:
        kept = sign_mask.unpack(kept, grad_out.shape[-2:], grad_out.dtype)
    if kept is not None and saves_output(activation, negative_slope):
        act_grad = spec.grad_from_output(kept, negative_slope)
    else:
        z = kept if kept is not None and not needs_graph() else batched_linear_act(x, weight, bias, None, None)
        act_grad = spec.grad_from_preact(z, negative_slope)
    dz = grad_out * act_grad
    dx = torch.matmul(dz, weight) if output_mask[0] else None
    dw = torch.matmul(dz.mT, x) if output_mask[1] else None
    db = dz.sum(-2) if output_mask[2] and bias is not None else None
    return dx, dw, db


# ------------------------------------------------------------------------------------ vmap rules

def batch_first(t, dim):
    """``t`` with its vmapped dim (``dim``, None: unbatched) moved to the front."""
    return t if t is None or dim is None else t.movedim(dim, 0)


def rows_of_batch(t, dim, batch):
    """A per-sample (M, C) tensor of a vmap as (batch * M, C) rows (expanded when unbatched)."""
    t = t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)
    return t.reshape(-1, t.shape[-1])


def sample_shape(t, dim) -> torch.Size:
    """The shape of one sample of a vmapped tensor (dim: its vmapped dim, or None)."""
    return t.shape if dim is None else t.movedim(dim, 0).shape[1:]


def out_dims(outputs, sample_dims):
    """The out_dims of a vmap rule's ``outputs`` (None entries allowed): 0 where an output has
    one dim more than a sample of it has (``sample_dims``), else None."""
    return tuple(None if o is None or o.dim() == d else 0 for o, d in zip(outputs, sample_dims))


def forward_vmap(apply, batch, in_dims, x, weight, bias, activation, negative_slope):
    """The vmap of a forward ``apply(x, weight, bias) -> out`` (or ``(out, z)``): a batch of x
    alone folds into the rows of one call; batched weights take ``batched_linear_act``."""
    x_dim, w_dim, b_dim = in_dims[:3]
    if w_dim is None and b_dim is None:
        out = apply(rows_of_batch(x, x_dim, batch), weight, bias)
        rows = sample_shape(x, x_dim)[0]
        if isinstance(out, tuple):
            return tuple(o.view(batch, rows, o.shape[-1]) for o in out), (0,) * len(out)
        return out.view(batch, rows, out.shape[-1]), 0
    out = batched_linear_act(batch_first(x, x_dim), batch_first(weight, w_dim), batch_first(bias, b_dim), activation,
                             negative_slope)
    return out, 0


def backward_vmap(apply, batch, in_dims, grad_out, x, weight, bias, kept, activation, negative_slope, output_mask):
    """The vmap of a backward ``apply(grad_out, x, weight, bias, kept, output_mask) -> (dx, dw,
    db)``: when only dx is wanted and the weights are shared, the batch folds into the rows of one
    call; otherwise (per-sample dW, db, or batched weights) ``batched_linear_act_backward``."""
    g_dim, x_dim, w_dim, b_dim, k_dim = in_dims[:5]
    if kept is not None and kept.dtype == torch.uint8:
        if k_dim is not None:
            raise NotImplementedError("fused_backprop: vmap over a batch of packed sign masks")
        kept = sign_mask.unpack(kept, sample_shape(grad_out, g_dim), grad_out.dtype)
    mask = (bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and bias is not None)
    if w_dim is None and b_dim is None and not mask[1] and not mask[2]:
        rows = sample_shape(grad_out, g_dim)[0]
        dx = apply(rows_of_batch(grad_out, g_dim, batch), rows_of_batch(x, x_dim, batch), weight, bias,
                   None if kept is None else rows_of_batch(kept, k_dim, batch), mask)[0]
        return (dx.view(batch, rows, dx.shape[-1]), None, None), (0, None, None)
    grads = batched_linear_act_backward(*(batch_first(t, d) for t, d in zip((grad_out, x, weight, bias, kept),
                                                                             (g_dim, x_dim, w_dim, b_dim, k_dim))),
                                        activation, negative_slope, mask)
    return grads, out_dims(grads, (2, 2, 1))


def register_op_vmap(fwd_name: str, fwd_preact_name: str, bwd_name: str) -> None:
    """vmap rules for the registered ops ``linear_act_fwd`` / ``_fwd_preact`` / ``_bwd`` (schemas
    in csrc/ops.cpp; a backward gradient left out is an empty tensor there)."""
    fwd = getattr(torch.ops.fused_backprop, fwd_name.split("::")[1]).default
    fwd_preact = getattr(torch.ops.fused_backprop, fwd_preact_name.split("::")[1]).default
    bwd = getattr(torch.ops.fused_backprop, bwd_name.split("::")[1]).default

    def fwd_rule(info, in_dims, x, weight, bias, activation, negative_slope=0.01):
        return forward_vmap(lambda x, w, b: fwd(x, w, b, activation, negative_slope), info.batch_size, in_dims,
                            x, weight, bias, activation, negative_slope)

    def fwd_preact_rule(info, in_dims, x, weight, bias, activation, negative_slope=0.01):
        x_dim, w_dim, b_dim = in_dims[:3]
        if w_dim is None and b_dim is None:
            return forward_vmap(lambda x, w, b: fwd_preact(x, w, b, activation, negative_slope), info.batch_size,
                                in_dims, x, weight, bias, activation, negative_slope)
        z = batched_linear_act(batch_first(x, x_dim), batch_first(weight, w_dim), batch_first(bias, b_dim), None, None)
        return (ACTIVATIONS[activation].forward(z, negative_slope), z), (0, 0)

    def bwd_rule(info, in_dims, grad_out, x, weight, bias, out, activation, output_mask, negative_slope=0.01):
        def apply(g, x, w, b, kept, mask):
            return bwd(g, x, w, b, kept, activation, list(mask), negative_slope)

        grads, dims = backward_vmap(apply, info.batch_size, in_dims, grad_out, x, weight, bias, out, activation,
                                    negative_slope, output_mask)
        # The op's shape for a gradient left out: an empty tensor, shared by the batch.
        return tuple(x.new_empty((0,)) if g is None else g for g in grads), dims

    torch.library.register_vmap(fwd_name, fwd_rule)
    torch.library.register_vmap(fwd_preact_name, fwd_preact_rule)
    torch.library.register_vmap(bwd_name, bwd_rule)
