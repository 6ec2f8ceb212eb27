"""Functional API: ``linear_act``, ``linear_relu``, ``linear_sigmoid``.

Same semantics as ``act(torch.nn.functional.linear(input, weight, bias))``: input of shape
``(*, in_features)`` (1-D included), output ``(*, out_features)``."""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad

from . import _ops, backends
from ._checks import check_activation, check_linear_args, check_negative_slope, check_recompute
from .activations import DEFAULT_NEGATIVE_SLOPE
from .autograd import EagerLinearActFunction, LinearActFunction, linear_act_backward

_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling


def _no_call_path(*args):
    return None


# The C++ call path (csrc/call_path.cpp): plain calls on CPU tensors in one C++ call, with a C++
# autograd node; it returns None for every other call (a transform, a mode, CUDA, bad arguments),
# which then takes the Python path below. A forward-AD level and torch.compile's tracing are
# ruled out here: the first has no C++ check as cheap, the second must trace the Python path.
_call_path = _no_call_path
_call_path_backend = None  # the Backend the C++ call path runs: taken only while resolve() gives it


def init_call_path() -> None:
    """Turns the C++ call path on where the compiled CPU backend is what "auto" runs on the CPU
    (called once the backends are loaded)."""
    global _call_path, _call_path_backend
    cpu = backends.get("cpu")
    if cpu is not None and cpu.supports(torch.device("cpu")) and backends.resolve("auto", torch.device("cpu")) is cpu:
        _ops._C._init_call_path(linear_act_backward, cpu)
        _call_path, _call_path_backend = _ops._C.linear_act, cpu


def linear_act(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str = "relu", *, negative_slope: float = DEFAULT_NEGATIVE_SLOPE, recompute: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """``activation(input @ weight.T + bias)`` with forward and backward as fused kernels.

    ``activation`` is one of ``fused_backprop.ACTIVATIONS``; ``negative_slope`` is leaky relu's
    (as ``F.leaky_relu``; the other activations ignore it). ``recompute=True`` saves only input
    and parameters for backward (and relu's or leaky relu's 1-bit sign mask) and recomputes the
    pre-activation there instead of keeping the output. ``backend`` is "auto" (fastest built
    backend for the input's device) or one of ``fused_backprop.available_backends(device)``."""
    # backends.resolve(backend, cpu) inlined (0.05 us): the C++ path only where it would give
    # the backend that path runs (so a backend replaced or re-chosen at run time is honoured).
    current = backends._AUTO.get("cpu") if backend == "auto" else backends._REGISTRY.get(backend) \
        if isinstance(backend, str) else None
    if current is _call_path_backend and forward_ad._current_level < 0 and not _is_compiling():
        out = _call_path(input, weight, bias, activation, negative_slope, recompute, backend)
        if out is not None:
            return out
    input, weight, bias = autocast_args(input, weight, bias)
    check_linear_args(input, weight, bias)
    check_activation(activation)
    negative_slope = check_negative_slope(negative_slope)
    check_recompute(recompute)
    impl = backends.resolve(backend, input.device)
    # func.transforms_active(), inlined (0.06 us, half the call's): torch.func needs the
    # setup_context form; plain calls take the combined form, which Function.apply calls 10-25 us
    # faster (autograd.py's module doc).
    fn = LinearActFunction if _functorch_active() or forward_ad._current_level >= 0 else EagerLinearActFunction
    if input.dim() == 2:
        return fn.apply(input, weight, bias, activation, negative_slope, recompute, impl)
    x = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    out = fn.apply(x, weight, bias, activation, negative_slope, recompute, impl)
    return out.reshape(*input.shape[:-1], weight.shape[0])


def autocast_args(input, *tensors):
    """Under ``torch.autocast`` the layer computes in the autocast dtype, exactly where
    ``nn.Linear`` would (linear is on autocast's lower-precision list): ``input`` and ``tensors``
    (parameters, None allowed) are cast to it if floating, and autograd carries the gradients
    back to their own dtypes. Returns them in order."""
    # _is_any_autocast_enabled first: 0.1 us against 0.5 us for the per-device query.
    if (not isinstance(input, torch.Tensor) or not torch._C._is_any_autocast_enabled()
            or not torch.is_autocast_enabled(input.device.type)):
        return (input, *tensors)
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tuple(map(cast, (input, *tensors)))


def linear_relu(input, weight, bias=None, *, recompute: bool = False, backend: str = "auto"):
    """``relu(input @ weight.T + bias)``; see ``linear_act``."""
    return linear_act(input, weight, bias, "relu", recompute=recompute, backend=backend)


def linear_sigmoid(input, weight, bias=None, *, recompute: bool = False, backend: str = "auto"):
    """``sigmoid(input @ weight.T + bias)``; see ``linear_act``."""
    return linear_act(input, weight, bias, "sigmoid", recompute=recompute, backend=backend)
