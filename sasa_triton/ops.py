"""`attend` as torch.library custom ops, so autograd and torch.compile see one opaque op.

Two ops, taking the implementation name (`backend`) and JSON config strings ("" = the
implementation's default config) as plain arguments:

* `sasa_triton::attend_fwd(q, k, v, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale,
  backend, fwd_config, bwd_config) -> (out, lse)` (bwd_config is kept for the backward)
* `sasa_triton::attend_bwd(q, k, v, out, lse, dout, rel_h, rel_w, rpb, kh, kw, dh, dw,
  padding, scale, backend, bwd_config) -> (dq, dk, dv, drel_h, drel_w, drpb)`, an empty
  tensor standing for an absent table's gradient.

`backend` is a name `attend` has checked (sasa_triton.variants.check_backend): "auto"
(resolved per call inside the op, so tracing never runs the dispatcher) or a variant of
the table. Ops only run: `sasa_triton.dispatch.resolve` says which variant and config,
the variant's `forward` / `backward` (imported on first use, so importing this module
imports no Triton) computes.
The backward op has no autograd of its own: double backward is not supported.

Plain eager calls skip the op dispatch (it costs about 100 us of host time per forward,
most of it torch.library's argument handling): with nothing to differentiate
`attend_op` calls the forward directly, otherwise `_EagerAttend`, an autograd Function
around the same two bodies (same saved tensors, same backward). Everything that traces
or intercepts ops -- torch.compile and torch.export, fake or subclass tensors, meta
tensors, dispatch and function modes, functorch transforms, torch.jit tracing -- goes
through the custom ops (`_plain_eager`).
"""
from __future__ import annotations

import functools
import json
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch, variants
from .args import Checked
from .types import AttendArgs


def _impl(backend: str, direction: int, q: Tensor, args: AttendArgs, config_text: str,
          checked: Optional[Checked] = None) -> tuple[Callable, Optional[dict], bool]:
    """(function, config, fresh) that run `direction` (0 forward, 1 backward) of
    `backend`; fresh: a Triton launcher, whose outputs are its own new contiguous
    allocations or views of them (`_fresh` need not look at storages). `checked`: the
    call key's verdict (sasa_triton.args.check_call), where the answer is kept."""
    if checked is not None:
        hit = checked.memo.get((backend, direction, config_text))
        # valid while the dispatcher's cache lives (dispatch.clear_cache() drops the
        # generation) and the variant is still the registered one
        if (hit is not None and hit[0] is _generation()
                and variants.VARIANTS.get(hit[1].name) is hit[1]):
            generation, variant, function, config, module, attribute = hit
            if module is not None:  # a Lazy's function, looked up as Lazy does (a
                function = getattr(module, attribute)  # monkeypatch shows) minus its call
            return function, None if config is None else dict(config), variant.needs_triton
    name, config = dispatch.resolve(backend, direction, q, args, _config(config_text))
    variant = variants.VARIANTS[name]
    function = variant.function(variants.DIRECTIONS[direction])
    if checked is not None:
        module = attribute = None
        if isinstance(function, variants.Lazy):
            module, attribute = function.module(), function.target.partition(":")[2]
        checked.memo[backend, direction, config_text] = (
            _generation(), variant, function, None if config is None else dict(config),
            module, attribute)
    return function, config, variant.needs_triton


_GENERATION_KEY = ("sasa_triton.ops: generation",)


def _generation() -> object:
    """A token that lives in the dispatcher's cache: `dispatch.clear_cache()` (a new tuned
    table, a test's stub) drops it, and with it every choice `_impl` kept."""
    token = dispatch._CACHE.get(_GENERATION_KEY)
    if token is None:
        token = dispatch._CACHE[_GENERATION_KEY] = object()
    return token


@functools.lru_cache(maxsize=256)
def _parse_config(text: str) -> Optional[dict]:
    return json.loads(text) if text else None


def _config(text: str) -> Optional[dict]:
    """The parsed config (a fresh dict: implementations may pop keys from it)."""
    config = _parse_config(text)
    return None if config is None else dict(config)


def _args(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale) -> AttendArgs:
    return AttendArgs(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale)


# ---------------------------------------------------------------- the ops

