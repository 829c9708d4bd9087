"""Runs a suite: every case x implementation x direction, one CSV row each.

Per case, the inputs are made once and shared; per (implementation, direction) the
step is built, called once (compile / autotune / cuDNN algorithm search happen here,
outside timing), timed, and run once more under the memory probe. A failure (OOM,
unsupported shape, any exception) becomes the row's status and the run goes on.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..autotune.tuned_table import gpu_slug
from ..perf_suite import default_suite, get_suite
from ..types import DTYPES as TYPE_NAMES
from . import impls as impls_mod
from .timing import copy_bandwidth_gbps, host_us, peak_extra_mib, time_fn

# --dtype: the short names of sasa_triton.types and torch's own (no float64 here)
DTYPES = {alias: dtype for name, dtype in TYPE_NAMES.items() if name != "fp64"
          for alias in (name, str(dtype).removeprefix("torch."))}
DIRECTIONS = {"fwd": ("fwd",), "fwdbwd": ("fwdbwd",), "both": ("fwd", "fwdbwd")}
# Forward + backward moves at least 3x the forward's bytes (PERF.md).
FWDBWD_FLOOR_FACTOR = 3


@dataclasses.dataclass
class Machine:
    device: torch.device
    name: str  # GPU name, or the CPU model
    slug: str  # directory name under reports/
    versions: dict

    @classmethod
    def detect(cls, device: torch.device) -> Machine:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            slug = gpu_slug(name)
        else:
            name, slug = _cpu_model(), "cpu"
        versions = {"torch": torch.__version__, "triton": _version("triton"),
                    "python": platform.python_version()}
        if device.type == "cuda":
            versions["cuda"] = torch.version.cuda or ""
            versions["cudnn"] = str(torch.backends.cudnn.version())
        return cls(device, name, slug, versions)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _step(forward: Callable, leaves: list, direction: str) -> Callable:
    """forward alone under no_grad, or forward then the gradients of all leaves."""
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                return forward()
        return fwd

    grad_out = []

    def fwdbwd():
        out = forward()
        if not grad_out:  # the first (warm-up) call fixes a random output gradient
            grad_out.append(torch.randn_like(out))
        # allow_unused: a layer may hold parameters its forward does not touch
        return torch.autograd.grad(out, leaves, grad_out[0], allow_unused=True)
    return fwdbwd


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _measure(impl, inputs, direction: str, budget_s: float, min_reps: int,
             cuda_graphs: bool) -> dict:
    device_type = inputs.device.type
    try:
        forward, leaves = impl.build(inputs, direction == "fwdbwd")
        step = _step(forward, leaves, direction)
        step()  # warm-up: compile, autotune, algorithm search
        if device_type == "cuda":
            torch.cuda.synchronize()
        timing = time_fn(step, device_type, budget_s=budget_s, min_reps=min_reps,
                         cuda_graphs=cuda_graphs)
        mem, mem_method = peak_extra_mib(step, device_type)
        # on CPU the whole call is host time: the latency says it already
        host = host_us(step, device_type) if device_type == "cuda" else timing.median_us
        return dict(status="ok", median_us=timing.median_us, p20_us=timing.p20_us,
                    p80_us=timing.p80_us, reps=timing.reps, timer=timing.timer,
                    host_us=host, peak_mem_mib=mem, mem_method=mem_method)
    except impls_mod.Unsupported as why:
        return dict(status="unsupported", note=str(why))
    except impls_mod.Unavailable as why:
        return dict(status="unavailable", note=str(why))
    except torch.cuda.OutOfMemoryError as error:
        failure = dict(status="error: out of memory", note=_short(error))
    except Exception as error:  # recorded; the run goes on
        failure = dict(status=f"error: {_short(error)}")
    gc.collect()  # a traceback holds the failed call's tensors in reference cycles
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return failure


@dataclasses.dataclass
class RunResult:
    rows: list[dict]
    machine: Machine
    suite: str
    dtype: torch.dtype
    copy_gbps: float


def run_suite(suite: Optional[str] = None, dtype: Optional[str] = None, direction: str = "both",
              impl_filter: Optional[str] = None, device: Optional[str] = None,
              budget_s: float = 0.15, extra_impls: tuple = (), shapes: Optional[list] = None,
              cpu_threads: Optional[int] = 1, min_reps: int = 3, cuda_graphs: bool = False,
              log: Callable[[str], None] = print) -> RunResult:
    """Measures every (case, implementation, direction); returns the rows (not written).

    On CPU, torch runs with `cpu_threads` intra-op threads (default 1: the quick suite's
    tiny ops gain nothing from more, and a busy machine makes thread handoffs dominate);
    None keeps torch's setting.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    threads = torch.get_num_threads()
    try:
        if dev.type == "cpu" and cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        return _run_suite(suite, dtype, direction, impl_filter, dev, budget_s, min_reps,
                          cuda_graphs, extra_impls, shapes, log)
    finally:
        torch.set_num_threads(threads)


