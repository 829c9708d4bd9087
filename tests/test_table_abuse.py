"""Tuned tables under abuse: concurrent writers, damaged and hostile files.

* 8 tuner processes writing many keys at once lose nothing, and a reader running
  beside them never sees a half-written table.
* Truncated files, random bytes, wrong schema, wrong types inside valid JSON, absurd
  nesting, a huge file, a table that is a directory, a FIFO or unreadable: exactly one
  warning and the heuristic (lookup gives None), never an exception, never a hang;
  a writer replaces such a table.
* The table is data only: a variant or config naming code is never imported or run;
  a config outside the variant's search space never reaches a kernel.
"""
import json
import multiprocessing
import os
import random
import sys
import warnings

import pytest
import torch

from sasa_triton import dispatch
from sasa_triton.args import check_attend_args
from sasa_triton.autotune import lookup as lookup_mod
from sasa_triton.autotune import tuned_table as table
from sasa_triton.autotune.keys import TuneKey, key_for
from sasa_triton.variants import with_direction

GPU = "Fake GPU 80GB HBM3"
WRITERS, KEYS_PER_WRITER = 8, 25


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("SASA_TRITON_TUNE_ON_MISS", raising=False)
    monkeypatch.setattr(table, "shipped_dir", lambda: tmp_path / "shipped")
    lookup_mod.clear_cache()
    dispatch.clear_cache()
    yield
    lookup_mod.clear_cache()
    dispatch.clear_cache()


def a_key(**changes) -> TuneKey:
    return TuneKey("fwd", 7, 7, 1, 1, 8, 16, "bf16", "zeros", "shared", False, 32, 32) \
        ._replace(**changes)


def an_entry(variant="tiled", config=None):
    config = {"BLOCK_W": 16, "BLOCK_H": 1, "num_warps": 4, "num_stages": 2} \
        if config is None else config
    return table.make_entry(variant, config, 10.0, (8, 32, 32, 8, 16),
                            [{"variant": variant, "config": config, "time_us": 10.0}])


def user_table():
    return table.table_path(table.user_dir(), GPU)


def good_table() -> dict:
    return {**table.current_meta(GPU), "entries": {str(a_key()): an_entry()}}


