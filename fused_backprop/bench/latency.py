"""``python -m fused_backprop.bench --latency``: time per call of one layer across batch sizes.

    python -m fused_backprop.bench --latency                          # M = 1..4096 at K = N in 64, 256, 1024
    python -m fused_backprop.bench --latency --latency-m 1,8,64 --latency-kn 64 --activations relu

Where the main benchmark looks at throughput on large batches, this mode measures what one call
costs a user who serves one request or a small batch: M = 1, 2, 4, ..., 4096 rows at K = N in
{64, 256, 1024}, both activations, float32 on the CPU, in two modes:

* ``inference``: under ``torch.no_grad()``, ``layer(x)`` with ``layer =
  fb.FusedLinearAct.from_linear(lin, activation=...)``, against eager
  ``torch.relu(lin(x))`` and ``torch.compile`` of the eager layer (``cases.compiled_fn``: compiled
  per shape, dynamo reset first, so no recompile limit falls back to eager silently);
* ``training``: one step, ``layer(x).sum().backward()`` with x, weight and bias requiring grad
  (their ``.grad`` set to None before each step, as ``zero_grad()`` does), the same three providers.

Each shape first passes the main benchmark's correctness gate (the fused path's output and
gradients against float64), then each provider is warmed up and timed by
``timing.measure_interleaved``: ``--repeat`` samples round-robin, each long enough for the clock.
Results: a table per (mode, K=N, activation) with fused/eager and fused/compile (time ÷ time:
<= 1 means the fused layer is no slower), ``latency.csv``, ``latency.json`` (the rows, a summary and
the machine) and one PNG per mode of time per call against M.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

import fused_backprop as fb
from fused_backprop import backends

from . import cases, cli, report, timing
from .cases import Case, dtype_name

LATENCY_MODES = ("inference", "training")
PROVIDERS = ("fused", "eager", "compile")
LATENCY_M = [2 ** i for i in range(13)]  # 1, 2, 4, ..., 4096
LATENCY_KN = [64, 256, 1024]
# timing defaults of --latency (--quick takes cli.QUICK's); the options given explicitly win
LATENCY = dict(repeat=11, warmup=3, min_sample_ms=10.0)

COLUMNS = ["device", "device_name", "dtype", "mode", "activation", "M", "K", "N", "provider", "status",
           "check_err", "median_us", "q25_us", "q75_us", "spread_pct", "samples", "calls_per_sample",
           "time_vs_eager", "time_vs_compile", "note"]
GROUP = ("device", "dtype", "mode", "activation", "M", "K", "N")


# ------------------------------------------------------------------------------------------ options

def _int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers > 0, got {text!r}")
    return sorted(set(values))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the latency mode, on the main parser."""
    g = p.add_argument_group("latency mode", "time per call of one layer across batch sizes M (CPU, float32 by "
                             "default); --activations, --dtypes, --device, --baselines eager,compile|none, "
                             "--quick (shorter timings), --repeat, --warmup, --min-sample-ms, --threads, --tol, "
                             "--seed, --out, --no-plots and --no-progress apply")
    g.add_argument("--latency", action="store_true",
                   help="run the latency sweep instead of the main benchmark: fused layer vs eager vs "
                        "torch.compile, inference and training step, writes latency.csv/.json/PNGs "
                        f"(timing defaults: repeat {LATENCY['repeat']}, warmup {LATENCY['warmup']}, "
                        f"{LATENCY['min_sample_ms']:g} ms samples)")
    g.add_argument("--latency-m", type=_int_list, metavar="M,...",
                   help="batch sizes (default " + ",".join(map(str, LATENCY_M)) + ")")
    g.add_argument("--latency-kn", type=_int_list, metavar="K,...",
                   help="layer widths K = N (default " + ",".join(map(str, LATENCY_KN)) + ")")
    g.add_argument("--latency-modes", type=cli._list_arg(LATENCY_MODES, {"train": "training", "infer": "inference"},
                                                         what="latency mode"),
                   default=list(LATENCY_MODES), metavar="MODE,...", help="inference, training or both (default both)")


