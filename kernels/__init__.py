"""Triton kernels of sasa-triton, one file per kernel family (installed as sasa_triton.kernels).

The variant tables below are plain data, importable without Triton; a variant module is
imported only when it runs. A forward variant module has `search_space()`,
`prune(configs, q_shape, args)`, `default_config(q_shape, args)`,
`supports(q_shape, dtype, args)` and `forward(q, k, v, args, config=None) -> (out, lse)`;
a backward one has the same four plus
`backward(q, k, v, out, lse, dout, args, config=None) -> (dq, dk, dv, drel_h, drel_w, drpb)`.
"""

FORWARD_VARIANTS = {
    "tiled": "sasa_triton.kernels.tiled_fwd",  # tensor-core halo tiles, one (b, head) per program
    "allheads": "sasa_triton.kernels.allheads_fwd",  # all heads of a pixel block, d < 16, tiny maps
    "tile2d": "sasa_triton.kernels.tile2d_fwd",  # CUDA cores, 2-D pixel tile x all heads, d <= 16
}
BACKWARD_VARIANTS = {
    "offsets": "sasa_triton.kernels.offsets_bwd",  # CUDA cores, window offsets in a loop
}
