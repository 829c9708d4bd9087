"""What Triton's launch costs the host per argument, by kind of argument (docs/host.md).

`kernel[grid](...)` runs `JITFunction.run`: a generated binder specialises every argument
(pointers: address divisible by 16; ints: equal to 1, divisible by 16; constexprs by
value), then `compute_cache_key` turns the specialisation into the key of the compiled
kernel. This script times exactly that part (the same work as `bind_us` of
`python -m sasa_triton.report --suite host`), with the sm_90 backend on this CPU, no GPU:

1. per kind: kernels with one pointer and 64 more arguments of one kind, minus the
   one-pointer kernel, divided by 64;
2. per launch: every launch of a forward + backward of the host suite's cases (the
   heuristic's kernels), its arguments counted by kind, its binder time, and the binder
   time of a stand-in kernel taking the same launch packed as tile2d's forward packs
   its own (`packed`): what that change would save the other kernels; and `fast us`,
   the whole repeat launch through kernels/fast_launch.py (its key, the checks, the
   launch metadata and the compiled kernel's run, the driver stubbed as in the host
   suite), which replaces Triton's binder and cache key after a launch's first call,
   beside `run us`, the same launch through `kernel[grid](...)`, Triton's whole
   `JITFunction.run` as the host suite's stub runs it (binder, cache key, grid, launch
   metadata, the stubbed compiled kernel's run): what each call paid before.

Usage: python scripts/bind_costs.py [--reps 3000] [--cases s1-b1,s2-b1]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _binder_time(fn, args, kwargs, reps: int) -> float:
    """Median microseconds of binder + cache key for one launch of `fn` (sm_90 backend)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    keys: dict = {}

    def once() -> None:
        _, specialization, options = binder(*args, **kwargs)
        compute_cache_key(keys, specialization, options)

    return median_us(once, reps)


