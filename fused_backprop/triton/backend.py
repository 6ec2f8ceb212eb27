"""The ``triton`` backend: the Triton kernels behind the registered ops
``torch.ops.fused_backprop.triton_linear_act_fwd`` / ``triton_linear_act_fwd_preact`` /
``triton_linear_act_bwd``.

Runs on CUDA tensors, and on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported). Importing this module raises ImportError when triton is missing,
which the backend registry reads as "not available". On CUDA ``backend="auto"`` runs it for the
passes where ``backends/auto_rule.py`` predicts it ahead of the CUDA kernels and eager, never on
the CPU (auto_priority orders ``available_backends``).
"""

from __future__ import annotations

import torch

import triton  # noqa: F401  (ImportError here = backend not available)

from ..backends import register_ops
from . import kernels as _kernels
from . import ops as _ops  # noqa: F401  (registers the ops, their fake kernels and autograd)


def supports(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    # The kernels were built as interpreted functions only if TRITON_INTERPRET=1 was set when
    # triton.jit ran (at import of fused_backprop.triton.kernels), so that is what counts.
    return device.type == "cpu" and _kernels.INTERPRET


# backward reads the packed 1-bit sign mask (what recompute=True keeps for relu and leaky relu)
# directly. On the CPU the interpreter is for tests only: auto never picks it there.
register_ops("triton", torch.ops.fused_backprop.triton_linear_act_fwd.default,
             torch.ops.fused_backprop.triton_linear_act_fwd_preact.default,
             torch.ops.fused_backprop.triton_linear_act_bwd.default, supports=supports, auto_priority=1,
             auto_devices=("cuda",), accepts_sign_mask=True)
