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

import torch


def window_positions(size: int, k: int, dil: int, padding: str, device=None):
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
