"""Latency, peak extra memory and the memory-bandwidth floor, on CUDA or CPU.

CUDA: `triton.testing.do_bench` (it flushes L2 between reps; quantiles 0.5/0.2/0.8) after
a warm-up call, so compilation and autotuning stay outside the timed region; CUDA events
when Triton is missing; optionally `do_bench_cudagraph` (graph replay, no host overhead).
CPU: a perf_counter loop after a warm-up, run for a time budget.
Host time of one call (`host_us`): wall time until fn returns with the device idle
before it, so on CUDA what the host spends before the GPU runs on by itself.
Peak extra memory: on CUDA the max_memory_allocated delta of one call; on CPU the peak
live tensor bytes seen by a TorchDispatchMode (`memory.PeakLiveBytes`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import torch

from .memory import PeakLiveBytes

MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    reps: float  # NaN where the timer does not say (do_bench)
    timer: str


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def _quantiles_us(samples_s: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(samples_s, dtype=torch.float64) * 1e6
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_fn(fn: Callable[[], object], device_type: str, budget_s: float = 0.2,
            min_reps: int = 3, max_reps: int = 200, cuda_graphs: bool = False) -> Timing:
    """Times fn() (already warmed up once by the caller: compiled, autotuned).
    cuda_graphs: replay fn from a CUDA graph (no host overhead; for tiny shapes), falling
    back to plain do_bench where fn cannot be captured."""
    if device_type == "cuda":
        if cuda_graphs:
            timing = _time_cuda_graph(fn)
            if timing is not None:
                return timing
        return _time_cuda(fn)
    fn()  # a second warm-up: allocator and caches settle
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps
                                       or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(*_quantiles_us(samples), reps=len(samples), timer="cpu perf_counter")


def _time_cuda_graph(fn) -> Timing | None:
    try:
        from triton.testing import do_bench_cudagraph

        med, p20, p80 = do_bench_cudagraph(fn, rep=100, quantiles=[0.5, 0.2, 0.8])
    except Exception:  # capture not possible (host sync, CPU work...): plain timing
        try:
            torch.cuda.synchronize()
        except Exception:  # a broken capture surfaces in the plain timing instead
            pass
        return None
    return Timing(med * 1e3, p20 * 1e3, p80 * 1e3, reps=math.nan,
                  timer="triton do_bench_cudagraph")


def _time_cuda(fn) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(med * 1e3, p20 * 1e3, p80 * 1e3, reps=math.nan, timer="triton do_bench")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(50)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) * 1e-3 for start, end in events]
    return Timing(*_quantiles_us(samples), reps=len(samples), timer="cuda events")


def peak_extra_mib(fn: Callable[[], object], device_type: str) -> tuple[float, str]:
    """Peak memory allocated during one call of fn (its outputs included), in MiB."""
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / MIB, "cuda max_memory_allocated delta"
    with PeakLiveBytes() as tracker:
        out = fn()
        del out
    return tracker.peak / MIB, "cpu dispatch-mode live tensor bytes"


def host_us(fn: Callable[[], object], device_type: str, reps: int = 10) -> float:
    """Median wall time until one call of fn returns, the device idle before each call:
    on CUDA the host overhead (argument checks, dispatch, launches; kernels run on
    asynchronously), on CPU the whole call."""
    samples = []
    for _ in range(reps):
        _sync(device_type)
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
        del out
    _sync(device_type)
    return _quantiles_us(samples)[0]


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Memory bandwidth of a large device-to-device copy, bytes read + written, in GB/s."""
    device_type = device.type
    if nbytes is None:
        nbytes = 1 << 30 if device_type == "cuda" else 64 << 20
        if device_type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(nbytes, free // 4)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device_type)
    timing = time_fn(functools.partial(dst.copy_, src), device_type, budget_s=0.3, min_reps=5)
    del src, dst
    return 2 * nbytes / (timing.median_us * 1e-6) / 1e9
