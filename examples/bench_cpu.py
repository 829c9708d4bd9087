"""CPU latency of `attend`'s CPU path next to the unfold SASA port and the reference.

Same process, same inputs (the report's: random q, k, v and shared SASA rel tables,
padding="zeros", float32), the implementations interleaved rep by rep, median of
repeats after a warm-up. Shapes: the report's `quick` suite and the paper's ResNet-50
stages at small batch.

    python examples/bench_cpu.py [--threads 1] [--batch 1] [--reps 20] [--suite quick,resnet]
    python examples/bench_cpu.py --threads 1 --timer thread   # steadier on a busy machine

Prints one row per shape and direction: milliseconds per call, and cpu / port.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

import sasa_triton
from sasa_triton.perf_suite import QUICK, RESNET50
from sasa_triton.report.baselines import unfold_attend

TIMER = time.perf_counter  # --timer thread: time.thread_time (CPU time, one thread only)
IMPLS = {
    "cpu": lambda q, k, v, ks, rh, rw: sasa_triton.attend(q, k, v, ks, rel_h=rh, rel_w=rw,
                                                          backend="cpu"),
    "port": lambda q, k, v, ks, rh, rw: unfold_attend(q, k, v, ks, rel_h=rh, rel_w=rw),
    "reference": lambda q, k, v, ks, rh, rw: sasa_triton.attend(q, k, v, ks, rel_h=rh, rel_w=rw,
                                                                backend="reference"),
}


def bench_shape(shape, reps: int) -> dict:
    """{impl: (forward ms, forward+backward ms)}: medians, the impls interleaved rep by
    rep so that a busy machine slows them alike."""
    g = torch.Generator().manual_seed(0)
    B, H, W, N, D, ks = shape.B, shape.H, shape.W, shape.heads, shape.d, shape.k
    q, k, v = (torch.randn(B, H, W, N, D, generator=g) for _ in range(3))
    rel_h = torch.randn(ks, D // 2, generator=g) * 0.5
    rel_w = torch.randn(ks, D - D // 2, generator=g) * 0.5
    dout = torch.randn(B, H, W, N, D, generator=g)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    steps = {}
    for name, impl in IMPLS.items():
        def fwd(impl=impl):
            with torch.no_grad():
                return impl(q, k, v, ks, rel_h, rel_w)

        def fwdbwd(impl=impl):
            out = impl(*leaves[:3], ks, *leaves[3:])
            return torch.autograd.grad(out, leaves, dout)

        steps[name] = (fwd, fwdbwd)
    samples = {name: ([], []) for name in IMPLS}
    for rep in range(reps + 1):  # the first round warms up
        for name, fns in steps.items():
            for direction, fn in enumerate(fns):
                t0 = TIMER()
                fn()
                if rep:
                    samples[name][direction].append(TIMER() - t0)
    return {name: tuple(statistics.median(s) * 1e3 for s in pair)
            for name, pair in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--batch", type=int, default=1, help="batch of the ResNet stage shapes")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--suite", default="quick,resnet")
    parser.add_argument("--timer", choices=("wall", "thread"), default="wall",
                        help="thread: this thread's CPU time (with --threads 1; steadier on "
                             "a busy machine, where other processes take turns on the cores)")
    args = parser.parse_args()
    global TIMER
    if args.timer == "thread":
        if args.threads != 1:
            parser.error("--timer thread needs --threads 1")
        TIMER = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = []
    if "quick" in args.suite:
        shapes += QUICK
    if "resnet" in args.suite:
        shapes += [dataclasses.replace(s, B=args.batch, name=f"{s.name}-B{args.batch}")
                   for s in RESNET50]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32, median of {args.reps}, {args.timer} time")
    print(f"{'shape':>10} {'BxHxWxC/heads k':>20} {'dir':>7} {'cpu ms':>8} {'port ms':>8} "
          f"{'ref ms':>8} {'cpu/port':>8} {'ref/port':>8}")
    for shape in shapes:
        times = bench_shape(shape, args.reps)
        desc = f"{shape.B}x{shape.H}x{shape.W}x{shape.C}/{shape.heads} {shape.k}"
        for i, direction in enumerate(("fwd", "fwd+bwd")):
            cpu, port, ref = (times[n][i] for n in ("cpu", "port", "reference"))
            print(f"{shape.name:>10} {desc:>20} {direction:>7} {cpu:8.3f} {port:8.3f} "
                  f"{ref:8.3f} {cpu / port:8.2f} {ref / port:8.2f}", flush=True)


if __name__ == "__main__":
    main()
