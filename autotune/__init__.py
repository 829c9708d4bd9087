"""Autotuning of the kernels and the per-GPU tables (installed as sasa_triton.autotune).

keys.py     TuneKey / key_for: what a tuned entry is keyed by (image size bucketed)
table.py    the per-GPU JSON tables: versioned, hashed, atomic, lock-merged writes
lookup.py   lookup(key) -> (variant, config) | None: user table, shipped table, miss
suites.py   named suites of shapes (shared/PERF.md)
tuner.py    benchmarks variants x configs, writes entries as it goes (resumable)
__main__.py the CLI: python -m sasa_triton.autotune --help

Importing this package loads neither Triton nor the kernels. The dispatcher calls
`sasa_triton.autotune.lookup.lookup(sasa_triton.autotune.keys.key_for(q, args, "fwd"))`.
"""
