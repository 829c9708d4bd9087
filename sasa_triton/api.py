"""`attend`: validate, choose an implementation, run it."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .args import check_attend_args, check_call
from .ops import attend_op
from .variants import check_backend, check_supported

IntPair = Union[int, Sequence[int]]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntPair,
    *,
    dilation: IntPair = 1,
    padding: str = "zeros",
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Stand-alone self-attention over each pixel's kh x kw neighborhood.

    Args:
        q, k, v: (B, H, W, heads, d) tensors of one dtype (float16, bfloat16, float32;
            float64 on the plain-PyTorch backends "cpu" and "reference"), any strides.
        kernel_size: odd int or (kh, kw).
        dilation: int or (dh, dw), >= 1.
        padding: "zeros" (out-of-image neighbors are zero keys/values that still take
            softmax mass, like F.pad + unfold), "mask" (they are left out of the
            softmax), or "shift" (the window moves inward to stay inside the image,
            like NATTEN).
        rel_h, rel_w: SASA relative embeddings, both or neither: rel_h is
            ((heads,) rows, d//2), rel_w ((heads,) cols, d - d//2), with rows = kh
            (zeros/mask) or 2kh-1 (shift); a 2-D table is shared by all heads.
        rpb: additive relative positional bias, (heads, 2kh-1, 2kw-1).
        scale: logit scale; None means d ** -0.5.
        backend: "auto" (the fastest kernel on CUDA, "cpu" on CPU), or a name
            from `sasa_triton.backends()` to force an implementation.

    Returns:
        A new contiguous (B, H, W, heads, d) tensor in q's dtype (under torch.autocast:
        the autocast dtype, see `_autocast`):
        out[b, i, j, n] = sum over the window of softmax(l) * v, with
        l = scale * q . (k + [rel_h[row], rel_w[col]]) + rpb[n, dy + kh - 1, dx + kw - 1].
    """
    if _any_autocast():
        q, k, v, rel_h, rel_w, rpb = _autocast(q, k, v, rel_h, rel_w, rpb)
    if torch.compiler.is_compiling():  # traced: no caches; the op's fake impl checks the backend
        args = check_attend_args(q, k, v, kernel_size, dilation, padding, rel_h, rel_w, rpb,
                                 scale)
        if q.numel() == 0:
            return _empty_output(q, k, v, args)
        return attend_op(q, k, v, args, backend)
    # eager: the checks' verdict is cached per call key (sasa_triton/args.py), and the key's
    # `checked` lets the op cache its dispatch too
    args, checked = check_call(q, k, v, kernel_size, dilation, padding, rel_h, rel_w, rpb, scale)
    forced = backend != "auto"  # "auto" passes both backend checks: skip the two calls
    if forced:
        check_backend(backend, q)
    if q.numel() == 0 if checked is None else checked.empty:
        return _empty_output(q, k, v, args)
    if forced:
        check_supported(backend, q, args)
    # a custom op (autograd + torch.compile); "auto" is resolved inside it per call
    return attend_op(q, k, v, args, backend, checked=checked)


def _autocast(*tensors):
    """Under torch.autocast for q's device, q, k, v, rel_h, rel_w and rpb are cast to the
    autocast dtype (float16 / bfloat16; float64 stays, as autocast leaves it), so the
    attention runs in that dtype (softmax and accumulation stay float32 inside). A
    custom op gets no autocast of its own; `torch.library.register_autocast` would fix
    one dtype per device, not follow the user's. The casts are differentiable."""
    q = tensors[0]
    if not isinstance(q, torch.Tensor) or not _autocast_on(q.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


# Whether autocast is on for any device type: one cheap call on the common path (private
# torch API; without it, every call asks for q's device type).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_on(device_type: str) -> bool:
    """torch.autocast is active for this device type (never for "meta" and other types
    autocast does not know: asking torch about them raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _empty_output(q, k, v, args) -> torch.Tensor:
    """The output of an empty call, still connected to every input for autograd (so a
    backward through it gives zero gradients instead of failing)."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    tensors = [t for t in (q, k, v, args.rel_h, args.rel_w, args.rpb) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = out + sum(t.sum() for t in tensors).to(q.dtype) * 0
    return out
