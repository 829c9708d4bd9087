"""Autotuning of the kernels and the per-GPU tables (installed as sasa_triton.autotune).

keys.py         TuneKey / key_for: what a tuned entry is keyed by (image size bucketed)
tuned_table.py  the per-GPU JSON tables: versioned, hashed, atomic, lock-merged writes
lookup.py       lookup(key) -> (variant, config) | None: user table, shipped table, miss
tune_suites.py  named suites of keys: the shapes of sasa_triton.perf_suite (docs/PERF.md)
tuner.py        benchmarks variants x configs, writes entries as it goes (resumable)
progress.py     the progress line and time formatting
__main__.py     the CLI: python -m sasa_triton.autotune --help

Importing this package loads neither Triton nor the kernels. The tuner reads the
variants to benchmark (and the reference it checks them against) from the table in
sasa_triton.variants. The dispatcher calls
`sasa_triton.autotune.lookup.lookup(sasa_triton.autotune.keys.key_for(q, args, "fwd"))`.
"""
