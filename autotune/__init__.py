"""Autotuning of the kernels and the per-GPU tables (installed as sasa_triton.autotune)."""
