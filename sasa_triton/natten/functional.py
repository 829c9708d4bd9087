"""NATTEN's functional API (`na2d`, `na1d`, and the split `na*d_qk` / `na*d_av`) on `attend`.

Neighborhood attention is `attend(..., padding="shift")`: NATTEN's window moves inward
at the borders, its rpb is indexed by the neighbor's offset in dilated steps
(`rpb[head, dy + kh - 1, dx + kw - 1]`), and the logit is `scale * q.k + rpb`.

* `na2d` / `na1d` (fused, heads-last `(B, H, W, heads, d)` / `(B, L, heads, d)`): NATTEN
  0.17's signature; they run the library's kernels (the reference on CPU) and are
  differentiable in q, k, v and rpb (NATTEN 0.17's fused kernels could not train rpb).
* `na2d_qk` / `na2d_av` (and the 1-D pair), heads-first `(B, heads, H, W, d)` like
  NATTEN's unfused ops: they materialise the `(B, heads, H, W, kh*kw)` logits (weights
  row-major over the window) in plain PyTorch, for users who inspect or edit them.
  Memory: the neighborhoods are gathered, about k^2 times the key/value tensor.

Extra tokens every query also attends to (`additional_keys` / `additional_values`,
(B, heads, n, d)) work in the split form, as in NATTEN's unfused ops. Not supported
(NotImplementedError naming the argument): causal masks, additional keys/values in the
fused `na2d` / `na1d`, stride != 1 (NATTEN 0.20).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..api import attend
from ..args import check_window
from ..window import window_positions

IntOrTuple = Union[int, Sequence[int]]


def _unsupported(is_causal, additional_keys=None, additional_values=None, stride=1) -> None:
    causal = is_causal if isinstance(is_causal, (tuple, list)) else (is_causal,)
    if any(bool(c) for c in causal):
        raise NotImplementedError(
            f"is_causal={is_causal!r}: causal neighborhood attention is not supported by "
            "sasa_triton.natten (only is_causal=False)")
    for name, t in (("additional_keys", additional_keys),
                    ("additional_values", additional_values)):
        if t is not None:
            raise NotImplementedError(
                f"{name}: the fused na2d/na1d do not take extra keys/values; "
                "na2d_qk/na2d_av (na1d_qk/na1d_av) do")
    strides = stride if isinstance(stride, (tuple, list)) else (stride,)
    if any(s != 1 for s in strides):
        raise NotImplementedError(
            f"stride={stride!r}: strided neighborhood attention (NATTEN 0.20) is not "
            "supported by sasa_triton.natten (only stride=1)")


def _check_dim(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _scale(scale: Optional[float]) -> Optional[float]:
    # NATTEN writes `scale or head_dim ** -0.5`: a scale of 0 (or None) means the default
    return scale if scale else None


def _one(value, name: str) -> int:
    """A 1-D argument given as an int or a 1-tuple, as an int."""
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ValueError(f"{name} of a 1-D call must be an int or a 1-tuple, got {value!r}")
        return value[0]
    return value


def _rpb_for(rpb: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    # NATTEN casts rpb to the query dtype; attend also takes a float32 table as it is
    if isinstance(rpb, torch.Tensor) and rpb.dtype not in (q.dtype, torch.float32):
        return rpb.to(q.dtype)
    return rpb


def na2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    is_causal: Union[bool, Sequence[bool]] = False,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
    *,
    stride: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """NATTEN's fused 2-D neighborhood attention: `attend(..., padding="shift")`.

    query, key, value: (B, H, W, heads, d), any strides. rpb: (heads, 2kh-1, 2kw-1).
    scale: None (or 0) means d ** -0.5. `backend` picks the implementation as in
    `sasa_triton.attend`. Returns a new (B, H, W, heads, d) tensor.
    """
    _unsupported(is_causal, additional_keys, additional_values, stride)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_dim(name, t, 5, "(batch, height, width, heads, head_dim)")
    return attend(query, key, value, kernel_size, dilation=dilation, padding="shift",
                  rpb=_rpb_for(rpb, query), scale=_scale(scale), backend=backend)


def na1d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    is_causal: Union[bool, Sequence[bool]] = False,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
    *,
    stride: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """NATTEN's fused 1-D neighborhood attention, as a 2-D call on a 1-pixel-high image
    (kernel (1, k), dilation (1, dil): the single window row is the pixel's own row).

    query, key, value: (B, L, heads, d). rpb: (heads, 2k-1). Returns (B, L, heads, d).
    """
    _unsupported(is_causal, additional_keys, additional_values, stride)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_dim(name, t, 4, "(batch, length, heads, head_dim)")
    k, dil = _one(kernel_size, "kernel_size"), _one(dilation, "dilation")
    if isinstance(rpb, torch.Tensor):
        _check_dim("rpb", rpb, 2, "(heads, 2 * kernel_size - 1)")
        rpb = rpb.unsqueeze(1)
    out = attend(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), (1, k),
                 dilation=(1, dil), padding="shift", rpb=_rpb_for(rpb, query),
                 scale=_scale(scale), backend=backend)
    return out.squeeze(1)


def _neighbors(H: int, W: int, kernel_size, dilation, device) -> tuple:
    """Flat neighbor index (H*W, kh*kw) and rpb indices (H*W, kh*kw) of NATTEN's windows,
    window taps row-major (the order of NATTEN's attention weights)."""
    kh, kw, dh, dw = check_window(kernel_size, dilation, "shift")
    if kh * dh > H or kw * dw > W:
        raise ValueError(
            f"kernel_size * dilation must fit the image: ({kh}*{dh}, {kw}*{dw}) vs "
            f"(H, W) = ({H}, {W})")
    pos_y, rel_y = window_positions(H, kh, dh, "shift", device)  # (H, kh)
    pos_x, rel_x = window_positions(W, kw, dw, "shift", device)  # (W, kw)
    flat = pos_y[:, None, :, None] * W + pos_x[None, :, None, :]  # (H, W, kh, kw)
    ry = rel_y[:, None, :, None].expand(H, W, kh, kw)
    rx = rel_x[None, :, None, :].expand(H, W, kh, kw)
    return flat.reshape(H * W, kh * kw), ry.reshape(H * W, -1), rx.reshape(H * W, -1), (kh, kw)


def _check_split(name: str, t, ndim: int, other=None, other_name: str = "") -> None:
    _check_dim(name, t, ndim, "(batch, heads, *spatial, dim)")
    if other is not None and t.shape[:-1] != other.shape[:-1]:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not match "
                         f"{other_name} {tuple(other.shape)} (all but the last dim)")


def _check_extra(name: str, t, like: torch.Tensor) -> None:
    """Extra tokens: (B, heads, n, d) with like's batch, heads and head dim."""
    _check_dim(name, t, 4, "(batch, heads, tokens, head_dim)")
    if (t.shape[0], t.shape[1], t.shape[3]) != (like.shape[0], like.shape[1], like.shape[-1]):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match batch, heads and "
                         f"head_dim of {tuple(like.shape)}")


