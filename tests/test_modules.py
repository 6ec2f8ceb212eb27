"""nn layers: nn.Linear conventions (init, names, state dicts), from_linear, FusedMLP, fuse(),
and torch.compile(fullgraph=True)."""

import pytest
import torch
from helpers import assert_close
from torch import nn

import fused_backprop as fb

LAYERS = [(fb.FusedLinearReLU, nn.ReLU), (fb.FusedLinearSigmoid, nn.Sigmoid)]


@pytest.mark.parametrize("fused_cls,act_cls", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_is_linear_then_activation(fused_cls, act_cls, bias):
    torch.manual_seed(3)
    fused = fused_cls(7, 5, bias=bias, dtype=torch.float64)
    torch.manual_seed(3)
    linear = nn.Linear(7, 5, bias=bias, dtype=torch.float64)
    # Same init, same random draws, same names and shapes.
    assert fused.state_dict().keys() == linear.state_dict().keys()
    for key, value in linear.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    assert_close(fused(x), act_cls()(linear(x)))


@pytest.mark.parametrize("fused_cls,act_cls", LAYERS)
def test_state_dicts_load_both_ways(fused_cls, act_cls):
    linear, fused = nn.Linear(4, 3), fused_cls(4, 3)
    fused.load_state_dict(linear.state_dict())
    assert torch.equal(fused.weight, linear.weight)
    linear2 = nn.Linear(4, 3)
    linear2.load_state_dict(fused_cls(4, 3).state_dict())


def test_from_linear_shares_parameters():
    linear = nn.Linear(6, 4)
    fused = fb.FusedLinearSigmoid.from_linear(linear)
    assert fused.weight is linear.weight and fused.bias is linear.bias
    fused(torch.randn(3, 6)).sum().backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None
    assert "activation='sigmoid'" in repr(fused)
    no_bias = fb.FusedLinearReLU.from_linear(nn.Linear(6, 4, bias=False))
    assert no_bias.bias is None and no_bias(torch.randn(2, 6)).shape == (2, 4)


def test_device_and_dtype_factory_kwargs():
    layer = fb.FusedLinearReLU(3, 2, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.device.type == "cpu"


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("recompute", ["none", "layer"])
@pytest.mark.parametrize("last_activation", [True, False])
def test_mlp_matches_sequential(activation, recompute, last_activation):
    mlp = fb.FusedMLP([5, 8, 7, 3], activation, last_activation=last_activation, recompute=recompute,
                      dtype=torch.float64)
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    seq = []
    for i, layer in enumerate(mlp.layers):
        lin = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
        lin.load_state_dict(layer.state_dict())
        seq += [lin] + ([act()] if (i < 2 or last_activation) else [])
    seq = nn.Sequential(*seq)
    assert isinstance(mlp.layers, nn.ModuleList)
    assert all(getattr(lay, "recompute", recompute == "layer") == (recompute == "layer") for lay in mlp.layers)
    assert isinstance(mlp.layers[-1], nn.Linear) != last_activation
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_close(mlp(x), seq(x))
    mlp(x).sum().backward()
    seq(x).sum().backward()
    for a, e in zip(mlp.parameters(), seq.parameters()):
        assert_close(a.grad, e.grad)


def test_fuse_replaces_linear_activation_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Sigmoid()),
                          nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 6)
    want = model(x)
    keys = model.state_dict().keys()
    assert fb.fuse(model) is model
    assert isinstance(model[0], fb.FusedLinearReLU) and isinstance(model[1], nn.Identity)
    assert isinstance(model[2][0], fb.FusedLinearSigmoid)
    assert type(model[3]) is nn.Linear and type(model[5]) is nn.Linear  # no fusable activation after them
    assert model.state_dict().keys() == keys
    assert_close(model(x), want)


def test_compile_fullgraph_mlp_forward_and_backward():
    torch._dynamo.reset()
    mlp = fb.FusedMLP([16, 32, 32, 8], "relu", last_activation=False)
    x = torch.randn(12, 16, requires_grad=True)
    eager_out = mlp(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in mlp.parameters()] + [x.grad.clone()]
    for p in mlp.parameters():
        p.grad = None
    x.grad = None
    compiled = torch.compile(mlp, fullgraph=True, backend="inductor")
    out = compiled(x)
    out.square().sum().backward()
    assert_close(out, eager_out)
    for a, e in zip([p.grad for p in mlp.parameters()] + [x.grad], eager_grads):
        assert_close(a, e)
