"""`python -m sasa_triton.autotune`: tune the kernels for this GPU and write its table."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import tuned_table as table
from .keys import DIRECTIONS, DTYPES, parse_cases
from .progress import fmt_seconds
from .tune_suites import SUITE_HELP, suite_cases

DESCRIPTION = """\
Benchmarks every kernel variant x pruned config for each key on this GPU and stores the
fastest in a JSON table named after the GPU (e.g. nvidia-h100-80gb-hbm3.json). `attend`
then uses the tuned kernel for calls with that key (same direction, dtype, kernel size,
dilation, heads, d, padding, rel/rpb options and power-of-two image-size bucket), and a
heuristic default for keys not in any table. Each key is written as soon as it is tuned:
an interrupted run resumes where it stopped (tuned keys are skipped unless --force).
Each candidate's result is checked against the reference first; a wrong one never wins.
Exit status: 0 done, 1 some key had no working candidate, 2 usage error or no GPU,
3 a candidate broke the CUDA context (run again to continue without it), 130 interrupted.
"""

EPILOG = """\
suites (--suite, comma-separated; default resnet50):
{suites}

keys (--key, repeatable): compact form, defaults in brackets
  B=32,H=28,W=28,heads=8,d=16,k=7[,dil=1][,padding=zeros][,rel=shared][,rpb=0]
  k and dil take 7 or 7x5 (kh x kw); padding zeros|mask|shift; rel none|shared|per_head;
  rpb 0|1. Each compact key is tuned for every --direction and --dtype. A key string as
  stored in a table (fwd-bf16-k7x7-dil1x1-heads8-d16-zeros-rel_shared-rpb0-H32xW32) is
  accepted too; it brings its own direction and dtype and is tuned at B=8 and its bucket
  size.

tables are looked up in this order: $SASA_TRITON_CACHE_DIR (default
~/.cache/sasa_triton), then the table shipped in the package, then the heuristic.
A table from another Triton version or older kernel sources is ignored with a warning.

examples:
  python -m sasa_triton.autotune --dry-run --suite all --direction both
  python -m sasa_triton.autotune --suite resnet50,det --dtype bf16,fp16
  python -m sasa_triton.autotune --key B=8,H=64,W=64,heads=4,d=32,k=9,padding=mask
