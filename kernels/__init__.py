"""Triton kernels of sasa-triton, one file per kernel family (installed as sasa_triton.kernels)."""
