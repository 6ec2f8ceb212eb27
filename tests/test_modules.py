"""nn layers: nn.Linear conventions (init, names, state dicts), from_linear, FusedMLP, fuse(),
and torch.compile(fullgraph=True), for every activation."""

import pytest
import torch
from helpers import ACT_CASES, ACTIVATIONS, EXTRA_SLOPES, assert_close, torch_act
from torch import nn

import fused_backprop as fb

# (fused class, its keyword arguments, torch's activation): every class, every activation.
LAYERS = [
    pytest.param(fb.FusedLinearReLU, {}, nn.ReLU(), id="relu"),
    pytest.param(fb.FusedLinearSigmoid, {}, nn.Sigmoid(), id="sigmoid"),
    pytest.param(fb.FusedLinearTanh, {}, nn.Tanh(), id="tanh"),
    pytest.param(fb.FusedLinearSiLU, {}, nn.SiLU(), id="silu"),
    pytest.param(fb.FusedLinearLeakyReLU, {}, nn.LeakyReLU(), id="leaky_relu"),
    pytest.param(fb.FusedLinearLeakyReLU, {"negative_slope": -0.3}, nn.LeakyReLU(-0.3), id="leaky_relu-0.3"),
    pytest.param(fb.FusedLinearGELU, {}, nn.GELU(), id="gelu"),
    pytest.param(fb.FusedLinearGELU, {"approximate": "tanh"}, nn.GELU(approximate="tanh"), id="gelu_tanh"),
    pytest.param(fb.FusedLinearAct, {"activation": "silu"}, nn.SiLU(), id="act-silu"),
    pytest.param(fb.FusedLinearAct, {"activation": "leaky_relu", "negative_slope": 0.2}, nn.LeakyReLU(0.2),
                 id="act-leaky_relu0.2"),
]


@pytest.mark.parametrize("fused_cls,kwargs,act", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_is_linear_then_activation(fused_cls, kwargs, act, bias):
    torch.manual_seed(3)
    fused = fused_cls(7, 5, bias=bias, dtype=torch.float64, **kwargs)
    torch.manual_seed(3)
    linear = nn.Linear(7, 5, bias=bias, dtype=torch.float64)
    # Same init, same random draws, same names and shapes.
    assert fused.state_dict().keys() == linear.state_dict().keys()
    for key, value in linear.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    assert_close(fused(x), act(linear(x)))
    for recompute in (False, True):
        fused.recompute = recompute
        xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        act(linear(xr)).square().sum().backward()
        fused(xf).square().sum().backward()
        assert_close(xf.grad, xr.grad)
        for p, q in zip(fused.parameters(), linear.parameters()):
            assert_close(p.grad, q.grad)
            p.grad = q.grad = None


@pytest.mark.parametrize("fused_cls,kwargs,act", LAYERS)
def test_state_dicts_load_both_ways(fused_cls, kwargs, act):
    linear, fused = nn.Linear(4, 3), fused_cls(4, 3, **kwargs)
    fused.load_state_dict(linear.state_dict())
    assert torch.equal(fused.weight, linear.weight)
    linear2 = nn.Linear(4, 3)
    linear2.load_state_dict(fused_cls(4, 3, **kwargs).state_dict())


@pytest.mark.parametrize("fused_cls,kwargs,act", LAYERS)
def test_from_linear_shares_parameters_and_takes_the_activation_args(fused_cls, kwargs, act):
    linear = nn.Linear(6, 4)
    fused = fused_cls.from_linear(linear, recompute=True, backend="torch", **kwargs)
    assert fused.weight is linear.weight and fused.bias is linear.bias
    assert fused.recompute and fused.backend == "torch"
    x = torch.randn(3, 6)
    assert_close(fused(x), act(linear(x)))
    fused(x).sum().backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None
    name = kwargs.get("activation", fused_cls.activation)
    if kwargs.get("approximate") == "tanh":
        name = "gelu_tanh"
    assert fused.activation == name and f"activation='{name}'" in repr(fused)
    if name == "leaky_relu":
        slope = kwargs.get("negative_slope", 0.01)
        assert fused.negative_slope == slope and f"negative_slope={slope}" in repr(fused)
    else:
        assert "negative_slope" not in repr(fused)


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


def test_module_attributes():
    assert fb.FusedLinearLeakyReLU(3, 2, negative_slope=0.3).negative_slope == 0.3
    assert fb.FusedLinearLeakyReLU(3, 2).negative_slope == 0.01 == nn.LeakyReLU().negative_slope
    gelu = fb.FusedLinearGELU(3, 2, approximate="tanh")
    assert gelu.activation == "gelu_tanh" and gelu.approximate == "tanh"
    assert fb.FusedLinearAct(3, 2).activation == "relu"  # the default, as linear_act's
    assert isinstance(fb.FusedLinearTanh(3, 2), fb.FusedLinearAct)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", ["none", "layer"])
@pytest.mark.parametrize("last_activation", [True, False])
def test_mlp_matches_sequential(activation, slope, recompute, last_activation):
    mlp = fb.FusedMLP([5, 8, 7, 3], activation, last_activation=last_activation, recompute=recompute,
                      negative_slope=slope, dtype=torch.float64)
    seq = []
    for i, layer in enumerate(mlp.layers):
        lin = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
        lin.load_state_dict(layer.state_dict())
        seq += [lin] + ([torch_act(activation, slope)] if (i < 2 or last_activation) else [])
    seq = nn.Sequential(*seq)
    assert isinstance(mlp.layers, nn.ModuleList)
    assert all(getattr(lay, "recompute", recompute == "layer") == (recompute == "layer") for lay in mlp.layers)
    assert isinstance(mlp.layers[-1], nn.Linear) != last_activation
    fused_layers = [lay for lay in mlp.layers if isinstance(lay, fb.FusedLinearAct)]
    assert all(lay.activation == activation and lay.negative_slope == slope for lay in fused_layers)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_close(mlp(x), seq(x))
    mlp(x).sum().backward()
    seq(x).sum().backward()
    for a, e in zip(mlp.parameters(), seq.parameters()):
        assert_close(a.grad, e.grad)


def test_mlp_layers_are_the_activations_own_classes():
    """FusedMLP builds each activation's own layer class (FusedLinearSigmoid, ...), as fuse does and
    as it did for relu and sigmoid (test_examples.test_vanishing_gradients_uses_fused_layers)."""
    classes = {"relu": fb.FusedLinearReLU, "sigmoid": fb.FusedLinearSigmoid, "tanh": fb.FusedLinearTanh,
               "leaky_relu": fb.FusedLinearLeakyReLU, "gelu": fb.FusedLinearGELU, "gelu_tanh": fb.FusedLinearGELU,
               "silu": fb.FusedLinearSiLU}
    got = {a: {type(lay) for lay in fb.FusedMLP([4, 5, 3], a).layers} for a in ACTIVATIONS}
    assert got == {a: {cls} for a, cls in classes.items()}


def test_fuse_replaces_linear_activation_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Sigmoid()),
                          nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4), nn.ELU(), nn.Linear(4, 2))
    x = torch.randn(5, 6)
    want = model(x)
    keys = model.state_dict().keys()
    assert fb.fuse(model) is model
    assert isinstance(model[0], fb.FusedLinearReLU) and isinstance(model[1], nn.Identity)
    assert isinstance(model[2][0], fb.FusedLinearSigmoid)
    assert isinstance(model[3], fb.FusedLinearTanh) and isinstance(model[4], nn.Identity)
    assert type(model[5]) is nn.Linear and type(model[7]) is nn.Linear  # no fusable activation after them
    assert model.state_dict().keys() == keys
    assert_close(model(x), want)


