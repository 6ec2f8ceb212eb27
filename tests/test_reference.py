"""The NumPy reference (the test oracle) checked against torch autograd in float64, plus its
finite-difference gradient checker and the "numpy" backend that wraps it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fused_backprop import reference
from fused_backprop.backends import get as get_backend
from helpers import ACT_CASES, ACTIVATIONS, ODD_SHAPES, TOL, TORCH_FUNCTIONS, keeps_z, sample_inputs, torch_act

F64 = TOL[torch.float64]


def to_np(t):
    return None if t is None else t.detach().numpy()


def torch_layer_grads(x, w, b, activation, seed=1, negative_slope=0.01):
    """y and (grad_y, dx, dw, db) from torch autograd for a fixed random grad_y."""
    y = TORCH_FUNCTIONS[activation](F.linear(x, w, b), negative_slope)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad_y)
    dx, dw = grads[:2]
    return y, grad_y, dx, dw, (grads[2] if b is not None else None)


def assert_np_close(actual, expected):
    np.testing.assert_allclose(actual, to_np(expected) if isinstance(expected, torch.Tensor) else expected,
                               **F64)


# (m, k, n, lead): the odd 2-D shapes, a 1-D x (m=None) and a 3-D x.
LAYER_CASES = [(m, k, n, ()) for m, k, n in ODD_SHAPES] + [(None, 6, 5, ()), (4, 6, 5, (3,))]


# (activation, slope, what backward is given): the output y where it determines act' (else the
# reference refuses it, test_errors), the pre-activation z, or nothing (recompute z).
SAVED_CASES = [pytest.param(*case.values, how, id=f"{case.id}-{how}") for case in ACT_CASES
               for how in ("none", "y", "z") if not (how == "y" and keeps_z(*case.values))]


@pytest.mark.parametrize("activation,slope,saved", SAVED_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,k,n,lead", LAYER_CASES)
def test_layer_matches_torch_autograd(m, k, n, lead, activation, slope, bias, saved):
    x, w, b = sample_inputs(m, k, n, bias=bias, lead=lead, requires_grad=True)
    y, grad_y, dx, dw, db = torch_layer_grads(x, w, b, activation, negative_slope=slope)

    y_ref = reference.forward(to_np(x), to_np(w), to_np(b), activation, slope)
    assert y_ref.shape == tuple(y.shape)
    assert_np_close(y_ref, y)

    kept = {"none": {}, "y": {"y": y_ref}, "z": {"z": to_np(F.linear(x, w, b))}}[saved]
    dx_ref, dw_ref, db_ref = reference.backward(to_np(grad_y), to_np(x), to_np(w), to_np(b), activation=activation,
                                                negative_slope=slope, **kept)
    assert dx_ref.shape == tuple(x.shape) and dw_ref.shape == tuple(w.shape)
    assert_np_close(dx_ref, dx)
    assert_np_close(dw_ref, dw)
    if bias:
        assert_np_close(db_ref, db)
    else:
        assert db_ref is None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_zero_rows_give_zero_parameter_grads(activation):
    x, w, b = (to_np(t) for t in sample_inputs(0, 5, 3))
    dx, dw, db = reference.backward(np.zeros((0, 3)), x, w, b, activation=activation)
    assert dx.shape == (0, 5)
    assert dw.shape == (3, 5) and not dw.any()
    assert db.shape == (3,) and not db.any()


@pytest.mark.parametrize("saved_output", [True, False])
def test_relu_derivative_at_zero_is_zero(saved_output):
    x, w = np.zeros((4, 3)), np.ones((2, 3))
    b = np.zeros(2)
    y = reference.forward(x, w, b) if saved_output else None
    dx, dw, db = reference.backward(np.ones((4, 2)), x, w, b, y)
    assert not dx.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_nan_propagates(activation, slope):
    assert np.isnan(reference.relu(np.array([np.nan]))).all()
    x, w, b = (to_np(t) for t in sample_inputs(3, 4, 2))
    x[1, 2] = np.nan
    y = reference.forward(x, w, b, activation, slope)
    assert np.isnan(y[1]).all()
    assert np.isfinite(y[[0, 2]]).all()


def test_sigmoid_stable_for_huge_inputs():
    z = np.array([-1e4, -800.0, -40.0, 0.0, 40.0, 800.0, 1e4])
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        s = reference.sigmoid(z)
        ds = reference.sigmoid_grad(z)
        y = reference.forward(np.array([[1e4], [-1e4]]), np.ones((1, 1)), np.zeros(1), "sigmoid")
        grads = reference.backward(np.ones((2, 1)), np.array([[1e4], [-1e4]]), np.ones((1, 1)), np.zeros(1),
                                   activation="sigmoid")
    assert np.isfinite(s).all() and np.isfinite(ds).all()
    assert s[0] == 0.0 and s[-1] == 1.0 and s[3] == 0.5
    assert ds[0] == 0.0 and ds[-1] == 0.0 and ds[3] == 0.25
    assert np.array_equal(y, [[1.0], [0.0]])
    assert all(np.array_equal(g, np.zeros_like(g)) for g in grads)
    np.testing.assert_allclose(s, torch.sigmoid(torch.from_numpy(z)).numpy(), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy: inf * 0, overflow
@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_extremes_match_torch_in_float64(activation, slope):
    """act and act' at the float64 extremes (±0, ±inf, NaN, ±1e300, values where exp over- or
    underflows) are torch's own, NaN where torch's are."""
    z = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e300, -1e300, 1e38, -1e38, 800.0,
                      -800.0, 40.0, -40.0, 1e-300, -1e-300], dtype=torch.float64, requires_grad=True)
    y = TORCH_FUNCTIONS[activation](z, slope)
    (dz,) = torch.autograd.grad(y.sum(), z)
    act = reference.ACTIVATIONS[activation]
    for got, want in ((act.forward(to_np(z), slope), y), (act.grad_from_preact(to_np(z), slope), dz)):
        torch.testing.assert_close(torch.from_numpy(got), want.detach(), equal_nan=True, **F64)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="W must be 2-D"):
        reference.forward(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match=r"x must have shape \(\*, K=4\)"):
        reference.forward(np.ones((2, 3)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="b must have shape"):
        reference.forward(np.ones((2, 3)), np.ones((5, 3)), np.ones(4))
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.forward(np.ones((2, 3)), np.ones((5, 3)), activation="swish")
    with pytest.raises(ValueError, match="grad_y must have"):
        reference.backward(np.ones((2, 4)), np.ones((2, 3)), np.ones((5, 3)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("last_activation", [True, False])
def test_mlp_manual_backprop_matches_torch(activation, last_activation):
    sizes = [7, 16, 9, 3]
    mlp = reference.NumpyMLP(sizes, activation, last_activation=last_activation, seed=3)
    layers = []
    for i, (w, b) in enumerate(mlp.params):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if i < len(sizes) - 2 or last_activation:
            layers.append(torch_act(activation))
    model = torch.nn.Sequential(*layers)

    x, _, _ = sample_inputs(2, sizes[0], 1, lead=(5,), requires_grad=True)
    out = model(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out.backward(grad_out)

    out_ref = mlp.forward(to_np(x))
    assert_np_close(out_ref, out)
    dx_ref, grads_ref = mlp.backward(to_np(grad_out))
    assert_np_close(dx_ref, x.grad)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert len(grads_ref) == len(linears)
    for (dw, db), linear in zip(grads_ref, linears):
        assert_np_close(dw, linear.weight.grad)
        assert_np_close(db, linear.bias.grad)

    # The same model loaded back from torch parameters (requiring grad) computes the same.
    loaded = reference.NumpyMLP.from_params([(m.weight, m.bias) for m in linears], activation, last_activation)
    assert_np_close(loaded.forward(to_np(x)), out)


def test_numerical_gradient_restores_x_and_is_exact_for_a_quadratic():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    before = x.copy()
    grad = reference.numerical_gradient(lambda v: (v ** 2).sum(), x)
    assert np.array_equal(x, before)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-8)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_gradient_check_accepts_right_and_rejects_wrong_gradients(activation, slope):
    # Shift the pre-activations away from relu's kink so central differences are exact enough.
    x, w, b = (to_np(t) for t in sample_inputs(6, 4, 3, seed=5))
    b = b + np.sign(b) * 0.5
    grad_y = np.random.default_rng(0).standard_normal((6, 3))

    def loss(w_):
        return (grad_y * reference.forward(x, w_, b, activation, slope)).sum()

    _, dw, _ = reference.backward(grad_y, x, w, b, activation=activation, negative_slope=slope)
    assert reference.gradient_check(loss, w, dw) < 1e-6

    y = reference.forward(x, w, b, activation, slope)
    wrong_dz = grad_y * (1.0 if activation == "relu" else y)  # relu' taken as 1; the others' act' as act
    assert reference.gradient_check(loss, w, wrong_dz.T @ x) > 1e-2
    assert reference.gradient_check(loss, w, 1.1 * dw) > 1e-2


@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_mask", [(True, True, True), (True, False, True), (False, True, False)])
def test_numpy_backend(activation, slope, dtype, output_mask):
    backend = get_backend("numpy")
    assert backend.supports(torch.device("cpu")) and not backend.supports(torch.device("cuda"))
    assert backend.auto_priority is None and not backend.differentiable
    x, w, b = sample_inputs(37, 13, 11, dtype=dtype, requires_grad=True)
    y, grad_y, *expected = torch_layer_grads(x, w, b, activation, negative_slope=slope)
    xd, wd, bd = x.detach(), w.detach(), b.detach()

    out = backend.forward(xd, wd, bd, activation, slope)
    assert out.dtype == dtype
    torch.testing.assert_close(out, y, **TOL[dtype])
    out_p, z = backend.forward_preact(xd, wd, bd, activation, slope)
    assert out_p.dtype == z.dtype == dtype
    torch.testing.assert_close(out_p, out, **TOL[dtype])
    torch.testing.assert_close(z, F.linear(xd, wd, bd), **TOL[dtype])
    for saved in (z if keeps_z(activation, slope) else out, None):
        grads = backend.backward(grad_y, xd, wd, bd, saved, activation, output_mask, slope)
        for got, want, wanted in zip(grads, expected, output_mask):
            if wanted:
                assert got.dtype == dtype
                torch.testing.assert_close(got, want, **TOL[dtype])
            else:
                assert got is None
    assert backend.backward(grad_y, x, w, None, out, activation, (True, True, True), slope)[2] is None
