"""`attend` as torch.library custom ops, so autograd and torch.compile see one opaque op.

Two ops, taking the implementation name (`backend`) and JSON config strings ("" = the
implementation's default config) as plain arguments:

* `sasa_triton::attend_fwd(q, k, v, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale,
  backend, fwd_config, bwd_config) -> (out, lse)` (bwd_config is kept for the backward)
* `sasa_triton::attend_bwd(q, k, v, out, lse, dout, rel_h, rel_w, rpb, kh, kw, dh, dw,
  padding, scale, backend, bwd_config) -> (dq, dk, dv, drel_h, drel_w, drpb)`, an empty
  tensor standing for an absent table's gradient.

`backend` is "auto" (sasa_triton.dispatch picks the kernel variant and config for the
call, inside the op, so tracing never runs the dispatcher), "reference", or a forced
forward variant ("tiled", "allheads", see `IMPLEMENTATIONS`), whose backward is the
dispatcher's default backward kernel. Implementations have the kernel-variant
signatures `forward(q, k, v, args, config) -> (out, lse)` and
`backward(q, k, v, out, lse, dout, args, config) -> (dq, dk, dv, drel_h, drel_w, drpb)`,
and are imported on first use, so importing this module imports no Triton.
The backward op has no autograd of its own: double backward is not supported.
In eager mode with nothing to differentiate, `attend_op` calls the forward directly
(the op dispatch costs tens of microseconds of host time).
"""
from __future__ import annotations

import functools
import importlib
import json
from typing import Callable, Optional

import torch
from torch import Tensor

from . import dispatch
from .args import AttendArgs
from .kernels import FORWARD_VARIANTS
from .registry import check_backend, register_backend
from .reference import reference_attend

# Names `attend_op` accepts besides "auto" (resolved per call by sasa_triton.dispatch):
# name -> "module:forward" target; the backward of a kernel variant is the dispatcher's
# default backward kernel (the reference where none supports the case).
IMPLEMENTATIONS: dict[str, str] = {"reference": "sasa_triton.ops:reference_forward",
                                   "cpu": "sasa_triton.cpu:forward"}
# implementations with a backward of their own (see dispatch._PLAIN); a kernel variant's
# backward is the dispatcher's default backward kernel
_OWN_BACKWARD = ("reference", "cpu")
IMPLEMENTATIONS.update({name: f"{module}:forward" for name, module in FORWARD_VARIANTS.items()})


def register_implementation(name: str, forward: str, triton: bool = True) -> None:
    """Makes `attend(..., backend=name)` run `forward` ("module:function" with the
    kernel-variant signature); its backward is the dispatcher's default backward."""
    IMPLEMENTATIONS[name] = forward
    register_backend(name, forward, triton=triton)
    _load.cache_clear()


@functools.lru_cache(maxsize=None)
def _load(target: str) -> Callable:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _impl(backend: str, direction: int, q: Tensor, args: AttendArgs, config_text: str):
    """(function, config) that run `direction` (0 forward, 1 backward) of `backend`."""
    if backend == "auto":
        name, config = dispatch.choose(q, args, direction)
    elif direction == 1 and backend not in _OWN_BACKWARD:
        name, config = dispatch.default_backward(q, args)
        if config_text and name != "reference":
            config = _config(config_text)
    else:
        if backend not in IMPLEMENTATIONS:
            raise ValueError(f"backend {backend!r} has no implementation in "
                             f"sasa_triton.ops.IMPLEMENTATIONS (use ops.register_implementation)")
        if direction == 1:  # one of _OWN_BACKWARD
            return dispatch.implementation(backend, 1), _config(config_text)
        return _load(IMPLEMENTATIONS[backend]), _config(config_text)
    return dispatch.implementation(name, direction), None if config is None else dict(config)


@functools.lru_cache(maxsize=256)
def _parse_config(text: str) -> Optional[dict]:
    return json.loads(text) if text else None


def _config(text: str) -> Optional[dict]:
    """The parsed config (a fresh dict: implementations may pop keys from it)."""
    config = _parse_config(text)
    return None if config is None else dict(config)


