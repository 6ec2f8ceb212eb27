"""The one place where the public Python API checks its arguments. Each error names the argument
and says what was expected. (The registered ops check again in C++, csrc/ops.cpp, because they
are public too.)"""

from __future__ import annotations

import torch

from .activations import NAMES as ACTIVATION_NAMES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_activation(activation) -> str:
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {ACTIVATION_NAMES}, got {activation!r}")
    return activation


def check_negative_slope(negative_slope) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    return float(negative_slope)


def check_recompute(recompute) -> bool:
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    return recompute


def check_linear_args(input, weight, bias) -> None:
    """``input (*, in_features)``, ``weight (out_features, in_features)``, ``bias (out_features,)``
    or None; one floating dtype, one device."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input must have shape (*, in_features={weight.shape[1]}) to match weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(input.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must have a floating dtype ({', '.join(map(str, FLOAT_DTYPES))}), got {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(f"{name} must have the same dtype as input ({input.dtype}), got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{name} must be on the same device as input ({input.device}), got {t.device}")
