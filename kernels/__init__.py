"""Triton kernels of sasa-triton, one file per kernel family (installed as sasa_triton.kernels).

The ground floor of the package: these modules import Triton, torch and
`sasa_triton.types` only. Which implementations exist, and how they are chosen, is the
table in `sasa_triton.variants`; a variant module is imported only when it runs.

common.py        geometry in-kernel (window_start), LOG2E, padding codes, host helpers
rows_fwd.py      forward "rows": tensor-core row tiles, each k/v row loaded once per tile
tiled_fwd.py     forward "tiled": tensor-core halo tiles, one (batch, head) per program
tile2d_fwd.py    forward "tile2d": CUDA cores, a 2-D pixel tile x all heads (d <= 32)
rows_bwd.py      backward "rowsbwd": rows_bwd_query.py (dq, delta, table gradients) then
                 rows_bwd_key.py (dk, dv), tensor-core row tiles
offsets_bwd.py   backward "offsets": CUDA cores, window offsets in a loop

A variant module has `search_space()`, `prune(configs, q_shape, args)`,
`default_config(q_shape, args)`, `supports(q_shape, dtype, args)` and its host
launcher(s): `forward(q, k, v, args, config=None) -> (out, lse)` and/or
`backward(q, k, v, out, lse, dout, args, config=None) -> (dq, dk, dv, drel_h, drel_w, drpb)`.
"""
