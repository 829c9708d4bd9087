"""Launch plans: the part of a host launcher's work that depends only on the call key.

A launcher's per-call work splits in two. What follows from the call key -- shape,
dtype, window, table flags, scale, config, the inputs' strides (and where a launch
depends on it, their pointer alignment) -- is computed once per key into a `plan`
(supports check, config check, grid, scalar and constexpr arguments, strides and
layouts of the outputs it allocates): a `LaunchPlan` made by `launch_plan`. What must
be read on every call stays per call: the tensors themselves, the table strides and the
allocations. A cached plan saves tens of microseconds of Python per launch
(docs/host.md); tests/test_launch_plans.py checks that cached plans launch what fresh
ones would.

Plans hold plain values only, never a kernel: launchers look their JITFunctions up at
launch time, so the cost tool's recorder (sasa_triton/cost/record.py) still sees them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

# Every plan cache, so that `clear_all` can drop them (tests; nothing in the library needs it).
_CACHES: list[dict] = []
MAX_PLANS = 4096  # per launcher; a full cache is emptied, not evicted entry by entry
_MISSING = object()


class LaunchPlan(NamedTuple):
    """One kernel launch of a call key: `kernel[grid](*tensors, *head, *per-call values,
    *tail, **options)`. `grid` None: nothing to launch (an empty call). Made by
    `launch_plan`: a kernel argument added or removed is a one-line change there."""
    grid: Optional[tuple]
    head: tuple  # runtime arguments after the tensors (sizes, strides, ...)
    tail: tuple  # the runtime arguments after the per-call ones, then every constexpr
    flags: dict  # the constexpr arguments by name (what `tail` ends with; for reading)
    options: dict  # launch keywords (num_warps, num_stages)
    layouts: tuple = ()  # (shape, strides) of what the launcher allocates (empty_strided)


NO_LAUNCH = LaunchPlan(None, (), (), {}, {})
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def launch_plan(params, grid: tuple, head: tuple, tail: tuple, flags: dict,
                layouts: tuple = ()) -> LaunchPlan:
    """A LaunchPlan for a kernel with parameter names `params` (its `arg_names`): the
    constexpr values of `flags` go positionally, in the kernel's order, after `tail`
    (keyword arguments cost a launch about 0.1 us each, copied at every layer of
    `kernel[grid](...)`); `flags`' num_warps / num_stages stay keywords. Raises if the
    constexprs named are not exactly the kernel's last parameters."""
    options = {k: flags[k] for k in LAUNCH_OPTIONS if k in flags}
    constexprs = {k: v for k, v in flags.items() if k not in options}
    trailing = tuple(params[len(params) - len(constexprs):])
    if set(trailing) != set(constexprs):
        raise TypeError(f"launch plan: constexpr arguments {sorted(constexprs)} are not the "
                        f"kernel's last parameters {list(trailing)}")
    return LaunchPlan(grid, tuple(head), (*tail, *(constexprs[n] for n in trailing)),
                      constexprs, options, layouts)


def plan_cache(make: Callable[..., Any]) -> Callable[..., Any]:
    """`cached(key, *args)`: `make(*args)` the first time `key` is seen, the stored plan
    afterwards. `make` may raise (an unsupported call): nothing is stored then."""
    plans: dict = {}
    _CACHES.append(plans)

    def cached(key, *args) -> Any:
        try:
            plan = plans.get(key, _MISSING)
        except TypeError:  # an unhashable key (a config with a list in it): no caching
            return make(*args)
        if plan is _MISSING:
            plan = make(*args)
            if len(plans) >= MAX_PLANS:
                plans.clear()
            plans[key] = plan
        return plan

    cached.plans = plans
    cached.__doc__ = make.__doc__
    cached.__name__ = getattr(make, "__name__", "plan")
    return cached


def args_key(args) -> tuple:
    """The launch-relevant part of an AttendArgs: the window, the table layouts (2-D
    shared / 3-D per-head, or absent) and the scale; never the tables' data."""
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    return (kh, kw, dh, dw, padding, None if rel_h is None else rel_h.dim(),
            None if rel_w is None else rel_w.dim(), rpb is not None, scale)


def config_key(config) -> Any:
    """A hashable stand-in for a config dict (None: the default config)."""
    return None if config is None else tuple(config.items())


def contiguous_strides(shape) -> tuple[int, ...]:
    """The strides of a contiguous tensor of `shape` (those of a fresh output)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def clear_all() -> None:
    """Forget every plan."""
    for plans in _CACHES:
        plans.clear()


def per_call_key(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(q_shape, ..., args, ...)` (a variant's supports / default_config and the like:
    a pure function of the call key) computed once per key: AttendArgs arguments are keyed
    by `args_key`, shapes as tuples, everything else as it is. A dict result comes back as
    a fresh copy (callers may change it)."""
    from sasa_triton.types import AttendArgs

    results: dict = {}
    _CACHES.append(results)

    def key_of(x) -> Any:
        if isinstance(x, AttendArgs):
            return args_key(x)
        return tuple(x) if isinstance(x, list) else x

    @functools.wraps(fn)
    def cached(*a, **kw) -> Any:
        key = (tuple(key_of(x) for x in a), tuple((k, key_of(v)) for k, v in kw.items()))
        try:
            hit = results.get(key, _MISSING)
        except TypeError:  # something unhashable: no caching
            return fn(*a, **kw)
        if hit is _MISSING:
            hit = fn(*a, **kw)
            if len(results) >= MAX_PLANS:
                results.clear()
            results[key] = hit
        return dict(hit) if isinstance(hit, dict) else hit

    return cached
