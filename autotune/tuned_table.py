"""Tuned tables: one JSON file per GPU name, written atomically by concurrent tuners.

File `<slug of torch.cuda.get_device_name()>.json`:

    {"schema": 1, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "torch": "2.11.0",
     "kernels_hash": "<sha256 of the kernels/*.py sources>",
     "entries": {"<TuneKey string>": {
         "variant": "tiled" | null (every candidate failed), "config": {...} | null,
         "time_us": 12.3 | null, "shape": [B, H, W, heads, d], "tuned_at": "<UTC ISO time>",
         "candidates": [{"variant": ..., "config": {...}, "time_us": 12.3 | null,
                         "error": "<why it failed>" (failed ones only),
                         "crashed": true (it broke the CUDA context; only then)}, ...],
         "complete": false (only when a crash stopped the run before every candidate ran)}}}

A table whose Triton version or kernel hash differs from this process's is stale: its
times were measured on other code, so it is ignored (one warning per file), never
trusted. So is a corrupt one (bad JSON, wrong schema). Reading never raises.

Writers take an exclusive fcntl lock on `<file>.lock`, read the table, merge their entry
and replace the file with os.replace from a temporary file in the same directory, so
readers see the old or the new file, never half of one, and two tuners writing different
keys never lose each other's entries.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # not on Windows: writers are then atomic but not serialised
    fcntl = None

SCHEMA = 1
_warned: set = set()


class StaleTableWarning(UserWarning):
    """A tuned table was ignored (corrupt, other Triton version, changed kernels)."""


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def table_path(directory, gpu: str) -> Path:
    return Path(directory) / f"{gpu_slug(gpu)}.json"


def user_dir() -> Path:
    """SASA_TRITON_CACHE_DIR, else $XDG_CACHE_HOME/sasa_triton, else ~/.cache/sasa_triton."""
    env = os.environ.get("SASA_TRITON_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sasa_triton"


def shipped_dir() -> Path:
    """The tables installed with the package (package data of sasa_triton.autotune)."""
    return Path(__file__).resolve().parent / "tables"


@functools.cache
def triton_version() -> Optional[str]:
    """The installed Triton's version, read from package metadata (no triton import)."""
    from importlib import metadata

    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


@functools.cache
def kernels_hash() -> str:
    """sha256 over the installed sasa_triton.kernels package's *.py files (sorted by
    name; each name and content), so any kernel edit makes old tables stale."""
    spec = importlib.util.find_spec("sasa_triton.kernels")
    h = hashlib.sha256()
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def current_meta(gpu: str) -> dict:
    import torch

    return {"schema": SCHEMA, "gpu": gpu, "triton": triton_version(),
            "torch": torch.__version__.split("+")[0], "kernels_hash": kernels_hash()}


def _check_schema(data) -> None:
    """ValueError saying what is wrong with a parsed table."""
    if not isinstance(data, dict):
        raise ValueError("top level is not an object")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA}")
    for field in ("gpu", "triton", "torch", "kernels_hash"):
        if not isinstance(data.get(field), str):
            raise ValueError(f"field {field!r} missing or not a string")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise ValueError("'entries' missing or not an object")
    for key, e in entries.items():
        if not (isinstance(e, dict) and isinstance(e.get("candidates", []), list)
                and (e.get("variant") is None or isinstance(e.get("variant"), str))
                and (e.get("config") is None or isinstance(e.get("config"), dict))
                and (e.get("time_us") is None or isinstance(e.get("time_us"), (int, float)))
                and isinstance(e.get("complete", True), bool)):
            raise ValueError(f"entry {key!r} is malformed")
        if e.get("variant") is not None and e.get("config") is None:
            raise ValueError(f"entry {key!r} has a variant but no config")


def _warn_once(path: Path, message: str) -> None:
    if str(path) in _warned:
        return
    _warned.add(str(path))
    warnings.warn(f"sasa_triton: ignoring tuned table {path}: {message}. The heuristic "
                  f"kernel choice is used instead; re-run `python -m sasa_triton.autotune` "
                  f"to tune for this setup.", StaleTableWarning, stacklevel=3)


def why_unusable(data: dict, gpu: Optional[str]) -> Optional[str]:
    """Why a well-formed table cannot be trusted here, or None."""
    if gpu is not None and data["gpu"] != gpu:
        return f"it was tuned on {data['gpu']!r}, this is {gpu!r}"
    if data["triton"] != triton_version():
        return f"it was tuned with Triton {data['triton']}, this is Triton {triton_version()}"
    if data["kernels_hash"] != kernels_hash():
        return "the kernel sources changed since it was tuned (kernels_hash differs)"
    return None


def read_raw(path) -> tuple[Optional[dict], Optional[str]]:
    """(parsed table, None), or (None, why it is corrupt); (None, None) when absent."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot read it ({e})"
    try:
        data = json.loads(text)
        _check_schema(data)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return None, f"it is corrupt ({e})"
    return data, None


def load_entries(path, gpu: Optional[str] = None, warn: bool = True) -> Optional[dict]:
    """The entries of a current table at `path`, or None (absent, corrupt or stale; one
    warning per file for the last two). Never raises."""
    path = Path(path)
    try:
        data, corrupt = read_raw(path)
        why = corrupt or (why_unusable(data, gpu) if data is not None else None)
    except Exception as e:  # e.g. an unreadable kernels folder: never into attend
        data, why = None, f"it could not be checked ({type(e).__name__}: {e})"
    if why:
        if warn:
            _warn_once(path, why)
        return None
    return None if data is None else data["entries"]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    # The lock file stays: removing it would let two writers lock two different inodes.
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _dumps(data: dict) -> str:
    """JSON with one line per entry, so a re-tuned key is a one-line diff."""
    meta = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(data.items()) if k != "entries"]
    entries = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
               for k, v in sorted(data["entries"].items())]
    body = ",\n".join(entries)
    return "{\n" + ",\n".join(meta + [f' "entries": {{\n{body}\n }}']) + "\n}\n"


def _atomic_write(path: Path, data: dict) -> None:
    text = _dumps(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def record(path, gpu: str, entries: dict) -> None:
    """Merges `entries` (TuneKey string -> entry) into the table at `path` under the lock.
    A corrupt or stale table there is replaced (its entries are of no use here)."""
    path = Path(path)
    json.dumps(entries)  # a non-serialisable config fails here, before the file is touched
    meta = current_meta(gpu)
    with _locked(path):
        data, corrupt = read_raw(path)
        why = corrupt or (why_unusable(data, gpu) if data is not None else None)
        if why:
            warnings.warn(f"sasa_triton: replacing tuned table {path}: {why}", StaleTableWarning,
                          stacklevel=2)
            data = None
        merged = dict(data["entries"]) if data else {}
        merged.update(entries)
        _atomic_write(path, {**meta, "entries": merged})


def make_entry(variant, config, time_us, shape, candidates) -> dict:
    return {"variant": variant, "config": config, "time_us": time_us, "shape": list(shape),
            "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "candidates": candidates}
