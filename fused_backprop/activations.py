"""The one list of activations on the Python side (csrc/activations.def is the C++ one; a test
checks that both hold the same names).

Each entry has the activation as torch computes it, its first derivative written from what backward
keeps (the layer output where the derivative is a function of it, else the pre-activation), its
first and second derivatives from the pre-activation, and how ``fuse`` recognises it in a model.
The composite ``torch`` backend, autograd's saving policy, the modules, ``fuse``, the Triton codes,
the benchmark and the tests read this table. The compiled kernels take their formulas from
``csrc/activation.h``; the NumPy reference keeps its own on purpose, as the independent oracle.

Every function takes ``a``, the activation's parameter: leaky relu's negative slope (ignored by the
others)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_NEGATIVE_SLOPE = 0.01


class ActivationSpec(NamedTuple):
    name: str
    forward: Callable            # (z, a) -> act(z), as torch's own function
    grad_from_preact: Callable   # (z, a) -> act'(z)
    grad2_from_preact: Callable  # (z, a) -> act''(z)
    # (y, a) -> act'(z) written with the output y = act(z); None when the derivative is not a
    # function of y (gelu, gelu_tanh, silu), so backward keeps the pre-activation instead.
    grad_from_output: Optional[Callable]
    sign_decides: bool           # the sign of z alone selects act'(z): a 1-bit mask can stand in for y
    # How fuse() finds it in a model: nn types (exact class), call_function targets, Tensor method
    # names, and the module attributes / keywords that select this entry ({} none; a value of
    # None: any value, handed to the fused layer).
    modules: tuple = ()
    functions: tuple = ()
    methods: tuple = ()
    params: dict = {}
    # For which parameter values grad_from_output holds (leaky relu: a >= 0; with a < 0, y > 0
    # for z < 0 too, so the output does not tell the branch).
    output_decides: Callable[[float], bool] = lambda a: True


def _step(v):
    # 0 where v <= 0, else 1: relu'(0) = 0, and NaN passes the gradient like threshold_backward.
    return (v <= 0).logical_not().to(v.dtype)


def _where_positive(v, p, q):
    # p where v > 0, else q (NaN: q), as leaky_relu and its backward.
    return torch.where(v > 0, p, q)


def _zeros(z, a):
    return torch.zeros_like(z)


def _sig_from_y(y):
    return y * (1 - y)


def _tanh_from_y(y):
    return 1 - y * y


def _sigmoid_grad2(z, a):
    s = torch.sigmoid(z)
    return s * (1 - s) * (1 - 2 * s)


def _tanh_grad2(z, a):
    t = torch.tanh(z)
    return -2 * t * (1 - t * t)


_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_BETA, _KAPPA = math.sqrt(2 / math.pi), 0.044715


def _gelu_grad(z, a):
    cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
    return cdf + z * (_INV_SQRT_2PI * torch.exp(z * z * -0.5))


def _gelu_grad2(z, a):
    return _INV_SQRT_2PI * torch.exp(z * z * -0.5) * (2 - z * z)


def _gelu_tanh_parts(z):
    z_sq = z * z
    t = torch.tanh(_BETA * (z + _KAPPA * (z_sq * z)))
    return t, _BETA * (1 + 3 * _KAPPA * z_sq)


def _gelu_tanh_grad(z, a):
    t, du = _gelu_tanh_parts(z)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du


def _gelu_tanh_grad2(z, a):
    t, du = _gelu_tanh_parts(z)
    return (1 - t * t) * (du + 0.5 * z * (6 * _BETA * _KAPPA * z - 2 * t * du * du))


def _silu_grad(z, a):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_grad2(z, a):
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _leaky_grad(v, a):
    return _where_positive(v, torch.ones_like(v), torch.full_like(v, a))


_SPECS = (
    ActivationSpec("relu", lambda z, a: torch.relu(z), lambda z, a: _step(z), _zeros, lambda y, a: _step(y), True,
                   (nn.ReLU,), (F.relu, torch.relu, F.relu_, torch.relu_), ("relu", "relu_")),
    ActivationSpec("sigmoid", lambda z, a: torch.sigmoid(z), lambda z, a: _sig_from_y(torch.sigmoid(z)),
                   _sigmoid_grad2, lambda y, a: _sig_from_y(y), False,
                   (nn.Sigmoid,), (torch.sigmoid, F.sigmoid, torch.sigmoid_), ("sigmoid", "sigmoid_")),
    ActivationSpec("tanh", lambda z, a: torch.tanh(z), lambda z, a: _tanh_from_y(torch.tanh(z)), _tanh_grad2,
                   lambda y, a: _tanh_from_y(y), False,
                   (nn.Tanh,), (torch.tanh, F.tanh, torch.tanh_), ("tanh", "tanh_")),
    ActivationSpec("leaky_relu", lambda z, a: F.leaky_relu(z, a), _leaky_grad, _zeros, _leaky_grad, True,
                   (nn.LeakyReLU,), (F.leaky_relu, F.leaky_relu_), (), {"negative_slope": None}, lambda a: a >= 0),
    ActivationSpec("gelu", lambda z, a: F.gelu(z), _gelu_grad, _gelu_grad2, None, False,
                   (nn.GELU,), (F.gelu,), (), {"approximate": "none"}),
    ActivationSpec("gelu_tanh", lambda z, a: F.gelu(z, approximate="tanh"), _gelu_tanh_grad, _gelu_tanh_grad2, None,
                   False, (nn.GELU,), (F.gelu,), (), {"approximate": "tanh"}),
    ActivationSpec("silu", lambda z, a: F.silu(z), _silu_grad, _silu_grad2, None, False,
                   (nn.SiLU,), (F.silu,), ()),
)


ACTIVATIONS: dict[str, ActivationSpec] = {spec.name: spec for spec in _SPECS}
NAMES = tuple(ACTIVATIONS)


def saves_output(activation: str, negative_slope: float) -> bool:
    """Whether backward takes act'(z) from the layer output (else from the pre-activation)."""
    spec = ACTIVATIONS[activation]
    return spec.grad_from_output is not None and spec.output_decides(negative_slope)


def uses_sign_mask(activation: str, negative_slope: float) -> bool:
    """Whether ``recompute=True`` keeps the 1-bit sign mask of the output instead of nothing."""
    return ACTIVATIONS[activation].sign_decides and saves_output(activation, negative_slope)


def gelu_activation(approximate) -> str:
    """The activation name of ``F.gelu(approximate=...)``: "gelu" or "gelu_tanh"."""
    names = {"none": "gelu", "tanh": "gelu_tanh"}
    if approximate not in names:
        raise ValueError(f"approximate must be one of {tuple(names)}, got {approximate!r}")
    return names[approximate]
