"""`SASA2d`: a stand-alone self-attention layer that replaces a k x k `nn.Conv2d`.

One fused 1x1 convolution projects the input to q, k and v (in_channels -> 3 * out);
q, k and v are then strided views of that one tensor, handed to `sasa_triton.attend`
without a copy. Stride s > 1 is a s x s average pool after the attention, as the paper
downsamples.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attend
from ..args import check_positive_int, check_window

IntPair = Union[int, Sequence[int]]
POSITIONS = ("relative", "absolute", "none")
LOGITS = ("content+position", "content", "position")


def split_qkv(proj: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3*C, H, W) projection -> q, k, v views of shape (B, H, W, heads, C // heads).

    Channel layout of the projection: [q | k | v], each head's d channels contiguous.
    Views only: they share storage with `proj`, whatever its memory format.
    """
    B, C3, H, W = proj.shape
    qkv = proj.unflatten(1, (3, heads, C3 // (3 * heads))).permute(1, 0, 4, 5, 2, 3)
    return qkv[0], qkv[1], qkv[2]


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return check_positive_int(pair[0], name), check_positive_int(pair[1], name)


def _resolve_position(position: Optional[str], logits: Optional[str],
                      rel_pos: bool) -> tuple[str, str]:
    """The (position, logits) pair of the ablation knobs, defaults filled from rel_pos."""
    if position is None:
        position = "relative" if rel_pos else "none"
    elif position == "relative" and not rel_pos:
        raise ValueError("rel_pos=False contradicts position='relative'")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if logits is None:
        logits = "content+position" if position == "relative" else "content"
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    if logits != "content" and position != "relative":
        raise ValueError(f"logits={logits!r} has a position term q.r, which needs "
                         f"position='relative', got position={position!r}")
    return position, logits


class SASA2d(nn.Module):
    """Stand-alone self-attention (Ramachandran et al. 2019), a drop-in for
    `nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)`.

    Each output pixel is a softmax-weighted sum of the values in its kernel_size window,
    with logits `q . (k + r) / sqrt(d)`, r the SASA relative embedding of the neighbor's
    (row, column) offset (rel_h covers the first d//2 channels of a head, rel_w the rest).

    Args:
        in_channels, out_channels: as for Conv2d; out_channels must be divisible by heads.
        kernel_size: odd int or (kh, kw): the attention window.
        heads: attention heads; each has d = out_channels // heads channels.
        stride: 1, or s > 1 for an s x s average pool with stride s after the attention
            (the paper's downsampling). `ceil_mode` makes the output size that of the
            Conv2d it replaces (ceil(H / s)) for odd sizes too.
        dilation: window dilation (int or pair).
        padding: "zeros" (out-of-image neighbors are zero keys/values, like a zero-padded
            conv), "mask" (left out of the softmax) or "shift" (window moved inside the
            image; needs kernel_size * dilation <= the image size).
        rel_pos: learn SASA relative embeddings (the paper's position logits).
        rpb: learn an additive relative position bias per head (zeros init).
        qkv_bias: bias in the q/k/v projection.
        rel_per_head: one relative embedding table per head instead of one shared by all
            heads (the default, as in the paper).
        position: the paper's positional-encoding ablation. "relative" (the default when
            rel_pos): the SASA relative embeddings r in the logits; "absolute": learned
            2-D absolute embeddings (a row and a column table, summed) added to the input
            before the projection, sized `abs_size` and resized bilinearly to other input
            sizes; "none": no position information (the default when not rel_pos).
        logits: the paper's logit ablation. "content+position": q.(k + r) (the default
            with relative positions); "content": q.k only (the default otherwise);
            "position": q.r only (no key projection: attend sees zero keys). The position
            term needs position="relative".
        abs_size: (H, W) (or int) of the absolute embeddings; required by "absolute".

    Initialisation: the projection as `nn.Conv2d` (kaiming uniform); rel_h and rel_w from
    a normal distribution with std d ** -0.5, truncated at 2 std (as timm's relative
    position embeddings for HaloNet / BoTNet), so that `q . r` starts at the scale of
    `q . k`; rpb zeros.

    Shapes: input (B, in_channels, H, W), NCHW or channels-last. Output
    (B, out_channels, ceil(H / stride), ceil(W / stride)) with channels-last strides:
    `attend` returns a contiguous (B, H, W, heads, d) tensor and the NCHW result is a
    permuted view of it (no copy). Convolutions and batch norm take it as is; call
    `.contiguous()` only if a consumer really needs the NCHW layout.

    Example:
        >>> layer = SASA2d(64, 64, kernel_size=7, heads=8)
        >>> x = torch.randn(2, 64, 14, 14)
        >>> layer(x).shape
        torch.Size([2, 64, 14, 14])
        >>> SASA2d(64, 128, kernel_size=7, heads=8, stride=2)(x).shape
        torch.Size([2, 128, 7, 7])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair = 7,
        heads: int = 8,
        stride: int = 1,
        dilation: IntPair = 1,
        padding: str = "zeros",
        rel_pos: bool = True,
        rpb: bool = False,
        qkv_bias: bool = False,
        *,
        rel_per_head: bool = False,
        position: Optional[str] = None,
        logits: Optional[str] = None,
        abs_size: Optional[IntPair] = None,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        check_positive_int(heads, "heads")
        check_positive_int(stride, "stride")
        if out_channels % heads:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by heads ({heads})"
            )
        kh, kw, dh, dw = check_window(kernel_size, dilation, padding)
        d = out_channels // heads
        position, logits = _resolve_position(position, logits, rel_pos)
        self.position, self.logits = position, logits
        rel_pos = position == "relative" and logits != "content"
        if rel_pos and d < 2:
            raise ValueError(
                f"rel_pos needs out_channels // heads >= 2 channels per head, got {d}"
            )

        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = (kh, kw), (dh, dw)
        self.heads, self.head_dim, self.stride, self.padding = heads, d, stride, padding
        self.rel_per_head = rel_per_head
        # "position" logits have no keys: the projection is [q | v]
        n_proj = 2 if logits == "position" else 3
        self.qkv = nn.Conv2d(in_channels, n_proj * out_channels, 1, bias=qkv_bias)
        if position == "absolute":
            if abs_size is None:
                raise ValueError("position='absolute' needs abs_size=(H, W), the input size")
            ah, aw = _pair(abs_size, "abs_size")
            self.abs_h = nn.Parameter(torch.empty(in_channels, ah, 1))
            self.abs_w = nn.Parameter(torch.empty(in_channels, 1, aw))
        else:
            self.register_parameter("abs_h", None)
            self.register_parameter("abs_w", None)
        # shift mode indexes rel tables by relative offset: 2k-1 rows instead of k
        rows, cols = (2 * kh - 1, 2 * kw - 1) if padding == "shift" else (kh, kw)
        lead = (heads,) if rel_per_head else ()
        if rel_pos:
            self.rel_h = nn.Parameter(torch.empty(*lead, rows, d // 2))
            self.rel_w = nn.Parameter(torch.empty(*lead, cols, d - d // 2))
        else:
            self.register_parameter("rel_h", None)
            self.register_parameter("rel_w", None)
        if rpb:
            self.rpb = nn.Parameter(torch.empty(heads, 2 * kh - 1, 2 * kw - 1))
        else:
            self.register_parameter("rpb", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        std = self.head_dim ** -0.5
        for table in (self.rel_h, self.rel_w):
            if table is not None:
                nn.init.trunc_normal_(table, std=std, a=-2 * std, b=2 * std)
        if self.rpb is not None:
            nn.init.zeros_(self.rpb)
        for table in (self.abs_h, self.abs_w):
            if table is not None:  # ViT's absolute embedding scale
                nn.init.trunc_normal_(table, std=0.02, a=-0.04, b=0.04)

    def absolute_embedding(self, height: int, width: int) -> torch.Tensor:
        """(in_channels, height, width): abs_h + abs_w, resized bilinearly when the input
        size is not abs_size."""
        pos = self.abs_h + self.abs_w
        if pos.shape[1:] != (height, width):
            pos = F.interpolate(pos[None], size=(height, width), mode="bilinear",
                                align_corners=False)[0]
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SASA2d expects input of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if self.abs_h is not None:
            x = x + self.absolute_embedding(x.shape[2], x.shape[3]).to(x.dtype)
        proj = self.qkv(x)
        if self.logits == "position":  # q.r only: zero keys
            q, v = proj.unflatten(1, (2, self.heads, self.head_dim)).permute(1, 0, 4, 5, 2, 3)
            k = torch.zeros_like(q)
        else:
            q, k, v = split_qkv(proj, self.heads)
        out = attend(
            q, k, v, self.kernel_size, dilation=self.dilation, padding=self.padding,
            rel_h=self.rel_h, rel_w=self.rel_w, rpb=self.rpb,
        )  # (B, H, W, heads, d), contiguous
        out = out.flatten(3).permute(0, 3, 1, 2)  # NCHW shape, channels-last strides
        if self.stride > 1:
            out = F.avg_pool2d(out, self.stride, self.stride, ceil_mode=True)
        return out

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"heads={self.heads}, stride={self.stride}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding != "zeros":
            s += f", padding={self.padding!r}"
        if self.position != "relative" or self.logits != "content+position":
            s += f", position={self.position!r}, logits={self.logits!r}"
        else:
            s += f", rel_pos={self.rel_h is not None}"
        if self.rel_per_head:
            s += ", rel_per_head=True"
        if self.rpb is not None:
            s += ", rpb=True"
        if self.qkv.bias is not None:
            s += ", qkv_bias=True"
        return s

    def attention_flops(self, height: int, width: int) -> int:
        """Analytic FLOPs (2 per multiply-add) of the attention for an H x W input,
        projection excluded: q.k and p.v over the window (2 * 2 * kh*kw * d per head
        and pixel), plus the separable relative term (2 * (kh + kw) * d/2), plus the
        softmax (about 5 per logit: max, subtract, exp, sum, divide) and the pool."""
        kh, kw = self.kernel_size
        taps, C, hw = kh * kw, self.out_channels, height * width
        flops = hw * (4 * taps * C + 5 * taps * self.heads)
        if self.logits == "position":
            flops -= hw * 2 * taps * C  # no q.k
        if self.abs_h is not None:
            flops += hw * self.in_channels  # the embedding added to the input
        if self.rel_h is not None:
            flops += hw * (kh + kw) * C  # 2 * (kh * d/2 + kw * d/2) per head
        if self.rpb is not None:
            flops += hw * taps * self.heads
        if self.stride > 1:
            flops += hw * C  # one add per input pixel of the pool
        return flops
