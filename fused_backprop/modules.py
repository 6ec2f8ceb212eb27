"""nn layers: one fused layer per activation (``FusedLinearReLU``, ..., ``FusedLinearAct`` for any)
and the ``FusedMLP`` stack.

Parameters are named, shaped and initialised as in ``nn.Linear`` (weight ``(out, in)``, bias
``(out,)``, the same Kaiming-uniform init drawing the same random numbers), so state dicts load
both ways."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from . import backends
from ._checks import check_activation, check_linear_args, check_negative_slope, check_recompute
from .activations import DEFAULT_NEGATIVE_SLOPE, gelu_activation
from .block import LayerSpec, apply_block
from .functional import autocast_args, linear_act


class FusedLinearAct(nn.Module):
    """``activation(x @ weight.T + bias)`` as one fused layer; see ``fused_backprop.linear_act``.
    ``activation`` is any name of ``fused_backprop.ACTIVATIONS`` (the subclasses fix it)."""

    activation: str = "relu"
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recompute: bool = False,
                 backend: str = "auto", device=None, dtype=None, activation: str | None = None,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self._set_activation(activation, negative_slope)
        self.in_features, self.out_features = in_features, out_features
        self.recompute = check_recompute(recompute)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_parameters()

    def _set_activation(self, activation, negative_slope) -> None:
        if activation is not None:
            self.activation = check_activation(activation)
        self.negative_slope = check_negative_slope(negative_slope)

    reset_parameters = nn.Linear.reset_parameters  # the same init, the same random draws

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, recompute: bool = False, backend: str = "auto", **activation_args):
        """A fused layer that shares ``linear``'s weight and bias (no copy). ``activation_args``
        are the class's own (``negative_slope``, ``approximate``; ``activation`` for FusedLinearAct)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._from_linear_args(**activation_args)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.recompute, layer.backend = check_recompute(recompute), backend
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        return layer

    def _from_linear_args(self, activation=None, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        self._set_activation(activation, negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The registered parameters straight from _parameters: self.weight goes through
        # nn.Module.__getattr__, 0.3-0.6 us a lookup, a tenth of a small layer's call. (A
        # parametrized weight is no longer there: then the attribute.)
        params = self._parameters
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        return linear_act(input, weight, bias, self.activation, negative_slope=self.negative_slope,
                          recompute=self.recompute, backend=self.backend)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}{slope}, recompute={self.recompute}, backend={self.backend!r}")


class _FixedActivation(FusedLinearAct):
    """A layer whose class fixes the activation: no activation arguments."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recompute: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, recompute=recompute, backend=backend, device=device,
                         dtype=dtype)

    def _from_linear_args(self):
        self._set_activation(None, DEFAULT_NEGATIVE_SLOPE)


class FusedLinearReLU(_FixedActivation):
    """``relu(x @ weight.T + bias)``; same signature as ``nn.Linear`` plus recompute and backend."""

    activation = "relu"


class FusedLinearSigmoid(_FixedActivation):
    """``sigmoid(x @ weight.T + bias)``; same signature as ``nn.Linear`` plus recompute and backend."""

    activation = "sigmoid"


class FusedLinearTanh(_FixedActivation):
    """``tanh(x @ weight.T + bias)``; same signature as ``nn.Linear`` plus recompute and backend."""

    activation = "tanh"


class FusedLinearSiLU(_FixedActivation):
    """``silu(x @ weight.T + bias)``; same signature as ``nn.Linear`` plus recompute and backend."""

    activation = "silu"


class FusedLinearLeakyReLU(FusedLinearAct):
    """``leaky_relu(x @ weight.T + bias, negative_slope)``; ``nn.Linear``'s signature plus
    ``negative_slope`` (as ``nn.LeakyReLU``), recompute and backend."""

    activation = "leaky_relu"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE, recompute: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, recompute=recompute, backend=backend, device=device,
                         dtype=dtype, negative_slope=negative_slope)

    def _from_linear_args(self, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        self._set_activation(None, negative_slope)


class FusedLinearGELU(FusedLinearAct):
    """``gelu(x @ weight.T + bias, approximate)`` ("none": the erf form, "tanh": the tanh
    approximation, as ``nn.GELU``); ``nn.Linear``'s signature plus approximate, recompute and
    backend."""

    activation = "gelu"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, approximate: str = "none",
                 recompute: bool = False, backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, recompute=recompute, backend=backend, device=device,
                         dtype=dtype, activation=gelu_activation(approximate))

    def _from_linear_args(self, approximate="none"):
        self._set_activation(gelu_activation(approximate), DEFAULT_NEGATIVE_SLOPE)

    @property
    def approximate(self) -> str:
        return "tanh" if self.activation == "gelu_tanh" else "none"


# The fused layer of each activation and the arguments that select it.
FUSED_LAYERS = {
    "relu": (FusedLinearReLU, {}), "sigmoid": (FusedLinearSigmoid, {}), "tanh": (FusedLinearTanh, {}),
    "leaky_relu": (FusedLinearLeakyReLU, {}), "gelu": (FusedLinearGELU, {"approximate": "none"}),
    "gelu_tanh": (FusedLinearGELU, {"approximate": "tanh"}), "silu": (FusedLinearSiLU, {}),
}


def _layer_of(activation: str, negative_slope: float):
    """(class, its activation arguments) of the fused layer for ``activation``."""
    cls, args = FUSED_LAYERS[activation]
    return cls, ({"negative_slope": negative_slope} if cls is FusedLinearLeakyReLU else args)


def fused_layer_from_linear(linear: nn.Linear, activation: str, *, negative_slope=DEFAULT_NEGATIVE_SLOPE, **kwargs):
    """The fused layer of ``activation`` sharing ``linear``'s parameters (fuse's rewrite)."""
    cls, args = _layer_of(activation, negative_slope)
    return cls.from_linear(linear, **kwargs, **args)


RECOMPUTE_MODES = ("none", "layer", "block")


class FusedMLP(nn.Module):
    """A stack of fused layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    ``last_activation=False`` makes the last layer a plain ``nn.Linear`` (logits).
    ``recompute``: "none" caches each layer's output; "layer" recomputes each pre-activation in
    backward; "block" saves only the stack's input and recomputes the whole stack in backward with
    the fused kernels (``fused_backprop.block``)."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu", *, last_activation: bool = True,
                 recompute: str = "none", negative_slope: float = DEFAULT_NEGATIVE_SLOPE, backend: str = "auto",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least 2 widths (input and output), got {sizes}")
        check_activation(activation)
        negative_slope = check_negative_slope(negative_slope)
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        self.sizes, self.activation, self.recompute, self.backend = sizes, activation, recompute, backend
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i == len(sizes) - 2 and not last_activation:
                layers.append(nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype))
            else:
                cls, args = _layer_of(activation, negative_slope)
                layers.append(cls(n_in, n_out, bias=bias, recompute=recompute == "layer", backend=backend,
                                  device=device, dtype=dtype, **args))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute != "block":
            for layer in self.layers:
                x = layer(x)
            return x
        x, *params = autocast_args(x, *[p for lay in self.layers for p in (lay.weight, lay.bias) if p is not None])
        first = self.layers[0]
        check_linear_args(x, params[0], params[1] if first.bias is not None else None)
        impl = backends.resolve(self.backend, x.device)
        specs = tuple(LayerSpec(getattr(lay, "activation", None), getattr(lay, "negative_slope", None),
                                lay.bias is not None) for lay in self.layers)
        if x.dim() == 2:
            return apply_block(x, specs, impl, *params)
        flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        out = apply_block(flat, specs, impl, *params)
        return out.reshape(*x.shape[:-1], out.shape[-1])
