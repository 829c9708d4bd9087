"""`NeighborhoodAttention2D`: NATTEN's module (0.17 constructor), on `na2d`.

Same parameters as NATTEN's (`qkv`: Linear(dim, 3*dim), `rpb`: (heads, 2kh-1, 2kw-1)
when rel_pos_bias, `proj`: Linear(dim, dim)), so a NATTEN state dict loads with
strict=True, and the same forward: qkv reshaped to (B, H, W, 3, heads, head_dim),
logits `scale * q.k + rpb`, softmax over the window, proj.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..args import check_window
from .functional import na2d, na2d_av, na2d_qk

IntOrPair = Union[int, Sequence[int]]


class NeighborhoodAttention2D(nn.Module):
    """Neighborhood attention over (B, H, W, dim) channels-last input.

    Args follow NATTEN 0.17: `qk_scale` None (or 0) means head_dim ** -0.5;
    `rel_pos_bias` adds the learned (heads, 2kh-1, 2kw-1) bias; `attn_drop` drops
    attention weights in training (through the split na2d_qk / na2d_av path, as NATTEN's
    unfused path did; in eval, or with attn_drop=0, the fused kernels run).
    `is_causal` must be False (NotImplementedError otherwise).
    Inputs smaller than kernel_size * dilation are zero-padded at the bottom/right before
    the qkv projection and cropped after the attention, as NATTEN <= 0.14 did.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: IntOrPair,
        dilation: IntOrPair = 1,
        is_causal: Union[bool, Sequence[bool]] = False,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        kh, kw, dh, dw = check_window(kernel_size, dilation, "shift")
        causal = is_causal if isinstance(is_causal, (tuple, list)) else (is_causal,)
        if any(bool(c) for c in causal):
            raise NotImplementedError(
                f"is_causal={is_causal!r}: causal neighborhood attention is not supported "
                "by sasa_triton.natten (only is_causal=False)")
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = (kh, kw)
        self.dilation = (dh, dw)
        self.is_causal = (False, False)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kh - 1, 2 * kw - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"NeighborhoodAttention2D expects (B, H, W, dim) input, got "
                             f"shape {tuple(x.shape)}")
        B, H, W, C = x.shape
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        pad_h, pad_w = max(0, kh * dh - H), max(0, kw * dw - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w

        qkv = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim)
        if self.training and self.attn_drop_rate > 0:
            # NATTEN's unfused path: heads-first, scaled query, explicit weights
            q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)
            attn = na2d_qk(q * self.scale, k, self.kernel_size, self.dilation, rpb=self.rpb)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = na2d_av(attn, v, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4)
        else:
            q, k, v = qkv.unbind(3)  # (B, H, W, heads, head_dim) views, read in place
            out = na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale)
        out = out.reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            out = out[:, :H, :W, :]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"is_causal={self.is_causal}, has_bias={self.rpb is not None}")
