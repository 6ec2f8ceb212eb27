"""FusedMLP(recompute="block"): the same gradients as "none" on a deep stack, for every backend,
every activation (leaky relu at slopes 0.01, 0, -0.5, 1.5), with and without a last activation and
bias; double backward; and only the block input (plus parameters) saved for backward."""

import pytest
import torch
from helpers import ACT_CASES, ACTIVATIONS, assert_close, saved_tensors

import fused_backprop as fb

BACKENDS = [b for b in fb.available_backends("cpu") if b != "triton"]
SIZES = [7, 12, 9, 12, 5, 11, 8, 6, 4]  # 8 layers, no two widths alike


def twin_mlps(activation, last_activation, bias, backend, dtype=torch.float64, slope=0.01):
    torch.manual_seed(0)
    kw = dict(last_activation=last_activation, bias=bias, backend=backend, negative_slope=slope, dtype=dtype)
    ref = fb.FusedMLP(SIZES, activation, **kw)
    blk = fb.FusedMLP(SIZES, activation, recompute="block", **kw)
    blk.load_state_dict(ref.state_dict())
    return ref, blk


def run(mlp, x, g):
    x = x.clone().requires_grad_(True)
    out = mlp(x)
    out.backward(g)
    return [out.detach(), x.grad] + [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("last_activation", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_block_equals_none_on_deep_stack(backend, activation, slope, last_activation, bias):
    ref, blk = twin_mlps(activation, last_activation, bias, backend, slope=slope)
    x = torch.randn(3, 10, SIZES[0], dtype=torch.float64)
    g = torch.randn(3, 10, SIZES[-1], dtype=torch.float64)
    want, got = run(ref, x, g), run(blk, x, g)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert_close(a, e)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_block_float32_cpu_kernels(activation, slope):
    ref, blk = twin_mlps(activation, True, True, "auto", dtype=torch.float32, slope=slope)
    x, g = torch.randn(300, SIZES[0]), torch.randn(300, SIZES[-1])
    for a, e in zip(run(blk, x, g), run(ref, x, g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_block_frozen_parameters_and_input():
    ref, blk = twin_mlps("relu", False, True, "auto")
    for mlp in (ref, blk):
        mlp.layers[2].weight.requires_grad_(False)
        mlp.layers[-1].bias.requires_grad_(False)
    x, g = torch.randn(5, SIZES[0], dtype=torch.float64), torch.randn(5, SIZES[-1], dtype=torch.float64)
    blk(x).backward(g)  # x needs no grad
    ref(x).backward(g)
    for a, e in zip(blk.parameters(), ref.parameters()):
        assert (a.grad is None) == (e.grad is None)
        if e.grad is not None:
            assert_close(a.grad, e.grad)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("last_activation", [True, False])
def test_block_gradcheck_and_double_backward(activation, slope, last_activation):
    mlp = fb.FusedMLP([4, 5, 3], activation, last_activation=last_activation, recompute="block",
                      negative_slope=slope, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in mlp.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mlp, dict(zip(names, ps)), (x,))

    args = (x, *[p.detach().clone().requires_grad_(True) for p in mlp.parameters()])
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_block_saves_only_input_and_parameters(activation):
    mlp = fb.FusedMLP([16, 32, 32, 32, 8], activation, recompute="block")
    x = torch.randn(64, 16, requires_grad=True)
    saved = saved_tensors(lambda: mlp(x))
    param_ptrs = {p.data_ptr() for p in mlp.parameters()}
    activations = [t for t in saved if t.data_ptr() not in param_ptrs]
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()
