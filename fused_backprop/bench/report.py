"""Results: one row per (device, dtype, mode, activation, shape, provider); the ratios; the table
(``rich``, plain text when rich is missing), CSV and JSON; the examples' JSON + PNG outputs."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

COLUMNS = ["device", "device_name", "dtype", "mode", "activation", "M", "K", "N", "provider", "backend",
           "recompute", "status", "check_err", "median_ms", "q25_ms", "q75_ms", "spread_pct", "samples",
           "calls_per_sample", "gflops", "speedup_vs_eager", "speedup_vs_compile", "time_vs_floor", "note"]

GROUP = ("device", "dtype", "mode", "activation", "M", "K", "N")


def add_ratios(rows: list) -> None:
    """Fills speedup_vs_eager (eager time / this time: > 1 is faster than eager), speedup_vs_compile
    (likewise) and time_vs_floor (this time / the bare GEMMs' time: 1 is at the floor) for every
    timed row, from the rows of the same (device, dtype, mode, activation, shape)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    for group in groups.values():
        ref = {r["provider"]: r["median_ms"] for r in group if r["median_ms"] is not None}
        for row in group:
            t = row["median_ms"]
            if t is None:
                continue
            row["speedup_vs_eager"] = ref["eager"] / t if "eager" in ref else None
            row["speedup_vs_compile"] = ref["compile"] / t if "compile" in ref else None
            row["time_vs_floor"] = t / ref["floor"] if "floor" in ref else None


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(rows: list) -> list:
    """Per (device, dtype, mode, provider): geometric means over the cases of the three ratios."""
    out: dict = {}
    for row in rows:
        if row["median_ms"] is None:
            continue
        key = (row["device"], row["dtype"], row["mode"], row["provider"])
        out.setdefault(key, []).append(row)
    result = []
    for (device, dtype, mode, provider), group in out.items():
        result.append(dict(device=device, dtype=dtype, mode=mode, provider=provider, cases=len(group),
                           speedup_vs_eager=geomean(r["speedup_vs_eager"] for r in group),
                           speedup_vs_compile=geomean(r["speedup_vs_compile"] for r in group),
                           time_vs_floor=geomean(r["time_vs_floor"] for r in group)))
    return result


def write_csv(rows: list, path: Path, columns=None) -> None:
    """One row per dict, ``columns`` in order (default: the benchmark's COLUMNS; the other
    benchmarks pass their own); None is written as an empty cell."""
    columns = COLUMNS if columns is None else list(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_example(out: Path, name: str, result: dict, plot=None) -> list:
    """An example's outputs: ``out/name.json`` and, when ``plot`` is given, ``out/name.png``:
    the matplotlib figure that ``plot(result)`` returns. Prints and returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.json"]
    written[0].write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    if plot is not None:
        from .plots import save_figure

        written.append(save_figure(plot(result), out / f"{name}.png"))
    print("wrote " + ", ".join(map(str, written)))
    return written


def write_json(meta: dict, rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": summary(rows), "rows": [{k: row.get(k) for k in COLUMNS} for row in rows]}
    path.write_text(json.dumps(_json_safe(doc), indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- table

def _fmt_ms(t):
    if t is None:
        return "—"
    return f"{t:.4f}" if t < 0.1 else f"{t:.3f}" if t < 10 else f"{t:.1f}"


def _fmt_ratio(r, suffix="×"):
    return "—" if r is None else f"{r:.2f}{suffix}"


def _style_speedup(r):
    if r is None:
        return ""
    return "green" if r >= 1.05 else "red" if r <= 0.95 else ""


def _check_text(row):
    if row["status"] == "ok":
        return "" if row["check_err"] is None else f"ok {row['check_err']:.0e}"
    return f"{row['status'].upper()}: {row['note']}"


def _cells(row):
    median = row["median_ms"]
    return [row["activation"], f"{row['M']}×{row['K']}×{row['N']}", row["provider"], _fmt_ms(median),
            "—" if median is None else f"±{row['spread_pct']:.0f}%",
            "—" if row["gflops"] is None else f"{row['gflops']:.1f}",
            _fmt_ratio(row["speedup_vs_eager"]), _fmt_ratio(row["speedup_vs_compile"]),
            _fmt_ratio(row["time_vs_floor"]), _check_text(row)]


HEADERS = ["act", "M×K×N", "provider", "median ms", "IQR", "GFLOP/s", "vs eager", "vs compile",
           "/ floor", "check"]


def _tables(rows):
    tables: dict = {}
    for row in rows:
        tables.setdefault((row["device"], row["device_name"], row["dtype"], row["mode"]), []).append(row)
    return tables


def print_tables(rows: list, meta: dict, file=None) -> None:
    """One table per (device, dtype, mode), then the geometric-mean summary."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # plain text
        _print_plain(rows, meta, file)
        return
    console = Console(file=file, width=None if file.isatty() else 150, highlight=False)
    for (device, device_name, dtype, mode), group in _tables(rows).items():
        table = Table(title=f"{mode} · {dtype} · {device_name}", title_justify="left",
                      caption="vs eager / vs compile: their time ÷ this time (> 1 = faster); "
                              "/ floor: this time ÷ the bare GEMMs' time (1 = no overhead over the GEMMs)",
                      caption_justify="left")
        for i, h in enumerate(HEADERS):
            table.add_column(h, justify="left" if i in (0, 1, 2, 9) else "right", no_wrap=i != 9)
        previous = None
        for row in group:
            case = (row["activation"], row["M"], row["K"], row["N"])
            if previous is not None and case != previous:
                table.add_section()
            previous = case
            cells = _cells(row)
            styles = [""] * len(cells)
            styles[6], styles[7] = _style_speedup(row["speedup_vs_eager"]), _style_speedup(row["speedup_vs_compile"])
            if row["status"] != "ok":
                styles[9] = "bold red"
            elif row["backend"] is not None:
                styles[2] = "bold"
            table.add_row(*[Text(str(c), style=s) for s, c in zip(styles, cells)])
        console.print(table)
    summ = [s for s in summary(rows) if s["provider"] != "eager"]
    if summ:
        table = Table(title="geometric mean over the cases", title_justify="left")
        for h in ("device", "dtype", "mode", "provider", "cases", "vs eager", "vs compile", "/ floor"):
            table.add_column(h, justify="right" if h in ("cases", "vs eager", "vs compile", "/ floor") else "left")
        for s in summ:
            table.add_row(s["device"], s["dtype"], s["mode"], s["provider"], str(s["cases"]),
                          _fmt_ratio(s["speedup_vs_eager"]), _fmt_ratio(s["speedup_vs_compile"]),
                          _fmt_ratio(s["time_vs_floor"]))
        console.print(table)


def _print_plain(rows, meta, file):
    for (device, device_name, dtype, mode), group in _tables(rows).items():
        print(f"\n{mode} · {dtype} · {device_name}", file=file)
        cells = [HEADERS] + [_cells(r) for r in group]
        widths = [max(len(str(c[i])) for c in cells) for i in range(len(HEADERS))]
        for c in cells:
            print("  ".join(str(v).ljust(w) if i in (0, 1, 2, 9) else str(v).rjust(w)
                            for i, (v, w) in enumerate(zip(c, widths))), file=file)


def markdown_table(rows: list, mode: str, device: str, dtype: str) -> str:
    """A GitHub-markdown table of one (device, dtype, mode) — for the README."""
    lines = ["| " + " | ".join(HEADERS[:-1]) + " |", "|" + "---|" * (len(HEADERS) - 1)]
    for row in rows:
        if (row["mode"], row["device"], row["dtype"]) == (mode, device, dtype):
            lines.append("| " + " | ".join(str(c) for c in _cells(row)[:-1]) + " |")
    return "\n".join(lines)