def _run_suite(suite, dtype, direction, impl_filter, dev: torch.device, budget_s, min_reps,
               cuda_graphs, extra_impls, shapes, log) -> RunResult:
    suite = suite or default_suite(dev.type)
    shapes = shapes if shapes is not None else get_suite(suite)
    if dtype is None:
        dtype = "bf16" if dev.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"--direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
    torch_dtype = DTYPES[dtype]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN picks its best algorithm in warm-up
        if os.environ.get("TRITON_INTERPRET") == "1":
            log("warning: TRITON_INTERPRET=1 is set: Triton kernels run in the interpreter")

    machine = Machine.detect(dev)
    if dev.type == "cpu":
        machine.versions["cpu_threads"] = str(torch.get_num_threads())
    chosen = impls_mod.select(impls_mod.default_impls(dev.type) + list(extra_impls), impl_filter)
    directions = DIRECTIONS[direction]
    log(f"sasa_triton.report: suite {suite!r}, {len(shapes)} cases x {len(chosen)} "
        f"implementations x {len(directions)} directions on {machine.name} "
        f"({dev.type}, {str(torch_dtype)[6:]})")
    copy_gbps = copy_bandwidth_gbps(dev)
    log(f"copy bandwidth (read + write): {copy_gbps:.1f} GB/s")

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows, start = [], time.perf_counter()
    total = len(shapes) * len(chosen) * len(directions)
    try:
        i = 0
        for shape in shapes:
            inputs = impls_mod.CaseInputs.make(shape, torch_dtype, dev)
            io_bytes = 4 * shape.B * shape.H * shape.W * shape.C * inputs.q.element_size()
            fwd_floor_us = io_bytes / (copy_gbps * 1e9) * 1e6
            for impl in chosen:
                for direc in directions:
                    i += 1
                    result = _measure(impl, inputs, direc, budget_s, min_reps, cuda_graphs)
                    floor_us = fwd_floor_us * (FWDBWD_FLOOR_FACTOR if direc == "fwdbwd" else 1)
                    row = dict(case=shape.name, suite=suite, B=shape.B, H=shape.H, W=shape.W,
                               C=shape.C, heads=shape.heads, d=shape.d, k=shape.k,
                               dtype=str(torch_dtype).replace("torch.", ""), impl=impl.name,
                               family=impl.family, direction=direc, note="",
                               impl_desc=impl.desc)
                    row.update(result)
                    row.update(io_bytes=io_bytes, copy_gbps=copy_gbps, floor_us=floor_us,
                               fwd_floor_us=fwd_floor_us, device=machine.name,
                               device_type=dev.type, date=date, **machine.versions)
                    rows.append(row)
                    shown = (f"{row['median_us']:.1f} us" if row["status"] == "ok"
                             else row["status"])
                    log(f"[{i}/{total}] {shape.name} {impl.name} {direc}: {shown} "
                        f"(elapsed {time.perf_counter() - start:.1f} s)")
            del inputs
    except KeyboardInterrupt:  # Ctrl-C or a time limit: keep what was measured
        log(f"interrupted: keeping the {len(rows)} of {total} measurements done")
    _add_ratios(rows)
    return RunResult(rows, machine, suite, torch_dtype, copy_gbps)


# ratio column -> the baseline implementation it divides by (same case and direction)
BASELINE_RATIOS = {"ratio_to_dense_conv": impls_mod.DENSE_CONV,
                   "ratio_to_conv_3x3": "conv_3x3",
                   "ratio_to_depthwise_conv": "conv_depthwise_kxk",
                   "ratio_to_unfold": "unfold",
                   "ratio_to_flex_na": "flex_na",
                   "ratio_to_flex_na_rel": "flex_na_rel"}


def _add_ratios(rows: list[dict]) -> None:
    times = {(r["impl"], r["case"], r["direction"]): r["median_us"] for r in rows
             if r["status"] == "ok"}
    for r in rows:
        median = r.get("median_us", math.nan) if r["status"] == "ok" else math.nan
        r["ratio_to_floor"] = median / r["floor_us"]
        r["ratio_to_fwd_floor"] = median / r["fwd_floor_us"]
        for column, baseline in BASELINE_RATIOS.items():
            r[column] = median / times.get((baseline, r["case"], r["direction"]), math.nan)


def default_out_dir(machine: Machine) -> Path:
    return Path("reports") / machine.slug
