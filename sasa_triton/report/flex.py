"""FlexAttention peer (torch.nn.attention.flex_attention), CUDA only.

Each pixel attends to its k x k neighborhood through a block mask over the H*W tokens;
optionally SASA's relative logits through a score_mod (the kh + kw dot products of each
query with rel_h and rel_w are computed once, then looked up per score). The mask leaves
out-of-image neighbors out of the softmax, i.e. attend's padding="mask", not "zeros".
FlexAttention needs d >= 16: smaller heads are zero-padded to 16 (inside the timed call).
Everything is compiled once per shape (torch.compile, dynamic=False) before timing.
It is left out on CPU: there FlexAttention compiles to Inductor's C++ CPU template, a
different kernel from the GPU one the report compares against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when FlexAttention can run here, else why not."""
    if device_type != "cuda":
        return "FlexAttention is benchmarked on CUDA only (its CPU path is a different kernel)"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return None


def _raise_recompile_limits() -> None:
    """One compiled graph per benchmark shape: keep dynamo from falling back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    torch._dynamo.reset()


def make_flex_neighborhood(H: int, W: int, heads: int, d: int, k: int, device,
                           with_rel: bool, compile: bool = True):
    """Returns fn(q, k, v, rel_h, rel_w) -> (B, H, W, heads, d); rel tables shared (k, .).
    compile=False runs FlexAttention eagerly (slow; for checking the math on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if compile:
        _raise_recompile_limits()
    r, L, d_pad, d2 = k // 2, H * W, max(d, 16), d // 2
    scale = d ** -0.5

    def neighborhood(b, h, q_idx, kv_idx):
        dy = kv_idx // W - q_idx // W
        dx = kv_idx % W - q_idx % W
        return (dy.abs() <= r) & (dx.abs() <= r)

    block_mask = create_block_mask(neighborhood, B=None, H=None, Q_LEN=L, KV_LEN=L,
                                   device=device)

    def tokens(t):  # (B, H, W, heads, d) -> (B, heads, H*W, d_pad), a view unless padded
        t = t.permute(0, 3, 1, 2, 4).flatten(2, 3)
        return F.pad(t, (0, d_pad - d)) if d_pad != d else t

    def forward(q, key, v, rel_h, rel_w, block_mask):
        score_mod = None
        if with_rel:
            q_t = q.permute(0, 3, 1, 2, 4).flatten(2, 3)  # (B, heads, L, d)
            # separable SASA term, logit scale folded in: [B, heads, L, k] each
            q_rh = torch.einsum("bnld,kd->bnlk", q_t[..., :d2], rel_h) * scale
            q_rw = torch.einsum("bnld,kd->bnlk", q_t[..., d2:], rel_w) * scale

            def score_mod(score, b, h, q_idx, kv_idx):
                row = (kv_idx // W - q_idx // W + r).clamp(0, k - 1)  # masked taps clamp
                col = (kv_idx % W - q_idx % W + r).clamp(0, k - 1)
                return score + q_rh[b, h, q_idx, row] + q_rw[b, h, q_idx, col]

        out = flex_attention(tokens(q), tokens(key), tokens(v), score_mod=score_mod,
                             block_mask=block_mask, scale=scale)
        return out[..., :d].unflatten(2, (H, W)).permute(0, 2, 3, 1, 4)

    compiled = torch.compile(forward, dynamic=False) if compile else forward

    def run(q, key, v, rel_h=None, rel_w=None):
        return compiled(q, key, v, rel_h, rel_w, block_mask)

    return run