def reject_options(args, parser) -> None:
    """The latency options without --latency are an error, not silently ignored."""
    given = [flag for flag, value in (("--latency-m", args.latency_m), ("--latency-kn", args.latency_kn),
                                      ("--latency-modes", args.latency_modes != list(LATENCY_MODES))) if value]
    if given:
        parser.error(f"{', '.join(given)} need --latency")


def resolve_options(args, parser) -> argparse.Namespace:
    """Defaults of the latency mode; rejects the main benchmark's options that do not apply."""
    given = []
    if args.shapes is not None:
        given.append("--shapes (use --latency-m and --latency-kn)")
    if args.backends is not None:
        given.append("--backends (the fused layer runs backend='auto', as a user's layer does)")
    if args.modes != list(cli.DEFAULT_MODES):
        given.append("--modes (use --latency-modes inference,training)")
    if args.recompute != "off":
        given.append("--recompute")
    if args.list:
        given.append("--list")
    if args.baselines != list(cases.BASELINES) and "floor" in args.baselines:
        given.append("--baselines floor (the latency mode times eager and compile)")
    if given:
        parser.error("with --latency these options do not apply: " + "; ".join(given))
    preset = cli.QUICK if args.quick else LATENCY
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.latency_m = args.latency_m or list(LATENCY_M)
    args.latency_kn = args.latency_kn or list(LATENCY_KN)
    args.latency_modes = [m for m in LATENCY_MODES if m in args.latency_modes]
    args.devices = args.devices or ["cpu"]  # the CPU unless asked: this mode is about CPU latency
    args.baselines = [] if "none" in args.baselines else [b for b in ("eager", "compile") if b in args.baselines]
    args.dtype_list = list(dict.fromkeys(cases.DTYPES[d] for d in args.dtypes))
    # what cli.describe reports
    args.shapes = [(m, kn, kn) for kn in args.latency_kn for m in args.latency_m]
    args.modes, args.recompute_values = list(args.latency_modes), [False]
    return args


def describe(args) -> dict:
    """The JSON's meta: cli.describe's machine and versions, this mode's options."""
    meta = cli.describe(args)
    for key in ("backends", "skipped", "gate"):
        meta.pop(key, None)
    meta["simd"] = cli.simd_level()
    meta["fused"] = {d: _fused_backend(d) for d in args.devices}
    meta["options"] = dict(latency=True, quick=args.quick, dtypes=[dtype_name(t) for t in args.dtype_list],
                           M=args.latency_m, KN=args.latency_kn, activations=args.activations,
                           modes=args.latency_modes, providers=["fused"] + args.baselines, repeat=args.repeat,
                           warmup=args.warmup, min_sample_ms=args.min_sample_ms, seed=args.seed,
                           tolerance=args.tol if args.tol is not None else
                           {dtype_name(d): cases.TOLERANCE[d] for d in args.dtype_list})
    meta["statements"] = dict(
        inference="with torch.no_grad(): layer(x)  vs  act(lin(x))  vs  torch.compile(act(F.linear(x, W, b)))",
        training="layer(x).sum().backward(), x, W, b requiring grad, grads set to None before each step")
    meta["gate"] = ("the fused path's output and (dx, dW, db) vs the torch backend in float64: "
                    "max|got - want| / max|want| <= tolerance, else WRONG and not timed")
    return meta


def _fused_backend(device: str):
    try:
        return f"FusedLinear*.from_linear(lin): backend 'auto' = {backends.resolve('auto', torch.device(device)).name}"
    except Exception as exc:  # noqa: BLE001
        return f"backend 'auto' unavailable: {exc}"


# ------------------------------------------------------------------------------------------ the run

