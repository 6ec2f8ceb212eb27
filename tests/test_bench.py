"""The benchmark CLI ``python -m fused_backprop.bench``: its options, its outputs (table, CSV, JSON,
PNGs), the correctness gate (a wrong backend is reported and not timed) and its timing helpers.

Everything runs on tiny shapes with short timings; only the end-to-end test pays for torch.compile."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_backprop as fb
from fused_backprop import backends
from fused_backprop.bench import cases, cli, report, timing

REPO = Path(__file__).resolve().parent.parent
FAST = ["--shapes", "64x16x8,96x24x40", "--repeat", "2", "--warmup", "1", "--min-sample-ms", "0.2", "--no-progress"]


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_main(tmp_path, *argv) -> tuple:
    rc = cli.main([*FAST, "--out", str(tmp_path), *argv])
    return rc, read_csv(tmp_path / "bench.csv"), json.loads((tmp_path / "bench.json").read_text())


# ------------------------------------------------------------------------------------- end to end

def test_module_entry_point_writes_table_csv_json_and_plots(tmp_path):
    """What `make bench` does, shrunk: a subprocess of the real entry point, compile included."""
    pytest.importorskip("rich")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fused_backprop.bench", "--quick", "--shapes", "128x32x32", "--activations", "relu",
         "--modes", "all", "--repeat", "2", "--min-sample-ms", "0.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for text in ("median ms", "vs eager", "vs compile", "/ floor", "GFLOP/s", "geometric mean", "forward+backward"):
        assert text in out
    if backends.get("triton") is not None:
        assert "triton: skipped on the CPU (interpreter only)" in out
    # progress: one line per measurement when stderr is not a terminal
    assert "[1/" in proc.stderr
    rows = read_csv(tmp_path / "bench.csv")
    providers = {r["provider"] for r in rows}
    assert {"cpu", "eager", "compile", "floor"} <= providers and "triton" not in providers
    assert {r["mode"] for r in rows} == set(cases.MODES)
    for r in rows:
        assert r["status"] == "ok" and float(r["median_ms"]) > 0 and float(r["gflops"]) > 0
        assert float(r["speedup_vs_compile"]) > 0 and float(r["time_vs_floor"]) > 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["meta"]["skipped"]["cpu"].get("triton", "interpreter only").startswith("skipped on the CPU")
    assert len(doc["rows"]) == len(rows) and doc["summary"]
    for name in ("time_cpu_float32.png", "speedup_cpu_float32.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ---------------------------------------------------------------------------------------- options

def test_options_modes_recompute_dtypes_backends(tmp_path, capsys):
    rc, rows, doc = run_main(tmp_path, "--modes", "all", "--recompute", "both", "--dtypes", "float64,bf16",
                             "--activations", "sigmoid", "--backends", "cpu,torch,numpy", "--baselines",
                             "eager,floor", "--no-plots")
    assert rc == 0
    out = capsys.readouterr().out
    assert "backward · float64" in out and "forward · bfloat16" in out
    assert {r["dtype"] for r in rows} == {"float64", "bfloat16"}
    assert {r["activation"] for r in rows} == {"sigmoid"}
    assert {(r["M"], r["K"], r["N"]) for r in rows} == {("64", "16", "8"), ("96", "24", "40")}
    by_mode = {m: {r["provider"] for r in rows if r["mode"] == m} for m in cases.MODES}
    assert by_mode["forward"] == {"cpu", "torch", "numpy", "eager", "floor"}  # recompute: backward only
    for mode in ("backward", "forward+backward"):
        assert by_mode[mode] == {"cpu", "cpu+recompute", "torch", "torch+recompute", "numpy",
                                 "numpy+recompute", "eager", "floor"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["speedup_vs_compile"] == "" for r in rows)  # no compile baseline
    eager = [r for r in rows if r["provider"] == "eager"]
    assert all(float(r["speedup_vs_eager"]) == 1.0 for r in eager)
    assert not list(tmp_path.glob("*.png"))
    assert doc["meta"]["options"]["recompute"] == "both"
    assert int(rows[0]["samples"]) == 2


def test_gflops_and_ratios_follow_from_the_medians(tmp_path):
    rc, rows, _ = run_main(tmp_path, "--modes", "fwd,bwd", "--activations", "relu", "--baselines", "eager,floor",
                           "--no-plots")
    assert rc == 0
    for r in rows:
        m, k, n, t = int(r["M"]), int(r["K"]), int(r["N"]), float(r["median_ms"]) / 1e3
        gemms = {"forward": 1, "backward": 2}[r["mode"]]
        assert float(r["gflops"]) == pytest.approx(2 * gemms * m * k * n / t / 1e9, rel=1e-6)
        group = {q["provider"]: float(q["median_ms"]) for q in rows
                 if (q["mode"], q["M"], q["N"]) == (r["mode"], r["M"], r["N"])}
        assert float(r["speedup_vs_eager"]) == pytest.approx(group["eager"] / group[r["provider"]], rel=1e-6)
        assert float(r["time_vs_floor"]) == pytest.approx(group[r["provider"]] / group["floor"], rel=1e-6)
        assert float(r["q25_ms"]) <= float(r["median_ms"]) <= float(r["q75_ms"])


def test_plots_for_each_device_and_dtype(tmp_path):
    pytest.importorskip("matplotlib")
    rc, _, _ = run_main(tmp_path, "--dtypes", "float32,float64", "--activations", "relu", "--baselines", "eager")
    assert rc == 0
    for name in ("time_cpu_float32.png", "speedup_cpu_float32.png", "time_cpu_float64.png", "speedup_cpu_float64.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_progress_lines(tmp_path, capsys):
    rc = cli.main([*FAST[:-1], "--activations", "relu", "--baselines", "floor", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "[1/8] cpu float32 relu 64x16x8 forward" in err and "[8/8]" in err


def test_list_backends(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "cpu      timed by default" in out
    assert "reference backend" in out
    if backends.get("triton") is not None:
        assert "triton   skipped on the CPU (interpreter only)" in out


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "12x3"], "shapes must look like"),
    (["--shapes", "0x3x4"], "shapes must look like"),
    (["--dtypes", "int8"], "unknown dtype int8"),
    (["--activations", "swish"], "unknown activation swish"),
    (["--modes", "sideways"], "unknown mode sideways"),
    (["--baselines", "jax"], "unknown baseline jax"),
    (["--backends", "nope"], "unknown backend nope"),
    (["--repeat", "0"], "must be > 0"),
    (["--recompute", "maybe"], "invalid choice"),
])
def test_bad_options_are_rejected(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_cuda_device_without_a_gpu_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda", "--list"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_activations_all_and_every_name():
    args = cli.resolve_options(cli.build_parser().parse_args(["--activations", "all"]))
    assert args.activations == list(fb.ACTIVATIONS)
    args = cli.resolve_options(cli.build_parser().parse_args(["--activations", "gelu_tanh,leaky_relu"]))
    assert args.activations == ["gelu_tanh", "leaky_relu"]


def test_every_activation_is_timed_and_checked(tmp_path):
    rc, rows, _ = run_main(tmp_path, "--shapes", "64x16x8", "--modes", "all", "--recompute", "both",
                           "--activations", "all", "--backends", "cpu", "--baselines", "eager", "--no-plots")
    assert rc == 0
    assert {r["activation"] for r in rows} == set(fb.ACTIVATIONS)
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad and all(float(r["median_ms"]) > 0 for r in rows), bad


def test_quick_defaults_and_explicit_options_win():
    args = cli.resolve_options(cli.build_parser().parse_args(["--quick", "--repeat", "7"]))
    assert args.shapes == cli.QUICK_SHAPES and args.repeat == 7 and args.warmup == cli.QUICK["warmup"]
    args = cli.resolve_options(cli.build_parser().parse_args([]))
    assert args.shapes == cli.SHAPES == [(65536, 64, 64), (16384, 256, 256), (8192, 1024, 1024)]
    assert args.modes == ["forward", "forward+backward"] and args.activations == ["relu", "sigmoid"]
    assert args.baselines == ["eager", "compile", "floor"] and args.dtype_list == [torch.float32]


# ------------------------------------------------------------------------------ correctness gate

def _register(monkeypatch, name, **changes):
    impl = dataclasses.replace(backends.get("torch"), name=name, **changes)
    monkeypatch.setitem(backends._REGISTRY, name, impl)
    monkeypatch.setitem(backends._MODULES, name, "tests.nowhere")
    return impl


def test_wrong_forward_is_flagged_and_not_timed(tmp_path, monkeypatch, capsys):
    good = backends.get("torch")
    _register(monkeypatch, "broken", forward=lambda x, w, b, act, slope: good.forward(x, w, b, act, slope) * 1.01)
    rc, rows, doc = run_main(tmp_path, "--backends", "broken,torch", "--baselines", "eager", "--no-plots")
    assert rc == 1
    broken = [r for r in rows if r["provider"] == "broken"]
    assert broken and all(r["status"] == "wrong" and r["median_ms"] == "" and r["gflops"] == "" for r in broken)
    assert all("out off by" in r["note"] for r in broken)
    assert all(float(r["check_err"]) > 1e-3 for r in broken)
    others = [r for r in rows if r["provider"] != "broken"]
    assert others and all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in others)
    captured = capsys.readouterr()
    assert "WRONG" in captured.out and "WRONG RESULTS (not timed): broken on cpu float32" in captured.err
    assert any(r["status"] == "wrong" for r in doc["rows"])


def test_wrong_backward_is_flagged(tmp_path, monkeypatch):
    good = backends.get("torch")

    def backward(grad_out, x, w, b, out, act, mask, slope):
        dx, dw, db = good.backward(grad_out, x, w, b, out, act, mask, slope)
        return dx, dw.t().contiguous().t() * 0.5, db  # dW halved

    _register(monkeypatch, "badgrad", backward=backward)
    rc, rows, _ = run_main(tmp_path, "--backends", "badgrad", "--baselines", "floor", "--activations", "relu",
                           "--no-plots")
    assert rc == 1
    bad = [r for r in rows if r["provider"] == "badgrad"]
    assert bad and all(r["status"] == "wrong" and "dW off by" in r["note"] and r["median_ms"] == "" for r in bad)


def test_backend_that_raises_is_reported_not_timed(tmp_path, monkeypatch):
    def forward(x, w, b, act, slope):
        raise RuntimeError("no kernel for this dtype")

    _register(monkeypatch, "raiser", forward=forward)
    rc, rows, _ = run_main(tmp_path, "--backends", "raiser", "--baselines", "eager", "--activations", "relu",
                           "--no-plots")
    assert rc == 0  # an unsupported case is not a wrong result
    bad = [r for r in rows if r["provider"] == "raiser"]
    assert bad and all(r["status"] == "error" and "no kernel for this dtype" in r["note"] for r in bad)
    assert all(r["median_ms"] == "" for r in bad)


def test_gate_passes_the_real_backends_in_every_dtype():
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for activation in fb.ACTIVATIONS:
            case = cases.Case("cpu", dtype, activation, 300, 70, 90)
            tensors = cases.make_tensors(case)
            for name in ("cpu", "torch", "numpy"):
                for recompute in (False, True):
                    check = cases.check_provider(cases.backend_provider(name, recompute), case, tensors)
                    assert check.ok, (name, dtype, activation, recompute, check)


def test_normalized_error():
    want = torch.tensor([1.0, -4.0, float("nan")], dtype=torch.float64)
    assert cases.normalized_error(torch.tensor([1.0, -4.0, float("nan")]), want) == 0
    assert cases.normalized_error(torch.tensor([1.0, -3.0, float("nan")]), want) == pytest.approx(0.25)
    assert cases.normalized_error(torch.tensor([1.0, -4.0, 0.0]), want) == float("inf")
    assert cases.normalized_error(torch.tensor([1.0, -4.0]), want) == float("inf")


# ------------------------------------------------------------------------------------- timing

def test_measurement_statistics():
    m = timing.Measurement([5.0, 1.0, 3.0, 2.0, 4.0], number=3)
    assert m.median == 3.0 and m.q25 == 2.0 and m.q75 == 4.0 and m.spread == pytest.approx(2 / 3)
    assert timing.Measurement([2.0], 1).spread == 0


def test_measure_interleaved_warms_up_calibrates_and_reports_errors():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1
        if calls["b"] > 2:
            raise ValueError("boom")

    def c():  # fails while being sampled, after warm-up and calibration
        calls["c"] = calls.get("c", 0) + 1
        if calls["c"] > 5:
            raise KeyError("late")

    errors = {}
    out = timing.measure_interleaved({"a": a, "b": b, "c": c}, timing.Clock(), warmup=2, repeat=4,
                                     min_sample_s=1e-9, on_error=lambda name, exc: errors.setdefault(name, exc))
    assert set(out) == {"a"} and isinstance(errors["b"], ValueError) and isinstance(errors["c"], KeyError)
    calls["a"] = 0
    out = timing.measure_interleaved({"a": a}, timing.Clock(), warmup=2, repeat=4, min_sample_s=1e-4)
    assert len(out["a"].times) == 4 and out["a"].number > 1  # a no-op needs many calls per sample
    assert calls["a"] == 2 + 1 + 4 * out["a"].number


def test_clock_for_device():
    assert isinstance(timing.clock_for("cpu"), timing.Clock) and timing.clock_for("cpu").name == "perf_counter"
    assert isinstance(timing.clock_for("cuda:0"), timing.CudaClock)


def test_markdown_table():
    rows = [dict(device="cpu", device_name="x", dtype="float32", mode="forward", activation="relu", M=1, K=2, N=3,
                 provider=p, backend=None, recompute=None, status="ok", check_err=None, median_ms=t, q25_ms=t,
                 q75_ms=t, spread_pct=0.0, samples=1, calls_per_sample=1, gflops=1.0, speedup_vs_eager=None,
                 speedup_vs_compile=None, time_vs_floor=None, note="") for p, t in (("eager", 2.0), ("floor", 1.0))]
    report.add_ratios(rows)
    text = report.markdown_table(rows, "forward", "cpu", "float32")
    assert text.count("\n") == 3 and "| relu | 1×2×3 | floor | 1.000 |" in text and "2.00×" in text


# --------------------------------------------------------------------------------- latency mode

LATENCY_FAST = ["--latency", "--latency-m", "1,4", "--latency-kn", "8", "--repeat", "2", "--warmup", "1",
                "--min-sample-ms", "0.2", "--no-progress"]


def run_latency(tmp_path, *argv) -> tuple:
    rc = cli.main([*LATENCY_FAST, "--out", str(tmp_path), *argv])
    return rc, read_csv(tmp_path / "latency.csv"), json.loads((tmp_path / "latency.json").read_text())


def test_latency_sweep_writes_table_csv_json_and_plots(tmp_path, capsys):
    """The sweep shrunk to M = 1, 4 at K = N = 8: both modes, both activations, all three providers
    (torch.compile included), the ratios from the medians, the meta, one PNG per mode."""
    rc, rows, doc = run_latency(tmp_path)
    assert rc == 0
    out = capsys.readouterr().out
    for text in ("inference · K=N=8 · relu", "training · K=N=8 · sigmoid", "fused/eager", "fused/compile",
                 "compile µs", "fused layer over the sweep of M"):
        assert text in out
    keys = {(r["mode"], r["activation"], r["M"], r["provider"]) for r in rows}
    assert keys == {(mode, act, m, p) for mode in ("inference", "training") for act in ("relu", "sigmoid")
                    for m in ("1", "4") for p in ("fused", "eager", "compile")}
    assert len(rows) == len(keys) and {(r["K"], r["N"], r["dtype"], r["device"]) for r in rows} == {("8", "8", "float32", "cpu")}
    for r in rows:
        assert r["status"] == "ok", r
        t = float(r["median_us"])
        assert 0 < float(r["q25_us"]) <= t <= float(r["q75_us"]) and int(r["samples"]) == 2
        group = {q["provider"]: float(q["median_us"]) for q in rows
                 if (q["mode"], q["activation"], q["M"]) == (r["mode"], r["activation"], r["M"])}
        assert float(r["time_vs_eager"]) == pytest.approx(t / group["eager"], rel=1e-6)
        assert float(r["time_vs_compile"]) == pytest.approx(t / group["compile"], rel=1e-6)
    assert all(float(r["time_vs_eager"]) == 1.0 for r in rows if r["provider"] == "eager")
    assert all(float(r["check_err"]) < 1e-3 for r in rows if r["provider"] == "fused")
    meta = doc["meta"]
    assert meta["cpu_capability"]["fused_backprop"] == fb.cpu_capability() and "SIMD" in meta["simd"]
    assert meta["options"]["M"] == [1, 4] and meta["options"]["KN"] == [8] and meta["options"]["latency"]
    assert meta["devices"]["cpu"] and meta["torch"] == torch.__version__ and "backend 'auto'" in meta["fused"]["cpu"]
    assert len(doc["rows"]) == len(rows) and len(doc["summary"]) == 4
    for s in doc["summary"]:
        assert s["points"] == 2 and 0 <= s["fused_le_eager"] <= 2 and s["worst_M"] in (1, 4)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert pngs == ["latency_inference_cpu_float32.png", "latency_training_cpu_float32.png"]
        assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    else:
        assert not pngs


def test_latency_options_narrow_the_sweep(tmp_path, capsys):
    rc, rows, doc = run_latency(tmp_path, "--latency-modes", "training", "--latency-kn", "8,12", "--latency-m", "3",
                                "--activations", "sigmoid", "--baselines", "eager", "--no-plots", "--threads", "1")
    assert rc == 0
    assert {(r["mode"], r["activation"], r["M"], r["K"], r["N"], r["provider"]) for r in rows} == {
        ("training", "sigmoid", "3", kn, kn, p) for kn in ("8", "12") for p in ("fused", "eager")}
    assert all(r["time_vs_compile"] == "" and float(r["median_us"]) > 0 for r in rows)
    assert not list(tmp_path.glob("*.png"))
    assert doc["meta"]["threads"] == 1 and doc["meta"]["options"]["providers"] == ["fused", "eager"]
    assert "training · K=N=12 · sigmoid" in capsys.readouterr().out


def test_latency_statements_compute_the_layer_and_its_gradients():
    from fused_backprop.bench import latency

    case = cases.Case("cpu", torch.float32, "sigmoid", 5, 7, 6)
    tensors = cases.make_tensors(case)
    x, w, b, _ = tensors
    want = torch.sigmoid(x @ w.t() + b)
    with torch.no_grad():
        stmts = latency.make_stmts(case, "inference", tensors, providers=("fused", "eager"))
        for stmt in stmts.values():
            out = stmt()
            assert not out.requires_grad and torch.allclose(out, want, atol=1e-5)
    stmts = latency.make_stmts(case, "training", tensors, providers=("fused",))
    stmt = stmts["fused"]
    assert stmt() is None and stmt() is None  # grads reset before each step: no accumulation
    xg, weight, bias = stmt.__defaults__[2]
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    torch.sigmoid(xr @ wr.t() + br).sum().backward()
    for got, ref in ((xg, xr), (weight, wr), (bias, br)):
        assert torch.allclose(got.grad, ref.grad, atol=1e-5)


def test_latency_wrong_fused_layer_is_flagged_and_not_timed(tmp_path, monkeypatch, capsys):
    good = backends.get("torch")
    broken = dataclasses.replace(good, name="broken",
                                 forward=lambda x, w, b, act, slope: good.forward(x, w, b, act, slope) * 1.01)
    monkeypatch.setitem(backends._AUTO, "cpu", broken)
    rc, rows, _ = run_latency(tmp_path, "--baselines", "eager", "--activations", "relu", "--latency-m", "2",
                              "--no-plots")
    assert rc == 1
    fused = [r for r in rows if r["provider"] == "fused"]
    assert len(fused) == 2 and all(r["status"] == "wrong" and r["median_us"] == "" and "out off by" in r["note"]
                                   for r in fused)
    assert all(r["status"] == "ok" and float(r["median_us"]) > 0 for r in rows if r["provider"] == "eager")
    assert "WRONG RESULTS (not timed): fused on cpu float32 relu 2x8x8" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--latency", "--shapes", "4x4x4"], "--shapes (use --latency-m"),
    (["--latency", "--backends", "cpu"], "--backends"),
    (["--latency", "--modes", "fwd"], "--modes (use --latency-modes"),
    (["--latency", "--baselines", "eager,floor"], "--baselines floor"),
    (["--latency", "--latency-m", "1,0"], "integers > 0"),
    (["--latency", "--latency-kn", "x"], "integers > 0"),
    (["--latency", "--latency-modes", "serving"], "unknown latency mode serving"),
    (["--latency-m", "1,2"], "--latency-m need --latency"),
])
def test_latency_bad_options_are_rejected(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_latency_measures_again_when_a_calibration_call_was_slow(monkeypatch):
    """A burst of load during the one calibration call leaves a provider at one call per sample,
    far shorter than the sample time: the latency mode measures again."""
    from argparse import Namespace

    from fused_backprop.bench import latency

    results = iter([{"a": timing.Measurement([1e-5, 1e-5], 1)}, {"a": timing.Measurement([1e-5, 1e-5], 200)}])
    monkeypatch.setattr(timing, "measure_interleaved", lambda *a, **k: next(results))
    args = Namespace(warmup=1, repeat=2, min_sample_ms=2.0)
    measurements, tries = latency.measure({"a": lambda: None}, timing.Clock(), args, None)
    assert tries == 2 and measurements["a"].number == 200
