"""The small shared vocabulary of every layer: validated arguments, padding modes, dtypes.

It imports torch only, so the kernels (the ground floor) may import it without pulling
in anything above them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

PADDINGS = ("zeros", "mask", "shift")
DIRECTIONS = ("fwd", "bwd")  # forward, backward: tuned-table keys and variant functions

# Short dtype names of tuned-table keys and command lines.
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class AttendArgs(NamedTuple):
    """Normalised arguments of one `attend` call (everything but q, k, v)."""

    kh: int
    kw: int
    dh: int
    dw: int
    padding: str
    rel_h: Optional[torch.Tensor]
    rel_w: Optional[torch.Tensor]
    rpb: Optional[torch.Tensor]
    scale: float
