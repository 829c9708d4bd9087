"""Writes one run's results: the CSV, then charts and summary.md drawn from the CSV."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .charts import draw_all
from .markdown import write_summary
from .results_csv import read_csv, write_csv
from .runner import RunResult

CSV_NAME = "results.csv"


@dataclasses.dataclass
class Outputs:
    out_dir: Path
    csv: Path
    charts: list[Path]
    summary: Path


def write_outputs(result: RunResult, out_dir: Path, command: str) -> Outputs:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / CSV_NAME
    write_csv(result.rows, csv_path)
    frame = read_csv(csv_path)  # charts and summary come from the file, not from memory
    for stale in [*out_dir.glob("*.png"), *out_dir.glob("*.svg")]:
        stale.unlink()
    charts = draw_all(frame, out_dir)
    summary = write_summary(frame, out_dir, charts, CSV_NAME, command)
    return Outputs(out_dir, csv_path, charts, summary)