def na2d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    additional_keys: Optional[torch.Tensor] = None,
    is_causal: Union[bool, Sequence[bool]] = False,
    rpb: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """NATTEN's unfused QK: logits `query . key[neighbor] + rpb` (no scale: NATTEN's
    module scales the query first).

    query, key: (B, heads, H, W, d). rpb: (heads, 2kh-1, 2kw-1). additional_keys:
    (B, heads, n, d) tokens every query also sees (their logits carry no rpb).
    Returns (B, heads, H, W, kh*kw + n), the window taps row-major, then the n extras.
    """
    _unsupported(is_causal)
    _check_split("query", query, 5)
    _check_split("key", key, 5)
    if key.shape != query.shape:
        raise ValueError(f"key has shape {tuple(key.shape)} but query has {tuple(query.shape)}")
    B, N, H, W, D = query.shape
    flat, ry, rx, (kh, kw) = _neighbors(H, W, kernel_size, dilation, query.device)
    keys = key.reshape(B, N, H * W, D)[:, :, flat]  # (B, N, H*W, kh*kw, D)
    attn = torch.einsum("bnpd,bnpkd->bnpk", query.reshape(B, N, H * W, D), keys)
    if rpb is not None:
        want = (N, 2 * kh - 1, 2 * kw - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != want:
            raise ValueError(f"rpb must be a tensor of shape {want}, got "
                             f"{tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else rpb!r}")
        attn = attn + rpb.to(attn.dtype)[:, ry, rx]  # (N, H*W, kh*kw), broadcast over B
    if additional_keys is not None:
        _check_extra("additional_keys", additional_keys, query)
        extra = torch.einsum("bnpd,bnmd->bnpm", query.reshape(B, N, H * W, D), additional_keys)
        attn = torch.cat([attn, extra], dim=-1)
    return attn.reshape(B, N, H, W, -1)


def na2d_av(
    attn: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    additional_values: Optional[torch.Tensor] = None,
    is_causal: Union[bool, Sequence[bool]] = False,
) -> torch.Tensor:
    """NATTEN's unfused AV: `sum over the window of attn * value[neighbor]`.

    attn: (B, heads, H, W, kh*kw + n) (as from `na2d_qk`, usually after a softmax);
    value: (B, heads, H, W, d); additional_values: (B, heads, n, d) for the last n
    weights. Returns (B, heads, H, W, d).
    """
    _unsupported(is_causal)
    _check_split("value", value, 5)
    _check_split("attn", attn, 5, value, "value")
    B, N, H, W, D = value.shape
    flat, _, _, (kh, kw) = _neighbors(H, W, kernel_size, dilation, value.device)
    n = 0
    if additional_values is not None:
        _check_extra("additional_values", additional_values, value)
        n = additional_values.shape[2]
    if attn.shape[-1] != kh * kw + n:
        raise ValueError(f"attn must have kh*kw + extra tokens = {kh * kw + n} weights per "
                         f"pixel (last dim), got {attn.shape[-1]}")
    attn = attn.to(value.dtype).reshape(B, N, H * W, -1)
    values = value.reshape(B, N, H * W, D)[:, :, flat]  # (B, N, H*W, kh*kw, D)
    out = torch.einsum("bnpk,bnpkd->bnpd", attn[..., :kh * kw], values)
    if n:
        out = out + torch.einsum("bnpm,bnmd->bnpd", attn[..., kh * kw:], additional_values)
    return out.reshape(B, N, H, W, D)


def na1d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    additional_keys: Optional[torch.Tensor] = None,
    is_causal: Union[bool, Sequence[bool]] = False,
    rpb: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """1-D `na2d_qk`: query, key (B, heads, L, d), rpb (heads, 2k-1), additional_keys
    (B, heads, n, d) -> (B, heads, L, k + n)."""
    _unsupported(is_causal)
    _check_split("query", query, 4)
    _check_split("key", key, 4)
    k, dil = _one(kernel_size, "kernel_size"), _one(dilation, "dilation")
    if isinstance(rpb, torch.Tensor):
        _check_dim("rpb", rpb, 2, "(heads, 2 * kernel_size - 1)")
        rpb = rpb.unsqueeze(1)
    return na2d_qk(query.unsqueeze(2), key.unsqueeze(2), (1, k), (1, dil),
                   additional_keys=additional_keys, rpb=rpb).squeeze(2)


def na1d_av(
    attn: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    additional_values: Optional[torch.Tensor] = None,
    is_causal: Union[bool, Sequence[bool]] = False,
) -> torch.Tensor:
    """1-D `na2d_av`: attn (B, heads, L, k + n), value (B, heads, L, d), additional_values
    (B, heads, n, d) -> (B, heads, L, d)."""
    _unsupported(is_causal)
    _check_split("attn", attn, 4)
    _check_split("value", value, 4)
    k, dil = _one(kernel_size, "kernel_size"), _one(dilation, "dilation")
    return na2d_av(attn.unsqueeze(2), value.unsqueeze(2), (1, k), (1, dil),
                   additional_values=additional_values).squeeze(2)
