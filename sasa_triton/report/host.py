"""`python -m sasa_triton.report --suite host`: the host time of one `attend` call.

What a call costs the host -- argument checks, dispatch, autograd bookkeeping, the
launchers' Python, allocations and the launches -- decides the speed of small layers
(s3, s4), whose GPU work is a few microseconds (docs/host.md; targets: <= 15 us per
eager forward, <= 40 us per forward + backward).

* CPU: the driver's launch is stubbed out (`stub_launches`: Triton's `run` does its
  Python work -- binder, cache key with the sm_90 backend, grid, launch metadata -- and
  then a fake compiled kernel's `run` returns at once, so the launchers' outputs keep
  their shapes, allocated and never written; repeat launches take the fast launch path,
  kernels/fast_launch.py, unless SASA_TRITON_FAST_LAUNCH=0), and "auto" dispatches as on a
  GPU with no tuned table (the heuristic's kernels), so what is timed is the host path of
  a GPU call, Triton's launch included, minus the driver's launch. The
  backward's torch glue (offsets' partial-sum reductions) runs for real, on CPU:
  cases use batch 1 so that it stays small.
* CUDA: real calls, three numbers per direction: `host_us`, the wall time until the
  call returns with the GPU idle before it (what the host spends; the kernels run on);
  `gpu_us`, CUDA events around that call; `loop_us`, back-to-back calls, wall time per
  call (the larger of the two in steady state).

Directions: `fwd` (forward under no_grad), `fwd_grad` (forward recording autograd, as
in training) and `fwdbwd` (forward, then `torch.autograd.grad` of a fixed output
gradient for q, k, v and the rel tables). Timings are medians of warm calls.
Writes host.csv (columns: `COLUMNS`) and host.md into the output folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from triton import knobs
from triton.compiler.compiler import LazyDict

from ..perf_suite import RESNET50, Shape
from .markdown import markdown_table

# Host-time targets of issue 14 (microseconds per call).
TARGETS_US = {"fwd": 15.0, "fwd_grad": 15.0, "fwdbwd": 40.0}
DIRECTIONS = ("fwd", "fwd_grad", "fwdbwd")
CSV_NAME, SUMMARY_NAME = "host.csv", "host.md"
COLUMNS = [
    "case", "B", "H", "W", "C", "heads", "d", "k", "dtype", "direction", "fwd_impl",
    "bwd_impl", "launch", "host_us", "host_p20_us", "host_p80_us", "reps", "floor_us",
    "over_floor_us", "target_us", "within_target", "launches", "bind_us", "fast_launch",
    "gpu_us", "loop_us",
    "device",
    "device_type", "date", "torch", "triton", "python",
]


def host_cases(device_type: str) -> list[Shape]:
    """The ResNet-50 stages (k = 7, 8 heads, d = 8 .. 64); batch 1 on CPU, where the
    stubbed launch leaves only the backward's glue proportional to the batch."""
    if device_type == "cuda":
        return list(RESNET50)
    return [dataclasses.replace(s, name=f"{s.name}-b1", B=1) for s in RESNET50]


# --------------------------------------------------------------------- the CPU stub

# While not None: the (kernel, args, kwargs) of every stubbed launch are appended here.
_RECORDED: Optional[list] = None
_SM90 = None  # the sm_90 backend the stub binds with (made on first use)


def _record(fn, args: tuple, kwargs: dict) -> None:
    if _RECORDED is not None:
        _RECORDED.append((fn, args, kwargs))


class _FakeCompiled:
    """Stands in for a CompiledKernel: what JITFunction.run and the fast launch path
    (kernels/fast_launch.py) read of one, and a `run` that returns at once instead of the
    driver's launch (recording it: the kernel, every argument in signature order, the
    launch options)."""
    function, packed_metadata = 0, ()

    def __init__(self, fn, options: dict):
        self.fn, self.options, self.name = fn, options, fn.__name__

    def launch_metadata(self, grid, stream, *args):
        """As CompiledKernel.launch_metadata (no per-kernel metadata function)."""
        if knobs.runtime.launch_enter_hook is None:
            return None
        return LazyDict({"name": self.name, "function": self.function, "stream": stream})

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata,
            enter_hook, exit_hook, *args) -> None:
        _record(self.fn, args, self.options)


