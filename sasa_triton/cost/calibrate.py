"""`--calibrate BENCH_CSV`: fit the issue efficiency to GPU measurements of the suite.

Reads a report CSV (python -m sasa_triton.report: columns case, B, H, W, C, heads, k,
dtype, impl, direction, status, median_us, timer, device), keeps the bf16 rows of
`attend` (dispatched) and `attend:<forward variant>` that ran, predicts each
(fwd: the forward's launches; fwdbwd: forward + the dispatched backward, as attend runs
it) and picks the efficiency in (0, 1] that minimises the squared log error
over all rows. The fit, the rows and the error are stored in calibration.json beside
the model; from then on every prediction says it is calibrated and from what.
Rows timed by plain do_bench include host time; prefer a `--cuda-graphs` report.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path

from . import model
from .predict import CaseCost, predict_case, retime
from .record import implementations

GRID = [round(0.05 + 0.005 * i, 3) for i in range(191)]  # 0.05 .. 1.0


def bench_rows(path: Path, shapes: dict) -> list[dict]:
    """The usable rows: {'shape', 'direction', 'impl', 'measured_us', 'timer', 'device'}."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            impl = row.get("impl", "")
            if row.get("status") != "ok" or not impl.startswith("attend"):
                continue
            if "bfloat16" not in row.get("dtype", "") and row.get("dtype") != "bf16":
                continue
            name = "auto" if impl == "attend" else impl.split(":", 1)[1]
            if name not in implementations("fwd") or row.get("direction") not in ("fwd", "fwdbwd"):
                continue
            shape = shapes.get(row.get("case"))
            if shape is None or any(str(getattr(shape, c)) != row.get(c, str(getattr(shape, c)))
                                    for c in ("B", "H", "W", "C", "heads", "k")):
                continue
            rows.append(dict(shape=shape, direction=row["direction"], impl=name,
                             measured_us=float(row["median_us"]), timer=row.get("timer", ""),
                             device=row.get("device", "")))
    return rows


def _predicted(parts: list[CaseCost], efficiency: float) -> float:
    return sum(retime(p, efficiency).predicted_us for p in parts)


def fit(pairs: list[tuple[list[CaseCost], float]]) -> tuple[float, float]:
    """(efficiency, rms log error) minimising sum log(predicted / measured)^2."""
    def error(e):
        return math.sqrt(sum(math.log(_predicted(parts, e) / m) ** 2 for parts, m in pairs)
                         / len(pairs))
    best = min(GRID, key=error)
    return best, error(best)


def calibrate(bench_csv: Path, shapes: dict, arch: int = 90,
              path: Path = model.CALIBRATION_FILE) -> str:
    """Fits, stores and returns a printable report (predicted against measured)."""
    rows = bench_rows(Path(bench_csv), shapes)
    if not rows:
        raise ValueError(f"{bench_csv}: no ok bf16 rows of attend / attend:<variant> on a "
                         f"known suite case (fwd or fwdbwd)")
    default = model.DEFAULT_EFFICIENCY
    pairs = []
    for r in rows:
        parts = [predict_case(r["shape"], "fwd", r["impl"], default, arch)]
        if r["direction"] == "fwdbwd":
            parts.append(predict_case(r["shape"], "bwd", "auto", default, arch))
        pairs.append((parts, r["measured_us"]))
    efficiency, rms = fit(pairs)
    devices = sorted({r["device"] for r in rows})
    lines = [f"Calibration from {bench_csv} ({', '.join(devices)}): issue efficiency "
             f"{efficiency} (default {default}); rms log error {rms:.3f} "
             f"(x{math.exp(rms):.2f})", "",
             "| case | direction | impl | timer | measured us | predicted us (fitted) | "
             "predicted us (default) |", "|---|---|---|---|---|---|---|"]
    for r, (parts, measured) in zip(rows, pairs):
        lines.append(f"| {r['shape'].name} | {r['direction']} | {r['impl']} | {r['timer']} | "
                     f"{measured:.1f} | {_predicted(parts, efficiency):.1f} | "
                     f"{_predicted(parts, default):.1f} |")
    if not any("H100" in d for d in devices):
        lines.append(f"\nWarning: the model's constants are {model.H100['name']}'s; "
                     f"this CSV comes from {devices}.")
    import triton

    Path(path).write_text(json.dumps(dict(
        efficiency=efficiency, rms_log_error=round(rms, 4), bench_csv=str(bench_csv),
        device=", ".join(devices), cases=len(rows), triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        rows=[dict(case=r["shape"].name, direction=r["direction"], impl=r["impl"],
                   measured_us=r["measured_us"]) for r in rows]), indent=1) + "\n")
    lines.append(f"\nStored in {path}.")
    return "\n".join(lines)
