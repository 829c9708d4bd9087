"""The paper's attention stem: local attention with spatially-aware values.

Ramachandran et al. 2019, section 3.2: in the stem, attention on raw pixels needs
position information in the values. Each neighbor's value is a mixture of m value
projections, weighted by a softmax over m of position logits that depend only on the
neighbor's offset (a, b) in the window:

    p(a, b, m) = softmax_m((emb_row[a] + emb_col[b]) . emb_mix[m])
    v_ab       = sum_m p(a, b, m) W_V^m x_ab
    y_ij       = sum_ab softmax_ab(q_ij . k_ab / sqrt(d)) v_ab

`attend` takes one value per neighbor pixel, not one per (query, offset) pair, so this
layer is plain PyTorch: a loop over the kh x kw offsets on zero-padded k and v, which
keeps memory at a few copies of the projection (the mixture is applied per offset as
small per-pixel coefficients, never materialised per offset). Out-of-image neighbors
follow `attend`'s "zeros" padding: zero keys and values that still take softmax mass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..args import check_positive_int, check_window


class SpatialMixtureAttention2d(nn.Module):
    """Local attention whose values mix `mixtures` projections by window position.

    Input (B, in_channels, H, W) -> output (B, out_channels, H, W), stride 1.
    `kernel_size` must be odd (a centred window, like `attend`; the paper's stem uses
    4 x 4, the nearest odd sizes are 3 and 5). `spatial_values=False` is the paper's
    ablation without spatially-aware values: one value projection, no embeddings
    (`mixtures` is ignored: p = 1), i.e. plain local attention on the pixels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5,
                 heads: int = 1, mixtures: int = 4, qkv_bias: bool = False,
                 spatial_values: bool = True) -> None:
        super().__init__()
        if not spatial_values:
            mixtures = 1  # a single value projection, whatever was asked
        for value, name in ((in_channels, "in_channels"), (out_channels, "out_channels"),
                            (heads, "heads"), (mixtures, "mixtures")):
            check_positive_int(value, name)
        if out_channels % heads:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by heads ({heads})")
        kh, kw, _, _ = check_window(kernel_size, 1, "zeros")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.heads, self.mixtures = (kh, kw), heads, mixtures
        self.head_dim = out_channels // heads
        # one fused projection: [q | k | v_0 | ... | v_{m-1}]
        self.qkv = nn.Conv2d(in_channels, (2 + mixtures) * out_channels, 1, bias=qkv_bias)
        self.spatial_values = spatial_values
        embed = self.head_dim
        for name, rows in (("emb_row", kh), ("emb_col", kw), ("emb_mix", mixtures)):
            table = nn.Parameter(torch.empty(rows, embed)) if spatial_values else None
            self.register_parameter(name, table)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        if not self.spatial_values:
            return
        # unit row/col embeddings, mix vectors at 1/sqrt(embed): mixture logits start O(1)
        nn.init.normal_(self.emb_row)
        nn.init.normal_(self.emb_col)
        nn.init.normal_(self.emb_mix, std=self.emb_mix.shape[1] ** -0.5)

    def mixture_weights(self) -> torch.Tensor:
        """p(a, b, m): (kh, kw, mixtures), a softmax over the last dim (ones without
        spatially-aware values)."""
        if not self.spatial_values:
            return self.qkv.weight.new_ones(*self.kernel_size, 1)
        pos = self.emb_row[:, None, :] + self.emb_col[None, :, :]  # (kh, kw, E)
        return torch.softmax(pos @ self.emb_mix.t(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}")
        B, _, H, W = x.shape
        kh, kw = self.kernel_size
        N, D, M = self.heads, self.head_dim, self.mixtures
        proj = self.qkv(x).unflatten(1, (2 + M, N, D))  # (B, 2+M, heads, d, H, W)
        q = proj[:, 0]
        kv = F.pad(proj[:, 1:], (kw // 2, kw // 2, kh // 2, kh // 2))  # zero keys/values outside
        k_pad, v_pad = kv[:, 0], kv[:, 1:]  # (B, heads, d, H+, W+), (B, M, heads, d, H+, W+)

        scale = D ** -0.5
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax dtype
        logits = torch.stack([
            (q * k_pad[..., a:a + H, b:b + W]).sum(2)
            for a in range(kh) for b in range(kw)
        ], dim=2).to(cdt) * scale  # (B, heads, kh*kw, H, W)
        attn = torch.softmax(logits, dim=2)
        mix = self.mixture_weights().flatten(0, 1).to(cdt)  # (kh*kw, M)

        out = torch.zeros(B, N, D, H, W, dtype=attn.dtype, device=x.device)
        for a in range(kh):
            for b in range(kw):
                tap = a * kw + b
                coef = attn[:, :, tap, None] * mix[tap, None, :, None, None]  # (B, heads, M, H, W)
                for m in range(M):
                    out = out + coef[:, :, m, None] * v_pad[:, m, ..., a:a + H, b:b + W]
        return out.flatten(1, 2).to(q.dtype)  # accumulated in float32 (float64)

    def attention_flops(self, height: int, width: int) -> int:
        """Analytic FLOPs (2 per multiply-add), projection excluded: q.k (2 d per tap),
        softmax (~5 per logit), mixture coefficients (M per tap) and the mixed value
        sum (2 M d per tap), per head and pixel."""
        taps = self.kernel_size[0] * self.kernel_size[1]
        coef = self.mixtures if self.spatial_values else 0  # attn * p per mixture
        per_head = taps * (2 * self.head_dim + 5 + coef + 2 * self.mixtures * self.head_dim)
        return height * width * self.heads * per_head

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"heads={self.heads}, mixtures={self.mixtures}"
                + ("" if self.spatial_values else ", spatial_values=False"))


class AttentionStem2d(nn.Module):
    """The paper's attention stem: spatially-aware attention (stride 1), batch norm,
    ReLU, and a `pool` x `pool` max pool with stride `pool` (4 at ImageNet scale: 224 ->
    56, like the conv stem's stride-2 conv + stride-2 max pool). The ReLU is not in the
    paper's text; the popular ports add it and it matches the conv stem.

    Example:
        >>> stem = AttentionStem2d(3, 64, kernel_size=5)
        >>> stem(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 64, 8, 8])
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, kernel_size: int = 5,
                 heads: int = 1, mixtures: int = 4, pool: int = 4,
                 spatial_values: bool = True) -> None:
        super().__init__()
        check_positive_int(pool, "pool")
        self.attention = SpatialMixtureAttention2d(in_channels, out_channels, kernel_size,
                                                   heads, mixtures,
                                                   spatial_values=spatial_values)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(pool, pool) if pool > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.attention(x))))