class _FakeDriver:
    """Triton's active driver while stubbed: device 0, stream 0, an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


_STUB_KERNELS: dict = {}  # id(JITFunction) -> (fn, binder, cache-key cache, {key: fake})


def _stub_run(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run on CPU: its Python work -- the options, Triton's
    binder and cache key (sm_90 backend), the grid, the launch metadata -- and a
    _FakeCompiled's `run` where the driver would launch. Returns the _FakeCompiled (one
    per cache key, as Triton's compiled kernels), so the fast path can keep it."""
    global _SM90
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    given = kwargs.copy() if kwargs else kwargs  # the launch options (and keyword arguments)
    kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    entry = _STUB_KERNELS.get(id(self))
    if entry is None or entry[0] is not self:
        if _SM90 is None:
            from triton.backends.nvidia.compiler import CUDABackend

            _SM90 = CUDABackend(_FakeDriver().get_current_target())
        entry = _STUB_KERNELS[id(self)] = (
            self, create_function_from_signature(self.signature, self.params, _SM90), {}, {})
    _, binder, key_cache, fakes = entry
    bound_args, specialization, opts = binder(*args, **kwargs)
    key = compute_cache_key(key_cache, specialization, opts)
    kernel = fakes.get(key)
    if kernel is None:  # "compile": keep the options, not the kernel's keyword arguments
        options = {k: v for k, v in given.items() if k not in self.arg_names}
        kernel = fakes[key] = _FakeCompiled(self, options)
    if not warmup:
        if callable(grid):
            grid = grid(bound_args)
        size = len(grid)
        stream = 0
        launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())
        kernel.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream,
                   kernel.function, kernel.packed_metadata, launch_metadata,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook,
                   *bound_args.values())
    return kernel


def _stub_run_interpreted(self, *args, grid, warmup, **kwargs) -> None:
    """Stands in for the interpreter's run: returns at once, launching nothing."""
    _record(self, args, kwargs)
    return None


def _launches(fn: Callable) -> list:
    """The (kernel, args, kwargs) of the launches one call of fn makes (stubbed)."""
    global _RECORDED
    _RECORDED = []
    try:
        fn()
        return _RECORDED
    finally:
        _RECORDED = None


def time_binder(launches: list, reps: int = 200) -> float:
    """Microseconds Triton's launch spends binding and specialising these launches'
    arguments and computing their cache key (JITFunction.run's Python work before the
    driver call; the driver launch is not included), with the sm_90 backend on this
    CPU. NaN where it cannot be timed (the interpreter's kernels, another Triton)."""
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
    except ImportError:
        return float("nan")
    if not launches or not all(isinstance(fn, JITFunction) for fn, _, _ in launches):
        return float("nan")
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    calls = []
    for fn, args, kwargs in launches:
        kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                      instrumentation_mode=knobs.compilation.instrumentation_mode)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        calls.append((binder, args, kwargs, {}))

    def bind_all():
        for binder, args, kwargs, key_cache in calls:
            _, specialization, options = binder(*args, **kwargs)
            compute_cache_key(key_cache, specialization, options)

    bind_all()
    samples = []
    with _no_gc():
        for _ in range(reps):
            t0 = time.perf_counter()
            bind_all()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _kernel_classes() -> list:
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:  # the interpreter's kernels (TRITON_INTERPRET=1)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


def _choose_as_on_cuda(q, args, direction: int):
    """dispatch._choose for a GPU without a tuned table: the heuristic's kernels."""
    from .. import dispatch

    if direction == 1:
        return dispatch.default_backward(q, args)
    return dispatch.heuristic_forward(tuple(q.shape), q.dtype, args)


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """Within: every Triton launch runs Triton's Python launch path and no kernel
    (`_stub_run`: a _FakeCompiled's `run` returns at once, from a fake driver's device 0
    and stream 0; the fast launch path keeps and relaunches those fakes; the
    interpreter's launches return at once), outputs keep the shapes their launchers
    allocated, "auto" picks the kernels it would pick on a GPU with no tuned table, and
    denormals flush (the glue reads unwritten memory). Restores everything, and forgets
    the choices and fakes made inside, on exit."""
    from triton.runtime.driver import driver

    from .. import dispatch
    from ..kernels import fast_launch

    classes = _kernel_classes()
    runs = [cls.__dict__["run"] for cls in classes]
    choose = dispatch._choose
    active = driver._active  # None until a real driver is first asked for
    denormal = torch.set_flush_denormal(True)
    dispatch.clear_cache()
    fast_launch.forget()
    try:
        for cls, stub in zip(classes, (_stub_run, _stub_run_interpreted)):
            cls.run = stub
        driver.set_active(_FakeDriver())
        dispatch._choose = _choose_as_on_cuda
        yield
    finally:
        for cls, run in zip(classes, runs):
            cls.run = run
        driver._active = active
        dispatch._choose = choose
        dispatch.clear_cache()
        fast_launch.forget()  # its kept kernels are fakes
        _STUB_KERNELS.clear()
        if denormal:
            torch.set_flush_denormal(False)