def _fresh(outputs, inputs, allocated: bool = False) -> Sequence:
    """Outputs are contiguous (as the fake impls say) and never a view of an input
    (a custom op may not alias): copy in the rare case one would be. `allocated`: the
    launcher allocated every output itself (a Triton variant: tests/test_launch_plans.py
    checks it), only contiguity is left to check."""
    if allocated:
        for t in outputs:  # contiguous as they are, the common case: no new list
            if t is not None and not t.is_contiguous():
                return [t if t is None or t.is_contiguous() else t.contiguous() for t in outputs]
        return outputs
    taken = {x.untyped_storage().data_ptr() for x in inputs if x is not None}
    return [None if t is None
            else t.clone(memory_format=torch.contiguous_format)
            if t.untyped_storage().data_ptr() in taken else t.contiguous()
            for t in outputs]


def _run_forward(q: Tensor, k: Tensor, v: Tensor, args: AttendArgs, backend: str,
                 config: str, checked: Optional[Checked] = None) -> Sequence:
    """[out, lse] of `backend`'s forward: the body of the forward op and of the eager path."""
    forward, parsed, allocated = _impl(backend, 0, q, args, config, checked)
    return _fresh(forward(q, k, v, args, parsed), (q, k, v), allocated)


def _run_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                  args: AttendArgs, backend: str, config: str,
                  checked: Optional[Checked] = None) -> Sequence:
    """The six gradients (None for an absent table) of `backend`'s backward: the body of
    the backward op and of the eager path."""
    backward, parsed, allocated = _impl(backend, 1, q, args, config, checked)
    return _fresh(backward(q, k, v, out, lse, dout, args, parsed),
                  (q, k, v, out, lse, dout, args.rel_h, args.rel_w, args.rpb), allocated)


def _attend_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    rel_h: Optional[Tensor], rel_w: Optional[Tensor], rpb: Optional[Tensor],
    kh: int, kw: int, dh: int, dw: int, padding: str, scale: float,
    backend: str, fwd_config: str, bwd_config: str,
) -> tuple[Tensor, Tensor]:
    args = _args(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale)
    out, lse = _run_forward(q, k, v, args, backend, fwd_config)
    return out, lse


attend_fwd = torch.library.custom_op("sasa_triton::attend_fwd", mutates_args=())(_attend_fwd)


@attend_fwd.register_fake
def _(q, k, v, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale, backend, fwd_config,
      bwd_config):
    variants.check_backend(backend, q)  # at trace time: `attend` skips this check under torch.compile
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=lse_dtype)


def _attend_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
    rel_h: Optional[Tensor], rel_w: Optional[Tensor], rpb: Optional[Tensor],
    kh: int, kw: int, dh: int, dw: int, padding: str, scale: float,
    backend: str, config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = _args(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale)
    grads = _run_backward(q, k, v, out, lse, dout, args, backend, config)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


attend_bwd = torch.library.custom_op("sasa_triton::attend_bwd", mutates_args=())(_attend_bwd)


@attend_bwd.register_fake
def _(q, k, v, out, lse, dout, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale, backend, config):
    grads = [q.new_empty(q.shape) for _ in range(3)]
    grads += [q.new_empty(0) if t is None else t.new_empty(t.shape) for t in (rel_h, rel_w, rpb)]
    return tuple(grads)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_h, rel_w, rpb, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_h, rel_w, rpb)
    ctx.rest = rest[:-2] + rest[-1:]  # kh, kw, dh, dw, padding, scale, backend, bwd_config
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse) -> tuple:
    q, k, v, out, lse, rel_h, rel_w, rpb = ctx.saved_tensors
    dq, dk, dv, drel_h, drel_w, drpb = attend_bwd(q, k, v, out, lse, dout, rel_h, rel_w, rpb,
                                                  *ctx.rest)
    return (dq, dk, dv,
            drel_h if rel_h is not None else None,
            drel_w if rel_w is not None else None,
            drpb if rpb is not None else None,
            *([None] * (len(ctx.rest) + 1)))


attend_fwd.register_autograd(_backward, setup_context=_setup_context)


def custom_op_body(name: str) -> Optional[Callable]:
    """The Python function behind the custom op `sasa_triton::<name>` ("attend_fwd" or
    "attend_bwd"), else None: a dispatch mode may run it to see inside the op."""
    return {"attend_fwd": _attend_fwd, "attend_bwd": _attend_bwd}.get(name)


# Tensor types the eager path takes as they are (anything else may trace or intercept).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# the C checks of `_plain_eager`, bound once (each attribute path costs a call ~0.05 us)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_transform = torch._C._functorch.peek_interpreter_stack
_jit_tracing = torch._C._get_tracing_state
_grad_enabled = torch._C.is_grad_enabled


