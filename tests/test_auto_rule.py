"""backend="auto" on CUDA (fused_backprop/backends/auto_rule.py): the rule picks per pass, dtype and
layer size, the Backend it gives runs what the rule names, and by the CUDA predictions
(benchmarks/cuda_predict.py) auto is no slower than eager on any row of the grid."""

import importlib.util
import io
from pathlib import Path

import pytest
import torch

from fused_backprop import backends
from fused_backprop.backends import Backend, auto_rule
from fused_backprop.bench import cli

ROOT = Path(__file__).resolve().parent.parent


def test_choose_follows_the_table():
    assert auto_rule.choose("forward", torch.float32, 256, 256) == "cuda"
    assert auto_rule.choose("forward", torch.float32, 1024, 1024) == "torch"
    assert auto_rule.choose("forward", torch.float16, 64, 1024) == "cuda"  # K·N = 256²
    assert auto_rule.choose("forward", torch.float64, 64, 64) == "cuda"
    assert auto_rule.choose("forward", torch.float64, 256, 256) == "torch"
    assert auto_rule.choose("backward", torch.float32, 256, 256) == "cuda"
    assert auto_rule.choose("backward", torch.float16, 256, 256) == "torch"
    for dtype in auto_rule.FUSED_UP_TO:
        assert auto_rule.choose("backward", dtype, 64, 64) == "cuda"
        assert auto_rule.choose("backward", dtype, 1024, 1024) == "torch"


def _recording_backend(name, calls):
    def record(pass_):
        return lambda *args: calls.append((name, pass_)) or name
    return Backend(name, record("forward"), record("forward_preact"), record("backward"), supports=lambda d: True)


def test_cuda_auto_runs_the_chosen_backend():
    calls = []
    stubs = {n: _recording_backend(n, calls) for n in ("cuda", "torch")}
    auto = auto_rule.cuda_auto(stubs.__getitem__)
    narrow, wide = torch.empty(8, 64), torch.empty(8, 1024)
    w_narrow, w_wide = torch.empty(64, 64), torch.empty(1024, 1024)
    assert auto.forward(narrow, w_narrow, None, "relu", 0.0) == "cuda"
    assert auto.forward_preact(wide, w_wide, None, "gelu", 0.0) == "torch"
    assert auto.backward(narrow, narrow, w_narrow, None, narrow, "relu", (True, True, False), 0.0) == "cuda"
    assert auto.backward(wide, wide, w_wide, None, wide, "relu", (True, True, False), 0.0) == "torch"
    assert calls == [("cuda", "forward"), ("torch", "forward_preact"), ("cuda", "backward"), ("torch", "backward")]
    assert not auto.accepts_sign_mask  # the torch backend's backward is handed the mask unpacked


def test_resolve_gives_the_rule_on_cuda(monkeypatch):
    fake = _recording_backend("cuda", [])
    monkeypatch.setitem(backends._REGISTRY, "cuda", fake)
    monkeypatch.delitem(backends._AUTO, "cuda", raising=False)
    auto = backends.resolve("auto", torch.device("cuda"))
    assert auto.name == "auto" and backends.resolve("auto", torch.device("cuda")) is auto
    assert backends.resolve("cuda", torch.device("cuda")) is fake  # explicit backends run what was asked


def test_predicted_auto_no_slower_than_eager():
    spec = importlib.util.spec_from_file_location("cuda_predict", ROOT / "benchmarks" / "cuda_predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    occ = {d: r[3] for d, r in predict.gemm_resources().items()}
    picked_fused = 0
    for d in predict.TORCH_DTYPE:
        for m, k, n in predict.SHAPES:
            p = predict.predict(d, m, k, n, occ)
            fwd, bwd = predict.auto_times(d, k, n, p)
            assert fwd <= p["e_fwd"] and bwd <= p["e_bwd"], (d, m, k, n)
            picked_fused += (fwd < p["e_fwd"]) + (bwd < p["e_bwd"])
    assert picked_fused >= 8  # the rule is not "always torch"


def test_list_prints_the_rule():
    out = io.StringIO()
    cli.print_backends(["cpu"], file=out)
    text = out.getvalue()
    assert "backend='auto' on CUDA" in text
    assert "float32   forward: cuda up to in*out = 256x256; backward: cuda up to 256x256; torch above" in text