# --------------------------------------------------------------------- the calls

def _steps(shape: Shape, dtype, device) -> tuple[dict[str, Callable], tuple[str, str]]:
    """The three directions' calls on one case's inputs, and the (forward, backward)
    implementation names "auto" resolves to."""
    import sasa_triton

    from .. import dispatch
    from ..args import check_attend_args
    from .impls import CaseInputs

    inp = CaseInputs.make(shape, dtype, device)
    leaves = [t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w)]
    q, k, v, rel_h, rel_w = leaves
    kernel = shape.k
    dout = torch.randn_like(inp.q)

    def forward():
        return sasa_triton.attend(q, k, v, kernel, rel_h=rel_h, rel_w=rel_w)

    def fwd():
        with torch.no_grad():
            return forward()

    def fwdbwd():
        return torch.autograd.grad(forward(), leaves, dout)

    args = check_attend_args(q, k, v, kernel, 1, "zeros", rel_h, rel_w, None, None)
    impls = (dispatch.choose(q, args, 0)[0], dispatch.choose(q, args, 1)[0])
    steps = {"fwd": fwd, "fwd_grad": forward, "fwdbwd": fwdbwd}
    return steps, _null_steps(leaves, dout), impls


class _Null(torch.autograd.Function):
    """The floor: an autograd Function with attend's inputs that only allocates its
    outputs (out, lse) and, backward, the gradients; no checks, dispatch or launch."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[:4], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, rel_h, rel_w)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, rel_h, rel_w = ctx.saved_tensors
        return tuple(torch.empty_like(t) for t in (q, k, v, rel_h, rel_w))


def _null_steps(leaves: list, dout: torch.Tensor) -> dict[str, Callable]:
    """The three directions with `_Null` in place of attend (columns floor_us)."""
    def forward():
        return _Null.apply(*leaves)

    def fwd():
        with torch.no_grad():
            return forward()

    def fwdbwd():
        return torch.autograd.grad(forward(), leaves, dout)

    return {"fwd": fwd, "fwd_grad": forward, "fwdbwd": fwdbwd}


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of samples in seconds, in microseconds."""
    cuts = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples) * 1e6, cuts[1] * 1e6, cuts[7] * 1e6


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The garbage collector off (its pauses are not the call's); the suite collects once
    before it starts (a collection takes a quarter second with torch loaded)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_host(fn: Callable, device_type: str, reps: int, warmup: int = 20) -> dict:
    """Host time of fn, warm: median and quantiles of `reps` single calls, each started
    with the device idle; on CUDA also CUDA-event and back-to-back times (module doc)."""
    cuda = device_type == "cuda"
    for _ in range(warmup):
        fn()
    samples, events = [], []
    with _no_gc():
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            if cuda:
                end.record()
                events.append((start, end))
        result = dict(zip(("host_us", "host_p20_us", "host_p80_us"), _quantiles(samples)))
        result["reps"] = reps
        if cuda:
            torch.cuda.synchronize()
            result["gpu_us"] = statistics.median(s.elapsed_time(e) for s, e in events) * 1e3
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            result["loop_us"] = (time.perf_counter() - t0) / reps * 1e6
    return result


# --------------------------------------------------------------------- the suite

def run_host_suite(dtype: Optional[str] = None, device: Optional[str] = None,
                   directions=DIRECTIONS, reps: int = 500, shapes: Optional[list] = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """One row per case x direction (not written)."""
    from ..kernels import fast_launch
    from .runner import DTYPES, Machine

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or "bf16"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    machine = Machine.detect(dev)
    shapes = shapes if shapes is not None else host_cases(dev.type)
    stubbed = dev.type != "cuda"
    launch = ("stubbed (CPU: Triton's launch path without the driver, no kernel runs)"
              if stubbed else "real")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    log(f"sasa_triton.report host: {len(shapes)} cases x {len(directions)} directions on "
        f"{machine.name} ({dev.type}, {dtype}), launch {launch}")
    rows = []
    gc.collect()
    threads = torch.get_num_threads()
    context = stub_launches() if stubbed else contextlib.nullcontext()
    try:
        torch.set_num_threads(1)  # host time: one thread, as a GPU run's host side
        with context:
            for shape in shapes:
                steps, null, (fwd_impl, bwd_impl) = _steps(shape, DTYPES[dtype], dev)
                for direction in directions:
                    timing = time_host(steps[direction], dev.type, reps)
                    floor = time_host(null[direction], dev.type, reps)["host_us"]
                    timing.update(floor_us=floor, over_floor_us=timing["host_us"] - floor)
                    if stubbed:
                        launches = _launches(steps[direction])
                        timing.update(launches=len(launches), bind_us=time_binder(launches))
                    timing["fast_launch"] = fast_launch.enabled()
                    target = TARGETS_US[direction]
                    rows.append(dict(
                        case=shape.name, B=shape.B, H=shape.H, W=shape.W, C=shape.C,
                        heads=shape.heads, d=shape.d, k=shape.k,
                        dtype=str(DTYPES[dtype]).replace("torch.", ""), direction=direction,
                        fwd_impl=fwd_impl, bwd_impl=bwd_impl if direction == "fwdbwd" else "",
                        launch=launch, **timing, target_us=target,
                        within_target=timing["host_us"] <= target, device=machine.name,
                        device_type=dev.type, date=date, **machine.versions))
                    log(f"{shape.name} {direction}: host {timing['host_us']:.1f} us "
                        f"(target {target:.0f}; torch floor {floor:.1f})")
    finally:
        torch.set_num_threads(threads)
    return rows


def write_host_outputs(rows: list[dict], out_dir: Path, command: str) -> tuple[Path, Path]:
    """host.csv (every column of COLUMNS, plus the versions present) and host.md."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = pd.NA
    extra = [c for c in frame.columns if c not in COLUMNS]
    csv_path = out_dir / CSV_NAME
    frame[COLUMNS + extra].to_csv(csv_path, index=False, float_format="%.6g")
    frame = pd.read_csv(csv_path)  # the summary comes from the file
    summary = out_dir / SUMMARY_NAME
    summary.write_text(_summary(frame, command))
    return csv_path, summary


def _summary(df, command: str) -> str:
    first = df.iloc[0]
    cuda = first["device_type"] == "cuda"
    versions = ", ".join(f"{n} {first[n]}" for n in ("torch", "triton", "python", "cuda")
                         if n in df)
    lines = [f"# sasa-triton host time: {first['device']}", "",
             f"* machine: {first['device']} ({first['device_type']}); versions: {versions}",
             f"* command: `{command}`; run at {first['date']}; dtype {first['dtype']}",
             f"* launch: {first['launch']}",
             "* host_us: median wall time of one warm call (p20-p80), the device idle "
             "before it; targets: " + ", ".join(f"{d} <= {t:.0f} us"
                                                for d, t in TARGETS_US.items()),
             "* torch floor: the same step with an autograd Function that only allocates "
             "(outputs; gradients backward): what torch itself costs on this machine; "
             "over floor = host - floor, what sasa_triton adds",
             f"* data: [{CSV_NAME}]({CSV_NAME}); what is measured and how: docs/host.md", ""]
    if not cuda:
        fast = "on" if bool(first.get("fast_launch", True)) else "off"
        lines += ["**CPU, driver stubbed**: the host path of a GPU call (checks, dispatch, "
                  "autograd, launchers, allocations, the backward's torch glue on CPU, "
                  f"Triton's launch path: fast launch {fast}) without the driver's launch. "
                  "Triton bind us: what Triton's binder and cache key cost these launches "
                  "(each call pays it with the fast launch off; only first calls with it "
                  "on).", ""]
    header = ["case", "direction", "forward", "backward", "host us (p20-p80)",
              "torch floor us", "over floor us", "target", "within"]
    header += ["gpu us", "loop us"] if cuda else ["Triton bind us"]
    table = []
    for _, r in df.iterrows():
        row = [r["case"], r["direction"], r["fwd_impl"],
               r["bwd_impl"] if isinstance(r["bwd_impl"], str) else "",
               f"{r['host_us']:.1f} ({r['host_p20_us']:.1f}-{r['host_p80_us']:.1f})",
               r["floor_us"], r["over_floor_us"], r["target_us"], "yes" if r["within_target"] else "no"]
        row += [r["gpu_us"], r["loop_us"]] if cuda else [r["bind_us"]]
        table.append(row)
    lines += [markdown_table(header, table), ""]
    return "\n".join(lines)


def main(args, command: str) -> tuple[Path, Path]:
    """`--suite host` of `python -m sasa_triton.report` (args: its parsed options)."""
    from .runner import Machine, default_out_dir

    directions = {"fwd": ("fwd", "fwd_grad"), "fwdbwd": ("fwdbwd",),
                  "both": DIRECTIONS}[args.direction]
    rows = run_host_suite(dtype=args.dtype, device=args.device, directions=directions,
                          reps=args.host_reps)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = args.out or default_out_dir(Machine.detect(dev))
    csv_path, summary = write_host_outputs(rows, out_dir, command)
    print(f"wrote {csv_path} ({len(rows)} rows) and {summary}")
    return csv_path, summary
