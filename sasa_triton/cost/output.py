"""The tool's files: cases.csv, launches.csv, loops.csv and predicted.md (all PREDICTED)."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from . import classes, model
from .predict import CaseCost

PREDICTED = "PREDICTED (static model, not measured on a GPU)"


def case_rows(cases: list[CaseCost], calibration: model.Calibration, meta: dict) -> list[dict]:
    rows = []
    for c in cases:
        s = c.shape
        rows.append(dict(
            case=s.name, B=s.B, H=s.H, W=s.W, C=s.C, heads=s.heads, d=s.d, k=s.k,
            direction=c.direction, impl=c.impl, variant=c.variant,
            config=json.dumps(c.config, sort_keys=True) if c.config else "",
            triton_launches=len(c.launches), glue_kernels=c.glue_kernels,
            warp_instructions=round(c.warp_instructions),
            instr_per_pixel_head_tap=round(c.instructions_per_tap, 2),
            l2_bytes=round(sum(x.report.l2_bytes for x in c.launches)),
            hbm_bytes=sum(x.report.hbm_bytes for x in c.launches),
            issue_us=round(c.bound_time("issue"), 2), l2_us=round(c.bound_time("L2"), 2),
            hbm_us=round(c.bound_time("HBM"), 2),
            latency_us=round(sum(x.time.launch_us for x in c.launches)
                             + model.glue_us(c.glue_kernels), 2),
            predicted_us=round(c.predicted_us, 1), fwd_floor_us=round(c.floor_us, 2),
            ratio_to_floor=round(c.ratio_to_floor, 1), bound=c.bound,
            efficiency=calibration.efficiency, calibrated=calibration.calibrated,
            note=c.notes, **meta))
    return rows


def launch_rows(cases: list[CaseCost]) -> list[dict]:
    rows = []
    for c in cases:
        for x in c.launches:
            r = x.report
            row = dict(case=c.shape.name, direction=c.direction, impl=c.impl, kernel=r.kernel,
                       grid="x".join(map(str, r.grid)), programs=r.programs,
                       num_warps=r.num_warps, num_stages=r.num_stages, regs=r.regs,
                       spill_bytes=r.spill_bytes, shared_bytes=r.shared,
                       resident_per_sm=x.resident, static_instructions=r.static_instructions,
                       warp_instr_per_program=round(r.warp_instructions_per_program),
                       warp_instructions=round(r.warp_instructions),
                       l2_bytes=round(r.l2_bytes), hbm_bytes=r.hbm_bytes,
                       issue_us=round(x.time.issue_us, 2), l2_us=round(x.time.l2_us, 2),
                       hbm_us=round(x.time.hbm_us, 2), predicted_us=round(x.time.total_us, 2),
                       bound=x.time.bound, note=r.note)
            for cls in classes.CLASSES:  # dynamic warp instructions of the launch, by class
                row[f"dyn_{cls}"] = round(r.per_program[cls] * r.num_warps * r.programs)
            rows.append(row)
    return rows


def _mem(counter) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(counter.items()))


def loop_rows(cases: list[CaseCost]) -> list[dict]:
    rows, seen = [], set()
    for c in cases:
        for x in c.launches:
            r = x.report
            key = (c.shape.name, c.direction, c.variant, r.kernel)
            if key in seen:  # "auto" and the forced variant it picked read the same
                continue
            seen.add(key)
            regions = [("outside loops", 0, "", "", "-", 1, 1, r.outside, r.outside_mem)]
            if r.cold:
                regions.append(("cold ifs", 0, "", "", "body of an if entered only on "
                                "non-finite input (slow pass)", 0, 0, r.cold, Counter()))
            regions += [(f"loop {lp.index}", lp.depth, f"{lp.start:#06x}", f"{lp.end:#06x}",
                         lp.name, lp.trips, lp.iterations, lp.body, lp.mem) for lp in r.loops]
            for region, depth, start, end, name, trips, iterations, body, mem in regions:
                row = dict(case=c.shape.name, direction=c.direction, variant=c.variant,
                           kernel=r.kernel, region=region, depth=depth, start=start, end=end,
                           walks=name, trips=trips, iterations_per_program=iterations,
                           body_instructions=sum(body.values()))
                row.update({cls: body[cls] for cls in classes.CLASSES})
                row["memory_widths"] = _mem(mem)
                rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def summary_table(cases: list[CaseCost]) -> list[str]:
    """Dispatched forward and backward per case: predicted us and ratio to the fwd floor."""
    by = {(c.shape.name, c.direction, c.impl): c for c in cases}
    names = list(dict.fromkeys(c.shape.name for c in cases))
    lines = ["| case | fwd floor us | dispatched fwd | fwd us (x floor) | bound | bwd us | bound "
             "| fwd+bwd us (x fwd floor) | fwd / bwd warp instr per (pixel, head, tap) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        f, b = by.get((name, "fwd", "auto")), by.get((name, "bwd", "auto"))
        if f is None and b is None:
            continue
        ref = f or b
        cells = [name, f"{ref.floor_us:.1f}"]
        cells += [f"{f.variant}" if f else "", f"{_fmt(f.predicted_us)} ({f.ratio_to_floor:.0f}x)"
                  if f else "", f.bound if f else ""]
        cells += [_fmt(b.predicted_us) if b else "", b.bound if b else ""]
        if f and b:
            total = f.predicted_us + b.predicted_us
            cells.append(f"{_fmt(total)} ({total / ref.floor_us:.0f}x)")
        else:
            cells.append("")
        cells.append(" / ".join(f"{c.instructions_per_tap:.1f}" if c else "-" for c in (f, b)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def all_cases_table(cases: list[CaseCost]) -> list[str]:
    lines = ["| case | dir | impl | ran | predicted us | x fwd floor | issue / L2 / HBM us | "
             "bound | warp instr per (pixel, head, tap) | launches (+ glue) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(
            f"| {c.shape.name} | {c.direction} | {c.impl} | {c.variant} | {_fmt(c.predicted_us)} "
            f"| {c.ratio_to_floor:.1f} | {c.bound_time('issue'):.0f} / {c.bound_time('L2'):.0f} / "
            f"{c.bound_time('HBM'):.0f} | {c.bound} | {c.instructions_per_tap:.1f} | "
            f"{len(c.launches)} (+{c.glue_kernels}) |")
    return lines


def launches_table(cases: list[CaseCost]) -> list[str]:
    lines = ["| case | dir | kernel | grid | warps | regs | spill B | smem B | programs/SM "
             "| loops: walks x iterations (body instr) |", "|---" * 10 + "|"]
    for c in cases:
        if c.impl != "auto":
            continue
        for x in c.launches:
            r = x.report
            loops = "; ".join(f"{lp.name} x{lp.iterations} ({sum(lp.body.values())})"
                              for lp in r.loops)
            lines.append(f"| {c.shape.name} | {c.direction} | {r.kernel} | "
                         f"{'x'.join(map(str, r.grid))} | {r.num_warps} | {r.regs} | "
                         f"{r.spill_bytes} | {r.shared} | {x.resident} | {loops} |")
    return lines


def markdown(cases: list[CaseCost], calibration: model.Calibration, meta: dict,
             command: str) -> str:
    notes = sorted({c.notes for c in cases if c.notes})
    gpu = model.H100
    parts = [
        f"# Predicted cost of attend's launches: {PREDICTED}",
        "",
        f"Command: `{command}`  ",
        f"Triton {meta['triton']}, {meta['arch']}, bf16; model constants: {gpu['name']} "
        f"({gpu['sms']} SMs x {gpu['issue_per_clock']} warp instr/clock x "
        f"{gpu['clock_ghz']} GHz, L2 {gpu['l2_gbps'] / 1e3:.1f} TB/s, HBM "
        f"{gpu['hbm_gbps'] / 1e3:.2f} TB/s, {gpu['launch_us']} us per launch).  ",
        f"Model: {calibration.label()}.",
        "",
        "predicted = max(issue-bound, L2-bound, HBM-bound) + launch latency, per launch; "
        "floor = 4 B H W C bytes / HBM bandwidth (the forward's; fwd+bwd is compared to it "
        "too). Dispatched = the heuristic with no tuned table.",
        "",
        "## Dispatched (auto), forward and backward",
        "",
        *summary_table(cases),
        "",
        "## Every implementation",
        "",
        *all_cases_table(cases),
        "",
        "## Dispatched launches",
        "",
        *launches_table(cases),
        "",
    ]
    if notes:
        parts += ["## Notes", "", *[f"* {n}" for n in notes], ""]
    parts += ["Per-loop instruction classes: loops.csv; per-launch dynamic totals by class: "
              "launches.csv.", ""]
    return "\n".join(parts)


def write_all(cases: list[CaseCost], calibration: model.Calibration, meta: dict, out: Path,
              command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("cases.csv", case_rows(cases, calibration, meta)),
                       ("launches.csv", launch_rows(cases)), ("loops.csv", loop_rows(cases))):
        write_csv(rows, out / name)
        paths.append(out / name)
    md = out / "predicted.md"
    md.write_text(markdown(cases, calibration, meta, command))
    paths.append(md)
    return paths
