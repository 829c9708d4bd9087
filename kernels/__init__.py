"""Triton kernels of sasa-triton, one file per kernel family (installed as sasa_triton.kernels)."""

# Backward kernel variants: name -> module (imported on first use; no Triton import here).
BACKWARD_VARIANTS = {"offsets": "sasa_triton.kernels.offsets_bwd"}
