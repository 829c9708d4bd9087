"""Charts drawn from the CSV (matplotlib, Agg): PNG and SVG of each.

* latency_by_case: median latency per case, grouped by implementation, log axis;
* latency_vs_k: latency against kernel size (cases that differ only in k);
* latency_vs_heads: latency against heads (cases that differ only in heads);
* peak_memory: peak extra memory per case and implementation;
* ratio_to_floor: median latency / memory floor per case and implementation.

One panel per direction; a chart is drawn only when its data exists.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

FORMATS = ("png", "svg")


def _title(df: pd.DataFrame, what: str) -> str:
    row = df.iloc[0]
    where = f"{row['device']}" + (" (CPU timings)" if row["device_type"] == "cpu" else "")
    return f"{what}: {where}, {row['dtype']}"


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in FORMATS:
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, dpi=110 if ext == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def _panels(df: pd.DataFrame, width: float):
    directions = [d for d in ("fwd", "fwdbwd") if d in set(df["direction"])]
    fig, axes = plt.subplots(len(directions), 1, figsize=(width, 3.8 * len(directions)),
                             squeeze=False, layout="constrained")
    return fig, list(zip(directions, axes[:, 0]))


def _colors(df: pd.DataFrame) -> dict:
    """One color per implementation, the same in every chart of a report."""
    cmap = plt.get_cmap("tab20")
    return {impl: cmap(n % 20) for n, impl in enumerate(dict.fromkeys(df["impl"]))}


def _legend(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(labels)),
               fontsize=8)


def _grouped_bars(df: pd.DataFrame, value: str, ylabel: str, title: str, out_dir: Path,
                  stem: str, colors: dict, floor_line: bool = False) -> list[Path]:
    data = df[df[value].notna() & (df[value] > 0)]
    if data.empty:
        return []
    cases = list(dict.fromkeys(data["case"]))
    impls = list(dict.fromkeys(data["impl"]))
    fig, panels = _panels(data, min(24.0, max(9.0, 0.12 * len(cases) * len(impls) + 3)))
    width = 0.85 / len(impls)
    for direction, ax in panels:
        part = data[data["direction"] == direction]
        for n, impl in enumerate(impls):
            series = part[part["impl"] == impl].set_index("case")[value]
            xs = [i + (n - (len(impls) - 1) / 2) * width for i, c in enumerate(cases)
                  if c in series.index]
            ys = [series[c] for c in cases if c in series.index]
            ax.bar(xs, ys, width=width, label=impl, color=colors[impl])
        if floor_line:
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{direction}")
        ax.grid(axis="y", which="both", alpha=0.3)
    _legend(fig, panels[0][1])
    fig.suptitle(title)
    return _save(fig, out_dir, stem)


def _sweep(df: pd.DataFrame, axis: str, xlabel: str, title: str, out_dir: Path,
           stem: str, colors: dict) -> list[Path]:
    """Lines of latency against `axis` over the largest group of cases that differ only
    in `axis`; nothing when no such group has two points."""
    data = df[df["median_us"].notna()]
    fixed = [c for c in ("B", "H", "W", "C", "heads", "k") if c != axis]
    best = None
    for _, group in data.groupby(fixed):
        if group[axis].nunique() >= 2 and (best is None or
                                           group[axis].nunique() > best[axis].nunique()):
            best = group
    if best is None:
        return []
    fig, panels = _panels(best, 9.0)
    for direction, ax in panels:
        part = best[best["direction"] == direction]
        for impl, series in part.groupby("impl", sort=False):
            series = series.sort_values(axis)
            ax.plot(series[axis], series["median_us"], marker="o", label=impl,
                    color=colors[impl])
        ax.set_yscale("log")
        if axis == "heads":
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(best[axis].unique()), [str(v) for v in sorted(best[axis].unique())])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median latency (us)")
        ax.set_title(direction)
        ax.grid(which="both", alpha=0.3)
    _legend(fig, panels[0][1])
    r = best.iloc[0]
    shape = {"k": f"B={r.B} {r.H}x{r.W} C={r.C} heads={r.heads}",
             "heads": f"B={r.B} {r.H}x{r.W} C={r.C} k={r.k}"}[axis]
    fig.suptitle(f"{title} ({shape})")
    return _save(fig, out_dir, stem)


def draw_all(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Draws every chart whose data exists; returns the files written."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return []
    c, paths = _colors(ok), []
    paths += _grouped_bars(ok, "median_us", "median latency (us, log)",
                           _title(ok, "Latency per case"), out_dir, "latency_by_case", c)
    paths += _sweep(ok, "k", "kernel size k", _title(ok, "Latency vs kernel size"),
                    out_dir, "latency_vs_k", c)
    paths += _sweep(ok, "heads", "heads (d = C / heads)", _title(ok, "Latency vs heads"),
                    out_dir, "latency_vs_heads", c)
    paths += _grouped_bars(ok, "peak_mem_mib", "peak extra memory (MiB, log)",
                           _title(ok, "Peak extra memory"), out_dir, "peak_memory", c)
    paths += _grouped_bars(ok, "ratio_to_floor", "latency / memory floor (log)",
                           _title(ok, "Ratio to the memory floor"), out_dir, "ratio_to_floor",
                           c, floor_line=True)
    return paths