def _args(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale) -> AttendArgs:
    return AttendArgs(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale)


# ---------------------------------------------------------------- reference path

def reference_forward(q, k, v, args: AttendArgs, config=None):
    """(out, lse) of the reference, without building an autograd graph."""
    with torch.no_grad():
        return reference_attend(q, k, v, args, return_lse=True)


# ---------------------------------------------------------------- the ops

def _fresh(t: Tensor, inputs) -> Tensor:
    """Outputs are contiguous (as the fake impls say) and never a view of an input
    (a custom op may not alias): copy in the rare case one would be."""
    storage = t.untyped_storage().data_ptr()
    if any(storage == x.untyped_storage().data_ptr() for x in inputs if x is not None):
        return t.clone(memory_format=torch.contiguous_format)
    return t.contiguous()


@torch.library.custom_op("sasa_triton::attend_fwd", mutates_args=())
def attend_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    rel_h: Optional[Tensor], rel_w: Optional[Tensor], rpb: Optional[Tensor],
    kh: int, kw: int, dh: int, dw: int, padding: str, scale: float,
    backend: str, fwd_config: str, bwd_config: str,
) -> tuple[Tensor, Tensor]:
    args = _args(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale)
    forward, config = _impl(backend, 0, q, args, fwd_config)
    out, lse = forward(q, k, v, args, config)
    return _fresh(out, (q, k, v)), _fresh(lse, (q, k, v))


@attend_fwd.register_fake
def _(q, k, v, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale, backend, fwd_config,
      bwd_config):
    check_backend(backend, q)  # at trace time: `attend` skips this check under torch.compile
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=lse_dtype)


@torch.library.custom_op("sasa_triton::attend_bwd", mutates_args=())
def attend_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
    rel_h: Optional[Tensor], rel_w: Optional[Tensor], rpb: Optional[Tensor],
    kh: int, kw: int, dh: int, dw: int, padding: str, scale: float,
    backend: str, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = _args(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale)
    backward, parsed = _impl(backend, 1, q, args, config)
    grads = backward(q, k, v, out, lse, dout, args, parsed)
    inputs = (q, k, v, out, lse, dout, rel_h, rel_w, rpb)
    return tuple(q.new_empty(0) if g is None else _fresh(g, inputs) for g in grads)


@attend_bwd.register_fake
def _(q, k, v, out, lse, dout, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale, backend, config):
    grads = [q.new_empty(q.shape) for _ in range(3)]
    grads += [q.new_empty(0) if t is None else t.new_empty(t.shape) for t in (rel_h, rel_w, rpb)]
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    q, k, v, rel_h, rel_w, rpb, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_h, rel_w, rpb)
    ctx.rest = rest[:-2] + rest[-1:]  # kh, kw, dh, dw, padding, scale, backend, bwd_config
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, rel_h, rel_w, rpb = ctx.saved_tensors
    dq, dk, dv, drel_h, drel_w, drpb = attend_bwd(q, k, v, out, lse, dout, rel_h, rel_w, rpb,
                                                  *ctx.rest)
    return (dq, dk, dv,
            drel_h if rel_h is not None else None,
            drel_w if rel_w is not None else None,
            drpb if rpb is not None else None,
            *([None] * (len(ctx.rest) + 1)))


attend_fwd.register_autograd(_backward, setup_context=_setup_context)


def attend_op(q, k, v, args: AttendArgs, backend: str, fwd_config: str = "",
              bwd_config: str = "") -> Tensor:
    """Runs `backend` through the custom op (differentiable, torch.compile-friendly);
    the configs are JSON strings of the variants' config dicts ("" = their default)."""
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rel_h, rel_w, rpb))):
        # eager, nothing to differentiate: skip the op dispatch (tens of microseconds)
        forward, config = _impl(backend, 0, q, args, fwd_config)
        return forward(q, k, v, args, config)[0]
    out, _ = attend_fwd(q, k, v, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale,
                        backend, fwd_config, bwd_config)
    return out