def _plain_eager(tensors, checked: Optional[Checked] = None) -> bool:
    """No op interception: plain (or Parameter) tensors off the meta device and not
    functorch wrappers, no dispatch or function mode, no functorch transform, no jit
    tracing. The caller checks torch.compiler.is_compiling() first (Dynamo must not
    trace these calls). `checked`: the call key's verdict, which keeps the part the key
    decides (the tensors' types and device)."""
    if (_dispatch_modes() or _function_modes() or _functorch_transform() is not None
            or _jit_tracing() is not None):
        return False
    plain = None if checked is None else checked.plain
    if plain is None:
        plain = not tensors[0].is_meta
        for t in tensors:  # a plain loop: half the time of all() over a generator
            if t is not None and type(t) not in _PLAIN_TYPES:
                plain = False
        if checked is not None:
            checked.plain = plain
    if not plain:
        return False
    for t in tensors:
        if t is not None and _functorch_wrapped(t):
            return False
    return True


class _EagerAttend(torch.autograd.Function):
    """The custom ops' autograd in plain eager mode, without their dispatch: forward
    and backward run the ops' bodies `_run_forward` / `_run_backward` directly."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, rpb, call: tuple) -> Tensor:
        args, backend, fwd_config, bwd_config, checked = call
        out, lse = _run_forward(q, k, v, args, backend, fwd_config, checked)
        ctx.save_for_backward(q, k, v, out, lse, rel_h, rel_w, rpb)
        # the window and scale only (the tables come back through saved_tensors); the
        # call key's verdict, where the backward's dispatch is kept
        ctx.rest = (*args[:5], args.scale, backend, bwd_config, checked)
        return out

    @staticmethod
    def backward(ctx, dout) -> tuple:
        if _grad_enabled():  # create_graph: refuse double backward, as the op does
            return _once_differentiable_backward(ctx, dout)
        return _eager_backward(ctx, dout)  # the engine runs backward under no_grad


def _eager_backward(ctx, dout) -> tuple:
    """`_EagerAttend.backward`'s body (grad mode off)."""
    q, k, v, out, lse, rel_h, rel_w, rpb = ctx.saved_tensors
    kh, kw, dh, dw, padding, scale, backend, config, checked = ctx.rest
    args = _new_args((kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale))
    dq, dk, dv, drel_h, drel_w, drpb = _run_backward(q, k, v, out, lse, dout, args,
                                                     backend, config, checked)
    return (dq, dk, dv,  # an absent table gets no gradient, whatever a variant returns
            drel_h if rel_h is not None else None,
            drel_w if rel_w is not None else None,
            drpb if rpb is not None else None,
            None)


_new_args = AttendArgs._make  # tuple.__new__: a third of the time of AttendArgs(...)


# once_differentiable costs ~3 us per backward; only create_graph=True needs it
_once_differentiable_backward = once_differentiable(_eager_backward)


# autograd.Function.apply without its Python wrapper (2-3 us): that wrapper only binds
# default arguments (none here) and unwraps functorch tensors (`_plain_eager` excludes them)
_eager_apply = super(torch.autograd.Function, _EagerAttend).apply


def attend_op(q, k, v, args: AttendArgs, backend: str, fwd_config: str = "",
              bwd_config: str = "", checked: Optional[Checked] = None) -> Tensor:
    """Runs `backend` through the custom op (differentiable, torch.compile-friendly);
    the configs are JSON strings of the variants' config dicts ("" = their default).
    Plain eager calls take the same bodies without the op dispatch (module docstring);
    `checked` (sasa_triton.args.check_call's verdict for this call's key) lets them keep
    their dispatch result per key."""
    rel_h, rel_w, rpb = args[5], args[6], args[7]
    # a verdict comes from `attend` in eager mode only: no need to ask again
    if checked is not None or not torch.compiler.is_compiling():
        tensors = (q, k, v, rel_h, rel_w, rpb)
        if _plain_eager(tensors, checked):
            if _grad_enabled():
                for t in tensors:  # a plain loop: half the time of any() over a generator
                    if t is not None and t.requires_grad:
                        return _eager_apply(q, k, v, rel_h, rel_w, rpb,
                                            (args, backend, fwd_config, bwd_config, checked))
            # nothing to differentiate: the forward alone
            forward, config, _ = _impl(backend, 0, q, args, fwd_config, checked)
            return forward(q, k, v, args, config)[0]
    kh, kw, dh, dw, padding, _, _, _, scale = args
    out, _ = attend_fwd(q, k, v, rel_h, rel_w, rpb, kh, kw, dh, dw, padding, scale,
                        backend, fwd_config, bwd_config)
    return out