"""


def build_parser() -> argparse.ArgumentParser:
    suites = "\n".join(f"  {name:<9} {text}" for name, text in SUITE_HELP.items())
    p = argparse.ArgumentParser(
        prog="python -m sasa_triton.autotune", description=DESCRIPTION,
        epilog=EPILOG.format(suites=suites), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None,
                   help="named suites of keys, comma-separated (default: resnet50 when no --key)")
    p.add_argument("--key", action="append", default=[], metavar="SPEC",
                   help="a key to tune (compact form below); repeatable, adds to --suite")
    p.add_argument("--direction", choices=("fwd", "bwd", "both"), default="both",
                   help="forward, backward or both kernels (default: both)")
    p.add_argument("--dtype", default="bf16",
                   help=f"dtypes, comma-separated, of {', '.join(DTYPES)} (default: bf16)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, metavar="DIR",
                       help="folder of the table (default: the user cache dir, "
                            "$SASA_TRITON_CACHE_DIR or ~/.cache/sasa_triton)")
    where.add_argument("--ship", action="store_true",
                       help="write the table shipped inside the package (autotune/tables/), "
                            "to commit it")
    p.add_argument("--force", action="store_true", help="re-tune keys already in the table")
    p.add_argument("--dry-run", action="store_true",
                   help="list keys x variants x config counts and the time estimate, tune "
                        "nothing (needs no GPU)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N configs per variant and key: the variant's default, then "
                        "evenly spaced picks (a quick table when device time is short)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking each candidate's result against the reference")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: rehearse on CPU through Triton's interpreter (TRITON_INTERPRET=1; "
                        "tiny --key shapes): the table, named 'cpu-interpreter', proves the "
                        "pipeline and attend never reads it (default: cuda)")
    return p


def _cases(ns, parser) -> list:
    directions = DIRECTIONS if ns.direction == "both" else (ns.direction,)
    dtypes = tuple(filter(None, (s.strip() for s in ns.dtype.split(","))))
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        parser.error(f"--dtype: unknown {', '.join(bad) or 'empty list'}; "
                     f"choose from {', '.join(DTYPES)}")
    suites = ns.suite if ns.suite is not None else ("" if ns.key else "resnet50")
    try:
        cases = suite_cases([s.strip() for s in suites.split(",") if s.strip()],
                            directions, dtypes)
        for spec in ns.key:
            cases += parse_cases(spec, directions, dtypes)
    except ValueError as e:
        parser.error(str(e))
    seen, unique = set(), []
    for c in cases:
        if c.key not in seen:
            seen.add(c.key)
            unique.append(c)
    return unique


CPU_TABLE_NAME = "cpu-interpreter"  # the --device cpu rehearsal's table (never looked up)


def _gpu(device: str = "cuda") -> Optional[str]:
    import torch

    if device == "cpu":
        return CPU_TABLE_NAME
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _cpu_timer(fn) -> float:
    """Median milliseconds of three calls on CPU (the --device cpu rehearsal)."""
    import time

    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[1] * 1e3


def dry_run(cases, out_dir, gpu: Optional[str], stream=None, limit=None) -> None:
    from .tuner import estimate_seconds, plan

    stream = sys.stdout if stream is None else stream
    items = plan(cases, limit=limit)
    done = {}
    path = table.table_path(out_dir, gpu) if gpu else None
    if path is not None:
        done = table.load_entries(path, gpu) or {}
    names = sorted({n for it in items for n in it.counts})
    width = max([len(str(c.key)) for c in cases] + [3])
    stream.write(f"GPU: {gpu or 'none found (dry run)'}; table: "
                 f"{path or table.table_path(out_dir, '<gpu name>')}\n")
    head = f"{'key':<{width}}  {'B x H x W':<12}" + "".join(f"{n:>10}" for n in names)
    stream.write(head + f"{'candidates':>12}\n")
    todo = []
    for it in items:
        c = it.case
        tuned = str(c.key) in done
        row = f"{str(c.key):<{width}}  {f'{c.B}x{c.H}x{c.W}':<12}"
        row += "".join(f"{it.counts.get(n, 0):>10}" for n in names)
        row += f"{len(it.candidates):>12}" + ("  (tuned: skipped)" if tuned else "")
        stream.write(row + "\n")
        if not tuned:
            todo.append(it)
    for note in dict.fromkeys(n for it in items for n in it.notes):  # once each, in order
        stream.write(f"note: {note}\n")
    total = sum(len(it.candidates) for it in todo)
    if not names:
        stream.write("no kernel variants are registered in sasa_triton.kernels for these "
                     "directions: nothing to tune\n")
    stream.write(f"total: {len(items)} keys ({len(items) - len(todo)} already tuned), "
                 f"{total} candidates, estimated {fmt_seconds(estimate_seconds(todo))} "
                 f"(~3 s per forward candidate, ~6 s per backward; compile dominates)\n")


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.limit is not None and ns.limit < 1:
        parser.error("--limit must be >= 1")
    if ns.device == "cpu":
        if ns.ship:
            parser.error("--device cpu tables are rehearsals: they are never shipped")
        import os
        # the kernels become interpreted functions only if this is set before they load
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cases = _cases(ns, parser)
    out_dir = table.shipped_dir() if ns.ship else (ns.out or table.user_dir())
    gpu = _gpu(ns.device)
    if ns.dry_run:
        dry_run(cases, out_dir, gpu, limit=ns.limit)
        return 0
    if gpu is None:
        sys.stderr.write("sasa_triton.autotune: no CUDA GPU found; tuning times kernels on "
                         "the GPU it tunes for. Run it on that GPU, or use --dry-run to list "
                         "the keys, candidates and the time estimate.\n")
        return 2
    from .lookup import clear_cache
    from .tuner import ContextLost, tune

    path = table.table_path(out_dir, gpu)
    try:
        on_cpu = ns.device == "cpu"
        summary = tune(cases, path, gpu, force=ns.force, verify=not ns.no_verify,
                       limit=ns.limit, device=ns.device,
                       timer=_cpu_timer if on_cpu else None)
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted: the keys tuned so far are in {path}; run the same "
                         f"command again to resume.\n")
        return 130
    except ContextLost as e:
        sys.stderr.write(f"\n{e}\n")
        return 3
    clear_cache()
    counts = {}
    for s in summary:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    print(f"{path}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
