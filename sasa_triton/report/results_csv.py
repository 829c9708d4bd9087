"""The tidy CSV: one row per case x implementation x direction (pandas).

Columns, in order:

    case         suite case name (s1..s4, k3..k11, h1..h16, det, q-*)
    suite        the --suite that was run
    B, H, W, C   feature map (batch, height, width, channels)
    heads, d     attention heads and head dim (d = C / heads)
    k            kernel size (window k x k; also the dense/depthwise conv size)
    dtype        element type of all inputs (bfloat16, float16, float32)
    impl         implementation: attend (backend="auto"), attend:<backend>, unfold,
                 flex_na, flex_na_rel, conv_kxk, conv_3x3, conv_depthwise_kxk,
                 layer:SASA2d, layer:Conv2d
    family       attention | conv | layer
    direction    fwd (forward under no_grad) | fwdbwd (forward + gradients of all inputs)
    status       ok | unsupported | unavailable | error: <exception>
    note         why it did not run (unsupported / unavailable / out of memory)
    impl_desc    what the implementation is
    median_us    median latency, microseconds (warm: compile/autotune done before)
    p20_us       20th percentile latency
    p80_us       80th percentile latency
    reps         timed repetitions (empty with do_bench, which picks its own)
    timer        triton do_bench | triton do_bench_cudagraph | cuda events | cpu perf_counter
    host_us      host time of one call, microseconds: wall time until it returns with the
                 GPU idle before it (argument checks, dispatch, launches); on CPU the
                 median latency (the whole call runs on the host)
    peak_mem_mib peak extra memory of one call, outputs included, MiB
    mem_method   cuda max_memory_allocated delta | cpu dispatch-mode live tensor bytes
    io_bytes     4 * B*H*W*C * bytes per element (read q, k, v, write out once)
    copy_gbps    measured copy bandwidth this run (bytes read + written per second / 1e9)
    floor_us     memory floor of the direction: io_bytes / bandwidth (x3 for fwdbwd)
    fwd_floor_us the forward floor io_bytes / bandwidth (PERF.md's fwd+bwd targets use it)
    ratio_to_floor       median_us / floor_us
    ratio_to_fwd_floor   median_us / fwd_floor_us
    ratio_to_dense_conv  median_us / median_us of conv_kxk, same case and direction
    ratio_to_conv_3x3, ratio_to_depthwise_conv, ratio_to_unfold, ratio_to_flex_na,
    ratio_to_flex_na_rel  likewise for conv_3x3, conv_depthwise_kxk, unfold, flex_na
                          and flex_na_rel (empty where that baseline did not run)
    device       GPU name, or the CPU model (CPU rows are CPU timings)
    device_type  cuda | cpu
    date         UTC time the run started
    torch, triton, python   versions (+ cuda, cudnn on GPU; cpu_threads on CPU)

Timings and ratios are empty (NaN) where status is not ok.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = [
    "case", "suite", "B", "H", "W", "C", "heads", "d", "k", "dtype", "impl", "family",
    "direction", "status", "note", "impl_desc", "median_us", "p20_us", "p80_us", "reps", "timer",
    "host_us", "peak_mem_mib", "mem_method", "io_bytes", "copy_gbps", "floor_us", "fwd_floor_us",
    "ratio_to_floor", "ratio_to_fwd_floor", "ratio_to_dense_conv",
    "ratio_to_conv_3x3", "ratio_to_depthwise_conv", "ratio_to_unfold", "ratio_to_flex_na",
    "ratio_to_flex_na_rel", "device", "device_type",
    "date", "torch", "triton", "python",
]
OPTIONAL_COLUMNS = ["cuda", "cudnn", "cpu_threads"]


def to_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = pd.NA
    extra = [c for c in OPTIONAL_COLUMNS if c in frame]
    return frame[COLUMNS + extra]


def write_csv(rows: list[dict], path: Path) -> pd.DataFrame:
    frame = to_frame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6g")
    return frame


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=True)
