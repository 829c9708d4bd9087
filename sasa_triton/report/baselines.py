"""Peers `attend` is measured against, as plain functions.

* `unfold_attend`: the popular SASA port (F.pad + unfold of k and v into k^2-times
  larger tensors, relative logits added to the unfolded keys, softmax over the window),
  following the contract of `attend` with padding="zeros" and dilation 1, so it is also a
  second, independent check of the reference. Its memory grows with k^2: that is the point.
* `conv_input` / `conv_weight`: the cuDNN convolutions the layer replaces (dense k x k
  C->C, 3x3 C->C, depthwise k x k), channels_last like the attention tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rel_view(table: torch.Tensor, heads: int, axis: str) -> torch.Tensor:
    """(k, c) or (heads, k, c) -> broadcastable against (B, heads, c, H, W, k, k)."""
    table = table if table.dim() == 3 else table.expand(heads, *table.shape)
    t = table.transpose(1, 2)  # (heads, c, k)
    if axis == "h":
        return t[None, :, :, None, None, :, None]
    return t[None, :, :, None, None, None, :]


def unfold_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int,
                  rel_h: Optional[torch.Tensor] = None, rel_w: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> torch.Tensor:
    """SASA the way the popular port computes it; (B, H, W, heads, d) in and out.

    rel_h / rel_w are shared (k, d//2), (k, d - d//2) or per-head (heads, k, ...) tables,
    as in `attend`; out-of-image neighbors are zero keys and values (padding="zeros").
    """
    B, H, W, N, D = q.shape
    C, ks, p = N * D, kernel_size, kernel_size // 2
    scale = D ** -0.5 if scale is None else scale

    def nchw(t):  # (B, H, W, heads, d) -> (B, heads * d, H, W), the port's layout
        return t.permute(0, 3, 4, 1, 2).reshape(B, C, H, W)

    # (B, C, H + 2p, W + 2p) -> (B, heads, d, H, W, k, k): a view, then k^2-sized copies
    k_win = F.pad(nchw(k), (p, p, p, p)).unfold(2, ks, 1).unfold(3, ks, 1)
    v_win = F.pad(nchw(v), (p, p, p, p)).unfold(2, ks, 1).unfold(3, ks, 1)
    k_win = k_win.reshape(B, N, D, H, W, ks, ks)
    v_win = v_win.reshape(B, N, D, H, W, ks * ks)
    if rel_h is not None:
        d2 = D // 2
        k_win = torch.cat((k_win[:, :, :d2] + _rel_view(rel_h, N, "h"),
                           k_win[:, :, d2:] + _rel_view(rel_w, N, "w")), dim=2)
    k_win = k_win.reshape(B, N, D, H, W, ks * ks)

    q_n = nchw(q).view(B, N, D, H, W, 1)
    logits = (q_n * k_win).sum(dim=2) * scale  # (B, heads, H, W, k*k)
    attn = torch.softmax(logits, dim=-1)
    out = torch.einsum("bnhwk,bndhwk->bndhw", attn, v_win)
    return out.permute(0, 3, 4, 1, 2)  # (B, H, W, heads, d), a view


def conv_input(B: int, C: int, H: int, W: int, dtype, device, generator=None) -> torch.Tensor:
    """A random NCHW feature map stored channels_last (the attention tensors' layout)."""
    x = torch.randn(B, C, H, W, dtype=dtype, device=device, generator=generator)
    return x.contiguous(memory_format=torch.channels_last)


def conv_weight(C_out: int, C_in_per_group: int, k: int, dtype, device,
                generator=None) -> torch.Tensor:
    fan_in = C_in_per_group * k * k
    w = torch.randn(C_out, C_in_per_group, k, k, dtype=dtype, device=device, generator=generator)
    return (w * fan_in ** -0.5).contiguous(memory_format=torch.channels_last)
