"""Window geometry along one image axis (the contract's neighbor positions).

For an axis of `size` pixels, a window of `k` taps and dilation `dil`, pixel i's a-th
neighbor sits at `pos[i, a]`:

* zeros / mask: centered, `i + (a - k//2) * dil` (may fall outside [0, size));
* shift: the window slides inward inside pixel i's dilation group (NATTEN), so that
  every position is inside the image.

`rel[i, a] = (pos[i, a] - i) // dil + k - 1` indexes the (2k-1)-entry rpb and shift-mode
rel tables.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch


def window_positions(size: int, k: int, dil: int, padding: str,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (pos, rel), both int64 tensors of shape (size, k)."""
    i = torch.arange(size, device=device).unsqueeze(1)
    a = torch.arange(k, device=device).unsqueeze(0)
    if padding == "shift":
        group = i % dil
        members = (size - group + dil - 1) // dil  # positions g, g+dil, ... < size
        start = torch.minimum((i // dil - k // 2).clamp(min=0), members - k)
        pos = group + (start + a) * dil
    else:
        pos = i + (a - k // 2) * dil
    rel = torch.div(pos - i, dil, rounding_mode="floor") + k - 1
    return pos, rel


class Tap(NamedTuple):
    """Window offset (a, c) for every pixel at once (the reference walks these)."""

    a: int
    c: int
    y: torch.Tensor  # (H,) neighbor rows, clamped into the image
    x: torch.Tensor  # (W,) neighbor columns, clamped into the image
    row: torch.Tensor  # (H,) rel_h row: a (zeros/mask) or the relative index (shift)
    col: torch.Tensor  # (W,) rel_w row, likewise
    rel_y: torch.Tensor  # (H,) rpb row index, (y - i) // dh + kh - 1
    rel_x: torch.Tensor  # (W,) rpb column index
    inside: torch.Tensor  # (H, W, 1) bool: the neighbor is in the image
    all_inside: bool  # every pixel's neighbor is in the image (no masking needed)


def window_taps(H: int, W: int, kh: int, kw: int, dh: int, dw: int, padding: str,
                device=None) -> Iterator[Tap]:
    """Yields a `Tap` for each of the kh x kw window offsets, row-major."""
    shift = padding == "shift"
    pos_y, rel_y = window_positions(H, kh, dh, padding, device)
    pos_x, rel_x = window_positions(W, kw, dw, padding, device)
    for a in range(kh):
        y = pos_y[:, a]
        in_y = (y >= 0) & (y < H)
        row = rel_y[:, a] if shift else torch.full_like(y, a)
        for c in range(kw):
            x = pos_x[:, c]
            in_x = (x >= 0) & (x < W)
            col = rel_x[:, c] if shift else torch.full_like(x, c)
            yield Tap(
                a, c, y.clamp(0, max(H - 1, 0)), x.clamp(0, max(W - 1, 0)), row, col,
                rel_y[:, a], rel_x[:, c], (in_y[:, None] & in_x[None, :])[:, :, None],
                # only the center offset (or a shifted window) stays inside for every
                # pixel; decided in Python so torch.compile needs no data-dependent branch
                shift or (a == kh // 2 and c == kw // 2),
            )
