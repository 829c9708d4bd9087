"""Repeat launches without Triton's binder (docs/host.md, "The fast launch path").

`launch_kernel(kernel, plan, *args, **options)` launches `kernel[plan.grid](*args, **options)`.
The first call with a given fast key goes through Triton (`JITFunction.run`: binder,
cache key, compile if needed, launch) and keeps the CompiledKernel it returns; later
calls with the same fast key make exactly the driver call `JITFunction.run` makes
(`kernel.run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *args)`, identical in Triton 3.6 and 3.9), skipping the binder and
the cache key, about 10 us per launch. The current device and stream are read on every
call, so torch streams and CUDA-graph capture see the launch as they see Triton's.

The fast key determines Triton's specialisation. A LaunchPlan is cached per call key, so
its ints and constexprs (`head`, `tail`, `options`) are fixed: the key is the kernel and
the plan (identity; the call's head, tail and options are checked to be the plan's), the
device, the knobs `run()` folds into the options, and per argument outside the plan:
tensors' dtype and 16-byte alignment, ints and other scalars by type and value (finer
than Triton's classes), None, tuples element-wise.

Never taken: with SASA_TRITON_FAST_LAUNCH=0 (read at import; `configure`), for anything
but a JITFunction (the interpreter's kernels, the cost tool's recorders), when Triton's
run returns something that is not a compiled kernel (None, a stub), with a callable grid,
keyword arguments that are kernel parameters, pre-run hooks or Triton's stage-inspection
hook. A plan that is not a LaunchPlan (a bare grid) always takes Triton's path.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Optional

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .launch_cache import _CACHES, MAX_PLANS, LaunchPlan

_SLOTS: dict = {}  # (id(kernel), id(plan)) -> _Slot
_CACHES.append(_SLOTS)  # launch_cache.clear_all forgets them too
_RUNTIME, _COMPILATION = knobs.runtime, knobs.compilation
_HAS_FPSAN = hasattr(_COMPILATION, "fpsan_homomorphic_casts")  # Triton >= 3.9
_HAS_STAGES_HOOK = hasattr(_RUNTIME, "add_stages_inspection_hook")
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _env_enabled() -> bool:
    return os.environ.get("SASA_TRITON_FAST_LAUNCH", "1").strip() != "0"


_ENABLED = _env_enabled()


def configure(enabled: Optional[bool] = None) -> bool:
    """Turn the fast path on or off (None: as SASA_TRITON_FAST_LAUNCH says); forgets
    every kept kernel. Returns whether it is on."""
    global _ENABLED
    _ENABLED = _env_enabled() if enabled is None else bool(enabled)
    _SLOTS.clear()
    return _ENABLED


def enabled() -> bool:
    """Whether launches may take the fast path."""
    return _ENABLED


class _Slot:
    """One (kernel, plan): where the per-call arguments sit, and a compiled kernel per
    per-call key."""
    __slots__ = ("kernel", "plan", "n_args", "lead", "mid", "stop", "compiled")

    def __init__(self, kernel, plan: LaunchPlan, n_args: int, lead: int):
        self.kernel, self.plan, self.n_args, self.lead = kernel, plan, n_args, lead
        self.mid = lead + len(plan.head)  # per-call values: args[:lead], args[mid:stop]
        self.stop = n_args - len(plan.tail)
        self.compiled: dict = {}


def _value_key(a) -> Any:
    """What of one argument outside the plan decides Triton's specialisation, or finer:
    a tensor's dtype and whether its address is 16-byte aligned; None; ints by value;
    tuples element-wise; other scalars by type and value (True is not 1, 1.0 is not 1)."""
    cls = type(a)
    if cls is int or a is None:
        return a
    if cls in _TENSORS or isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if cls is tuple:
        return (tuple, *map(_value_key, a))
    return (cls, a)  # bool, float, dtype, ...; unhashable: TypeError (Triton's path)


def _knob_key() -> tuple:
    """The knobs JITFunction.run folds into the options."""
    if _HAS_FPSAN:
        return (_RUNTIME.debug, _COMPILATION.instrumentation_mode,
                _COMPILATION.fpsan_homomorphic_casts)
    return (_RUNTIME.debug, _COMPILATION.instrumentation_mode)


def fast_key(slot: _Slot, args: tuple, device) -> tuple:
    """The per-call part of the fast key (the slot holds the kernel and the plan)."""
    return (device, slot.kernel.debug, _knob_key(),
            *map(_value_key, args[:slot.lead]), *map(_value_key, args[slot.mid:slot.stop]))


def _find_slot(kernel, plan, args: tuple, options: dict) -> Optional[_Slot]:
    """The slot of this call, made on first sight; None where the fast path cannot
    apply (the call's head, tail or options are not the plan's, a keyword argument is a
    kernel parameter, the grid is callable)."""
    slot = _SLOTS.get((id(kernel), id(plan)))
    if slot is None:
        params = kernel.arg_names
        if (len(args) != len(params) or callable(plan.grid)
                or any(name in params for name in options)):
            return None
        head, n = plan.head, len(args)
        lead = next((i for i in range(n - len(plan.tail) - len(head) + 1)
                     if all(map(operator.is_, args[i:i + len(head)], head))), None)
        if lead is None:
            return None
        if len(_SLOTS) >= MAX_PLANS:
            _SLOTS.clear()
        slot = _SLOTS[id(kernel), id(plan)] = _Slot(kernel, plan, n, lead)
    if (slot.plan is not plan or slot.kernel is not kernel or len(args) != slot.n_args
            or options != plan.options
            or not all(map(operator.is_, args[slot.lead:slot.mid], plan.head))
            or not all(map(operator.is_, args[slot.stop:], plan.tail))):
        return None
    return slot


def _is_compiled(compiled) -> bool:
    """A real compiled kernel (not None, not a stub returning nothing)."""
    return all(hasattr(compiled, name) for name in
               ("run", "function", "packed_metadata", "launch_metadata"))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def launch_kernel(kernel, plan, /, *args, **options) -> Any:
    """`kernel[plan.grid](*args, **options)`; repeat launches of a LaunchPlan skip
    Triton's binder (module docstring). Returns what Triton's launch returns."""
    if not _ENABLED or type(plan) is not LaunchPlan or not isinstance(kernel, JITFunction):
        return kernel[plan if type(plan) is not LaunchPlan else plan.grid](*args, **options)
    grid = plan.grid
    slot = _find_slot(kernel, plan, args, options)
    if slot is None or kernel.pre_run_hooks or (
            _HAS_STAGES_HOOK and _RUNTIME.add_stages_inspection_hook is not None):
        return kernel[grid](*args, **options)
    active = driver.active
    device = active.get_current_device()
    try:
        key = fast_key(slot, args, device)
        compiled = slot.compiled.get(key)
    except TypeError:  # an unhashable argument: Triton's path
        return kernel[grid](*args, **options)
    if compiled is None:
        compiled = kernel[grid](*args, **options)
        if _is_compiled(compiled) and not _interpreting():
            slot.compiled[key] = compiled
        return compiled
    for (name, _), (value, globals_dict) in kernel.used_global_vals.items():
        if globals_dict.get(name, _MISSING) != value:  # as JITFunction.run: changed globals
            return kernel[grid](*args, **options)  # raise there
    stream = active.get_current_stream(device)
    size = len(grid)
    launch_metadata = compiled.launch_metadata(grid, stream, *args)
    compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, launch_metadata,
                 _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook, *args)
    return compiled


_MISSING = object()
