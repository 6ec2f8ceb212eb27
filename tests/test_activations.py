"""The one list of activations on each side: the Python registry (fused_backprop.activations), the
C++ table (csrc/activations.def, as the extension reports it) and the NumPy reference name the
same activations; the registry's formulas are torch's own; what backward keeps follows from it;
every activation has a fused layer."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ACT_CASES, TORCH_FUNCTIONS, TORCH_MODULES, keeps_mask, keeps_z
from torch import nn

import fused_backprop as fb
from fused_backprop import activations, modules, reference
from fused_backprop._ops import BUILD_ERROR

DEF_FILE = Path(__file__).resolve().parent.parent / "csrc" / "activations.def"
# Every public fused layer class and the arguments that select the activation.
LAYERS = {
    "relu": (fb.FusedLinearReLU, {}), "sigmoid": (fb.FusedLinearSigmoid, {}), "tanh": (fb.FusedLinearTanh, {}),
    "leaky_relu": (fb.FusedLinearLeakyReLU, {}), "gelu": (fb.FusedLinearGELU, {}),
    "gelu_tanh": (fb.FusedLinearGELU, {"approximate": "tanh"}), "silu": (fb.FusedLinearSiLU, {}),
}


def test_public_names():
    assert fb.ACTIVATIONS == activations.NAMES == tuple(activations.ACTIVATIONS)
    assert fb.ACTIVATIONS == ("relu", "sigmoid", "tanh", "leaky_relu", "gelu", "gelu_tanh", "silu")
    assert set(TORCH_FUNCTIONS) == set(TORCH_MODULES) == set(LAYERS) == set(fb.ACTIVATIONS)


@pytest.mark.skipif(BUILD_ERROR is not None, reason="compiled extension not built")
def test_registry_names_are_the_extensions_and_the_references():
    assert tuple(fb._ops._C.activations()) == fb.ACTIVATIONS  # the same names, in the same order
    assert tuple(name for name in reference.ACTIVATIONS if name != "identity") == fb.ACTIVATIONS


def test_def_file_columns_match_the_registry():
    """activations.def's `saved` (Output: act' from y) and `sign` (a 1-bit mask suffices) columns
    say what the registry says, at the default slope."""
    rows = re.findall(r'^FB_ACTIVATION\(\s*(\w+),\s*"(\w+)",\s*(\w+),\s*(\w+)\)', DEF_FILE.read_text(), re.M)
    assert tuple(name for _, name, _, _ in rows) == fb.ACTIVATIONS
    for _, name, saved, sign in rows:
        spec = activations.ACTIVATIONS[name]
        assert saved in ("Output", "Preact") and sign in ("true", "false")
        assert (saved == "Output") == (spec.grad_from_output is not None) == activations.saves_output(name, 0.01)
        assert (sign == "true") == spec.sign_decides == activations.uses_sign_mask(name, 0.01)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_what_backward_keeps(activation, slope):
    """The output where act' is a function of it, else the pre-activation; under recompute the
    sign mask where the sign of the output alone decides act', else nothing."""
    assert activations.saves_output(activation, slope) == (not keeps_z(activation, slope))
    assert activations.uses_sign_mask(activation, slope) == keeps_mask(activation, slope)


# Finite pre-activations away from relu's and leaky relu's kink, where every derivative exists.
# Derivatives agree to rounding: relative 1e-12, and absolute 1e-13 where they cancel to ~0
# (0.5 (1 + tanh(u)) for z < -7 is a difference of O(1) terms in either formula).
D_TOL = dict(rtol=1e-12, atol=1e-13)
Z = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64), torch.tensor([-40.0, -20.0, 20.0, 40.0],
                                                                                  dtype=torch.float64)])
Z = Z[Z != 0]


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_registry_formulas_are_torchs(activation, slope):
    """forward is torch's own function; grad_from_preact and grad2_from_preact its first and second
    derivatives by autograd; grad_from_output(act(z)) = act'(z) wherever the registry uses it."""
    spec = activations.ACTIVATIONS[activation]
    z = Z.clone().requires_grad_(True)
    y = TORCH_FUNCTIONS[activation](z, slope)
    (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z, allow_unused=True)
    d2 = torch.zeros_like(Z) if d2 is None else d2
    assert torch.equal(spec.forward(Z, slope), y.detach())
    torch.testing.assert_close(spec.grad_from_preact(Z, slope), d1.detach(), **D_TOL)
    torch.testing.assert_close(spec.grad2_from_preact(Z, slope), d2, rtol=1e-10, atol=1e-13)
    if activations.saves_output(activation, slope):
        torch.testing.assert_close(spec.grad_from_output(y.detach(), slope), d1.detach(), **D_TOL)


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_numpy_reference_formulas_are_torchs(activation, slope):
    """The NumPy reference keeps its own formulas (the independent oracle): the same values."""
    act = reference.ACTIVATIONS[activation]
    z = Z.clone().requires_grad_(True)
    y = TORCH_FUNCTIONS[activation](z, slope)
    (d1,) = torch.autograd.grad(y.sum(), z)
    np.testing.assert_allclose(act.forward(Z.numpy(), slope), y.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(act.grad_from_preact(Z.numpy(), slope), d1.numpy(), **D_TOL)
    if activations.saves_output(activation, slope):
        np.testing.assert_allclose(act.grad_from_output(y.detach().numpy(), slope), d1.numpy(), **D_TOL)


@pytest.mark.parametrize("activation", fb.ACTIVATIONS)
def test_registry_knows_torchs_module(activation):
    """fuse recognises torch's module of each activation by the registry's entry."""
    spec = activations.ACTIVATIONS[activation]
    module = TORCH_MODULES[activation](0.01)
    assert type(module) in spec.modules
    for key, value in spec.params.items():
        assert value is None or getattr(module, key) == value


@pytest.mark.parametrize("activation,slope", ACT_CASES)
def test_every_activation_has_a_fused_layer(activation, slope):
    """Its own class, FusedLinearAct, and the layer fuse builds from an nn.Linear: the activation
    torch computes, with the slope carried."""
    torch.manual_seed(0)
    linear = nn.Linear(5, 4, dtype=torch.float64)
    cls, args = LAYERS[activation]
    if activation == "leaky_relu":
        args = {"negative_slope": slope}
    x = torch.randn(3, 5, dtype=torch.float64)
    want = TORCH_FUNCTIONS[activation](linear(x), slope)
    layers = [cls.from_linear(linear, **args), fb.FusedLinearAct.from_linear(linear, activation=activation,
                                                                             negative_slope=slope),
              modules.fused_layer_from_linear(linear, activation, negative_slope=slope)]
    own = cls(5, 4, dtype=torch.float64, **args)
    own.load_state_dict(linear.state_dict())
    for layer in layers + [own]:
        assert layer.activation == activation
        if activation == "leaky_relu":
            assert layer.negative_slope == slope and f"negative_slope={slope}" in repr(layer)
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert type(layers[2]) is cls


def test_gelu_activation_names():
    assert activations.gelu_activation("none") == "gelu" and activations.gelu_activation("tanh") == "gelu_tanh"
    with pytest.raises(ValueError, match=r"approximate must be one of \('none', 'tanh'\), got 'erf'"):
        activations.gelu_activation("erf")
    assert fb.FusedLinearGELU(3, 2).approximate == "none"
    assert fb.FusedLinearGELU(3, 2, approximate="tanh").approximate == "tanh"
