"""Bad input: a clear error naming the argument and what was expected, never a crash or a wrong
answer; through the public API and through the registered ops."""

import pytest
import torch
from helpers import sample_inputs

import fused_backprop as fb
from fused_backprop import reference

ops = torch.ops.fused_backprop
NAMES = r"\('relu', 'sigmoid', 'tanh', 'leaky_relu', 'gelu', 'gelu_tanh', 'silu'\)"  # as the Python API lists them
OP_NAMES = "'relu', 'sigmoid', 'tanh', 'leaky_relu', 'gelu', 'gelu_tanh', 'silu'"  # as the ops do
BACKENDS = [b for b in fb.available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,exc,match", [
    ("x_wrong_width", ValueError, r"input must have shape \(\*, in_features=5\)"),
    ("x_0d", ValueError, r"input must have shape"),
    ("w_1d", ValueError, r"weight must be 2-D"),
    ("b_wrong_size", ValueError, r"bias must have shape \(3,\)"),
    ("b_2d", ValueError, r"bias must have shape"),
    ("int_dtype", TypeError, r"input must have a floating dtype"),
    ("mixed_dtype", TypeError, r"weight must have the same dtype as input"),
    ("mixed_bias_dtype", TypeError, r"bias must have the same dtype as input"),
    ("meta_weight", RuntimeError, r"weight must be on the same device as input"),
    ("not_tensor", TypeError, r"input must be a torch.Tensor"),
])
def test_public_api_errors(backend, case, exc, match):
    x, w, b = sample_inputs(4, 5, 3)
    if case == "x_wrong_width":
        x = torch.randn(4, 6, dtype=x.dtype)
    elif case == "x_0d":
        x = torch.tensor(1.0, dtype=x.dtype)
    elif case == "w_1d":
        w = w[0]
    elif case == "b_wrong_size":
        b = torch.randn(4, dtype=x.dtype)
    elif case == "b_2d":
        b = b[None]
    elif case == "int_dtype":
        x, w, b = x.long(), w.long(), b.long()
    elif case == "mixed_dtype":
        w = w.float()
    elif case == "mixed_bias_dtype":
        b = b.float()
    elif case == "meta_weight":
        w = w.to("meta")
    elif case == "not_tensor":
        x = x.tolist()
    with pytest.raises(exc, match=match):
        fb.linear_relu(x, w, b, backend=backend)


def test_unknown_activation_backend_recompute():
    x, w, b = sample_inputs(4, 5, 3)
    with pytest.raises(ValueError, match=r"activation must be one of " + NAMES + ", got 'swish'"):
        fb.linear_act(x, w, b, "swish")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got 'fast'"):
        fb.linear_act(x, w, b, backend="fast")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got \['cpu'\]"):
        fb.linear_act(x, w, b, backend=["cpu"])
    with pytest.raises(TypeError, match="recompute must be a bool"):
        fb.linear_act(x, w, b, recompute="yes")
    with pytest.raises(ValueError, match="activation must be one of " + NAMES + ", got 'gelu_erf'"):
        fb.FusedMLP([3, 4], activation="gelu_erf")
    with pytest.raises(ValueError, match="activation must be one of " + NAMES + ", got 'swish'"):
        fb.FusedLinearAct(3, 4, activation="swish")
    with pytest.raises(ValueError, match="activation must be one of " + NAMES + ", got 'swish'"):
        fb.FusedLinearAct.from_linear(torch.nn.Linear(3, 4), activation="swish")
    with pytest.raises(ValueError, match="recompute must be one of"):
        fb.FusedMLP([3, 4], recompute=True)
    with pytest.raises(ValueError, match="sizes must list at least 2"):
        fb.FusedMLP([3])
    with pytest.raises(ValueError, match="in_features must be a non-negative int"):
        fb.FusedLinearReLU(-1, 3)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        fb.FusedLinearReLU.from_linear(torch.nn.ReLU())


def test_backend_on_wrong_device():
    x, w, b = sample_inputs(4, 5, 3)
    if "cuda" not in fb.backends.names():
        pytest.fail("cuda backend unknown")
    with pytest.raises(RuntimeError, match="backend 'cuda' does not run on device cpu|backend 'cuda' is not available"):
        fb.linear_act(x, w, b, backend="cuda")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("case,exc,match", [
    ("x_3d", ValueError, r"input must be 2-D"),
    ("w_wrong", ValueError, r"weight must have in_features = 5 columns"),
    ("b_wrong", ValueError, r"bias must have shape \(3,\)"),
    ("complex", TypeError, r"input dtype must be one of Float, Double, BFloat16, Half"),
    ("int", TypeError, r"input dtype must be one of"),
    ("mixed", TypeError, r"weight must have the same dtype as input"),
    ("activation", ValueError, "activation must be one of " + OP_NAMES + "; got 'swish'"),
    ("grad_shape", ValueError, r"grad_out must have shape \[4, 3\]"),
    ("out_shape", ValueError, r"out must have shape \[4, 3\]"),
])
def test_op_errors(case, exc, match):
    x, w, b = sample_inputs(4, 5, 3)
    g, out, act = torch.ones(4, 3, dtype=x.dtype), None, "relu"
    if case == "x_3d":
        x = x[None]
    elif case == "w_wrong":
        w = torch.randn(3, 6, dtype=x.dtype)
    elif case == "b_wrong":
        b = torch.randn(2, dtype=x.dtype)
    elif case == "complex":
        x, w, b = x.cfloat(), w.cfloat(), b.cfloat()
    elif case == "int":
        x, w, b = x.int(), w.int(), b.int()
    elif case == "mixed":
        w = w.float()
    elif case == "activation":
        act = "swish"
    elif case == "grad_shape":
        g = torch.ones(3, 4, dtype=x.dtype)
    elif case == "out_shape":
        out = torch.ones(4, 4, dtype=x.dtype)
    if case in ("grad_shape", "out_shape"):
        with pytest.raises(exc, match=match):
            ops.linear_act_bwd(g, x, w, b, out, act, [True, True, True])
    else:
        with pytest.raises(exc, match=match):
            ops.linear_act_fwd(x, w, b, act)
        with pytest.raises(exc, match=match):
            ops.linear_act_fwd_preact(x, w, b, act)
        with pytest.raises(exc, match=match):
            ops.linear_act_bwd(torch.ones(x.shape[0], 3, dtype=x.dtype), x, w, b, None, act, [True, True, True])


