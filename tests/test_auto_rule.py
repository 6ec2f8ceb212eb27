"""backend="auto" on CUDA (fused_backprop/backends/auto_rule.py): the rule picks per pass, dtype,
layer size and rows among the Triton kernels, the CUDA kernels and the torch backend; the Backend
it gives runs what the rule names, or the next choice where that one is not available here; and by
the predictions (benchmarks/cuda_predict.py, CUDA and Triton) the rule picks the fastest backend on
every row of the grid, and auto is no slower than eager on any row, whichever backends are missing."""

import importlib.util
import io
from pathlib import Path

import pytest
import torch

from fused_backprop import backends
from fused_backprop.backends import Backend, auto_rule
from fused_backprop.bench import cli

ROOT = Path(__file__).resolve().parent.parent
WIDE = auto_rule.TRITON_MIN_ROWS


def test_choose_follows_the_table():
    assert auto_rule.choose("forward", torch.float32, 256, 256, WIDE) == "cuda"
    assert auto_rule.choose("forward", torch.float32, 1024, 1024, WIDE) == "torch"
    assert auto_rule.choose("forward", torch.float16, 64, 1024, WIDE) == "cuda"  # K·N = 256²
    assert auto_rule.choose("forward", torch.float16, 1024, 1024, WIDE) == "triton"
    assert auto_rule.choose("forward", torch.bfloat16, 512, 512, WIDE) == "triton"
    assert auto_rule.choose("forward", torch.float16, 1024, 1024, WIDE - 1) == "torch"  # host-bound Triton
    assert auto_rule.choose("forward", torch.float16, 2048, 1024, WIDE) == "torch"
    assert auto_rule.choose("forward", torch.float64, 64, 64, 1) == "cuda"
    assert auto_rule.choices("forward", torch.float64, 64, 64, WIDE) == ("cuda", "triton", "torch")
    assert auto_rule.choose("forward", torch.float64, 256, 256, WIDE) == "torch"
    assert auto_rule.choose("backward", torch.float32, 256, 256, WIDE) == "cuda"
    assert auto_rule.choose("backward", torch.float16, 256, 256, WIDE) == "torch"
    for dtype in auto_rule.RULE:
        assert auto_rule.choose("backward", dtype, 64, 64, WIDE) == "cuda"
        assert auto_rule.choose("backward", dtype, 1024, 1024, WIDE) == "torch"
        assert "triton" not in auto_rule.choices("backward", dtype, 64, 64, WIDE)


def test_choose_falls_back_to_the_next_choice():
    no_triton, no_cuda = ("cuda", "torch"), ("triton", "torch")
    assert auto_rule.choose("forward", torch.float16, 1024, 1024, WIDE, no_triton) == "torch"  # not cuda: slower
    assert auto_rule.choose("forward", torch.float64, 64, 64, WIDE, no_cuda) == "triton"
    assert auto_rule.choose("forward", torch.float32, 64, 64, WIDE, no_cuda) == "torch"
    assert auto_rule.choose("forward", torch.float64, 64, 64, WIDE, ("torch",)) == "torch"


def _recording_backend(name, calls, runs=True):
    def record(pass_):
        return lambda *args: calls.append((name, pass_)) or name
    return Backend(name, record("forward"), record("forward_preact"), record("backward"), supports=lambda d: runs)


def _operands(rows, k, n, dtype=torch.float32):
    return torch.empty(rows, k, dtype=dtype, device="meta"), torch.empty(n, k, dtype=dtype, device="meta")


def test_cuda_auto_runs_the_chosen_backend():
    calls = []
    stubs = {n: _recording_backend(n, calls) for n in auto_rule.BACKENDS}
    auto = auto_rule.cuda_auto(stubs.get)
    narrow, w_narrow = _operands(8, 64, 64)
    wide, w_wide = _operands(8, 1024, 1024)
    half, w_half = _operands(WIDE, 1024, 1024, torch.float16)
    assert auto.forward(narrow, w_narrow, None, "relu", 0.0) == "cuda"
    assert auto.forward_preact(wide, w_wide, None, "gelu", 0.0) == "torch"
    assert auto.forward(half, w_half, None, "relu", 0.0) == "triton"
    assert auto.backward(narrow, narrow, w_narrow, None, narrow, "relu", (True, True, False), 0.0) == "cuda"
    assert auto.backward(wide, wide, w_wide, None, wide, "relu", (True, True, False), 0.0) == "torch"
    assert calls == [("cuda", "forward"), ("torch", "forward_preact"), ("triton", "forward"), ("cuda", "backward"),
                     ("torch", "backward")]
    assert not auto.accepts_sign_mask  # the torch backend's backward is handed the mask unpacked


@pytest.mark.parametrize("missing", ["unregistered", "unsupported"])
def test_cuda_auto_falls_back_when_a_backend_is_unavailable(missing):
    """Triton not importable (``get`` gives None) or not running on the device: its passes run the
    next choice predicted faster than eager, and where there is none the torch backend, never the
    CUDA kernels predicted slower than eager; likewise for a build without the CUDA kernels."""
    half, w_half = _operands(WIDE, 1024, 1024, torch.float16)
    f64, w_f64 = _operands(WIDE, 64, 64, torch.float64)
    for gone, x, w, expected in (("triton", half, w_half, "torch"), ("cuda", f64, w_f64, "triton")):
        calls = []
        stubs = {n: _recording_backend(n, calls, runs=not (n == gone and missing == "unsupported"))
                 for n in auto_rule.BACKENDS if not (n == gone and missing == "unregistered")}
        assert auto_rule.cuda_auto(stubs.get).forward(x, w, None, "relu", 0.0) == expected