def _row(case: Case, mode: str, provider: str, name: str) -> dict:
    return dict(device=case.device, device_name=name, dtype=dtype_name(case.dtype), mode=mode,
                activation=case.activation, M=case.M, K=case.K, N=case.N, provider=provider, status="ok",
                check_err=None, median_us=None, q25_us=None, q75_us=None, spread_pct=None, samples=None,
                calls_per_sample=None, time_vs_eager=None, time_vs_compile=None, note="")


def make_stmts(case: Case, mode: str, tensors, compiled=None, providers=PROVIDERS) -> dict:
    """{provider: zero-argument callable} for one shape and mode. ``inference`` statements must be
    timed under ``torch.no_grad()`` (``run`` does)."""
    x, w, b, _ = tensors
    act, slope = fb.activations.ACTIVATIONS[case.activation].forward, fb.activations.DEFAULT_NEGATIVE_SLOPE
    lin = nn.Linear(case.K, case.N, device=case.device, dtype=case.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    layer = fb.FusedLinearAct.from_linear(lin, activation=case.activation)
    fns = {"fused": layer, "eager": lambda x_: act(lin(x_), slope),
           "compile": lambda x_: compiled(x_, lin.weight, lin.bias)}
    stmts = {}
    for p in providers:
        fn = fns[p]
        if mode == "inference":
            stmts[p] = (lambda fn=fn: fn(x))
            continue
        xg = x.detach().clone().requires_grad_()
        leaves = (xg, lin.weight, lin.bias)

        def step(fn=fn, xg=xg, leaves=leaves):
            for t in leaves:
                t.grad = None
            fn(xg).sum().backward()

        stmts[p] = step
    return stmts


def run(args, meta=None) -> tuple:
    """The sweep for resolved options; returns (rows, meta)."""
    meta = meta or describe(args)
    providers = ["fused"] + args.baselines
    n_shapes = len(args.dtype_list) * len(args.latency_kn) * len(args.activations) * len(args.latency_m)
    total = sum(n_shapes * len(args.latency_modes) * len(providers) for _ in args.devices)
    progress = cli._Progress(total, enabled=not args.no_progress)
    rows = []
    try:
        for device in args.devices:
            clock = timing.clock_for(device)
            for dtype in args.dtype_list:
                for kn in args.latency_kn:
                    for activation in args.activations:
                        for m in args.latency_m:
                            case = Case(device, dtype, activation, m, kn, kn)
                            rows += _run_shape(case, providers, args, clock, meta["devices"][device], progress)
    finally:
        progress.close()
    add_ratios(rows)
    return rows, meta


def _run_shape(case, providers, args, clock, name, progress) -> list:
    progress.describe(f"{case}: checking")
    tensors = cases.make_tensors(case, args.seed)
    check = cases.check_provider(cases.Provider("fused", "auto"), case, tensors, args.tol)
    if not check.ok:
        progress.warn(f"{check.status.upper()}: the fused layer on {case}: {check.message} — not timed")
    compiled = cases.compiled_fn(case.activation) if "compile" in providers else None
    rows = []
    for mode in args.latency_modes:
        progress.describe(f"{case} {mode}")
        mode_rows = {p: _row(case, mode, p, name) for p in providers}
        mode_rows["fused"]["check_err"] = check.max_err
        timed = list(providers)
        if not check.ok:
            mode_rows["fused"].update(status=check.status, note=check.message)
            timed.remove("fused")
        stmts = make_stmts(case, mode, tensors, compiled, timed)

        def on_error(provider, exc, mode=mode, mode_rows=mode_rows):
            cli._mark_error(mode_rows[provider], exc, progress, case, mode)

        with torch.no_grad() if mode == "inference" else torch.enable_grad():
            measurements, tries = measure(stmts, clock, args, on_error)
        if tries > 1:
            for row in mode_rows.values():
                row["note"] = row["note"] or f"measured {tries} times: a calibration call was hit by load"
        for p, row in mode_rows.items():
            meas = measurements.get(p)
            if meas is not None:
                row.update(median_us=meas.median * 1e6, q25_us=meas.q25 * 1e6, q75_us=meas.q75 * 1e6,
                           spread_pct=100 * meas.spread, samples=len(meas.times), calls_per_sample=meas.number)
                progress.advance(f"{case} {mode} {p}: {meas.median * 1e6:.4g} us")
            else:
                progress.advance(f"{case} {mode} {p}: {row['status'].upper()}, not timed")
            rows.append(row)
    del tensors, compiled
    return rows


RETRIES = 2


def measure(stmts: dict, clock, args, on_error) -> tuple:
    """``timing.measure_interleaved`` of the statements; again (at most RETRIES more times, all of
    them, to keep the samples interleaved) while a provider's samples came out under half the
    sample time: its one calibration call was hit by a burst of load, so it took one call per
    sample where it needed many, and its median would be that of a few noisy calls. Returns
    ({name: Measurement}, how many times it measured)."""
    min_sample_s = args.min_sample_ms / 1e3
    for tries in range(1, RETRIES + 2):
        measurements = timing.measure_interleaved(stmts, clock, warmup=args.warmup, repeat=args.repeat,
                                                  min_sample_s=min_sample_s, on_error=on_error)
        short = [name for name, m in measurements.items() if m.number * m.median < 0.5 * min_sample_s]
        stmts = {name: stmts[name] for name in measurements}  # the ones that raised stay out
        if not short:
            break
    return measurements, tries


def add_ratios(rows: list) -> None:
    """time_vs_eager = this time ÷ eager's, time_vs_compile = this time ÷ compile's, within each
    (device, dtype, mode, activation, shape): for the fused rows, fused/eager and fused/compile
    (<= 1: the fused layer is no slower)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    for group in groups.values():
        ref = {r["provider"]: r["median_us"] for r in group if r["median_us"] is not None}
        for row in group:
            t = row["median_us"]
            if t is not None:
                row["time_vs_eager"] = t / ref["eager"] if "eager" in ref else None
                row["time_vs_compile"] = t / ref["compile"] if "compile" in ref else None


def summary(rows: list) -> list:
    """Per (device, dtype, mode, K, N, activation): how many M the fused layer is no slower than
    eager at (fused/eager <= 1), the worst fused/eager and at which M, and geometric means."""
    groups: dict = {}
    for r in rows:
        if r["provider"] == "fused" and r["median_us"] is not None:
            groups.setdefault((r["device"], r["dtype"], r["mode"], r["K"], r["N"], r["activation"]), []).append(r)
    out = []
    for (device, dtype, mode, k, n, act), group in groups.items():
        vs_eager = [r for r in group if r["time_vs_eager"] is not None]
        worst = max(vs_eager, key=lambda r: r["time_vs_eager"], default=None)
        out.append(dict(device=device, dtype=dtype, mode=mode, K=k, N=n, activation=act, points=len(group),
                        fused_le_eager=sum(r["time_vs_eager"] <= 1.0 for r in vs_eager),
                        worst_vs_eager=None if worst is None else worst["time_vs_eager"],
                        worst_M=None if worst is None else worst["M"],
                        geomean_vs_eager=report.geomean(r["time_vs_eager"] for r in group),
                        geomean_vs_compile=report.geomean(r["time_vs_compile"] for r in group)))
    return out


# ------------------------------------------------------------------------------------------- output

def write_json(meta: dict, rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": summary(rows), "rows": [{k: r.get(k) for k in COLUMNS} for r in rows]}
    path.write_text(json.dumps(report._json_safe(doc), indent=1) + "\n")


def _fmt_us(t):
    if t is None:
        return "—"
    return f"{t:.2f}" if t < 10 else f"{t:.1f}" if t < 1000 else f"{t:,.0f}"


def _fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}"


def _ratio_style(r):
    return "" if r is None else "green" if r <= 1.0 else "red" if r > 1.05 else "yellow"


TABLE_HEADERS = ["M", "fused µs", "eager µs", "compile µs", "fused/eager", "fused/compile"]


def _tables(rows):
    """{(device, device_name, dtype, mode, K, N, activation): [(M, {provider: row}), ...]}"""
    tables: dict = {}
    for r in rows:
        key = (r["device"], r["device_name"], r["dtype"], r["mode"], r["K"], r["N"], r["activation"])
        tables.setdefault(key, {}).setdefault(r["M"], {})[r["provider"]] = r
    return {key: sorted(by_m.items()) for key, by_m in tables.items()}


def _table_cells(m, by_provider):
    fused = by_provider.get("fused", {})
    cells = [str(m)] + [_fmt_us(by_provider.get(p, {}).get("median_us")) if by_provider.get(p, {}).get("status", "ok")
                        == "ok" else by_provider[p]["status"].upper() for p in PROVIDERS]
    return cells + [_fmt_ratio(fused.get("time_vs_eager")), _fmt_ratio(fused.get("time_vs_compile"))]


NOTE = ("median time per call in µs; fused/eager and fused/compile are time ÷ time: <= 1 means the fused "
        "layer is no slower")


def _title(key):
    device, _, dtype, mode, k, n, act = key
    shape = f"K=N={k}" if k == n else f"K={k} N={n}"
    return f"{mode} · {shape} · {act} · {device} {dtype}"


def print_tables(rows: list, file=None) -> None:
    """One table per (mode, K=N, activation): M, the three times, fused/eager, fused/compile."""
    file = file or sys.stdout
    tables = _tables(rows)
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(NOTE, file=file)
        for key, items in tables.items():
            print(f"\n{_title(key)}", file=file)
            cells = [TABLE_HEADERS] + [_table_cells(m, bp) for m, bp in items]
            widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADERS))]
            for c in cells:
                print("  ".join(v.rjust(w) for v, w in zip(c, widths)), file=file)
        _print_summary_plain(rows, file)
        return
    console = Console(file=file, width=None if file.isatty() else 120, highlight=False)
    console.print(NOTE)
    for key, items in tables.items():
        table = Table(title=_title(key), title_justify="left")
        for h in TABLE_HEADERS:
            table.add_column(h, justify="right")
        for m, by_provider in items:
            cells = _table_cells(m, by_provider)
            fused = by_provider.get("fused", {})
            styles = [""] * 4 + [_ratio_style(fused.get("time_vs_eager")), _ratio_style(fused.get("time_vs_compile"))]
            table.add_row(*[Text(c, style=s) for c, s in zip(cells, styles)])
        console.print(table)
    summ = summary(rows)
    if summ:
        table = Table(title="fused layer over the sweep of M", title_justify="left")
        for h in ("mode", "K=N", "act", "fused ≤ eager", "worst fused/eager", "geomean fused/eager",
                  "geomean fused/compile"):
            table.add_column(h, justify="left" if h in ("mode", "act") else "right")
        for s in summ:
            table.add_row(s["mode"], str(s["K"]), s["activation"], f"{s['fused_le_eager']}/{s['points']}",
                          "—" if s["worst_vs_eager"] is None else f"{s['worst_vs_eager']:.2f} (M={s['worst_M']})",
                          _fmt_ratio(s["geomean_vs_eager"]), _fmt_ratio(s["geomean_vs_compile"]))
        console.print(table)


def _print_summary_plain(rows, file):
    for s in summary(rows):
        worst = "—" if s["worst_vs_eager"] is None else f"{s['worst_vs_eager']:.2f} at M={s['worst_M']}"
        print(f"{s['mode']} K=N={s['K']} {s['activation']}: fused <= eager at {s['fused_le_eager']}/{s['points']} M, "
              f"worst fused/eager {worst}", file=file)


def plot_latency(rows: list, path: Path, title: str) -> Path:
    """Time per call against M (log-log), one line per provider, a panel per (K=N, activation)."""
    from . import plots
    plt = plots.pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator
    kns = list(dict.fromkeys((r["K"], r["N"]) for r in rows))
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    fig, axes = plt.subplots(len(kns), len(acts), squeeze=False, sharex=True,
                             figsize=(5.2 * len(acts), 3.4 * len(kns) + 0.6))
    for i, (k, n) in enumerate(kns):
        for j, act in enumerate(acts):
            ax = axes[i][j]
            for p in PROVIDERS:
                pts = sorted((r["M"], r) for r in rows if (r["K"], r["N"], r["activation"], r["provider"])
                             == (k, n, act, p) and r["median_us"] is not None)
                if not pts:
                    continue
                ms = [m for m, _ in pts]
                med = [r["median_us"] for _, r in pts]
                err = [[r["median_us"] - r["q25_us"] for _, r in pts], [r["q75_us"] - r["median_us"] for _, r in pts]]
                ax.errorbar(ms, med, yerr=err, label=p, capsize=2, markersize=4, **plots._style(p, ["fused"]))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_title(f"K=N={k} · {act}" if k == n else f"K={k} N={n} · {act}")
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("median time per call (µs)")
            if i == len(kns) - 1:
                ax.set_xlabel("M (batch rows)")
    return plots._finish(fig, axes, title, path)


def plot_all(rows: list, out_dir: Path, meta: dict) -> list:
    """One PNG per (mode, device, dtype) with timed rows: ``latency_<mode>_<device>_<dtype>.png``."""
    paths = []
    combos = list(dict.fromkeys((r["mode"], r["device"], r["dtype"]) for r in rows if r["median_us"] is not None))
    for mode, device, dtype in combos:
        sub = [r for r in rows if (r["mode"], r["device"], r["dtype"]) == (mode, device, dtype)]
        what = "inference (torch.no_grad)" if mode == "inference" else "training step (forward + .sum().backward())"
        title = f"latency · {what} · {meta['devices'][device]} · {dtype} · torch {meta['torch']}"
        paths.append(plot_latency(sub, out_dir / f"latency_{mode}_{device}_{dtype}.png", title))
    return paths


def _header(args, meta) -> str:
    lines = [f"fused_backprop {meta['fused_backprop']} latency bench · torch {meta['torch']} · {meta['timestamp']}"]
    for d in args.devices:
        lines.append(f"  {d}: {meta['devices'][d]} · clock {meta['clocks'][d]} · {meta['fused'][d]}")
    load = meta.get("load_average")
    if load is not None and meta.get("cpu_count") and load > meta["cpu_count"]:
        lines.append(f"  note: this machine is busy (load average {load:.1f} on {meta['cpu_count']} cores): "
                     "timings are noisy")
    lines.append(f"  M = {','.join(map(str, args.latency_m))} at K = N = {','.join(map(str, args.latency_kn))}; "
                 f"medians of {args.repeat} interleaved samples (each >= {args.min_sample_ms:g} ms) after "
                 f"{args.warmup} warm-up calls; providers: {', '.join(['fused'] + args.baselines)}")
    return "\n".join(lines)


def main(args, parser) -> int:
    """The latency mode of ``cli.main``, on the parsed (not yet resolved) options."""
    args = resolve_options(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    meta = describe(args)
    print(_header(args, meta), flush=True)
    rows, meta = run(args, meta)
    print_tables(rows)
    out = args.out
    report.write_csv(rows, out / "latency.csv", COLUMNS)
    write_json(meta, rows, out / "latency.json")
    written = [out / "latency.csv", out / "latency.json"]
    if not args.no_plots and any(r["median_us"] is not None for r in rows):
        try:
            written += plot_all(rows, out, meta)
        except ImportError as exc:
            print(f"plots skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r["status"] == "wrong"]
    if bad:
        shapes = sorted({f"{r['device']} {r['dtype']} {r['activation']} {r['M']}x{r['K']}x{r['N']}" for r in bad})
        print("WRONG RESULTS (not timed): fused on " + "; ".join(shapes), file=sys.stderr)
        return 1
    return 0

