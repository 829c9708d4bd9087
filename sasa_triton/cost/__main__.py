"""python -m sasa_triton.cost [--suite resnet50,det] [--impl auto,tiled,...]
[--direction fwd,bwd] [--arch sm_90] [--out DIR] [--calibrate BENCH_CSV]
[--update-baseline PATH] [--watch-json PATH]

Runs on CPU (no GPU): compiles with Triton's real compiler, so it re-runs itself
without TRITON_INTERPRET when that is set.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path


def _reexec_without_interpreter(argv: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "sasa_triton.cost", *argv], env)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m sasa_triton.cost", description=(
        "Predicted (not measured) H100 cost of attend's launches, read from the sm_90 "
        "machine code that Triton's compiler produces. CPU only."))
    p.add_argument("--suite", default="resnet50,det",
                   help="comma-separated report suites (resnet50, det, ksweep, heads, all, "
                        "quick) or case names (s1, det, ...); default resnet50,det")
    p.add_argument("--impl", default=None,
                   help="comma-separated: auto (dispatched) and variant names; default all")
    p.add_argument("--direction", default="fwd,bwd", help="fwd, bwd or fwd,bwd")
    p.add_argument("--arch", default="sm_90", help="compile target (model constants: H100)")
    p.add_argument("--out", default=None, help="folder for the CSVs and predicted.md (default "
                   "reports/cost; with --update-baseline / --watch-json only when given)")
    p.add_argument("--calibrate", metavar="BENCH_CSV", default=None,
                   help="fit the issue efficiency to a GPU report CSV and store it")
    p.add_argument("--update-baseline", metavar="PATH", default=None,
                   help="write the watch set's instruction totals for this Triton version")
    p.add_argument("--watch-json", metavar="PATH", default=None,
                   help="write the watch set's instruction totals as JSON (the test uses it)")
    return p.parse_args(argv)


def _shapes(spec: str) -> list:
    from .cases import shapes

    try:
        return shapes(spec)
    except ValueError as error:
        raise SystemExit(f"--suite: {error}") from None


def _arch(text: str) -> int:
    digits = text.lower().removeprefix("sm_").removeprefix("sm")
    if not digits.isdigit():
        raise SystemExit(f"--arch must look like sm_90, got {text!r}")
    return int(digits)


def _split(text: str, allowed, name: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"--{name}: unknown {bad}; known: {list(allowed)}")
    return items


def run_cases(shapes, directions, impls, arch, efficiency, log=print) -> list:
    from .predict import predict_case
    from .record import implementations

    cases = []
    for shape in shapes:
        for direction in directions:
            for impl in implementations(direction):
                if impls is not None and impl not in impls:
                    continue
                t = time.time()
                try:
                    case = predict_case(shape, direction, impl, efficiency, arch)
                except ValueError as error:
                    log(f"  {shape.name} {direction} {impl}: skipped ({error})")
                    continue
                cases.append(case)
                log(f"  {shape.name} {direction} {impl} -> {case.variant}: "
                    f"{case.predicted_us:.1f} us predicted ({time.time() - t:.1f} s)")
    return cases


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        _reexec_without_interpreter(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; no notice
    args = parse_args(argv)
    start = time.time()
    import triton

    from . import baseline, model, output
    from .record import implementations

    arch = _arch(args.arch)
    calibration = model.load_calibration()
    if args.calibrate:
        from .calibrate import calibrate
        from .cases import by_name

        print(calibrate(Path(args.calibrate), by_name(), arch))
        return 0

    watch = args.update_baseline or args.watch_json
    if watch:
        from .cases import by_name

        named = by_name()
        cases = []
        for name, direction in baseline.WATCH:
            cases += run_cases([named[name]], [direction], ["auto"], arch,
                               calibration.efficiency)
        totals = baseline.totals(cases)
        if args.update_baseline:
            baseline.write(Path(args.update_baseline), triton.__version__, f"sm_{arch}", totals)
            print(f"baseline for Triton {triton.__version__} written to {args.update_baseline}")
        if args.watch_json:
            Path(args.watch_json).write_text(json.dumps(
                {"triton": triton.__version__, "arch": f"sm_{arch}", "launches": totals},
                indent=1))
    else:
        directions = _split(args.direction, ("fwd", "bwd"), "direction")
        known = sorted(set(implementations("fwd")) | set(implementations("bwd")))
        impls = None if args.impl is None else _split(args.impl, known, "impl")
        print(f"Compiling attend's launches for sm_{arch} (Triton {triton.__version__}, CPU):")
        cases = run_cases(_shapes(args.suite), directions, impls, arch, calibration.efficiency)

    meta = dict(triton=triton.__version__, arch=f"sm_{arch}")
    command = "python -m sasa_triton.cost " + shlex.join(argv)
    paths = []
    if args.out is not None or not watch:
        out = Path(args.out or "reports/cost")
        paths = output.write_all(cases, calibration, meta, out, command.strip())
    print()
    print(f"{output.PREDICTED}; model {calibration.label()}")
    print()
    print("\n".join(output.summary_table(cases)))
    print()
    print(f"Wrote {', '.join(str(p) for p in paths) or 'no tables'} in "
          f"{time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
