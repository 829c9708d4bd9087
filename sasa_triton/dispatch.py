"""Dispatch: which implementation (a `sasa_triton.variants` entry and its config) runs a call.

Dispatch only chooses; the names it returns were checked by `attend` and are run by
`sasa_triton.ops`. `resolve(backend, direction, q, args, config)` is the one entry point:

* "auto" -> `choose(q, args, direction)`. On CUDA (non-float64) the order is: the tuned
  table for this GPU (sasa_triton.autotune.lookup: user cache dir, then the shipped
  table) -> the heuristic below -> the reference when no kernel supports the case.
  On CPU it is "cpu" (sasa_triton/cpu.py, every dtype); elsewhere (float64 on CUDA) the
  reference. The result is cached per call key, so a call costs one dict lookup after
  the first.
* a forced backend -> its forward with the given config; its backward is its own
  `backward` when it has one, else `default_backward` (with the given config, if any).

Forward heuristic, read from `python -m sasa_triton.cost` over the "all" suite (predicted
sm_90 times; docs/PERF.md) until a GPU's tuned table replaces it: head dims below 16 and
small windows (kh * kw <= SMALL_WINDOW) go to "tile2d" (CUDA cores, a 2-D pixel tile with
all heads; tensor-core tiles would pad d to 16), maps of at most 64 pixels (a ResNet's
7 x 7 stage) in 16-bit to "image" (the whole image per program, tensor cores), everything
else to "rows" (tensor-core row tiles); "tiled" is the fallback for what none supports
(d > 128 with more heads than tile2d holds, windows wider than both allow). A variant
that does not support the shape is skipped.
Backward, read from the same tool: head dims below 16 and the same small windows go to
"tile2dbwd" (CUDA cores, like tile2d), maps of at most 64 pixels (a ResNet's 7 x 7 stage)
to "imagebwd" (the whole image per program, tensor cores), everything else to "rowsbwd";
"offsets" covers what neither supports (shift padding at small d, d > 128, ...).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import variants
from .types import AttendArgs
from .variants import CPU, REFERENCE, call_key, triton_usable

_CACHE: dict = {}
# Windows of at most this many taps (k = 3) go to tile2d / tile2dbwd whatever the head
# dim: the row tiles' per-key-row overhead is not repaid by so few window rows (cost
# tool; at k = 5 the rows kernels now win both directions, if narrowly forward).
SMALL_WINDOW = 9
_DIRECTIONS = variants.DIRECTIONS  # direction index 0 / 1 -> "fwd" / "bwd"


def resolve(backend: str, direction: int, q: torch.Tensor, args: AttendArgs,
            config: Optional[dict] = None) -> tuple[str, Optional[dict]]:
    """(variant name, config) running `direction` (0 forward, 1 backward) of a call with
    the (already checked) backend name; `config` is the caller's forced config or None."""
    if backend == "auto":
        name, chosen = choose(q, args, direction)
        return name, None if chosen is None else dict(chosen)
    if variants.VARIANTS[backend].function(_DIRECTIONS[direction]) is not None:
        return backend, config
    name, chosen = default_backward(q, args)
    if config is not None and name != REFERENCE:
        return name, config
    return name, None if chosen is None else dict(chosen)


def choose(q: torch.Tensor, args: AttendArgs, direction: int = 0) -> tuple[str, Optional[dict]]:
    """(variant name, config) for a backend="auto" call; cached per call key."""
    key = (direction, *call_key(q, args))
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = _choose(q, args, direction)
    return hit


def _choose(q, args: AttendArgs, direction: int) -> tuple[str, Optional[dict]]:
    if q.device.type == "cpu":
        return CPU, None
    if q.dtype == torch.float64 or q.device.type != "cuda" or not triton_usable("cuda"):
        return REFERENCE, None
    shape = tuple(q.shape)
    tuned = _tuned(q, args, direction, shape)
    if tuned is not None:
        return tuned
    if direction == 1:
        return default_backward(q, args)
    return heuristic_forward(shape, q.dtype, args)


def heuristic_forward(shape: tuple, dtype, args: AttendArgs) -> tuple[str, Optional[dict]]:
    """The forward heuristic of the module docstring (no tuned table, any device)."""
    _, _, _, heads, d = shape
    if d < 16 or args.kh * args.kw <= SMALL_WINDOW:
        prefer = ("tile2d", "rows", "tiled")
    else:  # image takes only small maps (H * W <= 64) in 16-bit, where it wins
        prefer = ("image", "rows", "tile2d", "tiled")
    for name in prefer:
        variant = variants.VARIANTS.get(name)
        if variant is not None and variant.supports(shape, dtype, args):
            return name, variant.default_config(shape, args)
    return REFERENCE, None


def heuristic_backward(shape: tuple, dtype, args: AttendArgs) -> tuple[str, Optional[dict]]:
    """The backward heuristic of the module docstring (no tuned table, any device)."""
    d = shape[-1]
    if d < 16 or args.kh * args.kw <= SMALL_WINDOW:
        prefer = ("tile2dbwd", "rowsbwd")
    else:  # imagebwd takes only small maps (H * W <= 64), where it wins
        prefer = ("imagebwd", "rowsbwd", "tile2dbwd")
    for name in prefer:
        variant = variants.VARIANTS.get(name)
        if variant is not None and variant.supports(shape, dtype, args):
            return name, variant.default_config(shape, args)
    for variant in variants.with_direction("bwd"):  # whatever else covers the case
        if variant.needs_triton and variant.supports(shape, dtype, args):
            return variant.name, variant.default_config(shape, args)
    return REFERENCE, None


def default_backward(q: torch.Tensor, args: AttendArgs) -> tuple[str, Optional[dict]]:
    """`heuristic_backward`'s choice (default config), else the reference; also the
    backward of a forced forward-only variant. Cached."""
    key = ("bwd-default", *call_key(q, args))
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = heuristic_backward(tuple(q.shape), q.dtype, args)
    return hit


def _tuned(q, args: AttendArgs, direction: int, shape) -> Optional[tuple[str, dict]]:
    """The tuned table's (variant, config), if it has this key and the variant runs it."""
    from .autotune.keys import key_for
    from .autotune.lookup import lookup

    hit = lookup(key_for(q, args, _DIRECTIONS[direction]), q.device, shape=shape)
    if hit is None:
        return None
    variant = variants.VARIANTS.get(hit[0])
    if variant is None or variant.function(_DIRECTIONS[direction]) is None:
        return None
    if not variant.supports(shape, q.dtype, args):
        return None
    space = variant.search_space() if variant.search_space is not None else None
    if space is not None and hit[1] not in space:  # a table is data: trust no config it names
        warnings.warn(f"sasa_triton: ignoring the tuned config {hit[1]!r} of {hit[0]!r}: it "
                      f"is not in the variant's search space (edited or foreign table?); "
                      f"using the heuristic kernel choice", UserWarning, stacklevel=2)
        return None
    return hit


def clear_cache() -> None:
    """Forget cached choices (after a new tuned table is written, for instance)."""
    _CACHE.clear()
