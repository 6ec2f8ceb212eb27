"""``fuse(model)``: replace every ``nn.Linear`` -> activation pair it can prove with the fused layer.
How pairs are found and rewritten: ``fused_backprop.fx_fuse``."""

from __future__ import annotations

from torch import nn

from . import backends
from ._checks import check_recompute
from .activations import ACTIVATIONS
from .fx_fuse import SUPPORTED, FuseRecord, apply, format_report, plan

__all__ = ["fuse", "fuse_report", "FuseRecord"]


def _check(module, activations) -> tuple:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if activations is None:
        return SUPPORTED
    names = (activations,) if isinstance(activations, str) else tuple(activations)
    for name in names:
        if name not in SUPPORTED:
            what = "not supported yet" if name in ACTIVATIONS else "unknown"
            raise ValueError(f"activations: {name!r} is {what}; choose from {SUPPORTED}")
    return names


def fuse(module: nn.Module, *, recompute: bool = False, backend: str = "auto", activations=None,
         verbose: bool = False) -> nn.Module:
    """Replace each ``nn.Linear`` whose output goes only to a supported activation (``nn.ReLU``,
    ``F.relu``, ``x.relu()``, ``torch.sigmoid``, ..., also through ``nn.Identity``/dropout with
    p=0) with the fused layer, sharing the Linear's parameters. Outputs, gradients and state-dict
    keys stay the same; a pair that cannot be proven is left as it is.

    Works in place and returns ``module``, with one exception: when ``module``'s own ``forward``
    calls the activation as a function or method (``F.relu(self.fc(x))``), that forward is
    rewritten into a ``torch.fx.GraphModule`` which is returned (same submodules, parameters and
    buffers), and ``module`` stays valid but without those pairs fused. So write
    ``model = fb.fuse(model)``.

    ``activations``: the names to fuse (default: all supported, ``fused_backprop.fx_fuse.SUPPORTED``).
    ``verbose``: print which Linear layers were fused and why each other one was left
    (``fuse_report`` returns the same as records)."""
    allowed = _check(module, activations)
    check_recompute(recompute)
    if backend != "auto" and backend not in backends.names():
        raise ValueError(f"backend must be 'auto' or one of {backends.names()}, got {backend!r}")
    records, swaps, graphs = plan(module, allowed)
    if verbose:
        print(format_report(records))
    return apply(module, swaps, graphs, recompute=recompute, backend=backend)


def fuse_report(module: nn.Module, *, activations=None) -> list[FuseRecord]:
    """What ``fuse(module, activations=...)`` would do, one record per ``nn.Linear`` (qualified
    name, the activation it is fused with or why it is left); ``module`` is not changed."""
    return plan(module, _check(module, activations))[0]
