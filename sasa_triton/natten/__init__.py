"""A NATTEN drop-in: `from sasa_triton import natten` where you had `import natten`.

`na2d`, `na1d` (fused, heads-last), `na2d_qk` / `na2d_av` and `na1d_qk` / `na1d_av`
(split, heads-first, materialised weights) and `NeighborhoodAttention2D` with NATTEN's
argument names, layouts and parameter names (NATTEN 0.17's API; checkpoints of NATTEN
0.14 through 0.20 load). Migration notes: docs/natten.md.
"""
from .functional import na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk
from .module import NeighborhoodAttention2D

__all__ = ["na1d", "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk", "NeighborhoodAttention2D"]
