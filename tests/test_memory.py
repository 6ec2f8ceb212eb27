"""What each training variant of the memory benchmark saves for backward (deterministic byte
counts, no timing): block recompute keeps only the block inputs."""

import sys
from pathlib import Path

import pytest
import torch

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
