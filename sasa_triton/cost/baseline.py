"""The instruction watch: dynamic instruction totals of dispatched launches against a
committed baseline (tests/cost_baseline.json, keyed by Triton version).

The watch set is a small representative subset of the resnet50 suite, so that CI
compiles only five kernels: s1 forward (tile2d), s2 forward (tiled, 1 warp),
s3 forward (tiled, 4 warps) and s2 backward (offsets: dq and dk/dv kernels). A launch is
keyed by case, direction and its position among the case's launches (not by kernel name,
so renaming a kernel is not a change; a different dispatch is).
Update after an intended change (the diff then shows the cost in review):

    python -m sasa_triton.cost --update-baseline tests/cost_baseline.json
"""
from __future__ import annotations

import json
from pathlib import Path

WATCH = [("s1", "fwd"), ("s2", "fwd"), ("s3", "fwd"), ("s2", "bwd")]
TOLERANCE = 0.10  # more than 10% more dynamic instructions in any launch fails


def totals(cases) -> dict:
    """{"case/direction/#i": {"kernel", "warp_instructions"}} of CaseCosts."""
    out = {}
    for c in cases:
        for i, x in enumerate(c.launches):
            out[f"{c.shape.name}/{c.direction}/#{i}"] = {
                "kernel": x.report.kernel, "warp_instructions": round(x.report.warp_instructions)}
    return out


def compare(current: dict, baseline: dict, tolerance: float = TOLERANCE) -> list[str]:
    """Problems of `current` against `baseline` (both as `totals` returns): a launch with
    more than `tolerance` more instructions, or a launch added or removed."""
    problems = []
    for key, now in current.items():
        was = baseline.get(key)
        if was is None:
            problems.append(f"{key} ({now['kernel']}): not in the baseline")
            continue
        n, b = now["warp_instructions"], was["warp_instructions"]
        if n > b * (1 + tolerance):
            problems.append(f"{key} ({now['kernel']}): {n:,} dynamic warp instructions, "
                            f"{100 * (n / b - 1):+.1f}% over the baseline {b:,} "
                            f"({was['kernel']})")
    for key in baseline:
        if key not in current:
            problems.append(f"{key} ({baseline[key]['kernel']}): in the baseline, not launched now")
    return problems


def read(path: Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {"versions": {}}


def entry(path: Path, triton_version: str):
    """The baseline totals recorded with this Triton version, or None."""
    return read(path)["versions"].get(triton_version)


def write(path: Path, triton_version: str, arch: str, current: dict) -> None:
    """Stores `current` as the baseline of this Triton version (other versions are kept)."""
    data = read(path)
    data["about"] = ("Dynamic warp instructions of dispatched launches (python -m "
                     "sasa_triton.cost); update: python -m sasa_triton.cost --update-baseline "
                     "tests/cost_baseline.json")
    data["versions"][triton_version] = {"arch": arch, "launches": current}
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