def lookups_warn_once(key=None):
    """Looks the key up three times; returns (results, our warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [lookup_mod.lookup(key or a_key(), gpu=GPU) for _ in range(3)]
    return results, [w for w in caught if issubclass(w.category, table.StaleTableWarning)]


# ---------------------------------------------------------------- concurrent writers

def _writer(path, worker, barrier):
    barrier.wait()  # all start together: the most contention
    for i in range(KEYS_PER_WRITER):
        key = a_key(heads=worker + 1, d=i + 1)
        table.record(path, GPU, {str(key): an_entry("tiled", {"BLOCK_W": 16, "BLOCK_H": 1,
                                                              "num_warps": worker + 1,
                                                              "num_stages": i})})


def _reader(path, stop, bad):
    while not stop.is_set():
        data, corrupt = table.read_raw(path)
        if corrupt:
            bad.value += 1


def test_eight_concurrent_writers_lose_nothing_and_readers_see_whole_tables(tmp_path):
    path = tmp_path / "shared" / "gpu.json"
    ctx = multiprocessing.get_context("fork")
    barrier, stop, bad = ctx.Barrier(WRITERS), ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(path, stop, bad))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(path, w, barrier)) for w in range(WRITERS)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    stop.set()
    reader.join(30)
    assert bad.value == 0, "a reader saw a half-written table"
    entries = table.load_entries(path, GPU)
    assert len(entries) == WRITERS * KEYS_PER_WRITER
    for w in range(WRITERS):
        for i in range(KEYS_PER_WRITER):
            config = entries[str(a_key(heads=w + 1, d=i + 1))]["config"]
            assert (config["num_warps"], config["num_stages"]) == (w + 1, i)
    assert not [f for f in os.listdir(path.parent) if f.endswith(".tmp")]


# ---------------------------------------------------------------- damaged files

def _damaged() -> dict:
    """name -> bytes of a damaged table (or a callable that damages the path)."""
    text = json.dumps(good_table()).encode()
    rng = random.Random(16)
    good = good_table()
    entry = an_entry()
    bad_types = {
        "variant-int": {**entry, "variant": 3},
        "config-string": {**entry, "config": "BLOCK_W=16"},
        "config-value-string": {**entry, "config": {"BLOCK_W": "16", "BLOCK_H": 1}},
        "config-value-float": {**entry, "config": {"BLOCK_W": 16.0, "BLOCK_H": 1}},
        "config-value-bool": {**entry, "config": {"BLOCK_W": True, "BLOCK_H": 1}},
        "config-nested": {**entry, "config": {"BLOCK_W": {"eval": "__import__('os')"}}},
        "time-string": {**entry, "time_us": "fast"},
        "complete-string": {**entry, "complete": "yes"},
        "candidates-object": {**entry, "candidates": {"a": 1}},
        "entry-list": [entry],
        "variant-without-config": {**entry, "config": None},
    }
    cases = {
        "empty": b"",
        "truncated-1": text[:1],
        "truncated-half": text[: len(text) // 2],
        "truncated-last-byte": text[:-1],
        "random-bytes": bytes(rng.randrange(256) for _ in range(4096)),
        "bad-utf8-in-json": text.replace(b'"gpu"', b'"gp\xff"'),
        "nul-bytes": b"\0" * 100,
        "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
        "top-level-list": b"[]",
        "top-level-string": b'"table"',
        "schema-2": json.dumps({**good, "schema": 2}).encode(),
        "schema-string": json.dumps({**good, "schema": "1"}).encode(),
        "no-entries": json.dumps({k: v for k, v in good.items() if k != "entries"}).encode(),
        "entries-list": json.dumps({**good, "entries": []}).encode(),
        "gpu-int": json.dumps({**good, "gpu": 7}).encode(),
        "nan-literal": text.replace(b'"time_us": 10.0', b'"time_us": NaN'),
    }
    for name, e in bad_types.items():
        cases[f"wrong-type-{name}"] = json.dumps({**good, "entries": {str(a_key()): e}}).encode()
    return cases


@pytest.mark.parametrize("name", list(_damaged()))
def test_damaged_table_one_warning_and_the_heuristic(name):
    data = _damaged()[name]
    user_table().parent.mkdir(parents=True)
    user_table().write_bytes(data)
    results, ours = lookups_warn_once()
    if name == "nan-literal":  # valid to Python's json: a NaN time is harmless data
        assert results[0] == ("tiled", an_entry()["config"]) and not ours
        return
    assert results == [None, None, None]
    assert len(ours) == 1 and str(user_table()) in str(ours[0].message), \
        [str(w.message) for w in ours]
    # a writer replaces the damaged table (one more warning, saying so)
    with pytest.warns(table.StaleTableWarning, match="replacing"):
        table.record(user_table(), GPU, {str(a_key()): an_entry()})
    lookup_mod.clear_cache()
    assert lookup_mod.lookup(a_key(), gpu=GPU)[0] == "tiled"


def test_huge_file_is_not_read(monkeypatch):
    monkeypatch.setattr(table, "MAX_TABLE_BYTES", 1 << 20)
    user_table().parent.mkdir(parents=True)
    with open(user_table(), "wb") as f:  # sparse: no 1 MB write on a shared disk
        f.truncate(table.MAX_TABLE_BYTES + 1)
    reads = []
    monkeypatch.setattr(type(user_table()), "read_bytes", lambda self: reads.append(self))
    results, ours = lookups_warn_once()
    assert results == [None] * 3 and len(ours) == 1 and "too large" in str(ours[0].message)
    assert reads == []


def test_large_valid_table_still_loads():
    """Thousands of keys (a large sweep) are a table, not an attack."""
    entries = {str(a_key(heads=h, d=d)): an_entry() for h in range(1, 41) for d in range(1, 101)}
    table.record(user_table(), GPU, entries)
    assert user_table().stat().st_size < table.MAX_TABLE_BYTES
    results, ours = lookups_warn_once(a_key(heads=40, d=100))
    assert results[0][0] == "tiled" and not ours


@pytest.mark.parametrize("kind", ["directory", "fifo", "unreadable", "dangling-symlink",
                                  "parent-is-a-file"])
def test_table_that_is_not_a_readable_file(kind, monkeypatch, tmp_path):
    path = user_table()
    path.parent.mkdir(parents=True)
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "unreadable":
        path.write_text(json.dumps(good_table()))
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: make the read fail instead
            def denied(self):
                raise PermissionError(13, "Permission denied", str(self))
            monkeypatch.setattr(type(path), "read_bytes", denied)
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere.json")
    elif kind == "parent-is-a-file":
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(blocker))
        lookup_mod.clear_cache()
    results, ours = lookups_warn_once()
    assert results == [None] * 3
    if kind == "dangling-symlink":  # an absent table: nothing to warn about
        assert ours == []
    else:
        assert len(ours) == 1, [str(w.message) for w in ours]


def test_unreadable_kernels_folder_or_any_error_is_one_warning(monkeypatch):
    table.record(user_table(), GPU, {str(a_key()): an_entry()})

    def broken():
        raise RuntimeError("kernels folder vanished")

    monkeypatch.setattr(table, "kernels_hash", broken)
    lookup_mod.clear_cache()
    results, ours = lookups_warn_once()
    assert results == [None] * 3 and len(ours) == 1


# ---------------------------------------------------------------- data only

def _call(shape=(1, 8, 8, 8, 16), k=7):
    q = torch.zeros(shape, dtype=torch.bfloat16)
    rel_h = rel_w = None
    if shape[-1] >= 2:
        rel_h = torch.zeros(k, shape[-1] // 2, dtype=torch.bfloat16)
        rel_w = torch.zeros(k, shape[-1] - shape[-1] // 2, dtype=torch.bfloat16)
    return q, check_attend_args(q, q, q, k, 1, "zeros", rel_h, rel_w, None, None)


def _tuned(monkeypatch, entry, direction=0):
    """dispatch's tuned choice for a call whose key holds `entry` (as if on CUDA)."""
    q, args = _call()
    key = key_for(q, args, ("fwd", "bwd")[direction])
    table.record(user_table(), GPU, {str(key): entry})
    monkeypatch.setattr(lookup_mod, "gpu_name", lambda device=None: GPU)
    lookup_mod.clear_cache()
    return dispatch._tuned(q, args, direction, tuple(q.shape))


