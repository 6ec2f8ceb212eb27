"""PNG plots of a run, one pair per (device, dtype):

* ``time_<device>_<dtype>.png``: median time per call of every provider across the shapes (log
  scale, bars = interquartile range), one panel per (mode, activation);
* ``speedup_<device>_<dtype>.png``: eager time ÷ provider time (> 1 = faster than eager PyTorch).
"""

from __future__ import annotations

from pathlib import Path

STYLE = {"eager": dict(color="black", marker="s"), "compile": dict(color="tab:orange", marker="^"),
         "floor": dict(color="0.55", marker="", linestyle="--")}
BACKEND_COLORS = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive"]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (files only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _style(provider: str, backends: list) -> dict:
    if provider in STYLE:
        return dict(STYLE[provider])
    color = BACKEND_COLORS[backends.index(provider) % len(BACKEND_COLORS)]
    return dict(color=color, marker="o", linestyle=":" if provider.endswith("+recompute") else "-")


def _grid(rows):
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    activations = list(dict.fromkeys(r["activation"] for r in rows))
    shapes = list(dict.fromkeys((r["M"], r["K"], r["N"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    backends = [p for p in providers if p not in STYLE]
    return modes, activations, shapes, providers, backends


def _label(shape):
    return "×".join(map(str, shape))


def save_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """Writes ``fig`` to ``path`` (folders made, 110 dpi) and closes it; the bench's plots and the
    examples' figures all end here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, **savefig_kwargs)
    pyplot().close(fig)
    return path


def _finish(fig, axes, title: str, path: Path) -> Path:
    """One legend above a grid of panels (one row per mode), the title, and the file."""
    rows = len(axes)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.02 / rows))
    fig.suptitle(title, y=1.0 + 0.05 / rows, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.1 / rows))
    return save_figure(fig, path, bbox_inches="tight")


def plot_times(rows: list, path: Path, title: str) -> Path:
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator
    modes, activations, shapes, providers, backends = _grid(rows)
    fig, axes = plt.subplots(len(modes), len(activations), squeeze=False, sharex=True,
                             figsize=(5.2 * len(activations), 3.6 * len(modes) + 0.6))
    xs = range(len(shapes))
    for i, mode in enumerate(modes):
        for j, act in enumerate(activations):
            ax = axes[i][j]
            for provider in providers:
                pts = {(r["M"], r["K"], r["N"]): r for r in rows
                       if r["mode"] == mode and r["activation"] == act and r["provider"] == provider
                       and r["median_ms"] is not None}
                if not pts:
                    continue
                idx = [k for k, s in enumerate(shapes) if s in pts]
                med = [pts[shapes[k]]["median_ms"] for k in idx]
                lo = [m - pts[shapes[k]]["q25_ms"] for k, m in zip(idx, med)]
                hi = [pts[shapes[k]]["q75_ms"] - m for k, m in zip(idx, med)]
                label = "GEMM floor" if provider == "floor" else provider
                ax.errorbar(idx, med, yerr=[lo, hi], label=label, capsize=3, **_style(provider, backends))
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_title(f"{mode} · {act}")
            ax.set_xticks(list(xs), [_label(s) for s in shapes], rotation=20, fontsize=8)
            ax.grid(True, which="both", axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("median time per call (ms)")
            if i == len(modes) - 1:
                ax.set_xlabel("M × K × N   (x: M×K, W: N×K)")
    return _finish(fig, axes, title, path)


def plot_speedups(rows: list, path: Path, title: str) -> Path:
    plt = pyplot()
    modes, activations, shapes, providers, backends = _grid(rows)
    from matplotlib.ticker import FuncFormatter, LogLocator
    shown = [p for p in providers if p != "eager"]
    fig, axes = plt.subplots(len(modes), len(activations), squeeze=False, sharey=True,
                             figsize=(5.2 * len(activations), 3.4 * len(modes) + 0.6))
    width = 0.8 / max(len(shown), 1)
    for i, mode in enumerate(modes):
        for j, act in enumerate(activations):
            ax = axes[i][j]
            for p, provider in enumerate(shown):
                vals = {(r["M"], r["K"], r["N"]): r["speedup_vs_eager"] for r in rows
                        if r["mode"] == mode and r["activation"] == act and r["provider"] == provider
                        and r["speedup_vs_eager"] is not None}
                idx = [k for k, s in enumerate(shapes) if s in vals]
                if not idx:
                    continue
                style = _style(provider, backends)
                heights = [vals[shapes[k]] for k in idx]
                # bars grow from 1 (as fast as eager): up = faster, down = slower, on a log axis
                bars = ax.bar([k + (p - (len(shown) - 1) / 2) * width for k in idx], [h - 1.0 for h in heights],
                              width, bottom=1.0, color=style["color"], label="GEMM floor" if provider == "floor" else provider,
                              hatch="//" if provider == "floor" or provider.endswith("+recompute") else None,
                              alpha=0.55 if provider == "floor" else 0.9)
                ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize=6.5, padding=1)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_title(f"{mode} · {act}")
            ax.set_xticks(range(len(shapes)), [_label(s) for s in shapes], rotation=20, fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("speed-up over eager (log scale)")
    return _finish(fig, axes, title + "  —  eager time ÷ provider time (> 1 = faster than eager PyTorch)", path)


def plot_all(rows: list, out_dir: Path, titles: dict) -> list:
    """Both plots for each (device, dtype) that has timed rows; returns the paths written.
    ``titles[(device, dtype)]`` heads the figures."""
    paths = []
    combos = list(dict.fromkeys((r["device"], r["dtype"]) for r in rows if r["median_ms"] is not None))
    for device, dtype in combos:
        sub = [r for r in rows if (r["device"], r["dtype"]) == (device, dtype)]
        title = titles.get((device, dtype), f"{device} {dtype}")
        paths.append(plot_times(sub, out_dir / f"time_{device}_{dtype}.png", title))
        paths.append(plot_speedups(sub, out_dir / f"speedup_{device}_{dtype}.png", title))
    return paths
