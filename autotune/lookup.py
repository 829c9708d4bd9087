"""`lookup(key)`: the tuned (variant, config) for a key on this GPU, or None.

Order: the user's table (SASA_TRITON_CACHE_DIR, default ~/.cache/sasa_triton) -> the
table shipped in the package (autotune/tables/<gpu>.json) -> None, where the dispatcher
uses its heuristic default. Tables are read once per GPU; after the first call per key a
lookup is one dict access. A corrupt or stale table is skipped with one warning; lookup
never raises.

With SASA_TRITON_TUNE_ON_MISS=1 (opt-in, never the default) a miss on CUDA tunes that
key on the spot (seconds to minutes, once per key and process) and stores it in the
user's table.

The dispatcher uses it as:

    tuned = lookup(key_for(q, args, "fwd"), q.device) if q.is_cuda else None
    variant, config = tuned if tuned is not None else heuristic(q, args)
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from . import tuned_table as table
from .keys import TuneKey

_NOT_TUNED = object()
_memo: dict = {}  # (gpu, key) -> (variant, config) | _NOT_TUNED
_entries: dict = {}  # gpu -> [entries of the user table, entries of the shipped table]
_gpu_names: dict = {}  # device index -> name
_tried_on_miss: set = set()


def clear_cache() -> None:
    """Forgets loaded tables and memoised lookups (after tuning, or env changes); a
    table ignored before is checked (and warned about) again."""
    _memo.clear()
    _entries.clear()
    _gpu_names.clear()
    _tried_on_miss.clear()
    table._warned.clear()


def gpu_name(device=None) -> Optional[str]:
    """torch.cuda.get_device_name of `device` (index, torch.device or None: the current
    CUDA device), or None for a non-CUDA device or without CUDA. Cached per index."""
    if getattr(device, "type", "cuda") != "cuda":
        return None
    index = getattr(device, "index", device)
    name = _gpu_names.get(index)
    if name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        if index is None:
            index = torch.cuda.current_device()
        name = _gpu_names.get(index)
        if name is None:
            name = _gpu_names[index] = torch.cuda.get_device_name(index)
    return name


def lookup(key: TuneKey, device=None, *, gpu: Optional[str] = None,
           shape: Optional[tuple] = None) -> Optional[tuple[str, dict]]:
    """(variant, config) tuned for `key` on `gpu` (default: the name of CUDA `device`,
    index or torch.device, current when None), or None. The config is a fresh dict.
    `shape` (the call's q shape) is only used to tune on a miss when that is enabled."""
    if gpu is None:
        gpu = gpu_name(device)
        if gpu is None:
            return None
    hit = _memo.get((gpu, key))
    if hit is None:
        hit = _find(gpu, key, shape)
    if hit is _NOT_TUNED:
        return None
    return hit[0], dict(hit[1])


def _find(gpu: str, key: TuneKey, shape) -> object:
    try:
        tables = _entries.get(gpu)
        if tables is None:
            tables = _entries[gpu] = _load(gpu)
        hit = _first(tables, str(key))
        if hit is _NOT_TUNED and os.environ.get("SASA_TRITON_TUNE_ON_MISS") == "1":
            hit = _tune_on_miss(gpu, key, shape)
    except Exception as e:  # never into attend: fall back to the heuristic
        warnings.warn(f"sasa_triton: tuned-table lookup failed ({type(e).__name__}: {e}); "
                      f"using the heuristic kernel choice", table.StaleTableWarning, stacklevel=3)
        hit = _NOT_TUNED
    _memo[(gpu, key)] = hit
    return hit


def _load(gpu: str) -> list:
    found = []
    for folder in (table.user_dir(), table.shipped_dir()):
        entries = table.load_entries(table.table_path(folder, gpu), gpu)
        if entries:
            found.append(entries)
    return found


def _first(tables: list, key_str: str) -> object:
    for entries in tables:
        entry = entries.get(key_str)
        if entry is not None and entry.get("variant") is not None:
            return entry["variant"], entry["config"]
    return _NOT_TUNED


def _tune_on_miss(gpu: str, key: TuneKey, shape) -> object:
    """Tunes one unseen key into the user's table (CUDA only, once per key and process)."""
    import torch

    if (gpu, key) in _tried_on_miss or not torch.cuda.is_available():
        return _NOT_TUNED
    _tried_on_miss.add((gpu, key))
    from . import tuner

    tuner.tune_on_miss(key, gpu, shape)
    _entries.pop(gpu, None)
    _entries[gpu] = tables = _load(gpu)
    return _first(tables, str(key))
