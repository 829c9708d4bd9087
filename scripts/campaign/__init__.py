"""The GPU campaign behind scripts/gpu_campaign.sh: steps (steps.py), running commands
under a time limit (procs.py), the machine record (machine.py), the tarball (pack.py),
the bench's short table (bench_table.py) and the sanitizer's subset (sanitize_subset.py).
Only the standard library is imported here: torch and the package load in the steps'
subprocesses, so a broken install is reported, not fatal."""
