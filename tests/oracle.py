"""The test oracle: `attend` written straight from the contract, one pixel at a time.

Deliberately naive (Python loops over pixels and window taps, float64, no code shared
with the package) so that it is obviously right; autograd works through it.
"""
from __future__ import annotations

import torch


def _taps(i: int, size: int, k: int, dil: int, padding: str) -> list[int]:
    """Positions of pixel i's k window taps along one axis."""
    if padding != "shift":
        return [i + (a - k // 2) * dil for a in range(k)]
    group, member = i % dil, i // dil
    count = len(range(group, size, dil))
    start = min(max(member - k // 2, 0), count - k)
    return [group + (start + a) * dil for a in range(k)]


def _row(table, idx):
    """Row idx of a shared (R, c) or per-head (heads, R, c) table, as (1 or heads, c)."""
    return (table[idx][None] if table.dim() == 2 else table[:, idx]).double()


def oracle_attend(q, k, v, kernel_size, dilation=1, padding="zeros",
                  rel_h=None, rel_w=None, rpb=None, scale=None, return_lse=False):
    """out (B, H, W, heads, d) in float64; with return_lse also (B, H, W, heads) lse."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, W, N, D = q.shape
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    scale = D ** -0.5 if scale is None else scale
    zero = torch.zeros(B, N, D, dtype=torch.float64)

    out_rows, lse_rows = [], []
    for i in range(H):
        out_cols, lse_cols = [], []
        for j in range(W):
            logits, values = [], []  # one (B, N) logit and (B, N, D) value per tap
            for a, y in enumerate(_taps(i, H, kh, dh, padding)):
                for c, x in enumerate(_taps(j, W, kw, dw, padding)):
                    inside = 0 <= y < H and 0 <= x < W
                    if not inside and padding == "mask":
                        continue
                    key = k[:, y, x] if inside else zero
                    value = v[:, y, x] if inside else zero
                    dy, dx = (y - i) // dh, (x - j) // dw
                    if rel_h is not None:
                        row = dy + kh - 1 if padding == "shift" else a
                        col = dx + kw - 1 if padding == "shift" else c
                        key = key + torch.cat([_row(rel_h, row), _row(rel_w, col)], dim=-1)
                    logit = scale * (q[:, i, j] * key).sum(-1)
                    if rpb is not None:
                        logit = logit + rpb[:, dy + kh - 1, dx + kw - 1].double()
                    logits.append(logit)
                    values.append(value)
            logits = torch.stack(logits, dim=-1)  # (B, N, taps)
            weights = torch.softmax(logits, dim=-1)
            out_cols.append((weights[..., None] * torch.stack(values, dim=2)).sum(2))
            lse_cols.append(torch.logsumexp(logits, dim=-1))
        out_rows.append(torch.stack(out_cols, dim=1))
        lse_rows.append(torch.stack(lse_cols, dim=1))
    out, lse = torch.stack(out_rows, dim=1), torch.stack(lse_rows, dim=1)
    return (out, lse) if return_lse else out
