"""CPU latency of `attend`'s CPU path next to the unfold SASA port and the reference.

Same process, same inputs (the report's: random q, k, v and shared SASA rel tables,
padding="zeros", float32), median of repeats after a warm-up. Shapes: the report's
`quick` suite and the paper's ResNet-50 stages at small batch.

    python examples/bench_cpu.py [--threads 1] [--batch 1] [--reps 20] [--suite quick,resnet]

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
from sasa_triton.report.baselines import unfold_attend
from sasa_triton.report.suites import QUICK, RESNET50

IMPLS = {
    "cpu": lambda q, k, v, ks, rh, rw: sasa_triton.attend(q, k, v, ks, rel_h=rh, rel_w=rw,
                                                          backend="cpu"),
    "port": lambda q, k, v, ks, rh, rw: unfold_attend(q, k, v, ks, rel_h=rh, rel_w=rw),
    "reference": lambda q, k, v, ks, rh, rw: sasa_triton.attend(q, k, v, ks, rel_h=rh, rel_w=rw,
                                                                backend="reference"),
}


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def bench_shape(shape, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    B, H, W, N, D, ks = shape.B, shape.H, shape.W, shape.heads, shape.d, shape.k
    q, k, v = (torch.randn(B, H, W, N, D, generator=g) for _ in range(3))
    rel_h, rel_w = torch.randn(ks, D // 2, generator=g) * 0.5, torch.randn(ks, D - D // 2, generator=g) * 0.5
    dout = torch.randn(B, H, W, N, D, generator=g)
    times = {}
    for name, impl in IMPLS.items():
        def fwd():
            with torch.no_grad():
                return impl(q, k, v, ks, rel_h, rel_w)

        leaves = [t.detach().requires_grad_() for t in (q, k, v, rel_h, rel_w)]

        def fwdbwd():
            out = impl(*leaves[:3], ks, *leaves[3:])
            return torch.autograd.grad(out, leaves, dout)

        times[name] = (median_ms(fwd, reps), median_ms(fwdbwd, reps))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--batch", type=int, default=1, help="batch of the ResNet stage shapes")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--suite", default="quick,resnet")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = []
    if "quick" in args.suite:
        shapes += QUICK
    if "resnet" in args.suite:
        shapes += [dataclasses.replace(s, B=args.batch, name=f"{s.name}-B{args.batch}")
                   for s in RESNET50]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32, median of {args.reps}")
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
