"""gradcheck and gradgradcheck in float64 through the public API, for every backend that runs on
the CPU here, every activation (leaky relu also at slopes 0, -0.5 and 1.5), recompute on/off and
bias on/off. The numpy backend's backward is not differentiable itself: under create_graph the
layer takes the composite torch backend's, which gradgradcheck checks here for it too."""

import pytest
import torch
from helpers import ACT_CASES, sample_inputs

import fused_backprop as fb

CPU_BACKENDS = [b for b in fb.available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_and_gradgradcheck(backend, activation, slope, recompute, bias):
    x, w, b = sample_inputs(6, 5, 4, bias=bias, requires_grad=True, lead=(2,))
    args = (x, w) if b is None else (x, w, b)

    def f(x, w, b=None):
        return fb.linear_act(x, w, b, activation, negative_slope=slope, recompute=recompute, backend=backend)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_cpu_backend_built():
    """The compiled CPU kernels must be part of every test run (CI builds them)."""
    assert "cpu" in CPU_BACKENDS, fb._ops.BUILD_ERROR
