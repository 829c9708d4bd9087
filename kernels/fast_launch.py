"""Repeat launches without Triton's binder (docs/host.md, "The fast launch path").

`launch_kernel(kernel, plan, *args, **options)` launches `kernel[plan.grid](*args, **options)`.
The first call with a given fast key goes through Triton (`JITFunction.run`: binder,
cache key, compile if needed, launch) and keeps the CompiledKernel it returns; later
calls with the same fast key make exactly the driver call `JITFunction.run` makes
(`kernel.run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *args)`, identical in Triton 3.6 and 3.9), skipping the binder and
the cache key, about 10 us per launch. The current device and stream are read on every
call, so torch streams and CUDA-graph capture see the launch as they see Triton's. While
Triton's launch hooks are its default empty chains (no profiler has added one), the hooks
and the launch metadata (which only hooks read) go as None: the compiled launcher then
calls no Python hook, and the call does the same. The compiled kernel's `run`,
`function` and `packed_metadata` are read once, after its first launch.

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
from math import gcd
from typing import Any, Callable, NamedTuple, Optional

import torch
from triton import knobs
from triton.knobs import HookChain
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .launch_cache import _CACHES, MAX_PLANS, LaunchPlan

_SLOTS: dict = {}  # (id(kernel), id(plan)) -> _Slot
_CACHES.append(_SLOTS)  # launch_cache.clear_all forgets them too
_RUNTIME, _COMPILATION = knobs.runtime, knobs.compilation
_HAS_FPSAN = hasattr(_COMPILATION, "fpsan_homomorphic_casts")  # Triton >= 3.9
_HAS_STAGES_HOOK = hasattr(_RUNTIME, "add_stages_inspection_hook")
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_TENSOR_TYPES = frozenset(_TENSORS)
_INT_TYPES = frozenset((int,))
_DTYPE, _DATA_PTR = operator.attrgetter("dtype"), torch.Tensor.data_ptr
_TAG = object()  # marks a `_value_key` entry of `fast_key`
_IS = operator.is_


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


def forget() -> None:
    """Forget every kept kernel (the host benchmark's stub keeps fakes)."""
    _SLOTS.clear()


def enabled() -> bool:
    """Whether launches may take the fast path."""
    return _ENABLED


class _Slot:
    """One (kernel, plan): where the per-call arguments sit, what the fixed ones must be
    (the plan's own objects), and per per-call key what to launch (`_Kept`)."""
    __slots__ = ("kernel", "plan", "n_args", "lead", "mid", "stop", "tensors", "others",
                 "head", "tail", "options", "grid", "compiled")

    def __init__(self, kernel, plan: LaunchPlan, args: tuple, lead: int):
        self.kernel, self.plan, self.n_args, self.lead = kernel, plan, len(args), lead
        self.mid = lead + len(plan.head)  # per-call values: args[:lead], args[mid:stop]
        self.stop = len(args) - len(plan.tail)
        per_call = [*range(lead), *range(self.mid, self.stop)]
        # where this first call had tensors (the usual case of every later call: `fast_key`
        # reads them with C-level maps) and everything else
        self.tensors = _getter([i for i in per_call if isinstance(args[i], torch.Tensor)])
        self.others = _getter([i for i in per_call if not isinstance(args[i], torch.Tensor)])
        self.head, self.tail, self.options = plan.head, plan.tail, plan.options
        grid = plan.grid
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.compiled: dict = {}  # fast key -> _Kept


class _Kept(NamedTuple):
    """A compiled kernel and what a launch reads of it, read once (after its first launch
    through Triton: its handles are loaded, `run` no longer changes)."""
    compiled: Any
    run: Callable
    function: Any
    packed_metadata: Any


def _getter(positions: list) -> Callable[[tuple], tuple]:
    """args -> the tuple of args[i] for i in positions."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _value_key(a) -> Any:
    """What of one argument outside the plan decides Triton's specialisation, or finer
    (the general case of `fast_key`): tensors' dtype and 16-byte alignment, None, ints by
    value, tuples element-wise, other scalars by type and value (True is not 1)."""
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
    """The per-call part of the fast key (the slot holds the kernel and the plan): the
    device, the knobs, then the arguments outside the plan. Where the slot's first call had
    tensors: their dtypes and one alignment entry (True: all 16-byte aligned, else each
    one's bit), read with C-level maps; if one of them is no tensor now, every argument
    outside the plan by `_value_key` instead (a key of another length and marker)."""
    tensors = slot.tensors(args)
    others = slot.others(args)
    if _TENSOR_TYPES.issuperset(map(type, tensors)):
        ptrs = tuple(map(_DATA_PTR, tensors))
        aligned = gcd(*ptrs) & 15 == 0  # every address 16-byte aligned (0 counts as such)
        return (device, slot.kernel.debug, *_knob_key(), *map(_DTYPE, tensors),
                aligned or tuple(p & 15 == 0 for p in ptrs), *_other_keys(others))
    return (device, slot.kernel.debug, *_knob_key(), _TAG,
            *map(_value_key, tensors), *map(_value_key, others))


def _other_keys(values: tuple) -> tuple:
    """`_value_key` of each of values; ints, None and tuples of ints as they are."""
    for v in values:
        cls = type(v)
        if cls is tuple:
            if not _INT_TYPES.issuperset(map(type, v)):
                return (_TAG, *map(_value_key, values))
        elif cls is not int and v is not None:
            return (_TAG, *map(_value_key, values))
    return values


def _find_slot(kernel, plan, args: tuple, options: dict) -> Optional[_Slot]:
    """The slot of this call, made on first sight; None where the fast path cannot
    apply (the call's head, tail or options are not the plan's, a keyword argument is a
    kernel parameter, the grid is not a tuple: a callable)."""
    slot = _SLOTS.get((id(kernel), id(plan)))
    if slot is None:
        params = kernel.arg_names
        if (len(args) != len(params) or not isinstance(plan.grid, (tuple, list))
                or any(name in params for name in options)):
            return None
        head, n = plan.head, len(args)
        lead = next((i for i in range(n - len(plan.tail) - len(head) + 1)
                     if all(map(operator.is_, args[i:i + len(head)], head))), None)
        if lead is None:
            return None
        if len(_SLOTS) >= MAX_PLANS:
            _SLOTS.clear()
        slot = _SLOTS[id(kernel), id(plan)] = _Slot(kernel, plan, args, lead)
    return slot if _serves(slot, kernel, plan, args, options) else None


def _serves(slot: _Slot, kernel, plan: LaunchPlan, args: tuple, options: dict) -> bool:
    """Whether this call is the slot's launch: its kernel and plan, the plan's options, and
    the plan's own head and tail objects (not equal ones) where the slot expects them."""
    return (slot.plan is plan and slot.kernel is kernel and len(args) == slot.n_args
            and options == slot.options and _fixed_are_the_plans(slot, args))


def _fixed_are_the_plans(slot: _Slot, args: tuple) -> bool:
    """The plan's own head and tail objects (identity: an equal value of another type,
    True for 1, would specialise differently) where the slot expects them."""
    return (all(map(_IS, args[slot.lead:slot.mid], slot.head))
            and all(map(_IS, args[slot.stop:], slot.tail)))


def _is_compiled(compiled) -> bool:
    """A real compiled kernel (not None, not a stub returning nothing)."""
    return all(hasattr(compiled, name) for name in
               ("run", "function", "packed_metadata", "launch_metadata"))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _silent(hook) -> bool:
    """A launch hook that would do nothing: None or an empty HookChain (Triton's default)."""
    return hook is None or (type(hook) is HookChain and not hook.calls)


def launch_kernel(kernel, plan, /, *args, **options) -> Any:
    """`kernel[plan.grid](*args, **options)`; repeat launches of a LaunchPlan skip
    Triton's binder (module docstring). Returns what Triton's launch returns."""
    # a slot holds its kernel and plan, so the ids in its key are theirs; the tests below
    # are `_serves`'s, written out (one call less)
    slot = _SLOTS.get((id(kernel), id(plan))) if _ENABLED else None
    if (slot is None or len(args) != slot.n_args or options != slot.options
            or not all(map(_IS, args[slot.lead:slot.mid], slot.head))
            or not all(map(_IS, args[slot.stop:], slot.tail))):
        return _launch_first(kernel, plan, args, options)
    if kernel.pre_run_hooks or (_HAS_STAGES_HOOK
                                and _RUNTIME.add_stages_inspection_hook is not None):
        return kernel[plan.grid](*args, **options)
    active = driver.active
    device = active.get_current_device()
    try:
        key = fast_key(slot, args, device)
        kept = slot.compiled.get(key)
    except TypeError:  # an unhashable argument: Triton's path
        return kernel[plan.grid](*args, **options)
    if kept is None:
        return _keep(slot, key, kernel[plan.grid](*args, **options))
    if kernel.used_global_vals:
        for (name, _), (value, globals_dict) in kernel.used_global_vals.items():
            if globals_dict.get(name, _MISSING) != value:  # changed since compiled:
                return kernel[plan.grid](*args, **options)  # JITFunction.run raises
    stream = active.get_current_stream(device)
    enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    if _silent(enter) and _silent(leave):  # hooks that would do nothing: none, and no
        kept.run(*slot.grid, stream, kept.function, kept.packed_metadata,  # metadata
                 None, None, None, *args)
    else:
        kept.run(*slot.grid, stream, kept.function, kept.packed_metadata,
                 kept.compiled.launch_metadata(plan.grid, stream, *args), enter, leave, *args)
    return kept.compiled


def _launch_first(kernel, plan, args: tuple, options: dict) -> Any:
    """A launch with no slot serving it yet: Triton's path, keeping the compiled kernel
    where the fast path applies (the next such launch takes it)."""
    if not _ENABLED or type(plan) is not LaunchPlan:
        return kernel[plan if type(plan) is not LaunchPlan else plan.grid](*args, **options)
    if not isinstance(kernel, JITFunction):  # the interpreter's kernels, recorders
        return kernel[plan.grid](*args, **options)
    slot = _find_slot(kernel, plan, args, options)
    if slot is None or kernel.pre_run_hooks or (
            _HAS_STAGES_HOOK and _RUNTIME.add_stages_inspection_hook is not None):
        return kernel[plan.grid](*args, **options)
    try:
        key = fast_key(slot, args, driver.active.get_current_device())
        hash(key)
    except TypeError:  # an unhashable argument: Triton's path
        return kernel[plan.grid](*args, **options)
    return _keep(slot, key, kernel[plan.grid](*args, **options))


def _keep(slot: _Slot, key: tuple, compiled) -> Any:
    """Keeps what Triton's launch returned for `key` (a real compiled kernel, not while
    interpreting); returns it."""
    if _is_compiled(compiled) and not _interpreting():
        if len(slot.compiled) >= MAX_PLANS:
            slot.compiled.clear()
        slot.compiled[key] = _Kept(compiled, compiled.run, compiled.function,
                                   compiled.packed_metadata)
    return compiled


_MISSING = object()
