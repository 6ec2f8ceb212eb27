"""The compiled extension's kernels (C++ on the CPU, C++/CUDA on NVIDIA GPUs), reached through the
registered ops ``torch.ops.fused_backprop.linear_act_fwd`` / ``linear_act_bwd`` (in eager mode through
the extension's bindings of the same ops, ``_C.linear_act_fwd`` / ``_C.linear_act_bwd``, which skip
torch.ops' per-call cost); the dispatcher picks the CPU or CUDA kernel from the tensors' device."""

from __future__ import annotations

import torch

from .. import _ops
from . import register_ops

if _ops.BUILD_ERROR is not None:
    raise ImportError(f"the compiled extension fused_backprop._C is not built: {_ops.BUILD_ERROR}")

_OPS = (torch.ops.fused_backprop.linear_act_fwd.default, torch.ops.fused_backprop.linear_act_fwd_preact.default,
        torch.ops.fused_backprop.linear_act_bwd.default)

_EAGER = (_ops._C.linear_act_fwd, _ops._C.linear_act_fwd_preact, _ops._C.linear_act_bwd)

# The CPU backward reads the packed sign mask directly; the CUDA kernels take the output.
register_ops("cpu", *_OPS, eager=_EAGER, auto_priority=0, accepts_sign_mask=True,
             supports=lambda device: device.type == "cpu" and _ops.has_kernel("CPU"))
register_ops("cuda", *_OPS, eager=_EAGER, auto_priority=2,
             supports=lambda device: device.type == "cuda" and _ops.has_kernel("CUDA"))
