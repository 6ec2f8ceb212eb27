"""What each training variant of the memory benchmark saves for backward (deterministic byte
counts, no timing): block recompute keeps only the block inputs; and per activation what one layer
and a FusedMLP keep: the output, the pre-activation, the sign mask or nothing."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import ACT_CASES, keeps_mask, keeps_z, saved_tensors

import fused_backprop as fb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_memory  # noqa: E402

BLOCKS, LAYERS, WIDTH, BATCH = 3, 4, 48, 40
ACT_BYTES = BATCH * WIDTH * 4  # one float32 activation


def saved(variant):
    torch.manual_seed(0)
    model = bench_memory.build(variant, BLOCKS, LAYERS, WIDTH, torch.device("cpu"))
    return bench_memory.saved_bytes(model, torch.randn(BATCH, WIDTH, requires_grad=True))


@pytest.mark.parametrize("variant,activations", [
    ("eager", BLOCKS * LAYERS + 1),       # the input and every relu output
    ("fused-none", BLOCKS * LAYERS + 1),  # the same: a layer's output is the next layer's input
    ("checkpoint", BLOCKS),               # block inputs
    ("fused-block", BLOCKS),              # block inputs, nothing else
])
def test_saved_activation_count(variant, activations):
    assert saved(variant) == activations * ACT_BYTES


def test_layer_recompute_keeps_sign_masks_not_the_last_output():
    # Every layer input is kept; the last output is replaced by masks of 1/32 of an activation.
    masks = BLOCKS * LAYERS * (ACT_BYTES // 32)
    assert saved("fused-layer") == BLOCKS * LAYERS * ACT_BYTES + masks


def test_quick_run_writes_csv(tmp_path):
    out = tmp_path / "memory.csv"
    assert bench_memory.main(["--quick", "--variants", "eager,fused-block", "--steps", "1", "--csv", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("variant,saved_bytes,peak_step_bytes") and len(lines) == 3


# --- what one layer keeps, per activation ---------------------------------------------------------

M_ROWS, K_IN, N_OUT = 64, 16, 40
OUT_BYTES = M_ROWS * N_OUT * 4


@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", [False, True])
def test_layer_keeps_output_preact_mask_or_nothing(activation, slope, recompute):
    """Beside x and the parameters, backward keeps the output y (act' is a function of it: relu,
    sigmoid, tanh, leaky relu with slope >= 0), the pre-activation z (gelu, gelu_tanh, silu, leaky
    relu with slope < 0); under recompute relu's / leaky relu's 1-bit sign mask, or nothing."""
    torch.manual_seed(0)
    layer = fb.FusedLinearAct(K_IN, N_OUT, activation=activation, negative_slope=slope, recompute=recompute)
    x = torch.randn(M_ROWS, K_IN, requires_grad=True)
    outputs = []
    saved = saved_tensors(lambda: outputs.append(layer(x)))
    y = outputs[0]
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in params | {x.untyped_storage().data_ptr()}]
    assert len(saved) - len(extra) >= 2  # x and the weight (and the bias where backward needs it)
    if recompute:
        if keeps_mask(activation, slope):
            assert len(extra) == 1 and extra[0].dtype == torch.uint8 and extra[0].nbytes == OUT_BYTES // 32
        else:
            assert extra == []
    else:
        assert len(extra) == 1 and extra[0].nbytes == OUT_BYTES
        z = torch.nn.functional.linear(x, layer.weight, layer.bias).detach()
        if keeps_z(activation, slope):
            torch.testing.assert_close(extra[0], z, rtol=0, atol=1e-6)
        else:
            assert extra[0].data_ptr() == y.data_ptr()  # the output itself, no copy
    y.sum().backward()  # what was kept serves backward
    assert x.grad is not None


@pytest.mark.parametrize("activation,slope", ACT_CASES)
@pytest.mark.parametrize("recompute", ["none", "layer", "block"])
def test_mlp_saved_bytes_per_activation(activation, slope, recompute):
    """A FusedMLP of L layers saves its input and L - 1 hidden outputs (the next layers' inputs),
    and per layer: "none": its output (the last layer's is new; the others are the next layer's
    inputs already counted) or its pre-activation; "layer": the sign mask or nothing; "block":
    nothing but the input."""
    layers, width, batch = 4, 48, 40
    torch.manual_seed(0)
    mlp = fb.FusedMLP([width] * (layers + 1), activation, recompute=recompute, negative_slope=slope)
    got = bench_memory.saved_bytes(mlp, torch.randn(batch, width, requires_grad=True))
    act = batch * width * 4
    if recompute == "block":
        want = act
    elif recompute == "layer":
        want = layers * act + (layers * act // 32 if keeps_mask(activation, slope) else 0)
    elif keeps_z(activation, slope):
        want = layers * act + layers * act
    else:
        want = (layers + 1) * act
    assert got == want
