"""Mixed precision: under torch.autocast the fused layers compute in the autocast dtype exactly
where nn.Linear would, and the gradients reach the float32 parameters in float32."""

import pytest
import torch
from torch import nn

from helpers import ACT_CASES, dtype_id, torch_act

import fused_backprop as fb

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(model, x, device, dtype):
    x = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        out = model(x)
    out.float().square().sum().backward()
    return out, x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", ["none", "layer", "block"])
def test_mlp_under_autocast_matches_linear(device, dtype, activation, slope, recompute):
    torch.manual_seed(0)
    fused = fb.FusedMLP([24, 40, 16], activation, recompute=recompute, negative_slope=slope, device=device)
    layers = [nn.Linear(24, 40), torch_act(activation, slope), nn.Linear(40, 16), torch_act(activation, slope)]
    eager = nn.Sequential(*layers).to(device)
    for linear, layer in zip(eager[::2], fused.layers):
        linear.load_state_dict(layer.state_dict())
    x = torch.randn(33, 24, device=device)
    out, dx, grads = run(fused, x, device, dtype)
    want_out, want_dx, want_grads = run(eager, x, device, dtype)
    assert out.dtype == want_out.dtype == dtype
    assert dx.dtype == want_dx.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out, want_out, **tol)
    for a, e in zip(grads, want_grads):
        assert a.dtype == e.dtype == torch.float32
        # Gradients sum 33 products of 16-bit values: compare relative to their scale.
        torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * e.abs().max().item())


def test_no_cast_outside_autocast():
    layer = fb.FusedLinearSigmoid(4, 3)
    assert layer(torch.randn(2, 4)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
