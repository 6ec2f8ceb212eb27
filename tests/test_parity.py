"""Outputs and all gradients against nn.Sequential(nn.Linear, act) and the NumPy reference, over
odd shapes, leading dims, dtypes, recompute and bias settings, for every activation (leaky relu
also at a zero, a negative and a > 1 slope)."""

import numpy as np
import pytest
import torch
from helpers import (ACT_CASES, ACTIVATIONS, ODD_SHAPES, assert_close, dtype_id, layer_grads,
                     sample_inputs, torch_act)
from torch import nn

import fused_backprop as fb
from fused_backprop import reference

BACKENDS = [b for b in fb.available_backends("cpu") if b != "triton"]

LAYOUTS = [  # (m, lead): x is (*lead, m, k); m=None means x is (*lead, k)
    (None, ()), (None, (3,)), (4, (2,)), (3, (2, 2)),
]


def eager_grads(x, w, b, activation, g, negative_slope=0.01):
    """Output and (dx, dw, db) of nn.Sequential(nn.Linear, act) sharing the given parameters."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    xr = x.detach().clone().requires_grad_(True)
    y = nn.Sequential(lin, torch_act(activation, negative_slope))(xr)
    y.backward(g)
    return y.detach(), xr.grad, lin.weight.grad, (lin.bias.grad if b is not None else None)


def fused_grads(x, w, b, activation, g, **kw):
    return layer_grads(lambda x, w, b: fb.linear_act(x, w, b, activation, **kw), x, w, b, g)


def check_all(got, want, dtype):
    for a, e in zip(got, want):
        if e is None:
            assert a is None
        else:
            assert a.shape == e.shape
            assert_close(a, e, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,k,n", ODD_SHAPES)
def test_matches_sequential_odd_shapes(backend, activation, slope, recompute, bias, m, k, n):
    x, w, b = sample_inputs(m, k, n, bias=bias)
    g = torch.randn(m, n, dtype=x.dtype)
    want = eager_grads(x, w, b, activation, g, slope)
    got = fused_grads(x, w, b, activation, g, negative_slope=slope, recompute=recompute, backend=backend)
    check_all(got, want, x.dtype)
    if m == 0:  # empty input: empty output, zero parameter gradients
        assert got[0].shape == (0, n) and not got[2].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,lead", LAYOUTS)
def test_leading_dims(backend, m, lead):
    x, w, b = sample_inputs(m, 6, 5, lead=lead)
    g = torch.randn(*x.shape[:-1], 5, dtype=x.dtype)
    for case in ACT_CASES:
        activation, slope = case.values
        for recompute in (False, True):
            got = fused_grads(x, w, b, activation, g, negative_slope=slope, recompute=recompute, backend=backend)
            check_all(got, eager_grads(x, w, b, activation, g, slope), x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
def test_low_precision_matches_eager(dtype, activation, slope, recompute):
    x, w, b = sample_inputs(300, 70, 45, dtype=dtype, noncontiguous=True)
    g = torch.randn(300, 45, dtype=torch.float64).to(dtype)
    want = eager_grads(x, w, b, activation, g, slope)
    got = fused_grads(x, w, b, activation, g, negative_slope=slope, recompute=recompute, backend="cpu")
    assert_close(got[0], want[0], dtype)
    # Gradients sum hundreds of products; eager and the kernels round in different places. (For
    # relu and leaky relu in 16-bit, a pre-activation within rounding of the kink could take either
    # side in eager and in the kernel and move a row of dW by g*x; on these fixed inputs none does,
    # at every SIMD level, so their gradients are compared too.)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.5)
    for a, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
def test_matches_numpy_reference(backend, activation, slope, recompute):
    x, w, b = sample_inputs(37, 13, 11, lead=(2,))
    g = torch.randn(2, 37, 11, dtype=torch.float64)
    y, dx, dw, db = fused_grads(x, w, b, activation, g, negative_slope=slope, recompute=recompute, backend=backend)
    np.testing.assert_allclose(y.numpy(), reference.forward(x.numpy(), w.numpy(), b.numpy(), activation, slope),
                               rtol=1e-10, atol=1e-12)
    for got, want in zip((dx, dw, db), reference.backward(g.numpy(), x.numpy(), w.numpy(), b.numpy(),
                                                          activation=activation, negative_slope=slope)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_matches_numpy_mlp(activation):
    """A 3-layer FusedMLP against the reference's manual backprop (chain rule, layer cache)."""
    mlp = fb.FusedMLP([7, 9, 8, 3], activation, last_activation=False, dtype=torch.float64)
    ref = reference.NumpyMLP.from_params([(lay.weight, lay.bias) for lay in mlp.layers], activation,
                                         last_activation=False)
    x = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 3, dtype=torch.float64)
    y = mlp(x)
    y.backward(g)
    np.testing.assert_allclose(y.detach().numpy(), ref.forward(x.detach().numpy()), rtol=1e-10)
    dx, grads = ref.backward(g.numpy())
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-9, atol=1e-12)
    for lay, (dw, db) in zip(mlp.layers, grads):
        np.testing.assert_allclose(lay.weight.grad.numpy(), dw, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lay.bias.grad.numpy(), db, rtol=1e-9, atol=1e-12)
