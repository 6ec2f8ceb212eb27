"""Loads the compiled extension (schemas + kernels) and gives its ops what Python must add:
fake (meta) kernels for tracing and the op-level autograd formula."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.fused_backprop.*)
    BUILD_ERROR = None
except ImportError as exc:  # a source checkout that was never built
    BUILD_ERROR = exc


# Which devices the compiled extension has kernels for, read once (a plain dict lookup later, so
# torch.compile traces the backend choice without a graph break).
_KERNELS = {key: BUILD_ERROR is None and
            torch._C._dispatch_has_kernel_for_dispatch_key("fused_backprop::linear_act_fwd", key)
            for key in ("CPU", "CUDA")}


def has_kernel(dispatch_key: str) -> bool:
    """Whether the compiled extension has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return _KERNELS[dispatch_key]


def cpu_capability() -> str:
    """The SIMD level the CPU kernels run: "DEFAULT", "AVX2" or "AVX512" on x86-64, "DEFAULT"
    elsewhere. It is the level torch runs (``torch.backends.cpu.get_cpu_capability()``: the best
    the CPU supports, or a lower one that ``ATEN_CPU_CAPABILITY=default|avx2`` asks for), or the
    best level built below it; chosen once per process."""
    if BUILD_ERROR is not None:
        raise RuntimeError(f"fused_backprop: the compiled extension is not built: {BUILD_ERROR}")
    return _C.cpu_capability()


if BUILD_ERROR is None:

    @torch.library.register_fake("fused_backprop::linear_act_fwd")
    def _linear_act_fwd_fake(x, weight, bias, activation, negative_slope=0.01):
        torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1])
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("fused_backprop::linear_act_fwd_preact")
    def _linear_act_fwd_preact_fake(x, weight, bias, activation, negative_slope=0.01):
        out = _linear_act_fwd_fake(x, weight, bias, activation)
        return out, torch.empty_like(out)

    @torch.library.register_fake("fused_backprop::linear_act_bwd")
    def _linear_act_bwd_fake(grad_out, x, weight, bias, out, activation, output_mask, negative_slope=0.01):
        torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1])
        n = weight.shape[0]
        return (x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
                weight.new_empty(weight.shape) if output_mask[1] else x.new_empty((0,)),
                weight.new_empty((n,)) if output_mask[2] and bias is not None else x.new_empty((0,)))

    @torch.library.register_fake("fused_backprop::linear_act_jvp")
    def _linear_act_jvp_fake(x, weight, bias, x_t, weight_t, bias_t, out, activation, negative_slope=0.01):
        return _linear_act_fwd_fake(x, weight, bias, activation)

    @torch.library.register_fake("fused_backprop::linear_act_bwd_bwd")
    def _linear_act_bwd_bwd_fake(grad_out, x, weight, bias, out, ggx, ggw, ggb, activation, output_mask,
                                 negative_slope=0.01):
        torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1])
        shapes = (grad_out.shape, x.shape, weight.shape, (weight.shape[0],) if bias is not None else None)
        return tuple(x.new_empty(shape) if wanted and shape is not None else x.new_empty((0,))
                     for shape, wanted in zip(shapes, output_mask))

    @torch.library.register_fake("fused_backprop::sign_mask_pack")
    def _sign_mask_pack_fake(y, activation="relu"):
        return y.new_empty(((y.numel() + 7) // 8,), dtype=torch.uint8)

    from .autograd import (register_backward_op_autograd, register_composite_op_autograd, register_op_autograd,
                           register_preact_op_autograd)
    from .func import linear_act_bwd_bwd_composite, linear_act_tangent_composite, register_op_vmap

    register_op_autograd("fused_backprop::linear_act_fwd", backend_name=None)
    register_preact_op_autograd("fused_backprop::linear_act_fwd_preact")
    register_backward_op_autograd("fused_backprop::linear_act_bwd")
    register_composite_op_autograd("fused_backprop::linear_act_jvp", 7, linear_act_tangent_composite)
    register_composite_op_autograd(  # the op takes output_mask before negative_slope
        "fused_backprop::linear_act_bwd_bwd", 8,
        lambda *a: linear_act_bwd_bwd_composite(*a[:8], a[8], a[10], a[9]))
    register_op_vmap("fused_backprop::linear_act_fwd", "fused_backprop::linear_act_fwd_preact",
                     "fused_backprop::linear_act_bwd")
