"""Triton kernels for the fused Linear+activation layers (every activation of
``fused_backprop.activations``).

* ``kernels``: the ``@triton.jit`` kernels (forward GEMM with a bias+activation epilogue; backward
  GEMMs that form dZ = dY * act'(.) in their operand loads and reduce db alongside dW).
* ``ops``: launch wrappers and the registered ops ``torch.ops.fused_backprop.triton_linear_act_fwd``
  / ``triton_linear_act_fwd_preact`` / ``triton_linear_act_bwd`` (custom ops with fake kernels and
  autograd); ``set_allow_tf32``.
* ``backend``: registers ``backend="triton"`` with ``fused_backprop.backends``.

Users reach it through ``fused_backprop.linear_act(..., backend="triton")`` or the modules. The
submodules import triton, so importing them raises ImportError where triton is not installed; this
package itself imports nothing heavy. CPU tensors run only under the Triton interpreter:
``TRITON_INTERPRET=1`` must be set before triton is imported.
"""

from __future__ import annotations

__all__ = ["set_allow_tf32", "allow_tf32", "linear_act_forward", "linear_act_backward"]


def __getattr__(name):
    if name in __all__:
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
