"""Backends: one small interface, one registry.

A backend computes the fused layer on 2-D inputs whose arguments have already been checked
(``fused_backprop._checks``):

* ``forward(x, weight, bias, activation, negative_slope) -> out`` with x ``(M, K)``, weight
  ``(N, K)``, bias ``(N,)`` or None, out ``(M, N)``; ``negative_slope`` is leaky relu's parameter
  (the other activations ignore it);
* ``forward_preact(x, weight, bias, activation, negative_slope) -> (out, preact)``: the same and
  the pre-activation ``z = x @ weight.T + bias``, which backward takes as ``out`` for the
  activations whose derivative is not a function of the output (``activations.saves_output``);
* ``backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope) -> (dx, dw, db)``,
  where ``out`` is the layer output or the pre-activation (as ``activations.saves_output`` says),
  or None: "recompute the pre-activation from x, weight, bias" (for relu and leaky relu, ``out``
  may be the packed sign mask when ``accepts_sign_mask``), and an entry of ``output_mask`` that
  is False (or a missing bias) gives None in that slot;
* ``supports(device) -> bool``: whether it runs on tensors of that device here and now.

Autograd, the flattening of leading dims and the modules live above this interface, so a new
backend is a file with these three functions and one ``register`` call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["Backend", "register", "register_ops", "load_all", "get", "names", "available_backends", "resolve"]


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    forward_preact: Callable
    backward: Callable
    supports: Callable[[torch.device], bool]
    # Lower runs first when backend="auto" picks among the ones that support a device (None:
    # never picked by auto); auto_devices limits that to some device types (None: all).
    auto_priority: Optional[int] = None
    auto_devices: Optional[tuple[str, ...]] = None
    # True when backward builds an autograd graph (needed for double backward).
    differentiable: bool = False
    # True when backward takes the packed sign mask (``sign_mask.pack``) as ``out``; other
    # backends get it unpacked to 0/1 values.
    accepts_sign_mask: bool = False


_REGISTRY: dict[str, Backend] = {}
# Why a backend's module failed to import (a missing optional dependency, an unbuilt extension).
_IMPORT_ERRORS: dict[str, str] = {}
# The module that defines each backend; ``load_all`` imports them once, when the package loads,
# so that choosing a backend later is a dict lookup (and torch.compile traces it).
_MODULES = {
    "cpu": "fused_backprop.backends.compiled",
    "cuda": "fused_backprop.backends.compiled",
    "torch": "fused_backprop.backends.torch_backend",
    "numpy": "fused_backprop.backends.numpy_backend",
    "triton": "fused_backprop.triton.backend",
}


def load_all() -> None:
    for name, module in _MODULES.items():
        if name not in _REGISTRY and name not in _IMPORT_ERRORS:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def register_ops(name: str, fwd_op, fwd_preact_op, bwd_op, *, eager=None, **kwargs) -> Backend:
    """Registers a backend whose forward, forward_preact and backward are registered ops with the
    schemas of ``linear_act_fwd`` / ``linear_act_fwd_preact`` / ``linear_act_bwd`` (a masked-out
    gradient comes back as an empty tensor, handed on as None). ``eager``, if given, is a
    (forward, forward_preact, backward) triple with this interface that runs the same ops without
    torch.ops' per-call cost (the compiled extension's own bindings); it is used except while
    torch.compile traces, which needs the ops themselves."""

    def forward(x, weight, bias, activation, negative_slope):
        if eager is not None and not torch.compiler.is_compiling():
            return eager[0](x, weight, bias, activation, negative_slope)
        return fwd_op(x, weight, bias, activation, negative_slope)

    def forward_preact(x, weight, bias, activation, negative_slope):
        if eager is not None and not torch.compiler.is_compiling():
            return eager[1](x, weight, bias, activation, negative_slope)
        return fwd_preact_op(x, weight, bias, activation, negative_slope)

    def backward(grad_out, x, weight, bias, out, activation, output_mask, negative_slope):
        mask = [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and bias is not None]
        if eager is not None and not torch.compiler.is_compiling():
            return eager[2](grad_out, x, weight, bias, out, activation, mask, negative_slope)
        grads = bwd_op(grad_out, x, weight, bias, out, activation, mask, negative_slope)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask))

    return register(Backend(name, forward, forward_preact, backward, **kwargs))


def names() -> list[str]:
    """Every backend name this package knows, built or not."""
    return list(_MODULES)


def get(name: str) -> Optional[Backend]:
    """The backend called ``name``, or None when its module cannot be imported here."""
    return _REGISTRY.get(name)


def available_backends(device=None) -> list[str]:
    """Names of the backends that run on ``device`` (default: the CPU) in this installation,
    fastest first."""
    device = torch.device("cpu" if device is None else device)
    found = [b for b in (get(n) for n in names()) if b is not None and b.supports(device)]
    found.sort(key=lambda b: (b.auto_priority is None, b.auto_priority or 0))
    return [b.name for b in found]


_AUTO: dict[str, Backend] = {}  # "auto"'s choice per device type, found once


def _find_auto(device: torch.device) -> Backend:
    if device.type == "cuda":
        from .auto_rule import cuda_auto  # per pass, dtype and size, among "triton", "cuda" and "torch"

        return cuda_auto(get, device)
    found = [b for b in map(get, available_backends(device)) if b.auto_priority is not None
             and (b.auto_devices is None or device.type in b.auto_devices)]
    if not found:
        raise RuntimeError(f"fused_backprop: no backend supports device {device}")
    return found[0]


def resolve(name: str, device: torch.device) -> Backend:
    """The backend to run for ``name`` (a backend name or "auto") on ``device``."""
    if name == "auto":
        if device.type not in _AUTO:
            _AUTO[device.type] = _find_auto(device)
        return _AUTO[device.type]
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"fused_backprop: backend must be 'auto' or one of {names()}, got {name!r}")
    backend = get(name)
    if backend is None:
        raise RuntimeError(f"fused_backprop: backend {name!r} is not available in this installation "
                           f"({_MODULES[name]}: {_IMPORT_ERRORS.get(name)})")
    if not backend.supports(device):
        raise RuntimeError(f"fused_backprop: backend {name!r} does not run on device {device}; "
                           f"available there: {available_backends(device)}")
    return backend
