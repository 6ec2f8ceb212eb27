"""ReLU and leaky relu under recompute keep a packed 1-bit sign mask instead of their output
(leaky relu only with negative_slope >= 0: with a negative slope y > 0 on both branches)."""

import pytest
import torch
from helpers import EXTRA_SLOPES, keeps_mask, saved_tensors

import fused_backprop as fb
from fused_backprop import sign_mask

# The bit each activation keeps: relu's ~(y <= 0) (NaN set: it passes the gradient), leaky relu's
# y > 0 (NaN clear: it takes the slope), as threshold_backward and leaky_relu_backward.
BITS = {"relu": lambda y: (y <= 0).logical_not(), "leaky_relu": lambda y: y > 0}
SLOPES = (0.01, *EXTRA_SLOPES)


@pytest.mark.parametrize("activation", BITS)
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (3, 5), (7, 8), (2, 3, 9)])
def test_pack_unpack_roundtrip(activation, shape):
    z = torch.randn(shape)
    y = torch.nn.functional.leaky_relu(z, 0.2) if activation == "leaky_relu" else torch.relu(z)
    if y.numel():
        y.view(-1)[0] = float("nan")
        y.view(-1)[-1] = 0.0
    packed = sign_mask.pack(y, activation)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-y.numel() // 8)
    assert torch.equal(packed, sign_mask.pack_composite(y, activation))  # the C++ pass and the torch ops agree
    torch.library.opcheck(torch.ops.fused_backprop.sign_mask_pack, (y, activation))
    want = BITS[activation](y).double()
    assert torch.equal(sign_mask.unpack(packed, y.shape, torch.float64), want)


def test_pack_defaults_to_relu():
    y = torch.tensor([-1.0, 0.0, float("nan"), 2.0])
    assert torch.equal(sign_mask.pack(y), sign_mask.pack(y, "relu"))
    assert sign_mask.pack(y, "relu").item() == 0b1100 and sign_mask.pack(y, "leaky_relu").item() == 0b1000


def saved_bytes(fn):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved_tensors(fn)}
    return sum(storages.values())


@pytest.mark.parametrize("activation,slope", [("relu", 0.01)] + [("leaky_relu", s) for s in SLOPES])
def test_recompute_saves_mask_not_output(activation, slope):
    x = torch.randn(4096, 64, requires_grad=True)
    w = torch.randn(256, 64, requires_grad=True)
    param_bytes = w.numel() * 4
    out_bytes = 4096 * 256 * 4

    def layer(recompute):
        return lambda: fb.linear_act(x, w, activation=activation, negative_slope=slope, recompute=recompute).sum()

    kept = saved_bytes(layer(False)) - param_bytes - x.numel() * 4
    masked = saved_bytes(layer(True)) - param_bytes - x.numel() * 4
    assert kept == out_bytes  # the output, or for a negative slope the pre-activation
    assert masked == (out_bytes // 32 if keeps_mask(activation, slope) else 0)


@pytest.mark.parametrize("activation,slope", [("relu", 0.01)] + [("leaky_relu", s) for s in (0.01, 0.0, 1.5)])
@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (37, 13, 11), (300, 20, 64)])
def test_cpu_kernel_reads_the_packed_mask(activation, slope, m, k, n):
    """The CPU backward takes the packed mask as `out` and gives the gradients of the output."""
    x, w, b = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    out = torch.ops.fused_backprop.linear_act_fwd(x, w, b, activation, slope)
    g = torch.randn(m, n, dtype=torch.float64)
    mask = [True, True, True]
    want = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, out, activation, mask, slope)
    packed = sign_mask.pack(out, activation)
    got = torch.ops.fused_backprop.linear_act_bwd(g, x, w, b, packed, activation, mask, slope)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fused_backprop.linear_act_bwd, (g, x, w, b, packed, activation, mask, slope))


def test_packed_mask_errors():
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    g, packed = torch.randn(4, 5), torch.zeros(3, dtype=torch.uint8)
    bwd = torch.ops.fused_backprop.linear_act_bwd
    with pytest.raises(ValueError, match=r"packed sign mask must have shape \(3,\)"):
        bwd(g, x, w, None, packed[:2], "relu", [True, True, False])
    for activation in ("sigmoid", "tanh", "gelu", "gelu_tanh", "silu"):
        with pytest.raises(ValueError, match="only for activations 'relu' and 'leaky_relu', got '" + activation):
            bwd(g, x, w, None, packed, activation, [True, True, False])
    with pytest.raises(ValueError, match="'leaky_relu' with negative_slope < 0, got negative_slope = -0.5"):
        bwd(g, x, w, None, packed, "leaky_relu", [True, True, False], -0.5)
    for pack in (sign_mask.pack, sign_mask.pack_composite):
        with pytest.raises(ValueError, match="activation must be .*'relu'.*'leaky_relu'.*got 'sigmoid'"):
            pack(torch.randn(4), "sigmoid")
    with pytest.raises(ValueError, match="activation must be one of .*got 'swish'"):
        sign_mask.pack(torch.randn(4), "swish")
    with pytest.raises(TypeError, match="y must be floating point"):
        sign_mask.pack(torch.ones(4, dtype=torch.int32))
