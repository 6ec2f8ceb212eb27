"""Shared test inputs, tolerances and torch's own activations: every test builds its tensors here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_backprop import ACTIVATIONS

# (M, K, N): 0 rows, 1 row, K=1, N=1, and sizes that are multiples of no panel or tile (the last
# one large enough for the float tile GEMM, csrc/cpu/tile_gemm.h).
ODD_SHAPES = [(0, 5, 3), (1, 7, 4), (5, 1, 6), (6, 9, 1), (37, 13, 11), (130, 65, 33), (257, 70, 67)]
DEFAULT_SLOPE = 0.01

# torch's own activation of each name as an nn.Module, written here (not read from the package's
# registry) so that the tests check the registry too. A factory of the negative slope.
TORCH_MODULES = {
    "relu": lambda a: nn.ReLU(),
    "sigmoid": lambda a: nn.Sigmoid(),
    "tanh": lambda a: nn.Tanh(),
    "leaky_relu": lambda a: nn.LeakyReLU(a),
    "gelu": lambda a: nn.GELU(),
    "gelu_tanh": lambda a: nn.GELU(approximate="tanh"),
    "silu": lambda a: nn.SiLU(),
}
# ... and as a function.
TORCH_FUNCTIONS = {
    "relu": lambda z, a: torch.relu(z),
    "sigmoid": lambda z, a: torch.sigmoid(z),
    "tanh": lambda z, a: torch.tanh(z),
    "leaky_relu": lambda z, a: F.leaky_relu(z, a),
    "gelu": lambda z, a: F.gelu(z),
    "gelu_tanh": lambda z, a: F.gelu(z, approximate="tanh"),
    "silu": lambda z, a: F.silu(z),
}
# What backward keeps of the layer when it keeps something: the output y where act' is a function
# of y, else the pre-activation z (leaky relu with a negative slope: y > 0 on both branches).
KEEPS_Z = {"gelu", "gelu_tanh", "silu"}
SIGN_ACTIVATIONS = ("relu", "leaky_relu")  # act' from the sign alone: recompute keeps a 1-bit mask

# Leaky relu's slope cases beyond the default: zero (relu-like), negative (y does not tell the
# branch, so z is kept) and above one.
EXTRA_SLOPES = (0.0, -0.5, 1.5)
# (activation, negative_slope): every activation at the default slope, and leaky relu's others.
ACT_CASES = [pytest.param(a, DEFAULT_SLOPE, id=a) for a in ACTIVATIONS] + [
    pytest.param("leaky_relu", s, id=f"leaky_relu{s:g}") for s in EXTRA_SLOPES]


def dtype_id(dtype) -> str:
    """A test id for a dtype: "float32" rather than "dtype0"."""
    return str(dtype).removeprefix("torch.")


def torch_act(activation: str, negative_slope: float = DEFAULT_SLOPE) -> nn.Module:
    return TORCH_MODULES[activation](negative_slope)


def keeps_z(activation: str, negative_slope: float = DEFAULT_SLOPE) -> bool:
    return activation in KEEPS_Z or (activation == "leaky_relu" and negative_slope < 0)


def keeps_mask(activation: str, negative_slope: float = DEFAULT_SLOPE) -> bool:
    """Whether recompute=True keeps the packed sign mask (else nothing)."""
    return activation in SIGN_ACTIVATIONS and not keeps_z(activation, negative_slope)


# Tolerances tied to the dtype (Liger-Kernel style).
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def sample_inputs(m, k, n, *, dtype=torch.float64, device="cpu", bias=True, requires_grad=False,
                  lead=(), noncontiguous=False, seed=0):
    """(x, weight, bias) for a layer in_features=k -> out_features=n with m rows.

    ``lead`` adds leading dims: x has shape (*lead, m, k) (m=None drops the row dim: x is (k,)).
    ``noncontiguous`` returns x and weight as transposed views of contiguous storage."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, k) if m is None else (*lead, m, k)

    def make(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    if noncontiguous:
        x = make(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2) if len(shape) >= 2 else make(*shape)
        w = make(k, n, scale=k ** -0.5).t()
    else:
        x = make(*shape)
        w = make(n, k, scale=k ** -0.5)
    b = make(n) if bias else None
    tensors = [t.to(device) if t is not None else None for t in (x, w, b)]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tuple(tensors)


def assert_close(actual, expected, dtype=None):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOL[dtype])


def layer_grads(fn, x, w, b, g):
    """Output and (dx, dw, db) of ``fn(x, w, b)`` (b may be None) for the output gradient ``g``,
    on fresh leaf copies of the inputs."""
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def torch_layer(activation, negative_slope=DEFAULT_SLOPE):
    """``act(F.linear(x, w, b))`` with torch's own activation."""
    act = TORCH_FUNCTIONS[activation]
    return lambda x, w, b: act(F.linear(x, w, b), negative_slope)


def saved_tensors(fn):
    """The tensors autograd saves for backward while ``fn()`` runs, in order."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved
