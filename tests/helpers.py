"""Shared test inputs and tolerances: every test builds its tensors here."""

from __future__ import annotations

import torch

# (M, K, N): 0 rows, 1 row, K=1, N=1, and sizes that are multiples of no panel or tile.
ODD_SHAPES = [(0, 5, 3), (1, 7, 4), (5, 1, 6), (6, 9, 1), (37, 13, 11), (130, 65, 33)]
ACTIVATIONS = ("relu", "sigmoid")

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