def test_resolve_gives_the_rule_on_cuda(monkeypatch):
    calls = []
    for name in ("torch", "triton"):
        monkeypatch.setitem(backends._REGISTRY, name, _recording_backend(name, calls))
    fake = _recording_backend("cuda", calls)
    monkeypatch.setitem(backends._REGISTRY, "cuda", fake)
    monkeypatch.delitem(backends._AUTO, "cuda", raising=False)
    auto = backends.resolve("auto", torch.device("cuda"))
    assert auto.name == "auto" and backends.resolve("auto", torch.device("cuda")) is auto
    assert backends.resolve("cuda", torch.device("cuda")) is fake  # explicit backends run what was asked
    assert backends.resolve("triton", torch.device("cuda")).name == "triton"
    # without the CUDA kernels auto is still the rule: not Triton everywhere
    monkeypatch.delitem(backends._REGISTRY, "cuda")
    monkeypatch.delitem(backends._AUTO, "cuda")
    auto = backends.resolve("auto", torch.device("cuda"))
    assert auto.forward(*_operands(8, 64, 64), None, "relu", 0.0) == "torch"
    assert auto.forward(*_operands(WIDE, 1024, 1024, torch.bfloat16), None, "relu", 0.0) == "triton"


@pytest.fixture(scope="module")
def predict():
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("cuda_predict", ROOT / "benchmarks" / "cuda_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(predict):
    occ = {d: r[3] for d, r in predict.gemm_resources().items()}
    for d in predict.TORCH_DTYPE:
        for m, k, n in predict.SHAPES:
            yield d, m, k, n, predict.predict(d, m, k, n, occ), predict.triton_predict(d, m, k, n)


AVAILABLE = [auto_rule.BACKENDS, ("cuda", "torch"), ("triton", "torch"), ("torch",)]


def test_the_rule_is_the_predictions(predict):
    """On every row of the grid, each pass's choices are exactly the backends predicted faster than
    eager, fastest first: the table is written from the predictions and agrees with them."""
    for d, m, k, n, p, t in _rows(predict):
        dtype = getattr(torch, predict.TORCH_DTYPE[d])
        for pass_, key, eager in (("forward", "fwd", p["e_fwd"]), ("backward", "bwd", p["e_bwd"])):
            times = {"cuda": p[key], "triton": t[key]}
            faster = sorted((name for name in times if times[name] < eager), key=times.get)
            assert auto_rule.choices(pass_, dtype, k, n, m) == (*faster, "torch"), (d, m, k, n, pass_, times, eager)


@pytest.mark.parametrize("available", AVAILABLE, ids="+".join)
def test_predicted_auto_no_slower_than_eager(predict, available):
    picked = {"cuda": 0, "triton": 0, "torch": 0}
    for d, m, k, n, p, t in _rows(predict):
        fwd, bwd, fwd_by, bwd_by = predict.auto_times(d, m, k, n, p, t, available)
        assert fwd <= p["e_fwd"] and bwd <= p["e_bwd"], (d, m, k, n, available)
        assert {fwd_by, bwd_by} <= set(available)
        picked[fwd_by] += 1
        picked[bwd_by] += 1
    if available == auto_rule.BACKENDS:
        assert picked["cuda"] >= 8 and picked["triton"] == 2  # float16/bfloat16 8192x1024x1024 forward
    if "cuda" not in available and "triton" in available:
        assert picked["triton"] == 3  # float64 65536x64x64 forward too


def test_triton_launches_are_the_backends(predict):
    """The predicted Triton passes launch what ops.py launches on an H100: the narrow single-pass
    backward for 16-bit layers up to 64 wide, the dW/db reduction split where dW has few tiles, the
    first tile kernels.prune_tiles keeps, each with sm_90a compile facts."""
    bwd = predict.triton_plan("bf16", 65536, 64, 64)
    assert [step[0] for step in bwd] == ["narrow"] and bwd[0][2] == 128
    assert [(r, s) for r, _, s, _ in predict.triton_plan("f32", 65536, 64, 64)] == [("dx", 1), ("dw", 64)]
    assert [r for r, *_ in predict.triton_plan("f64", 8192, 1024, 1024, recompute=True)] == ["dz", "dx", "dw"]
    assert predict.triton_tile("bf16", "fwd", 8192, 1024, 1024, "sigmoid") == (128, 256, 64, 8, 3)
    for d in ("f32", "bf16", "f64"):
        for m, k, n in predict.SHAPES:
            for role, tile, _, _ in predict.triton_plans(d, m, k, n):
                regs, smem, form = predict.triton_facts(d, role, tile)
                assert form == {"f32": "fma", "f64": "mma"}.get(d, form) and form in ("fma", "mma", "ss", "rs")
    with pytest.raises(KeyError, match="--triton-compile"):
        predict.triton_facts("f32", "fwd", (16, 16, 16, 1, 1))


def test_list_prints_the_rule():
    out = io.StringIO()
    cli.print_backends(["cpu"], file=out)
    text = out.getvalue()
    assert "backend='auto' on CUDA" in text
    assert "float32   forward: cuda up to 256x256, torch above; backward: cuda up to 256x256, torch above" in text
    assert "float16   forward: cuda up to 256x256, triton up to 1024x1024, torch above" in text
    assert "float64   forward: cuda then triton up to 64x64, torch above" in text
    assert f"triton only from {auto_rule.TRITON_MIN_ROWS} rows" in text
