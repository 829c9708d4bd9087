"""Forward dispatch v1: which kernel variant (and config) runs a given call.

`choose_forward(q, args) -> (variant, config)` uses a documented heuristic over the
variants' own `supports` and `default_config`; the result is cached per shape key, so a
call costs one dict lookup after the first. Tuned tables (sasa_triton.autotune) can
replace the heuristic later through `set_forward_lookup`.

The backends registered in sasa_triton.backends ("triton", "tiled", "allheads") are the
functions `*_attend(q, k, v, args) -> out` below. They import Triton on first use only.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from .args import AttendArgs
from .kernels import FORWARD_VARIANTS

_CACHE: dict = {}
_LOOKUP: Optional[Callable] = None  # (key, q_shape, args) -> (variant, config) or None


def variant_module(name: str):
    """The module of forward variant `name` (imports Triton)."""
    if name not in FORWARD_VARIANTS:
        raise ValueError(f"unknown forward variant {name!r}; known: {sorted(FORWARD_VARIANTS)}")
    return importlib.import_module(FORWARD_VARIANTS[name])


def forward_key(q: torch.Tensor, args: AttendArgs) -> tuple:
    """Everything about a call that a kernel choice may depend on (no tensor data)."""
    rel = None if args.rel_h is None else args.rel_h.dim()
    return (q.device.type, tuple(q.shape), q.dtype, args.kh, args.kw, args.dh, args.dw,
            args.padding, rel, args.rpb is not None)


def set_forward_lookup(fn: Optional[Callable]) -> None:
    """Installs a tuned-table lookup `fn(key, q_shape, args) -> (variant, config) | None`
    consulted before the heuristic (None removes it)."""
    global _LOOKUP
    _LOOKUP = fn
    _CACHE.clear()


def choose_forward(q: torch.Tensor, args: AttendArgs) -> tuple[str, dict]:
    """(variant name, config) for this call; ("reference", {}) when no kernel supports it.

    Heuristic (from PERF.md's calibration, H100): head dims below 16 go to "allheads"
    (tensor-core tiles would pad d to 16 and waste most of each MMA; all heads of a
    pixel form one coalesced row); so do rows of at most 32 values in all (heads x d),
    where a one-head tile reads sector fragments. Everything else goes to "tiled" (tensor
    cores win from d = 16 on). A variant that does not support the shape is skipped.
    """
    key = forward_key(q, args)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    shape = tuple(q.shape)
    choice = _LOOKUP(key, shape, args) if _LOOKUP is not None else None
    if choice is None:
        B, H, W, heads, d = shape
        prefer = ("allheads", "tiled") if d < 16 or heads * d <= 32 else ("tiled", "allheads")
        choice = ("reference", {})
        for name in prefer:
            mod = variant_module(name)
            if mod.supports(shape, q.dtype, args):
                choice = (name, mod.default_config(shape, args))
                break
    _CACHE[key] = choice
    return choice


def run_forward(name: str, q, k, v, args: AttendArgs, config: Optional[dict] = None):
    """(out, lse) from forward variant `name`; a clear error if it cannot run this case."""
    mod = variant_module(name)
    if not mod.supports(tuple(q.shape), q.dtype, args):
        raise ValueError(f"backend={name!r} does not support q of shape {tuple(q.shape)} and "
                         f"dtype {q.dtype} with these arguments; use backend='auto'")
    return mod.forward(q, k, v, args, config)


def _needs_grad(q, k, v, args: AttendArgs) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, args.rel_h, args.rel_w, args.rpb))


def triton_attend(q, k, v, args: AttendArgs) -> torch.Tensor:
    """Backend "triton": the dispatcher's choice of kernel. Until the kernels' autograd
    Function lands, calls that need gradients run the (differentiable) reference."""
    name, config = choose_forward(q, args)
    if name == "reference" or _needs_grad(q, k, v, args):
        from .reference import reference_attend
        return reference_attend(q, k, v, args)
    return variant_module(name).forward(q, k, v, args, config)[0]


def _forced(name: str, q, k, v, args: AttendArgs) -> torch.Tensor:
    if _needs_grad(q, k, v, args):
        raise ValueError(f"backend={name!r} runs the forward kernel only (no gradients yet); "
                         f"use backend='auto' or 'reference' for inputs that require grad")
    return run_forward(name, q, k, v, args)[0]


def tiled_attend(q, k, v, args: AttendArgs) -> torch.Tensor:
    """Backend "tiled": forces the tensor-core tile kernel (default config)."""
    return _forced("tiled", q, k, v, args)


def allheads_attend(q, k, v, args: AttendArgs) -> torch.Tensor:
    """Backend "allheads": forces the all-heads kernel (default config)."""
    return _forced("allheads", q, k, v, args)
