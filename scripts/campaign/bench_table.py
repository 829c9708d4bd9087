"""The bench step's short table: attend per case and direction against the floor and
every baseline, from the report's CSV (`python bench_table.py results.csv`)."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

COLUMNS = [("median_us", "us"), ("ratio_to_floor", "x floor"),
           ("ratio_to_dense_conv", "x conv kxk"), ("ratio_to_conv_3x3", "x conv 3x3"),
           ("ratio_to_depthwise_conv", "x dw kxk"), ("ratio_to_flex_na_rel", "x flex+rel"),
           ("ratio_to_unfold", "x unfold"), ("host_us", "host us"),
           ("peak_mem_mib", "peak MiB")]


def _fmt(value: str) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(x):
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(csv_path: Path, impl: str = "attend") -> str:
    """A markdown table of `impl`'s rows; the fastest forced variant per row beside it."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    best: dict = {}
    for r in rows:
        if r["impl"].startswith("attend:") and r["status"] == "ok":
            key = (r["case"], r["direction"])
            if key not in best or float(r["median_us"]) < float(best[key]["median_us"]):
                best[key] = r
    head = ["case", "dir", "status"] + [name for _, name in COLUMNS] + ["fastest variant"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["impl"] != impl:
            continue
        b = best.get((r["case"], r["direction"]))
        fastest = f"{b['impl'][7:]} {_fmt(b['median_us'])} us" if b else "-"
        cells = [r["case"], r["direction"], r["status"][:30]]
        cells += [_fmt(r.get(col, "")) for col, _ in COLUMNS] + [fastest]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(Path(sys.argv[1])), end="")
