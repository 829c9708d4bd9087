"""`python -m sasa_triton.report`: benchmark attend against its peers; CSV, charts, summary."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from ..perf_suite import SUITES


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sasa_triton.report",
        description="Latency and peak memory of sasa_triton.attend next to the unfold SASA "
                    "port, FlexAttention and the cuDNN convolutions it replaces.")
    p.add_argument("--suite", choices=sorted(SUITES) + ["host"],
                   help="cases to run (default: resnet50 on a GPU, quick on CPU); 'host': "
                        "the host time of one attend call (docs/host.md)")
    p.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--direction", default="both", choices=["fwd", "fwdbwd", "both"])
    p.add_argument("--out", type=Path,
                   help="output folder (default: reports/<gpu-name>/, or reports/cpu/)")
    p.add_argument("--impl", help="comma-separated glob patterns of implementations to run, "
                                  "e.g. 'attend*,conv_kxk' (conv_kxk feeds ratio_to_dense_conv)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--cpu-budget", type=float, default=0.15,
                   help="seconds of timed calls per measurement on CPU (default 0.15)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on CUDA, time by CUDA graph replay (no host overhead; for tiny "
                        "shapes); implementations that cannot be captured use do_bench")
    p.add_argument("--min-reps", type=int, default=3,
                   help="fewest timed calls per measurement on CPU (default 3)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default 1; 0 keeps torch's default)")
    p.add_argument("--host-reps", type=int, default=500,
                   help="--suite host: timed calls per case and direction (default 500)")
    p.add_argument("--list", action="store_true", help="print suites and implementations")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, extra_impls: tuple = ()) -> object:
    args = parse_args(argv)
    import torch

    from .impls import default_impls
    from .runner import default_out_dir, run_suite

    if args.list:
        device_type = torch.device(args.device or ("cuda" if torch.cuda.is_available()
                                                   else "cpu")).type
        for name, shapes in SUITES.items():
            print(f"suite {name}: {', '.join(s.name for s in shapes)}")
        for impl in default_impls(device_type):
            print(f"impl {impl.name} ({impl.family}): {impl.desc}")
        return None

    command = "python -m sasa_triton.report " + shlex.join(argv if argv is not None
                                                            else sys.argv[1:])
    if args.suite == "host":
        from . import host

        return host.main(args, command.strip())

    from .output import write_outputs

    result = run_suite(suite=args.suite, dtype=args.dtype, direction=args.direction,
                       impl_filter=args.impl, device=args.device, budget_s=args.cpu_budget,
                       extra_impls=extra_impls, cpu_threads=args.cpu_threads or None,
                       min_reps=args.min_reps, cuda_graphs=args.cuda_graphs)
    out_dir = args.out or default_out_dir(result.machine)
    outputs = write_outputs(result, out_dir, command.strip())
    failed = sum(r["status"] != "ok" for r in result.rows)
    print(f"wrote {outputs.csv} ({len(result.rows)} rows, {failed} not ok), "
          f"{len(outputs.charts)} chart files and {outputs.summary}")
    return outputs


if __name__ == "__main__":
    main()
