"""nn layers: ``FusedLinearReLU``, ``FusedLinearSigmoid`` and the ``FusedMLP`` stack.

Parameters are named, shaped and initialised as in ``nn.Linear`` (weight ``(out, in)``, bias
``(out,)``, the same Kaiming-uniform init drawing the same random numbers), so state dicts load
both ways."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from . import backends
from ._checks import check_activation, check_linear_args, check_recompute
from .block import BlockFunction, LayerSpec
from .functional import autocast_args, linear_act


class FusedLinearAct(nn.Module):
    """``activation(x @ weight.T + bias)`` as one fused layer; see ``fused_backprop.linear_act``."""

    activation: str = "relu"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recompute: bool = False,
                 backend: str = "auto", device=None, dtype=None, activation: str | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if activation is not None:
            self.activation = check_activation(activation)
        self.in_features, self.out_features = in_features, out_features
        self.recompute = check_recompute(recompute)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_parameters()

    reset_parameters = nn.Linear.reset_parameters  # the same init, the same random draws

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, recompute: bool = False, backend: str = "auto"):
        """A fused layer that shares ``linear``'s weight and bias (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.recompute, layer.backend = check_recompute(recompute), backend
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_act(input, self.weight, self.bias, self.activation,
                          recompute=self.recompute, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, recompute={self.recompute}, backend={self.backend!r}")


class FusedLinearReLU(FusedLinearAct):
    """``relu(x @ weight.T + bias)``; same signature as ``nn.Linear`` plus recompute and backend."""

    activation = "relu"


class FusedLinearSigmoid(FusedLinearAct):
    """``sigmoid(x @ weight.T + bias)``; same signature as ``nn.Linear`` plus recompute and backend."""

    activation = "sigmoid"


FUSED_LAYERS = {"relu": FusedLinearReLU, "sigmoid": FusedLinearSigmoid}
RECOMPUTE_MODES = ("none", "layer", "block")


class FusedMLP(nn.Module):
    """A stack of fused layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    ``last_activation=False`` makes the last layer a plain ``nn.Linear`` (logits).
    ``recompute``: "none" caches each layer's output; "layer" recomputes each pre-activation in
    backward; "block" saves only the stack's input and recomputes the whole stack in backward with
    the fused kernels (``fused_backprop.block``)."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu", *, last_activation: bool = True,
                 recompute: str = "none", backend: str = "auto", bias: bool = True, device=None, dtype=None):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least 2 widths (input and output), got {sizes}")
        check_activation(activation)
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        self.sizes, self.activation, self.recompute, self.backend = sizes, activation, recompute, backend
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i == len(sizes) - 2 and not last_activation:
                layers.append(nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype))
            else:
                layers.append(FUSED_LAYERS[activation](n_in, n_out, bias=bias, recompute=recompute == "layer",
                                                       backend=backend, device=device, dtype=dtype))
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
        specs = tuple(LayerSpec(getattr(lay, "activation", None), lay.bias is not None) for lay in self.layers)
        if x.dim() == 2:
            return BlockFunction.apply(x, specs, impl, *params)
        flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        out = BlockFunction.apply(flat, specs, impl, *params)
        return out.reshape(*x.shape[:-1], out.shape[-1])