@pytest.mark.parametrize("slope", [0.01, *EXTRA_SLOPES])
def test_fuse_carries_leaky_relu_slope_and_gelu_approximation(slope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(slope), nn.Linear(8, 8), nn.GELU(approximate="tanh"),
                          nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4), nn.SiLU())
    x = torch.randn(5, 6, requires_grad=True)
    want = model(x)
    (want_dx,) = torch.autograd.grad(want.square().sum(), x)
    fb.fuse(model)
    assert [type(m) for m in model[::2]] == [fb.FusedLinearLeakyReLU, fb.FusedLinearGELU, fb.FusedLinearGELU,
                                            fb.FusedLinearSiLU]
    assert model[0].negative_slope == slope
    assert [m.activation for m in model[2:6:2]] == ["gelu_tanh", "gelu"]
    out = model(x)
    assert_close(out, want)
    assert_close(torch.autograd.grad(out.square().sum(), x)[0], want_dx)


def _compile_check(model, x):
    torch._dynamo.reset()
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    for p in model.parameters():
        p.grad = None
    x.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x)
    out.square().sum().backward()
    assert_close(out, eager_out)
    for a, e in zip([p.grad for p in model.parameters()] + [x.grad], eager_grads):
        assert_close(a, e)


def test_compile_fullgraph_mlp_forward_and_backward():
    mlp = fb.FusedMLP([16, 32, 32, 8], "relu", last_activation=False)
    _compile_check(mlp, torch.randn(12, 16, requires_grad=True))


def test_compile_fullgraph_every_activation():
    """One graph through a layer of every activation (leaky relu also with a negative slope), each
    kept output, pre-activation, sign mask or recompute, forward and backward: no graph break."""
    torch.manual_seed(0)
    layers = []
    for i, name in enumerate(ACTIVATIONS + ("leaky_relu",)):
        slope = -0.2 if i == len(ACTIVATIONS) else 0.01
        for recompute in (False, True):
            layers.append(fb.FusedLinearAct(12, 12, activation=name, negative_slope=slope, recompute=recompute))
    model = nn.Sequential(*layers, fb.FusedMLP([12, 10, 6], "gelu", recompute="block"))
    _compile_check(model, torch.randn(9, 12, requires_grad=True))