def test_a_valid_tuned_entry_is_used(monkeypatch):
    config = {"BLOCK_W": 32, "BLOCK_H": 2, "num_warps": 4, "num_stages": 1}
    assert _tuned(monkeypatch, an_entry("tiled", config)) == ("tiled", config)


@pytest.mark.parametrize("config", [
    {"BLOCK_W": 16},  # a key missing: the kernel would raise inside attend
    {"BLOCK_W": 16, "BLOCK_H": 1, "num_warps": 4, "num_stages": 2, "extra": 1},
    {"BLOCK_W": 3, "BLOCK_H": 1, "num_warps": 4, "num_stages": 2},  # not a power of two
    {"BLOCK_W": 1 << 30, "BLOCK_H": 1, "num_warps": 4, "num_stages": 2},
    {"BLOCK_W": 16, "BLOCK_H": 1, "num_warps": 1024, "num_stages": 2},
], ids=["missing-key", "extra-key", "odd-block", "huge-block", "huge-warps"])
def test_configs_outside_the_search_space_never_reach_a_kernel(config, monkeypatch):
    with pytest.warns(UserWarning, match="not in the variant's search space"):
        assert _tuned(monkeypatch, an_entry("tiled", config)) is None


def test_variant_names_are_never_imported(monkeypatch, tmp_path):
    """A variant naming a module (here one that would leave a mark when imported), a
    dotted path or a kernel module of the other direction: ignored, never imported."""
    mark = tmp_path / "imported"
    (tmp_path / "evil_variant.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["evil_variant", "os:system", "sasa_triton.kernels.tiled_fwd", "offsets",
             "__import__('evil_variant')", "../evil_variant"]
    for name in names:
        dispatch.clear_cache()
        assert _tuned(monkeypatch, an_entry(name)) is None, name
    assert not mark.exists() and "evil_variant" not in sys.modules


@pytest.mark.parametrize("direction", [0, 1])
def test_default_configs_are_in_the_search_space(direction):
    """The tuner records configs of the search space (and the default): the check
    above must never reject what the tuner writes."""
    for module in with_direction(("fwd", "bwd")[direction], tuned_only=True):
        name = module.name
        space = module.search_space()
        for shape in [(1, 7, 7, 8, 8), (2, 56, 56, 4, 64), (1, 3, 200, 1, 256), (1, 9, 9, 16, 1)]:
            q, args = _call(shape, 3)
            assert module.default_config(shape, args) in space, (name, shape)
            assert all(c in space for c in module.prune(space, shape, args)), (name, shape)
