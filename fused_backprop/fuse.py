"""``fuse(module)``: replace each ``nn.Linear`` that is directly followed by ``nn.ReLU`` or
``nn.Sigmoid`` inside an ``nn.Sequential`` with the fused layer, in place."""

from __future__ import annotations

from torch import nn

from .modules import FusedLinearReLU, FusedLinearSigmoid

_FUSABLE = {nn.ReLU: FusedLinearReLU, nn.Sigmoid: FusedLinearSigmoid}


def fuse(module: nn.Module, *, recompute: bool = False, backend: str = "auto") -> nn.Module:
    """Fuses in place and returns ``module``. The fused layer shares the Linear's parameters and
    takes its place (same state-dict keys); the activation becomes ``nn.Identity``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for child in module.children():
        fuse(child, recompute=recompute, backend=backend)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names[:-1], names[1:]):
            linear, act = module._modules[first], module._modules[second]
            fused_cls = _FUSABLE.get(type(act))
            if type(linear) is nn.Linear and fused_cls is not None:
                module._modules[first] = fused_cls.from_linear(linear, recompute=recompute, backend=backend)
                module._modules[second] = nn.Identity()
    return module
