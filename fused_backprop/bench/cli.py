"""The command line and the run loop of ``python -m fused_backprop.bench``.

    python -m fused_backprop.bench                     # the full run: 3 shapes, relu+sigmoid, float32
    python -m fused_backprop.bench --activations all   # ... and tanh, leaky_relu, gelu, gelu_tanh, silu
    python -m fused_backprop.bench --quick             # under two minutes on a 2-core CPU
    python -m fused_backprop.bench --modes all --recompute both --dtypes float32,bfloat16
    python -m fused_backprop.bench --shapes 4096x128x128 --backends cpu,torch --baselines eager,floor
    python -m fused_backprop.bench --list              # which backends run here, and why not
    python -m fused_backprop.bench --latency           # time per call across batch sizes M (latency.py)

Every case (device, dtype, activation, M×K×N) first checks each backend against the ``torch``
backend in float64: a backend whose output or gradients are off is reported as WRONG and not
timed (the exit status is then 1). Then each provider — the backends, eager PyTorch, torch.compile
and the bare GEMMs ("floor") — is warmed up and timed: ``--repeat`` samples, each long enough for
the clock (perf_counter on the CPU, CUDA events on a GPU). Results: a table on stdout, and
``bench.csv``, ``bench.json`` and PNG plots in ``--out`` (default ``results/bench``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import fused_backprop as fb
from fused_backprop import backends

from . import cases, report, timing
from .cases import BASELINES, MODE_ALIASES, MODES, Case, Provider, backend_provider, dtype_name

SHAPES = [(65536, 64, 64), (16384, 256, 256), (8192, 1024, 1024)]
QUICK_SHAPES = [(4096, 64, 64), (2048, 256, 256)]
DEFAULT_MODES = ("forward", "forward+backward")
# The kernel backends a run times by default; the reference backends only on request.
DEFAULT_BACKENDS = ("cpu", "cuda", "triton")
REFERENCE_BACKENDS = ("torch", "numpy")
DEFAULT_OUT = Path("results") / "bench"
FULL = dict(repeat=15, warmup=3, min_sample_ms=20.0)
QUICK = dict(repeat=5, warmup=1, min_sample_ms=5.0)


# ------------------------------------------------------------------------------------------ options

def _list_arg(choices=None, aliases=None, what="value"):
    aliases = aliases or {}

    def parse(text: str):
        items = [aliases.get(v.strip().lower(), v.strip().lower()) for v in text.split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        if choices is not None:
            bad = [v for v in items if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return parse


def parse_shapes(text: str) -> list:
    """``"MxKxN,MxKxN"`` -> [(M, K, N), ...]."""
    try:
        shapes = [tuple(int(v) for v in item.strip().lower().replace("×", "x").split("x"))
                  for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 65536x64x64,16384x256x256 (M x K x N, each > 0); "
                                         f"got {text!r}")
    return list(dict.fromkeys(shapes))


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_backprop.bench",
        description="Benchmark the fused Linear+activation layers against eager PyTorch, torch.compile and "
                    "the bare GEMMs, after checking every backend's results.",
        epilog="Lists are comma-separated. Ratios: 'vs eager' = eager time / this time (> 1 is faster); "
               "'/ floor' = this time / the bare GEMMs' time (1 is no overhead over the GEMMs).")
    p.add_argument("--quick", action="store_true",
                   help=f"small shapes {','.join('x'.join(map(str, s)) for s in QUICK_SHAPES)} and short timings "
                        f"(repeat {QUICK['repeat']}, warmup {QUICK['warmup']}, {QUICK['min_sample_ms']:g} ms "
                        "samples); options given explicitly still win")
    p.add_argument("--device", "--devices", dest="devices", type=_list_arg(("cpu", "cuda"), what="device"),
                   help="cpu, cuda or both (default: cpu, and cuda when a GPU is visible)")
    p.add_argument("--dtypes", type=_list_arg(tuple(cases.DTYPES), what="dtype"), default=["float32"],
                   help="float32, float64, bfloat16, float16 (aliases fp32, bf16, ...; default float32)")
    p.add_argument("--shapes", type=parse_shapes,
                   help="M x K x N list (default: " + ",".join("x".join(map(str, s)) for s in SHAPES) + ")")
    p.add_argument("--activations", type=_list_arg(cases.ACTIVATIONS + ("all",), what="activation"),
                   default=list(cases.DEFAULT_ACTIVATIONS),
                   help=f"{', '.join(cases.ACTIVATIONS)} or all (default {','.join(cases.DEFAULT_ACTIVATIONS)})")
    p.add_argument("--backends", type=_list_arg(what="backend"),
                   help="package backends to time, or 'all' (default: the kernel backends "
                        f"{', '.join(DEFAULT_BACKENDS)} that run on the device; the reference backends "
                        f"{', '.join(REFERENCE_BACKENDS)} by name)")
    p.add_argument("--baselines", type=_list_arg(BASELINES + ("none",), what="baseline"), default=list(BASELINES),
                   help="eager, compile, floor or none (default all three)")
    p.add_argument("--modes", type=_list_arg(MODES + ("all",), MODE_ALIASES, what="mode"), default=list(DEFAULT_MODES),
                   help="forward, backward, forward+backward (aliases fwd, bwd, fwd+bwd) or all "
                        "(default forward,forward+backward)")
    p.add_argument("--recompute", choices=("off", "on", "both"), default="off",
                   help="time the backends with recompute=False (off), recompute=True (on) or both; "
                        "recompute only changes backward (default off)")
    p.add_argument("--repeat", type=_positive(int), help=f"timed samples per measurement (default {FULL['repeat']})")
    p.add_argument("--warmup", type=_nonnegative_int,
                   help=f"untimed calls before timing (default {FULL['warmup']}; at least 1 runs)")
    p.add_argument("--min-sample-ms", type=_positive(float),
                   help=f"each sample repeats the call until it lasts this long (default {FULL['min_sample_ms']:g})")
    p.add_argument("--threads", type=_positive(int), help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--tol", type=_positive(float),
                   help="normalized-error tolerance of the correctness gate (default per dtype: " +
                        ", ".join(f"{dtype_name(d)} {t:g}" for d, t in cases.TOLERANCE.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"results folder for bench.csv, bench.json and the PNGs (default {DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--list", action="store_true", help="list the backends and whether they run here, then exit")
    from . import latency  # the --latency mode and its options
    latency.add_arguments(p)
    return p


def resolve_options(args) -> argparse.Namespace:
    """Fills the defaults that depend on --quick and on the machine."""
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "all" in args.modes:
        args.modes = list(MODES)
    args.modes = [m for m in MODES if m in args.modes]  # a fixed order
    if "all" in args.activations:
        args.activations = list(cases.ACTIVATIONS)
    args.baselines = [] if "none" in args.baselines else [b for b in BASELINES if b in args.baselines]
    args.recompute_values = {"off": [False], "on": [True], "both": [False, True]}[args.recompute]
    args.dtype_list = list(dict.fromkeys(cases.DTYPES[d] for d in args.dtypes))
    return args


# ---------------------------------------------------------------------------------------- backends

def plan_backends(requested, device: str):
    """(names to time, {name: why it is skipped}) for ``device``."""
    if requested is None:
        wanted = [n for n in DEFAULT_BACKENDS if n in backends.names()]
        wanted += [n for n in backends.names() if n not in wanted and n not in REFERENCE_BACKENDS]
    elif "all" in requested:
        wanted = backends.names()
    else:
        wanted = requested
    dev = torch.device(device)
    run, skipped = [], {}
    for name in wanted:
        impl = backends.get(name)
        if impl is None:
            error = backends._IMPORT_ERRORS.get(name, "not built")
            skipped[name] = f"not available in this installation ({error})"
        elif name == "triton" and dev.type == "cpu":
            skipped[name] = "skipped on the CPU (interpreter only); timed on CUDA"
        elif name == "cuda" and dev.type != "cuda":
            skipped[name] = "runs on CUDA tensors only"
        elif name == "cpu" and dev.type != "cpu":
            skipped[name] = "runs on CPU tensors only"
        elif not impl.supports(dev):
            skipped[name] = f"does not run on {device} here"
        else:
            run.append(name)
    return run, skipped


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev) if torch.cuda.is_available() else "no CUDA device visible"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads != 1 else ''}, {simd_level()}"


def simd_level() -> str:
    """The SIMD level of the CPU kernels (and torch's, where it differs)."""
    torch_level, ours = torch.backends.cpu.get_cpu_capability(), _cpu_capability_or_none()
    if ours is None:
        return f"SIMD: fused kernels not built, torch {torch_level}"
    gemm = "tile GEMM" if fb._ops._C._tile_gemm() else "BLAS GEMM"
    return f"SIMD {ours}" + (f" (torch {torch_level})" if torch_level != ours else "") + f", {gemm}"


def _cpu_capability_or_none():
    try:
        return fb.cpu_capability()
    except RuntimeError:
        return None


def _git_commit():
    try:
        root = Path(fb.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return (out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------- progress

class _Progress:
    """A rich progress bar on a terminal; one line per measurement otherwise (CI logs)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                           TimeElapsedColumn)
            except ImportError:
                return
            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                                 transient=True)
            self._task = self._bar.add_task("starting", total=total)
            self._bar.start()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self, line: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {line}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"[bold red]{text}[/]", markup=True, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ------------------------------------------------------------------------------------------ the run

def _row(case: Case, mode: str, provider: Provider, name: str) -> dict:
    return dict(device=case.device, device_name=name, dtype=dtype_name(case.dtype), mode=mode,
                activation=case.activation, M=case.M, K=case.K, N=case.N, provider=provider.name,
                backend=provider.backend, recompute=provider.recompute if provider.is_backend else None,
                status="ok", check_err=None, median_ms=None, q25_ms=None, q75_ms=None, spread_pct=None,
                samples=None, calls_per_sample=None, gflops=None, speedup_vs_eager=None,
                speedup_vs_compile=None, time_vs_floor=None, note="")


def describe(args) -> dict:
    """What a run of these (resolved) options will do, and on what: the JSON's ``meta``."""
    plans = {d: plan_backends(args.backends, d) for d in args.devices}
    names = {d: device_name(d) for d in args.devices}
    return dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, fused_backprop=fb.__version__, python=platform.python_version(),
        platform=platform.platform(), git_commit=_git_commit(), threads=torch.get_num_threads(),
        cpu_capability=dict(fused_backprop=_cpu_capability_or_none(), torch=torch.backends.cpu.get_cpu_capability()),
        tile_gemm=_cpu_capability_or_none() is not None and fb._ops._C._tile_gemm(),
        cpu_count=os.cpu_count(), load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        devices={d: names[d] for d in args.devices},
        clocks={d: timing.clock_for(d).name for d in args.devices},
        backends={d: plans[d][0] for d in args.devices}, skipped={d: plans[d][1] for d in args.devices},
        options=dict(quick=args.quick, dtypes=[dtype_name(t) for t in args.dtype_list],
                     shapes=["x".join(map(str, s)) for s in args.shapes], activations=args.activations,
                     modes=args.modes, baselines=args.baselines, recompute=args.recompute, repeat=args.repeat,
                     warmup=args.warmup, min_sample_ms=args.min_sample_ms, seed=args.seed,
                     tolerance=args.tol if args.tol is not None else
                     {dtype_name(d): cases.TOLERANCE[d] for d in args.dtype_list}),
        gate="each backend's output and (dx, dW, db) vs the torch backend in float64: "
             "max|got - want| / max|want| <= tolerance, else WRONG and not timed",
    )


def run(args, meta=None) -> tuple:
    """Runs the benchmark for resolved options; returns (rows, meta)."""
    meta = meta or describe(args)
    names = meta["devices"]
    plans = {d: (meta["backends"][d], meta["skipped"][d]) for d in args.devices}
    providers = {d: [backend_provider(n, r) for n in plans[d][0] for r in args.recompute_values]
                 + [Provider(b) for b in args.baselines] for d in args.devices}
    n_cases = len(args.dtype_list) * len(args.activations) * len(args.shapes)
    total = sum(n_cases * sum(p.runs_in(m) for p in providers[d] for m in args.modes) for d in args.devices)
    progress = _Progress(total, enabled=not args.no_progress)
    rows = []
    try:
        for device in args.devices:
            clock = timing.clock_for(device)
            for dtype in args.dtype_list:
                for activation in args.activations:
                    for m, k, n in args.shapes:
                        case = Case(device, dtype, activation, m, k, n)
                        rows += _run_case(case, providers[device], args, clock, names[device], progress)
    finally:
        progress.close()
    report.add_ratios(rows)
    return rows, meta


def _mark_error(row, exc, progress, case, mode) -> None:
    """A provider that raised while being set up or timed (e.g. torch.compile without a C++
    compiler): reported in its row, not timed."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    row.update(status="error", note=f"{type(exc).__name__}: {text}"[:300])
    progress.warn(f"ERROR: {row['provider']} on {case} {mode}: {row['note']}")


def _run_case(case, providers, args, clock, name, progress) -> list:
    progress.describe(f"{case}: checking")
    tensors = cases.make_tensors(case, args.seed)
    checks = {p: cases.check_provider(p, case, tensors, args.tol) for p in providers if p.is_backend}
    for p, check in checks.items():
        if not check.ok:
            progress.warn(f"{check.status.upper()}: backend {p.name!r} on {case}: {check.message} — not timed")
    compiled = cases.compiled_fn(case.activation) if "compile" in args.baselines else None
    rows = []
    for mode in args.modes:
        progress.describe(f"{case} {mode}")
        mode_rows, stmts = {}, {}
        for p in providers:
            if not p.runs_in(mode):
                continue
            row = mode_rows[p.name] = _row(case, mode, p, name)
            check = checks.get(p)
            if check is not None:
                row["check_err"] = check.max_err
                if not check.ok:
                    row.update(status=check.status, note=check.message)
                    continue
            try:
                stmts[p.name] = cases.make_stmt(p, mode, case, tensors, compiled)
            except Exception as exc:  # noqa: BLE001
                _mark_error(row, exc, progress, case, mode)

        def on_error(provider_name, exc):
            _mark_error(mode_rows[provider_name], exc, progress, case, mode)

        measurements = timing.measure_interleaved(stmts, clock, warmup=args.warmup, repeat=args.repeat,
                                                  min_sample_s=args.min_sample_ms / 1e3, on_error=on_error)
        for pname, row in mode_rows.items():
            meas = measurements.get(pname)
            if meas is not None:
                median = meas.median
                row.update(median_ms=median * 1e3, q25_ms=meas.q25 * 1e3, q75_ms=meas.q75 * 1e3,
                           spread_pct=100 * meas.spread, samples=len(meas.times), calls_per_sample=meas.number,
                           gflops=case.flops(mode) / median / 1e9)
                progress.advance(f"{case} {mode} {pname}: {median * 1e3:.4g} ms")
            else:
                progress.advance(f"{case} {mode} {pname}: {row['status'].upper()}, not timed")
            rows.append(row)
    del tensors, compiled
    if torch.device(case.device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------- output

def print_backends(devices, file=None) -> None:
    file = file or sys.stdout
    for device in devices:
        run_, skipped = plan_backends(None, device)
        extra = [n for n in backends.names() if n not in run_ and n not in skipped]
        print(f"{device} ({device_name(device)}):", file=file)
        for n in run_:
            print(f"  {n:<8} timed by default", file=file)
        for n in extra:
            ok = backends.get(n) is not None and backends.get(n).supports(torch.device(device))
            print(f"  {n:<8} {'reference backend: time it with --backends ' + n if ok else 'not available here'}",
                  file=file)
        for n, why in skipped.items():
            print(f"  {n:<8} {why}", file=file)
    from ..backends import auto_rule
    print("backend='auto' on CUDA (fused_backprop/backends/auto_rule.py, from the predicted H100 times):", file=file)
    for line in auto_rule.describe():
        print(f"  {line}", file=file)


def _header(args, meta) -> str:
    lines = [f"fused_backprop {meta['fused_backprop']} bench · torch {meta['torch']} · {meta['timestamp']}"]
    for d in args.devices:
        skipped = "; ".join(f"{n}: {why}" for n, why in meta["skipped"][d].items())
        lines.append(f"  {d}: {meta['devices'][d]} · clock {meta['clocks'][d]} · backends timed: "
                     f"{', '.join(meta['backends'][d]) or 'none'}" + (f" · {skipped}" if skipped else ""))
    load = meta.get("load_average")
    if load is not None and load > (os.cpu_count() or 1):
        lines.append(f"  note: this machine is busy (load average {load:.1f} on {os.cpu_count()} cores): timings "
                     "are noisy, and multi-threaded ones suffer most; compare with --threads 1")
    lines.append(f"  medians of {args.repeat} samples (each >= {args.min_sample_ms:g} ms) after {args.warmup} "
                 "warm-up calls; every backend checked against the torch backend first")
    return "\n".join(lines)


def separate_inductor_cache() -> None:
    """One torch.compile cache per SIMD level, unless TORCHINDUCTOR_CACHE_DIR is set: torch 2.14's
    inductor reuses what it compiled at another ATEN_CPU_CAPABILITY level, and after a run at avx2
    the same graph at avx512 aborts ("double free or corruption"; AMD EPYC, reproduced without
    fused_backprop, gone with a fresh cache)."""
    import getpass
    import tempfile

    level = torch.backends.cpu.get_cpu_capability()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{level}"))


def main(argv=None) -> int:
    separate_inductor_cache()
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import latency
    if args.latency:
        return latency.main(args, parser)
    latency.reject_options(args, parser)
    args = resolve_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.list:
        print_backends(args.devices)
        return 0
    unknown = [n for n in (args.backends or []) if n != "all" and n not in backends.names()]
    if unknown:
        parser.error(f"unknown backend {', '.join(unknown)}; known: {', '.join(backends.names())}")

    meta = describe(args)
    print(_header(args, meta), flush=True)
    rows, meta = run(args, meta)
    report.print_tables(rows, meta)
    out = args.out
    report.write_csv(rows, out / "bench.csv")
    report.write_json(meta, rows, out / "bench.json")
    written = [out / "bench.csv", out / "bench.json"]
    if not args.no_plots and any(r["median_ms"] is not None for r in rows):
        try:
            from . import plots
            titles = {(d, dtype_name(t)): f"{meta['devices'][d]} · {dtype_name(t)} · torch {meta['torch']}"
                      for d in args.devices for t in args.dtype_list}
            written += plots.plot_all(rows, out, titles)
        except ImportError as exc:
            print(f"plots skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r["status"] == "wrong"]
    if bad:
        failing = sorted({(r["provider"], f"{r['device']} {r['dtype']} {r['activation']} {r['M']}x{r['K']}x{r['N']}")
                          for r in bad})
        print("WRONG RESULTS (not timed): " + "; ".join(f"{p} on {c}" for p, c in failing), file=sys.stderr)
        return 1
    return 0
