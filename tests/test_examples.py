"""The examples in examples/, each run through its main(argv) in its reduced (--quick) mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import fused_backprop as fb

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_digits(tmp_path, capsys, keep_threads):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = load("train_digits")
    assert example.main(["--quick", "--hidden", "128", "64", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train_digits.json").read_text())
    eager, fused = result["eager"], result["fused"]
    # --quick: 40 full-batch steps (the default batch is the whole training set)
    assert result["epochs"] == 40 and result["batch_size"] == 1438
    assert len(eager["losses"]) == len(fused["losses"]) == 40
    # same seed, same batches: the curves agree to float32 rounding, and the model learns
    assert result["max_loss_diff"] < 1e-3
    assert eager["losses"][-1] < 0.8 * eager["losses"][0] and fused["test_accuracy"][-1] > 0.4
    assert result["speedup"] > 0
    assert is_png(tmp_path / "train_digits.png")
    out = capsys.readouterr().out
    assert "FusedLinearReLU" in out and "loss curves agree" in out


def test_train_digits_fuses_sigmoid_layers(tmp_path):
    pytest.importorskip("sklearn")
    example = load("train_digits")
    model = fb.fuse(example.make_model([64, 32, 16, 10], "sigmoid"))
    assert [type(m).__name__ for m in model] == ["FusedLinearSigmoid", "Identity", "FusedLinearSigmoid",
                                                 "Identity", "Linear"]
    assert example.main(["--quick", "--epochs", "1", "--hidden", "32", "--activation", "sigmoid", "--no-plot",
                         "--batch-size", "128", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "train_digits.png").exists()
    result = json.loads((tmp_path / "train_digits.json").read_text())
    assert result["batch_size"] == 128 and len(result["fused"]["losses"]) == 12  # ceil(1438 / 128) steps


def test_vanishing_gradients(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = load("vanishing_gradients")
    assert example.main(["--quick", "--batch", "128", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "vanishing_gradients.json").read_text())
    runs = {(r["activation"], r["init"]): r for r in result["runs"]}
    assert result["depth"] == 8 and all(len(r["weight_grad"]) == 8 for r in runs.values())
    # sigmoid: the gradient shrinks by orders of magnitude towards the input; relu with He init doesn't
    assert runs["sigmoid", "xavier"]["first_over_last"] < 1e-3
    assert runs["relu", "kaiming"]["first_over_last"] > 1e-2
    assert runs["relu", "kaiming"]["activation_grad"][0] > 100 * runs["sigmoid", "xavier"]["activation_grad"][0]
    assert is_png(tmp_path / "vanishing_gradients.png")


def test_vanishing_gradients_uses_fused_layers():
    example = load("vanishing_gradients")
    mlp = example.build("sigmoid", 3, 16, 64, "xavier", 0)
    assert isinstance(mlp, fb.FusedMLP)
    assert [type(m).__name__ for m in mlp.layers] == ["FusedLinearSigmoid"] * 3 + ["Linear"]


def test_gradient_check(tmp_path, capsys):
    example = load("gradient_check")
    assert example.main(["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gradient_check.json").read_text())
    backends_checked = {r["backend"] for r in result["results"]}
    assert set(fb.available_backends("cpu")) <= backends_checked
    assert all(r["ok"] and max(r["errors"].values()) < 1e-5 for r in result["results"])
    assert len(result["results"]) == 4 * len(backends_checked)  # 2 activations x recompute on/off
    assert result["buggy_sigmoid_dw_error"] > 0.1  # the planted bug is caught
    assert "caught" in capsys.readouterr().out


def test_gradient_check_fails_on_a_wrong_backend(tmp_path, monkeypatch):
    import dataclasses

    good = fb.backends.get("torch")

    def backward(grad_out, x, w, b, out, act, mask, slope):
        dx, dw, db = good.backward(grad_out, x, w, b, out, act, mask, slope)
        return dx, dw, None if db is None else db * 2

    monkeypatch.setitem(fb.backends._REGISTRY, "badbias", dataclasses.replace(good, name="badbias", backward=backward))
    monkeypatch.setitem(fb.backends._MODULES, "badbias", "tests.nowhere")
    example = load("gradient_check")
    assert example.main(["--backends", "badbias", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gradient_check.json").read_text())
    assert all(not r["ok"] and r["errors"]["b"] > 0.1 and r["errors"]["W"] < 1e-5 for r in result["results"])


def test_fuse_model(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    example = load("fuse_model")
    assert example.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fuse_model.json").read_text())
    report = {r["name"]: r for r in result["report"]}
    assert result["steps"] == 60 and result["fused_layers"] == 3 and result["linear_layers"] == 5
    assert report["0.fc1"]["activation"] == "relu" and report["2.fc"]["activation"] == "sigmoid"
    assert report["0.fc2"]["reason"] == "no activation after it"
    # same weights, same batches and dropout masks: the curves agree to float32 rounding, and it learns
    eager, fused = result["eager"], result["fused"]
    assert result["max_loss_diff"] < 1e-4 and eager["losses"][-1] < 0.9 * eager["losses"][0]
    assert eager["median_step_ms"] > 0 and fused["median_step_ms"] > 0
    out = capsys.readouterr().out
    assert "fuse: 3 of 5 Linear layers fused" in out and "2.fc: fused with sigmoid" in out


def test_hvp_per_sample():
    """The example's Hessian-vector products and per-sample gradients agree with finite differences
    and with the nn.Linear model, and it reports both timings."""
    r = load("hvp_per_sample").main(["--quick"])
    assert r["ok"] and max(r["errors"].values()) < r["threshold"]
    assert len(r["ms"]) == 6 and all(t > 0 for t in r["ms"].values())  # fused and eager, 3 computations