@pytest.mark.parametrize("slope,exc,match", [
    ("0.1", TypeError, "negative_slope must be a float, got str"),
    (True, TypeError, "negative_slope must be a float, got bool"),
    (None, TypeError, "negative_slope must be a float, got NoneType"),
    (torch.tensor(0.1), TypeError, "negative_slope must be a float, got Tensor"),
])
def test_bad_negative_slope(slope, exc, match):
    x, w, b = sample_inputs(4, 5, 3)
    with pytest.raises(exc, match=match):
        fb.linear_act(x, w, b, "leaky_relu", negative_slope=slope)
    with pytest.raises(exc, match=match):
        fb.FusedLinearLeakyReLU(5, 3, negative_slope=slope)
    with pytest.raises(exc, match=match):
        fb.FusedLinearAct(5, 3, activation="leaky_relu", negative_slope=slope)
    with pytest.raises(exc, match=match):
        fb.FusedLinearLeakyReLU.from_linear(torch.nn.Linear(5, 3), negative_slope=slope)
    with pytest.raises(exc, match=match):
        fb.FusedMLP([5, 3], "leaky_relu", negative_slope=slope)
    with pytest.raises(RuntimeError, match="Expected a value of type 'float' for argument 'negative_slope'"):
        ops.linear_act_fwd(x, w, b, "leaky_relu", "0.1")
    assert fb.linear_act(x, w, b, "leaky_relu", negative_slope=1).dtype == x.dtype  # an int is a float


def test_layers_take_only_their_own_activation_arguments():
    """A slope or an approximation for a layer whose class fixes them is an error."""
    linear = torch.nn.Linear(5, 3)
    with pytest.raises(ValueError, match=r"approximate must be one of \('none', 'tanh'\), got 'erf'"):
        fb.FusedLinearGELU(5, 3, approximate="erf")
    with pytest.raises(ValueError, match=r"approximate must be one of \('none', 'tanh'\), got 'erf'"):
        fb.FusedLinearGELU.from_linear(linear, approximate="erf")
    with pytest.raises(TypeError, match="negative_slope"):
        fb.FusedLinearGELU(5, 3, negative_slope=0.2)
    with pytest.raises(TypeError, match="negative_slope"):
        fb.FusedLinearGELU.from_linear(linear, negative_slope=0.2)
    with pytest.raises(TypeError, match="approximate"):
        fb.FusedLinearLeakyReLU.from_linear(linear, approximate="tanh")
    with pytest.raises(TypeError, match="negative_slope"):
        fb.linear_relu(torch.randn(2, 5), linear.weight, negative_slope=0.2)


@pytest.mark.parametrize("cls", [fb.FusedLinearReLU, fb.FusedLinearSigmoid, fb.FusedLinearTanh, fb.FusedLinearSiLU])
@pytest.mark.parametrize("args", [{"negative_slope": 0.2}, {"activation": "gelu"}])
def test_fixed_activation_layers_reject_activation_arguments(cls, args):
    """FusedLinearReLU(..., activation="gelu") must not build a ReLU layer that computes gelu, nor
    take a slope it ignores (as FusedLinearGELU refuses negative_slope)."""
    with pytest.raises(TypeError, match=next(iter(args))):
        cls(5, 3, **args)
    with pytest.raises(TypeError, match=next(iter(args))):
        cls.from_linear(torch.nn.Linear(5, 3), **args)


def test_reference_errors_list_the_activations():
    x, w = sample_inputs(4, 5, 3, bias=False)[:2]
    x, w = x.numpy(), w.numpy()
    with pytest.raises(ValueError, match=r"activation must be one of \(.*'silu', 'identity'\), got 'swish'"):
        reference.forward(x, w, activation="swish")
    y = reference.forward(x, w, activation="gelu")
    for activation, slope in (("gelu", 0.01), ("gelu_tanh", 0.01), ("silu", 0.01), ("leaky_relu", -0.1)):
        with pytest.raises(ValueError, match=f"y does not determine the derivative of '{activation}'"):
            reference.backward(y, x, w, y=y, activation=activation, negative_slope=slope)
