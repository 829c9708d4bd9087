"""The GPU campaign: every GPU-owed number of the project in one short GPU window.

    scripts/gpu_campaign.sh STEP... [--out DIR] [--rehearse]

Steps (budget on an H100; each stops at its budget, a failing one does not stop the
others): install, check, tune, bench, report, e2e, sanitize, or all (in that order).
Results accumulate in a work folder (default .campaign/gpu, or .campaign/rehearsal),
one sub-folder per step, with machine.json, steps.json and summary.md; after the steps
it is packed into DIR/gpu-results.tar.gz (and DIR/summary.md), so a GPU session that
runs one step per command gets every step run so far back in one file. Ingest with
scripts/ingest_gpu_results.py. --rehearse runs every step on CPU (Triton's interpreter,
toy sizes, tables in a temporary folder) in about 5 minutes, same layout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign import machine as machine_mod  # noqa: E402
from campaign import pack as pack_mod  # noqa: E402
from campaign.steps import ORDER, STEPS, Context, import_check, install  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/gpu_campaign.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1],
        epilog="budgets (GPU / rehearsal, seconds):\n" + "\n".join(
            f"  {s.name:<9} {s.gpu_budget_s:>4} / {s.rehearse_budget_s:<4} {s.what}"
            for s in STEPS.values()))
    p.add_argument("steps", nargs="+", metavar="STEP", choices=ORDER + ["all"],
                   help=f"{', '.join(ORDER)} or all")
    p.add_argument("--out", type=Path, default=REPO / ".campaign",
                   help="folder that receives gpu-results.tar.gz and summary.md "
                        "(default .campaign; on the GPU machine: $OUT)")
    p.add_argument("--work", type=Path, default=None,
                   help="results folder that is packed (default .campaign/gpu or "
                        ".campaign/rehearsal; kept between runs so steps accumulate)")
    p.add_argument("--rehearse", action="store_true",
                   help="run on CPU: Triton's interpreter, toy sizes, tables in a temp folder")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the steps (default: this one)")
    return p.parse_args(argv)


def step_list(names: list) -> list:
    wanted = ORDER if "all" in names else names
    return [n for n in ORDER if n in wanted]  # the campaign's order, each once


def base_env(rehearse: bool, cache: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_NO_INDEX="1", MPLBACKEND="Agg",
               PIP_DISABLE_PIP_VERSION_CHECK="1", SASA_TRITON_CACHE_DIR=str(cache))
    if rehearse:
        env.update(TRITON_INTERPRET="1", SASA_CAMPAIGN_REHEARSE="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
        env.pop("SASA_CAMPAIGN_REHEARSE", None)
        env["SASA_TEST_REAL_GPU"] = "1"
    return env


def user_table_dir() -> Path:
    """Where attend looks up the user's tables (sasa_triton.autotune's rule)."""
    env = os.environ.get("SASA_TRITON_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sasa_triton"


def probe_machine(python: str, env: dict) -> dict:
    try:
        out = subprocess.run([python, str(Path(machine_mod.__file__)), str(REPO)], env=env,
                             capture_output=True, text=True, timeout=180)
        return json.loads(out.stdout) if out.returncode == 0 else {
            "probe_error": out.stderr.strip()[-2000:],
            "kernels_hash": machine_mod.kernels_hash(REPO / "kernels")}
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"probe_error": f"{type(e).__name__}: {e}",
                "kernels_hash": machine_mod.kernels_hash(REPO / "kernels")}


def load_records(work: Path, kernels_hash: str, say) -> dict:
    """Earlier steps' records in this work folder; those made from other kernel sources
    are dropped with their folders (they would not match this tree)."""
    path = work / "steps.json"
    records = json.loads(path.read_text()) if path.exists() else {}
    for name, rec in list(records.items()):
        if rec.get("kernels_hash") != kernels_hash:
            say(f"dropping the earlier {name} results: made from other kernel sources")
            shutil.rmtree(work / name, ignore_errors=True)
            del records[name]
    return records


def write_summary(work: Path, records: dict, info: dict, rehearse: bool) -> str:
    mode = "CPU rehearsal (Triton interpreter, toy sizes: no GPU numbers)" if rehearse \
        else f"GPU run on {info.get('gpu') or 'NO GPU FOUND'}"
    lines = [f"# GPU campaign: {mode}", "",
             f"torch {info.get('torch')}, Triton {info.get('triton')}, Python "
             f"{info.get('python')}, driver {info.get('driver')}, CUDA {info.get('torch_cuda')}, "
             f"kernels {str(info.get('kernels_hash'))[:12]}, commit "
             f"{info.get('git_commit') or 'unknown'}{' (dirty)' if info.get('git_dirty') else ''}",
             "", "| step | budget s | took s | status | detail |", "|---|---|---|---|---|"]
    for name in ORDER:
        if name in records:
            r = records[name]
            detail = str(r["detail"]).replace("|", "/").replace("\n", " ")[:400]
            lines.append(f"| {name} | {r['budget_s']} | {r['seconds']:.0f} | {r['status']} | "
                         f"{detail} |")
    table = work / "bench" / "table.md"
    if "bench" in records and table.exists():
        lines += ["", "## bench: attend (dispatched) per case", "", table.read_text()]
    text = "\n".join(lines) + "\n"
    (work / "summary.md").write_text(text)
    return text


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    names = step_list(args.steps)
    mode = "rehearsal" if args.rehearse else "gpu"
    work = (args.work or REPO / ".campaign" / mode).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "campaign.log", "a")

    def say(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    budget = lambda s: s.rehearse_budget_s if args.rehearse else s.gpu_budget_s  # noqa: E731
    say(f"== sasa-triton GPU campaign ({mode}): {' '.join(names)}; budgets: " + ", ".join(
        f"{n} {budget(STEPS[n])} s" for n in names) +
        f"; total {sum(budget(STEPS[n]) for n in names) / 60:.1f} min")
    temp_tables = Path(tempfile.mkdtemp(prefix="sasa-campaign-tables-")) if args.rehearse \
        else None
    env = base_env(args.rehearse, temp_tables or user_table_dir())
    info = probe_machine(args.python, env)
    info.update(mode=mode, command=" ".join(sys.argv), tables_dir=env["SASA_TRITON_CACHE_DIR"])
    (work / "machine.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    say(f"machine: {info.get('gpu') or 'no GPU'}; torch {info.get('torch')}, Triton "
        f"{info.get('triton')}, kernels {str(info.get('kernels_hash'))[:12]}")
    records = load_records(work, info["kernels_hash"], say)

    no_gpu = None if args.rehearse or info.get("cuda_available") else (
        "no CUDA GPU visible (torch.cuda.is_available() is False); on CPU use --rehearse")
    installed = True
    signal.signal(signal.SIGTERM, _interrupt)
    for name in names:
        step = STEPS[name]
        shutil.rmtree(work / name, ignore_errors=True)
        start = time.time()
        ctx = Context(REPO, work, args.rehearse, args.python, env, start + budget(step), say)
        say(f"== {name} (budget {budget(step)} s): {step.what}")
        try:
            if no_gpu and name != "install":
                status, detail = "failed", no_gpu
            elif (name != "install" and not args.rehearse
                  and not import_check(ctx, ctx.dir(name) / "imports.log").ok):
                if not installed:
                    status, detail = "failed", "sasa_triton does not import from this " \
                        "checkout (imports.log) and the install step failed"
                else:  # a fresh GPU machine: install first, on this step's clock
                    say("  the package is not installed here: running install first")
                    installed = install(ctx)[0] == "ok"
                    status, detail = step.run(ctx) if installed else (
                        "failed", "install failed (install/pip.log, install/imports.log)")
            else:
                status, detail = step.run(ctx)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: record, pack what there is, stop
            status, detail = "interrupted", "the campaign was interrupted during this step"
        except Exception:  # a broken step is recorded; the next one runs
            status, detail = "failed", traceback.format_exc().strip().splitlines()[-1]
            (ctx.dir(name) / "error.log").write_text(traceback.format_exc())
        if name == "install" and status != "ok":
            installed = False
        seconds = time.time() - start
        records[name] = dict(status=status, detail=detail, seconds=round(seconds, 1),
                             budget_s=budget(step), kernels_hash=info["kernels_hash"],
                             git_commit=info.get("git_commit"), finished=time.strftime(
                                 "%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        say(f"== {name}: {status} in {seconds:.0f} s: {detail}")
        (work / "steps.json").write_text(json.dumps(records, indent=1) + "\n")
        if status == "interrupted":
            names = names[:names.index(name) + 1]
            break

    summary = write_summary(work, records, info, args.rehearse)
    log_file.close()
    tarball, size, left_out = pack_mod.pack(work, args.out)
    shutil.copy2(work / "summary.md", args.out / "summary.md")
    if temp_tables:
        shutil.rmtree(temp_tables, ignore_errors=True)
    print("\n" + summary)
    print(f"packed {tarball} ({size / 2**20:.2f} MiB)"
          + (f"; left out to stay under the limit: {', '.join(left_out)}" if left_out else ""))
    bad = [n for n in names if records[n]["status"] not in ("ok", "not available")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
