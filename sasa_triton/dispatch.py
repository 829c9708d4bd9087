"""Dispatch: which implementation (kernel variant and config) runs a call.

`choose(q, args, direction)` returns (name, config) for the forward (direction 0) or the
backward (1) of a `backend="auto"` call. On CUDA (non-float64) the order is: the tuned
table for this GPU (sasa_triton.autotune.lookup: user cache dir, then the shipped table)
-> the heuristic below -> the reference when no kernel supports the case. Elsewhere (CPU,
float64) it is the reference. The result is cached per call key, so a call costs one dict
lookup after the first. `implementation(name, direction)` is the function that runs it.

Forward heuristic (PERF.md's calibration on an H100, and the sm_90 machine code): head
dims below 16 go to "tile2d" (CUDA cores, a 2-D pixel tile with all heads; tensor-core
tiles would pad d to 16 and waste most of each MMA), then "allheads" (rows too wide for
tile2d); rows of at most 32 values (heads x d) go to "allheads", where a one-head tile
reads sector fragments; everything else goes to "tiled" (tensor cores win from d = 16
on). A variant that does not support the shape is skipped.
Backward: the first backward variant that supports the case, with its default config.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from .args import AttendArgs
from .kernels import BACKWARD_VARIANTS, FORWARD_VARIANTS
from .registry import triton_usable

_CACHE: dict = {}
_VARIANTS = (FORWARD_VARIANTS, BACKWARD_VARIANTS)
_REFERENCE = ("sasa_triton.ops:reference_forward", "sasa_triton.reference_bwd:reference_backward")


def variant_module(name: str, direction: int = 0):
    """The module of kernel variant `name` (imports Triton)."""
    variants = _VARIANTS[direction]
    if name not in variants:
        raise ValueError(f"unknown {('forward', 'backward')[direction]} variant {name!r}; "
                         f"known: {sorted(variants)}")
    return importlib.import_module(variants[name])


def implementation(name: str, direction: int) -> Callable:
    """forward(q, k, v, args, config) or backward(q, k, v, out, lse, dout, args, config)."""
    if name == "reference":
        module, _, function = _REFERENCE[direction].partition(":")
        return getattr(importlib.import_module(module), function)
    return getattr(variant_module(name, direction), ("forward", "backward")[direction])


def call_key(q: torch.Tensor, args: AttendArgs) -> tuple:
    """Everything about a call that a kernel choice may depend on (no tensor data)."""
    rel = None if args.rel_h is None else args.rel_h.dim()
    return (q.device, tuple(q.shape), q.dtype, args.kh, args.kw, args.dh, args.dw,
            args.padding, rel, args.rpb is not None)


def choose(q: torch.Tensor, args: AttendArgs, direction: int = 0) -> tuple[str, Optional[dict]]:
    """(implementation name, config) for a backend="auto" call; cached per call key."""
    key = (direction, *call_key(q, args))
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = _choose(q, args, direction)
    return hit


def _choose(q, args: AttendArgs, direction: int):
    if q.dtype == torch.float64 or q.device.type != "cuda" or not triton_usable("cuda"):
        return "reference", None
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
    if d < 16:
        prefer = ("tile2d", "allheads", "tiled")
    elif heads * d <= 32:
        prefer = ("allheads", "tiled")
    else:
        prefer = ("tiled", "allheads")
    for name in prefer:
        module = variant_module(name)
        if module.supports(shape, dtype, args):
            return name, module.default_config(shape, args)
    return "reference", None


def default_backward(q: torch.Tensor, args: AttendArgs) -> tuple[str, Optional[dict]]:
    """The first backward kernel that supports the case (default config), else the
    reference; also the backward of a forced forward variant. Cached per call key."""
    key = ("bwd-default", *call_key(q, args))
    hit = _CACHE.get(key)
    if hit is None:
        hit = "reference", None
        shape = tuple(q.shape)
        for name in BACKWARD_VARIANTS:
            module = variant_module(name, 1)
            if module.supports(shape, q.dtype, args):
                hit = name, module.default_config(shape, args)
                break
        _CACHE[key] = hit
    return hit


def _tuned(q, args: AttendArgs, direction: int, shape):
    """The tuned table's (variant, config), if it has this key and the variant runs it."""
    from .autotune.keys import key_for
    from .autotune.lookup import lookup

    hit = lookup(key_for(q, args, ("fwd", "bwd")[direction]), q.device, shape=shape)
    if hit is None or hit[0] not in _VARIANTS[direction]:
        return None
    if not variant_module(hit[0], direction).supports(shape, q.dtype, args):
        return None
    return hit


def check_forced(name: str, q: torch.Tensor, args: AttendArgs) -> None:
    """A forced forward variant that cannot run this case raises before any launch."""
    key = ("forced", name, *call_key(q, args))
    if key in _CACHE:
        return
    if not variant_module(name).supports(tuple(q.shape), q.dtype, args):
        raise ValueError(f"backend={name!r} does not support q of shape {tuple(q.shape)} and "
                         f"dtype {q.dtype} with these arguments; use backend='auto'")
    _CACHE[key] = True


def clear_cache() -> None:
    """Forget cached choices (after a new tuned table is written, for instance)."""
    _CACHE.clear()
