"""The numerical contract: NaN propagates like torch, relu'(0) = 0, sigmoid stays finite at the
extremes, empty inputs give empty outputs and zero parameter gradients."""

import dataclasses

import pytest
import torch
from helpers import ACTIVATIONS

import fused_backprop as fb

BACKENDS = [b for b in fb.available_backends("cpu") if b != "triton"]
TORCH_ACT = {"relu": torch.relu, "sigmoid": torch.sigmoid}


def grads(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates_like_torch(backend, activation, recompute, dtype):
    # 20 columns so that the NaNs sit in both SIMD bodies and tails.
    x = torch.randn(5, 20, dtype=dtype)
    x[1, 3] = float("nan")
    w = torch.eye(20, dtype=dtype)
    w[7, 7] = float("nan")
    b = torch.zeros(20, dtype=dtype)
    b[11] = float("nan")
    g = torch.randn(5, 20, dtype=dtype)
    got = grads(lambda *a: fb.linear_act(*a, activation, recompute=recompute, backend=backend), x, w, b, g)
    want = grads(lambda *a: TORCH_ACT[activation](torch.nn.functional.linear(*a)), x, w, b, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, equal_nan=True)
        assert torch.equal(a.isnan(), e.isnan())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True])
def test_relu_derivative_at_zero_is_zero(backend, recompute):
    x = torch.zeros(3, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(19, 17, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(19, dtype=torch.float64, requires_grad=True)
    y = fb.linear_relu(x, w, b, recompute=recompute, backend=backend)
    y.backward(torch.ones_like(y))
    assert not y.any() and not x.grad.any() and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sigmoid_finite_at_extremes(backend, recompute, dtype):
    z = torch.tensor([-1e4, -800.0, -100.0, 0.0, 100.0, 800.0, 1e4], dtype=torch.float64)
    x = z.to(dtype).repeat(3, 3)[:, :19].contiguous()  # 3 x 19: body and tail lanes
    w = torch.eye(19, dtype=dtype)
    b = torch.zeros(19, dtype=dtype)
    got = grads(lambda *a: fb.linear_sigmoid(*a, recompute=recompute, backend=backend), x, w, b,
                torch.ones(3, 19, dtype=dtype))
    want = grads(lambda *a: torch.sigmoid(torch.nn.functional.linear(*a)), x, w, b, torch.ones(3, 19, dtype=dtype))
    for a, e in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_float32_accuracy(backend):
    """float32 sigmoid within 3 ULP of float64 (torch.sigmoid: 2.35) over a dense sweep of the
    pre-activation, wherever the result is a normal float (below that, 1 / (1 + e^-z) flushes to 0
    once e^-z overflows, as torch.sigmoid does); the kernels' derivative recomputed from z equals
    the one from the saved output. The CPU kernel's own exp must be as accurate as torch's."""
    z = torch.cat([torch.linspace(-88, 90, 200_000), torch.linspace(-1, 1, 50_001)])
    x = z.reshape(-1, 1)  # z = x exactly: weight 1, bias 0
    w, b = torch.ones(1, 1), torch.zeros(1)
    y, dx, _, _ = grads(lambda *a: fb.linear_sigmoid(*a, backend=backend), x, w, b, torch.ones_like(x))
    want = torch.sigmoid(z.double())
    ulp = torch.nextafter(want.float(), torch.tensor(float("inf"))) - want.float()
    err = (y.flatten().double() - want).abs() / ulp.double()
    assert err.max() <= 3, f"max error {err.max():.2f} ULP at z = {z[err.argmax()].item()}"
    y_r, dx_r, _, _ = grads(lambda *a: fb.linear_sigmoid(*a, recompute=True, backend=backend), x, w, b,
                            torch.ones_like(x))
    assert torch.equal(y_r, y)
    if backend != "numpy":  # the NumPy reference recomputes σ'(z) as e / (1 + e)², not from y
        assert torch.equal(dx_r, dx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_inputs(backend, activation):
    w = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    for shape in [(0, 5), (2, 0, 5)]:
        x = torch.randn(*shape, requires_grad=True)
        y = fb.linear_act(x, w, b, activation, backend=backend)
        assert y.shape == (*shape[:-1], 3)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
        w.grad = b.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_in_features_is_the_bias(backend):
    """in_features = 0 (allowed by nn.Linear): the output is act(b) and only b gets a gradient."""
    x = torch.randn(4, 0, requires_grad=True)
    w = torch.randn(3, 0, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = fb.linear_sigmoid(x, w, b, backend=backend)
    torch.testing.assert_close(y, torch.sigmoid(b).expand(4, 3))
    y.sum().backward()
    torch.testing.assert_close(b.grad, 4 * torch.sigmoid(b) * (1 - torch.sigmoid(b)))
    assert w.grad.shape == (3, 0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not built")
def test_only_needed_gradients_are_computed(monkeypatch):
    """The kernel is asked only for the gradients autograd needs (no dX GEMM for an input that
    needs no grad, no dW/db for frozen parameters)."""
    cpu, masks = fb.backends.get("cpu"), []

    def spy(*args):
        masks.append(tuple(args[6]))
        return cpu.backward(*args)

    monkeypatch.setitem(fb.backends._REGISTRY, "cpu", dataclasses.replace(cpu, backward=spy))
    for needs, want in [((False, True, False), (False, True, False)), ((True, False, False), (True, False, False)),
                        ((False, False, True), (False, False, True)), ((True, True, True), (True, True, True))]:
        x, w, b = (torch.randn(*s).requires_grad_(r) for s, r in zip([(6, 4), (3, 4), (3,)], needs))
        fb.linear_relu(x, w, b, backend="cpu").sum().backward()
        assert masks[-1] == want
        assert [t.grad is not None for t in (x, w, b)] == list(needs)
