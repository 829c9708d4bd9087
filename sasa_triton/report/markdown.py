"""summary.md: machine, versions, the floor, the results tables and links to the charts."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _latency_table(df: pd.DataFrame, direction: str) -> str:
    part = df[df["direction"] == direction]
    cases = list(dict.fromkeys(part["case"]))
    impls = list(dict.fromkeys(part["impl"]))
    rows = []
    for case in cases:
        row = [case]
        for impl in impls:
            hit = part[(part["case"] == case) & (part["impl"] == impl)]
            if hit.empty:
                row.append("")
            elif hit.iloc[0]["status"] == "ok":
                r = hit.iloc[0]
                row.append(f"{r['median_us']:.1f} ({r['p20_us']:.0f}-{r['p80_us']:.0f})")
            else:
                row.append(str(hit.iloc[0]["status"]).split(":")[0])
        floor = part[part["case"] == case]["floor_us"].iloc[0]
        rows.append(row + [floor])
    return markdown_table(["case", *impls, "floor"], rows)


def _attend_table(df: pd.DataFrame) -> str:
    part = df[(df["impl"] == "attend")]
    rows = [[r["case"], r["direction"], r["status"], r["median_us"], r["floor_us"],
             r["ratio_to_floor"], r["ratio_to_fwd_floor"], r["ratio_to_dense_conv"],
             r["peak_mem_mib"]] for _, r in part.iterrows()]
    return markdown_table(["case", "direction", "status", "median us", "floor us",
                           "x floor", "x fwd floor", "x dense conv", "peak MiB"], rows)


def write_summary(df: pd.DataFrame, out_dir: Path, charts: list[Path], csv_name: str,
                  command: str) -> Path:
    first = df.iloc[0]
    cpu = first["device_type"] == "cpu"
    names = ("torch", "triton", "python", "cuda", "cudnn", "cpu_threads")
    versions = ", ".join(f"{name} {first[name]}" for name in names if name in df)
    lines = [f"# sasa-triton report: {first['device']}", ""]
    if cpu:
        lines += ["**CPU timings** (no GPU in this run): these numbers are the CPU "
                  "reference path and CPU convolutions, not GPU kernels; they check "
                  "that the harness works, not how fast the kernels are.", ""]
    lines += [
        f"* machine: {first['device']} ({first['device_type']})",
        f"* versions: {versions}",
        f"* suite: `{first['suite']}`, dtype {first['dtype']}, run at {first['date']}",
        f"* command: `{command}`",
        f"* copy bandwidth (bytes read + written): {first['copy_gbps']:.1f} GB/s; memory "
        "floor = 4 * B*H*W*C * bytes per element / bandwidth (x3 for forward + backward)",
        f"* timer: {', '.join(sorted(set(df['timer'].dropna())))}; peak memory: "
        f"{', '.join(sorted(set(df['mem_method'].dropna())))}",
        f"* data: [{csv_name}]({csv_name}) (one row per case x implementation x direction)",
        "",
    ]
    for direction, label in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        if direction in set(df["direction"]):
            lines += [f"## {label}: median latency, us (p20-p80)", "",
                      _latency_table(df, direction), ""]
    if (df["impl"] == "attend").any():
        lines += ["## attend against the floor and the dense k x k convolution", "",
                  _attend_table(df), ""]
    lines += ["## Implementations", ""]
    for impl, desc in dict(zip(df["impl"], df["impl_desc"])).items():
        lines.append(f"* `{impl}`: {desc if isinstance(desc, str) else ''}")
    lines.append("")
    failed = df[df["status"] != "ok"].fillna({"note": ""})
    if not failed.empty:
        lines += ["## Not measured", ""]
        for (impl, direction, status, note), group in failed.groupby(
                ["impl", "direction", "status", "note"], sort=False):
            why = f"{status}: {note}" if note else status
            lines.append(f"* `{impl}` {direction}: {why} (cases: {', '.join(group['case'])})")
        lines.append("")
    if charts:
        lines += ["## Charts", ""]
        for path in charts:
            if path.suffix == ".png":
                lines += [f"![{path.stem}]({path.name}) ([svg]({path.stem}.svg))", ""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path