def _kernel(folder: Path, name: str, params: str, decorator: str = "@triton.jit"):
    """A JITFunction with parameters `params` and an empty body (Triton reads its source
    from a file)."""
    path = folder / f"{name}.py"
    path.write_text(f"import triton\nimport triton.language as tl\n\n{decorator}\n"
                    f"def kernel({params}):\n    pass\n")
    spec = importlib.util.spec_from_file_location(f"bind_costs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel


def per_kind(reps: int, n: int = 64) -> list[tuple[str, float]]:
    """(kind, us per argument) rows."""
    x = torch.empty(64)
    opts = dict(num_warps=4, num_stages=1)
    names = ", ".join(f"a{i}" for i in range(n))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = _binder_time(_kernel(folder, "base", "x_ptr"), (x,), opts, reps)
        plain = _kernel(folder, "plain", f"x_ptr, {names}")
        consts = _kernel(folder, "consts", "x_ptr, " + ", ".join(
            f"a{i}: tl.constexpr" for i in range(n)))
        dns = _kernel(folder, "dns", f"x_ptr, {names}",
                      f"@triton.jit(do_not_specialize={list(range(1, n + 1))})")
        one_tuple = _kernel(folder, "tuple1", "x_ptr, t")
        tuples5 = _kernel(folder, "tuples5", "x_ptr, " + ", ".join(
            f"t{i}" for i in range(n // 5)))
        cases = [
            ("pointer (a tensor)", plain, (x,) * n, n),
            ("int (7)", plain, (7,) * n, n),
            ("int equal to 1", plain, (1,) * n, n),
            ("int divisible by 16 (32)", plain, (32,) * n, n),
            ("int, do_not_specialize", dns, (7,) * n, n),
            ("float", plain, (0.5,) * n, n),
            ("None", plain, (None,) * n, n),
            ("constexpr", consts, (7,) * n, n),
            ("int inside tuples of 5", tuples5, ((7,) * 5,) * (n // 5), 5 * (n // 5)),
            (f"int inside one tuple of {n}", one_tuple, ((7,) * n,), n),
        ]
        rows = [("(fixed: one pointer, options, cache key)", base)]
        for kind, fn, values, count in cases:
            rows.append((kind, (_binder_time(fn, (x, *values), opts, reps) - base) / count))
    return rows


def _kind(param, value) -> str:
    if param.is_constexpr:
        return "constexpr"
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return "pointer"
    if isinstance(value, tuple):
        return "tuple"
    return "float" if isinstance(value, float) else "int"


def _launch_times(fn, args, kwargs, reps: int) -> tuple[float, float]:
    """Median microseconds of one repeat launch through the fast path and through
    `kernel[grid](...)` (stubbed driver and compiled kernel; the plan: the one the fast
    path keeps for fn). NaN if none is kept."""
    from sasa_triton.kernels import fast_launch

    slots = [s for s in fast_launch._SLOTS.values() if s.kernel is fn and s.compiled]
    if len(slots) != 1:
        return float("nan"), float("nan")
    plan = slots[0].plan
    return (median_us(lambda: fast_launch.launch_kernel(fn, plan, *args, **kwargs), reps),
            median_us(lambda: fn[plan.grid](*args, **kwargs), reps))


def median_us(once, reps: int) -> float:
    """Median microseconds of once(), warm, garbage collector off."""
    for _ in range(200):
        once()
    samples = []
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            once()
            samples.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return statistics.median(samples) * 1e6


def per_launch(case_names: list[str], reps: int) -> list[dict]:
    """One row per launch of a forward + backward of each case."""
    from sasa_triton.kernels import fast_launch
    from sasa_triton.report import host

    rows = []
    shapes = [s for s in host.host_cases("cpu") if s.name in case_names]
    with host.stub_launches():
        for shape in shapes:
            steps, _, _ = host._steps(shape, torch.bfloat16, torch.device("cpu"))
            fast_launch.forget()
            steps["fwdbwd"]()  # the fast path keeps each launch's (fake) compiled kernel
            for fn, args, kwargs in host._launches(steps["fwdbwd"]):
                counts: dict = {}
                ints_in_tuples = 0
                for param, value in zip(fn.params, args):
                    kind = _kind(param, value)
                    counts[kind] = counts.get(kind, 0) + 1
                    if kind == "tuple":
                        ints_in_tuples += len(value)
                rows.append(dict(case=shape.name, kernel=fn.__name__, arguments=len(args),
                                 **counts, ints_in_tuples=ints_in_tuples,
                                 bind_us=_binder_time(fn, args, kwargs, reps),
                                 packed_us=what_if(fn, args, kwargs, reps),
                                 **dict(zip(("fast_us", "run_us"),
                                            _launch_times(fn, args, kwargs, reps)))))
    return rows


# Strides of what each launcher allocates itself (contiguous: the kernel could derive
# them from the sizes, as tile2d's forward does for out and lse).
DERIVABLE = {
    "_rows_fwd_kernel": ("so", "sl"),
    "_query_grads_kernel": ("sdq",),
    "_reduce_tables_kernel": ("sdh", "sdw", "sdb"),
    "_key_bwd_kernel": ("sdk", "sdv", "sdl"),
    "_tile2d_bwd_query_kernel": ("sdq",),
    "_tile2d_bwd_key_kernel": ("sdk", "sdv"),
}


def packed(fn, args) -> tuple[list[str], list]:
    """(parameter names, values) of the same launch as tile2d's forward passes its
    arguments: the leading sizes as one tuple, each tensor's strides as one tuple (those in
    DERIVABLE dropped; v's None where they equal k's), the dilations as one tuple,
    the table strides as one tuple, an absent table's pointer None (its HAS_ flag off)."""
    flags = {p.name: v for p, v in zip(fn.params, args) if p.is_constexpr}
    absent = set()
    if not flags.get("HAS_REL", True):
        absent |= {"relh_ptr", "relw_ptr"}
    if not flags.get("HAS_RPB", True):
        absent.add("rpb_ptr")
    drop = DERIVABLE.get(fn.__name__, ())
    names, values, groups = [], [], {}
    for param, value in zip(fn.params, args):
        name = param.name
        is_int = not param.is_constexpr and isinstance(value, int)
        group = name.split("_")[0] if is_int and name.startswith("s") and "_" in name else None
        if group in ("srh", "srw", "srp"):
            group = "s_tab"
        elif is_int and name.startswith("dil_"):
            group = "dil"
        elif is_int and group is None and not any(g not in ("sizes", "dil") for g in groups):
            group = "sizes"  # the plain ints before the first stride
        if group is None:
            names.append(name)
            values.append(None if name in absent else value)
        elif group not in drop:
            if group not in groups:
                groups[group] = []
                names.append(group)
                values.append(groups[group])
            groups[group].append(value)
    values = [tuple(v) if isinstance(v, list) else v for v in values]
    if "sk" in groups and groups["sk"] == groups.get("sv"):  # KV_SAME_STRIDES
        values[names.index("sv")] = None
    return names, values


def what_if(fn, args, kwargs, reps: int) -> float:
    """Binder microseconds of a stand-in kernel taking `packed(fn, args)` (constexprs
    kept as they are)."""
    names, values = packed(fn, args)
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    params = ", ".join(f"{n}: tl.constexpr" if n in constexprs else n for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = _kernel(Path(tmp), f"packed_{fn.__name__}", params)
        return _binder_time(stand_in, tuple(values), kwargs, reps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3000)
    parser.add_argument("--cases", default="s1-b1,s2-b1")
    opts = parser.parse_args(argv)
    import triton

    print(f"Triton {triton.__version__}, torch {torch.__version__}, Python "
          f"{sys.version.split()[0]}; sm_90 backend on this CPU; median of {opts.reps}\n")
    print("| kind | us per argument |\n|---|---|")
    for kind, us in per_kind(opts.reps):
        print(f"| {kind} | {us:.3f} |")
    rows = per_launch(opts.cases.split(","), opts.reps)
    kinds = ["pointer", "None", "int", "float", "tuple", "constexpr"]
    print("\n| case | kernel | arguments | " + " | ".join(kinds)
          + " | ints in tuples | bind us | packed like tile2d's forward: bind us | run us "
          "| fast us |")
    print("|---" * (len(kinds) + 8) + "|")
    for r in rows:
        print(f"| {r['case']} | {r['kernel']} | {r['arguments']} | "
              + " | ".join(str(r.get(k, 0)) for k in kinds)
              + f" | {r['ints_in_tuples']} | {r['bind_us']:.1f} | {r['packed_us']:.1f} "
              f"| {r['run_us']:.1f} | {r['fast_us']:.1f} |")


if __name__ == "__main__":
    main()
