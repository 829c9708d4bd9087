"""Autotuning without a GPU: keys, tables (staleness, corruption, concurrent writers),
lookup order, the tuner with fake variants and an injected timer, and the CLI."""
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
import types
import warnings

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.autotune import lookup as lookup_mod
from sasa_triton.autotune import tuned_table as table
from sasa_triton.autotune import tuner
from sasa_triton.autotune.__main__ import main as cli_main
from sasa_triton.autotune.keys import (
    TuneCase,
    TuneKey,
    key_for,
    parse_case,
    parse_cases,
    size_bucket,
)
from sasa_triton.autotune.progress import Progress
from sasa_triton.reference import reference_attend

from cases import Case, make_inputs

GPU = "Fake GPU 80GB HBM3"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test: its own user cache dir and shipped dir, fresh lookup caches."""
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("SASA_TRITON_TUNE_ON_MISS", raising=False)
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(table, "shipped_dir", lambda: shipped)
    lookup_mod.clear_cache()
    yield
    lookup_mod.clear_cache()


def call_key(case: Case, direction="fwd", dtype=torch.float32):
    q, k, v, kw = make_inputs(case, dtype)
    args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])
    return key_for(q, args, direction)


def a_key(**changes) -> TuneKey:
    base = TuneKey("fwd", 7, 7, 1, 1, 8, 16, "bf16", "zeros", "shared", False, 32, 32)
    return base._replace(**changes)


def an_entry(variant="tiled", config=None, time_us=10.0):
    config = {"BLOCK": 16, "num_warps": 4} if config is None else config
    cands = [{"variant": variant, "config": config, "time_us": time_us}]
    return table.make_entry(variant, config, time_us, (32, 28, 28, 8, 16), cands)


def write_raw(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def user_table():
    return table.table_path(table.user_dir(), GPU)


# ---------------------------------------------------------------- keys

def test_size_bucket_powers_of_two_clamped():
    got = {n: size_bucket(n) for n in (1, 7, 8, 9, 14, 16, 17, 28, 56, 128, 129, 512, 4000)}
    assert got == {1: 8, 7: 8, 8: 8, 9: 16, 14: 16, 16: 16, 17: 32, 28: 32, 56: 64, 128: 128,
                   129: 256, 512: 512, 4000: 512}


def test_key_for_buckets_nearby_shapes_and_tells_options_apart():
    base = Case(B=1, H=9, W=9, heads=2, d=8, k=3, rel="shared")
    assert call_key(base) == call_key(Case(B=2, H=12, W=16, heads=2, d=8, k=3, rel="shared"))
    assert call_key(base).h_bucket == 16
    different = [Case(B=1, H=17, W=9, heads=2, d=8, k=3, rel="shared"),
                 Case(B=1, H=9, W=9, heads=2, d=8, k=5, rel="shared"),
                 Case(B=1, H=9, W=9, heads=2, d=8, k=(3, 5), rel="shared"),
                 Case(B=1, H=9, W=9, heads=2, d=8, k=3, dilation=2, rel="shared"),
                 Case(B=1, H=9, W=9, heads=1, d=8, k=3, rel="shared"),
                 Case(B=1, H=9, W=9, heads=2, d=16, k=3, rel="shared"),
                 Case(B=1, H=9, W=9, heads=2, d=8, k=3, rel="per_head"),
                 Case(B=1, H=9, W=9, heads=2, d=8, k=3),
                 Case(B=1, H=9, W=9, heads=2, d=8, k=3, rel="shared", rpb=True),
                 Case(B=1, H=9, W=9, heads=2, d=8, k=3, padding="mask", rel="shared")]
    keys = {call_key(c) for c in different} | {call_key(base), call_key(base, "bwd"),
                                               call_key(base, dtype=torch.bfloat16)}
    assert len(keys) == len(different) + 3
    k = call_key(Case(B=1, H=9, W=9, heads=2, d=8, k=3, rel="per_head", rpb=True), "bwd",
                 torch.float16)
    assert (k.direction, k.dtype, k.rel, k.rpb) == ("bwd", "fp16", "per_head", True)


def test_key_string_round_trip_and_errors():
    for key in (a_key(), a_key(direction="bwd", kh=3, kw=5, dh=2, rel="per_head", rpb=True,
                                dtype="fp16", padding="shift", h_bucket=512, w_bucket=8)):
        assert TuneKey.parse(str(key)) == key
        assert TuneCase.from_key(key).key == key  # its representative shape is in its bucket
    assert str(a_key()) == "fwd-bf16-k7x7-dil1x1-heads8-d16-zeros-rel_shared-rpb0-H32xW32"
    for bad in ("", "fwd-bf16", str(a_key()).replace("zeros", "reflect"),
                str(a_key()).replace("rpb0", "rpb2"), str(a_key()).replace("fwd", "up")):
        with pytest.raises(ValueError):
            TuneKey.parse(bad)


def test_key_for_and_memoised_lookup_cost_microseconds():
    q = torch.empty(32, 28, 28, 8, 16, dtype=torch.bfloat16, device="meta")
    args = check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None)
    record = {str(key_for(q, args, "fwd")): an_entry()}
    table.record(user_table(), GPU, record)
    assert lookup_mod.lookup(key_for(q, args, "fwd"), gpu=GPU) is not None
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        lookup_mod.lookup(key_for(q, args, "fwd"), gpu=GPU)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 50e-6, f"key_for + lookup took {per_call * 1e6:.1f} us"


def test_compact_case_syntax():
    c = parse_case("B=4,H=30,W=20,heads=2,d=16,k=7x5,dil=2,padding=mask,rel=none,rpb=1",
                   "bwd", "fp16")
    assert c == TuneCase("bwd", 4, 30, 20, 2, 16, 7, 5, 2, 2, "fp16", "mask", "none", True)
    assert parse_case(c.spec(), "bwd", "fp16") == c
    d = parse_case("H=28,W=28,heads=8,d=16,k=7")
    assert (d.B, d.dh, d.padding, d.rel, d.rpb) == (32, 1, "zeros", "shared", False)
    assert [x.key.direction + x.key.dtype for x in
            parse_cases("H=28,W=28,heads=8,d=16,k=7", ("fwd", "bwd"), ("bf16", "fp16"))] == \
        ["fwdbf16", "fwdfp16", "bwdbf16", "bwdfp16"]
    from_key = parse_cases(str(a_key(direction="bwd")), ("fwd",), ("fp32",))
    assert [x.key for x in from_key] == [a_key(direction="bwd")]
    for bad in ("H=28,W=28,heads=8,d=16", "H=28,W=28,heads=8,d=16,k=6",
                "H=28,W=28,heads=8,d=16,k=7,colour=red", "H=x,W=28,heads=8,d=16,k=7",
                "H=5,W=28,heads=8,d=16,k=7,padding=shift", "H=8,W=8,heads=8,d=16,k=3,rpb=2"):
        with pytest.raises(ValueError):
            parse_case(bad)


# ---------------------------------------------------------------- tables

def test_table_round_trip_and_lookup():
    entries = {str(a_key()): an_entry("tiled", {"BLOCK_H": 8, "num_warps": 4}),
               str(a_key(d=8)): an_entry("tile2d", {"BLOCK": 64})}
    table.record(user_table(), GPU, entries)
    assert user_table().name == "fake-gpu-80gb-hbm3.json"
    data = json.loads(user_table().read_text())
    assert data["triton"] == table.triton_version() and data["kernels_hash"] == table.kernels_hash()
    assert data["gpu"] == GPU and data["torch"] == torch.__version__.split("+")[0]
    assert table.load_entries(user_table(), GPU) == entries
    assert lookup_mod.lookup(a_key(), gpu=GPU) == ("tiled", {"BLOCK_H": 8, "num_warps": 4})
    got = lookup_mod.lookup(a_key(d=8), gpu=GPU)
    got[1]["BLOCK"] = 0  # callers get a copy: the cache is not corrupted
    assert lookup_mod.lookup(a_key(d=8), gpu=GPU) == ("tile2d", {"BLOCK": 64})
    assert lookup_mod.lookup(a_key(d=32), gpu=GPU) is None
    assert lookup_mod.lookup(a_key(), gpu="Other GPU") is None
    if not torch.cuda.is_available():
        assert lookup_mod.lookup(a_key()) is None  # no CUDA: no table applies


def test_lookup_resolves_and_caches_the_gpu_name(monkeypatch):
    table.record(user_table(), GPU, {str(a_key()): an_entry("tiled")})
    names = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: names.append(i) or GPU)
    for device in (None, 0, torch.device("cuda", 0), None):
        assert lookup_mod.lookup(a_key(), device)[0] == "tiled"
    assert names == [0]  # asked once, then cached
    assert lookup_mod.lookup(a_key(), torch.device("cpu")) is None


def test_lookup_order_user_then_shipped_then_none():
    shipped = table.table_path(table.shipped_dir(), GPU)
    table.record(shipped, GPU, {str(a_key()): an_entry("shipped_v"),
                                str(a_key(d=8)): an_entry("shipped_v")})
    table.record(user_table(), GPU, {str(a_key()): an_entry("user_v")})
    assert lookup_mod.lookup(a_key(), gpu=GPU)[0] == "user_v"
    assert lookup_mod.lookup(a_key(d=8), gpu=GPU)[0] == "shipped_v"
    assert lookup_mod.lookup(a_key(d=32), gpu=GPU) is None
    # an entry whose every candidate failed is a miss, not a crash
    all_failed = table.make_entry(None, None, None, (1,), [])
    table.record(user_table(), GPU, {str(a_key(d=32)): all_failed})
    lookup_mod.clear_cache()
    assert lookup_mod.lookup(a_key(d=32), gpu=GPU) is None


def _stale_tables():
    good = {"schema": 1, "gpu": GPU, "triton": table.triton_version(),
            "torch": "2.13.0", "kernels_hash": table.kernels_hash(),
            "entries": {str(a_key()): an_entry()}}
    return {
        "other-triton": ({**good, "triton": "0.0.1"}, "Triton 0.0.1"),
        "other-source": ({**good, "kernels_hash": "0" * 64}, "kernel sources changed"),
        "other-gpu": ({**good, "gpu": "Another GPU"}, "Another GPU"),
        "bad-json": ('{"schema": 1, "entries": {', "corrupt"),
        "not-object": ("[1, 2]", "corrupt"),
        "wrong-schema-version": ({**good, "schema": 99}, "corrupt"),
        "entries-not-dict": ({**good, "entries": [1]}, "corrupt"),
        "entry-malformed": ({**good, "entries": {str(a_key()): {"variant": 3}}}, "corrupt"),
        "missing-hash": ({k: v for k, v in good.items() if k != "kernels_hash"}, "corrupt"),
    }


@pytest.mark.parametrize("name", list(_stale_tables()))
def test_stale_or_corrupt_table_ignored_with_one_warning(name):
    data, reason = _stale_tables()[name]
    write_raw(user_table(), data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key in (a_key(), a_key(d=8), a_key()):
            assert lookup_mod.lookup(key, gpu=GPU) is None
        assert table.load_entries(user_table(), GPU) is None
    ours = [w for w in caught if issubclass(w.category, table.StaleTableWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert reason in str(ours[0].message) and str(user_table()) in str(ours[0].message)


def test_stale_user_table_falls_through_to_shipped_and_is_replaced_on_write():
    write_raw(user_table(), "not json")
    table.record(table.table_path(table.shipped_dir(), GPU), GPU, {str(a_key()): an_entry("s")})
    with pytest.warns(table.StaleTableWarning):
        assert lookup_mod.lookup(a_key(), gpu=GPU)[0] == "s"
    with pytest.warns(table.StaleTableWarning, match="replacing"):
        table.record(user_table(), GPU, {str(a_key()): an_entry("u")})
    lookup_mod.clear_cache()
    assert lookup_mod.lookup(a_key(), gpu=GPU)[0] == "u"


def test_lookup_never_raises(monkeypatch):
    def broken(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(table, "load_entries", broken)
    with pytest.warns(table.StaleTableWarning, match="disk on fire"):
        assert lookup_mod.lookup(a_key(), gpu=GPU) is None


def _writer(path, worker, n):
    for i in range(n):
        key = a_key(heads=worker + 1, d=8 * (i + 1))
        table.record(path, GPU, {str(key): an_entry(f"w{worker}", {"i": i})})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "shared" / "gpu.json"
    workers, per_worker = 4, 12
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())  # valid JSON
    assert len(data["entries"]) == workers * per_worker
    for w in range(workers):
        for i in range(per_worker):
            e = data["entries"][str(a_key(heads=w + 1, d=8 * (i + 1)))]
            assert (e["variant"], e["config"]) == (f"w{w}", {"i": i})
    assert not [f for f in os.listdir(path.parent) if f.endswith(".tmp")]


# ---------------------------------------------------------------- tuner

class FakeVariants:
    """Two forward variants and one backward variant built on the reference, a timer that
    reads the (fake) time of the candidate it runs, and a log of what ran."""

    TIMES = {("slow", 8): 5.0, ("slow", 16): 4.0, ("fast", 32): 1.5, ("fast", 64): 2.0,
             ("broken", 1): 0.1, ("wrong", 1): 0.2, ("bwd", 16): 3.0, ("bwd", 32): 2.5}

    def __init__(self):
        self.last = None
        self.timed = []  # candidates the timer measured
        self.interrupt_after = None

    def module(self, name, blocks, supported=True, wrong=False, fail_compile=False,
               crash=False):
        fake = self

        def forward(q, k, v, args, config=None):
            fake.last = (name, config["BLOCK"])
            if fail_compile:
                raise RuntimeError("CompilationError: out of shared memory (fake)")
            if crash:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (fake)")
            out, lse = reference_attend(q, k, v, args, return_lse=True)
            return (torch.zeros_like(out) if wrong else out), lse.float()

        def backward(q, k, v, out, lse, dout, args, config=None):
            fake.last = (name, config["BLOCK"])
            leaves = [t.detach().requires_grad_() if t is not None else None
                      for t in (q, k, v, args.rel_h, args.rel_w, args.rpb)]
            a = args._replace(rel_h=leaves[3], rel_w=leaves[4], rpb=leaves[5])
            reference_attend(*leaves[:3], a).backward(dout)
            return tuple(t.grad if t is not None else None for t in leaves)

        mod = types.ModuleType(f"fake_{name}")
        mod.search_space = lambda: [{"BLOCK": b, "num_warps": 4} for b in blocks] + \
            [{"BLOCK": 999, "num_warps": 4}]
        mod.prune = lambda configs, q_shape, args: [c for c in configs if c["BLOCK"] != 999]
        mod.default_config = lambda q_shape, args: {"BLOCK": blocks[0], "num_warps": 4}
        mod.supports = lambda q_shape, dtype, args: supported
        mod.forward, mod.backward = forward, backward
        return mod

    def variants(self):
        return {"fwd": {"slow": self.module("slow", [8, 16]),
                        "fast": self.module("fast", [32, 64]),
                        "broken": self.module("broken", [1], fail_compile=True),
                        "wrong": self.module("wrong", [1], wrong=True),
                        "unsupported": self.module("unsupported", [1], supported=False)},
                "bwd": {"bwd": self.module("bwd", [16, 32])}}

    def timer(self, fn):
        fn()
        if self.interrupt_after is not None and len(self.timed) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.timed.append(self.last)
        return self.TIMES[self.last]


def tiny_cases():
    base = TuneCase("fwd", 1, 5, 6, 2, 8, 3, 3, dtype="fp32", rel="shared")
    return [base, base.with_(H=9, W=9, rel="per_head", rpb=True), base.with_(padding="mask")]


def tune(fake, cases, path, **kw):
    return tuner.tune(cases, path, GPU, variants=fake.variants(), timer=fake.timer,
                      device="cpu", stream=io.StringIO(), **kw)


def test_tuner_picks_fastest_and_records_failures(tmp_path):
    fake, path = FakeVariants(), tmp_path / "t.json"
    summary = tune(fake, tiny_cases()[:1], path)
    assert [s["status"] for s in summary] == ["tuned"]
    assert (summary[0]["variant"], summary[0]["config"]) == ("fast", {"BLOCK": 32, "num_warps": 4})
    entry = table.load_entries(path, GPU)[str(tiny_cases()[0].key)]
    assert entry["time_us"] == pytest.approx(1500.0) and entry["shape"] == [1, 5, 6, 2, 8]
    by_variant = {}
    for c in entry["candidates"]:
        by_variant.setdefault(c["variant"], []).append(c)
    assert sorted(by_variant) == ["broken", "fast", "slow", "wrong"]  # unsupported: absent
    assert len(by_variant["slow"]) == len(by_variant["fast"]) == 2  # pruned BLOCK=999
    assert by_variant["broken"][0]["time_us"] is None
    assert "CompilationError" in by_variant["broken"][0]["error"]
    assert "wrong result" in by_variant["wrong"][0]["error"]  # fastest, but wrong
    assert ("broken", 1) not in fake.timed and ("wrong", 1) not in fake.timed


def test_tuner_backward_and_lookup_of_its_table(tmp_path, monkeypatch):
    fake = FakeVariants()
    case = tiny_cases()[1].with_(direction="bwd")
    summary = tune(fake, [case], user_table())
    assert (summary[0]["variant"], summary[0]["config"]["BLOCK"]) == ("bwd", 32)
    assert lookup_mod.lookup(case.key, gpu=GPU) == ("bwd", {"BLOCK": 32, "num_warps": 4})


def test_tuner_resumes_after_interruption(tmp_path):
    fake, path, cases = FakeVariants(), tmp_path / "t.json", tiny_cases()
    per_key = 4  # slow x 2 + fast x 2 are timed; broken and wrong fail before timing
    fake.interrupt_after = per_key + 1  # in the middle of the second key
    with pytest.raises(KeyboardInterrupt):
        tune(fake, cases, path)
    assert list(table.load_entries(path, GPU)) == [str(cases[0].key)]
    fake.timed, fake.interrupt_after = [], None
    summary = tune(fake, cases, path)
    assert [s["status"] for s in summary] == ["skipped", "tuned", "tuned"]
    assert len(fake.timed) == 2 * per_key
    assert set(table.load_entries(path, GPU)) == {str(c.key) for c in cases}
    fake.timed = []
    assert [s["status"] for s in tune(fake, cases, path)] == ["skipped"] * 3
    assert fake.timed == []
    tune(fake, cases[:1], path, force=True)
    assert len(fake.timed) == per_key


def test_tuner_stops_on_a_broken_context_and_resumes_without_the_crasher(tmp_path, monkeypatch):
    fake, path, case = FakeVariants(), tmp_path / "t.json", tiny_cases()[0]
    variants = fake.variants()
    fwd = variants["fwd"]
    variants["fwd"] = {"slow": fwd["slow"], "crasher": fake.module("crasher", [1], crash=True),
                       "fast": fwd["fast"]}
    monkeypatch.setattr(tuner, "_context_lost", lambda device: fake.last[0] == "crasher")

    def run():
        return tuner.tune([case], path, GPU, variants=variants, timer=fake.timer,
                          device="cpu", stream=io.StringIO())

    with pytest.raises(tuner.ContextLost, match="crasher"):
        run()
    entry = table.load_entries(path, GPU)[str(case.key)]
    assert entry["complete"] is False and entry["variant"] == "slow"
    assert entry["candidates"][-1]["crashed"] is True
    fake.timed = []
    assert run()[0]["variant"] == "fast"
    assert fake.timed == [("fast", 32), ("fast", 64)]  # slow kept, crasher skipped
    entry = table.load_entries(path, GPU)[str(case.key)]
    assert "complete" not in entry and len(entry["candidates"]) == 5
    assert run()[0]["status"] == "skipped"


def test_tuner_without_candidates_writes_nothing(tmp_path):
    out = io.StringIO()
    summary = tuner.tune(tiny_cases()[:1], tmp_path / "t.json", GPU, variants={"fwd": {}},
                         timer=None, device="cpu", stream=out)
    assert summary[0]["status"] == "no candidates" and not (tmp_path / "t.json").exists()


def test_plan_estimate_and_progress():
    fake = FakeVariants()
    items = tuner.plan(tiny_cases(), fake.variants())
    assert [len(it.candidates) for it in items] == [6, 6, 6]
    assert items[0].counts == {"slow": 2, "fast": 2, "broken": 1, "wrong": 1, "unsupported": 0}
    assert tuner.estimate_seconds(items, {"fwd": 2.0, "bwd": 5.0}) == 36.0
    now = [0.0]
    p = Progress(10, estimate_s=100.0, stream=io.StringIO(), clock=lambda: now[0])
    assert p.eta() == 100.0
    now[0] = 20.0
    p.step(4)
    assert p.eta() == pytest.approx(30.0)
    assert "4/10 candidates" in p.line() and "ETA 30s" in p.line()


def test_limit_keeps_the_default_and_spreads_the_rest():
    configs = [{"BLOCK": b} for b in range(10)]
    assert tuner.limit_configs(configs, {"BLOCK": 7}, 3) == [{"BLOCK": 7}, {"BLOCK": 0},
                                                             {"BLOCK": 5}]
    assert tuner.limit_configs(configs, {"BLOCK": 0}, 3) == [{"BLOCK": 0}, {"BLOCK": 5}]
    assert tuner.limit_configs(configs, None, 20) == configs
    items = tuner.plan(tiny_cases()[:1], FakeVariants().variants(), limit=1)
    assert [(c.variant, c.config["BLOCK"]) for c in items[0].candidates] == \
        [("slow", 8), ("fast", 32), ("broken", 1), ("wrong", 1)]


def test_tune_on_miss_is_opt_in(monkeypatch):
    calls = []

    def fake_tune(key, gpu, shape):
        calls.append(key)
        table.record(user_table(), gpu, {str(key): an_entry("tuned_now")})

    monkeypatch.setattr(tuner, "tune_on_miss", fake_tune)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lookup_mod.lookup(a_key(), gpu=GPU) is None and calls == []  # default: never
    lookup_mod.clear_cache()
    monkeypatch.setenv("SASA_TRITON_TUNE_ON_MISS", "1")
    assert lookup_mod.lookup(a_key(), gpu=GPU)[0] == "tuned_now"
    assert lookup_mod.lookup(a_key(), gpu=GPU)[0] == "tuned_now" and len(calls) == 1


def test_tune_on_miss_tunes_the_calls_shape_into_the_user_table(monkeypatch):
    seen = []
    monkeypatch.setattr(tuner, "tune", lambda cases, path, gpu, **kw: seen.append((cases, path)))
    big = a_key(h_bucket=512)
    tuner.tune_on_miss(big, GPU, (2, 300, 31, 8, 16))
    tuner.tune_on_miss(big, GPU)
    tuner.tune_on_miss(big, GPU, (2, 30, 31, 8, 16))  # not this key's bucket: ignored
    (shaped, path), (bucketed, _), (other, _) = seen
    assert path == user_table()
    assert (shaped[0].B, shaped[0].H, shaped[0].W, shaped[0].key) == (2, 300, 31, big)
    assert (bucketed[0].H, bucketed[0].W, bucketed[0].key) == (512, 32, big)
    assert other == bucketed


# ---------------------------------------------------------------- CLI

def test_cli_dry_run_lists_keys_variants_and_estimate(monkeypatch, capsys):
    fake = FakeVariants()
    monkeypatch.setitem(sys.modules, "fake_fwd_variants", fake.module("fast", [32, 64]))
    from sasa_triton import variants

    monkeypatch.setattr(variants, "VARIANTS", {
        "fastv": variants.kernel_variant("fastv", "fake_fwd_variants", forward=True),
        "missing": variants.kernel_variant("missing", "no_such_module_xyz", backward=True)})
    assert cli_main(["--dry-run", "--suite", "resnet50", "--direction", "both",
                     "--dtype", "bf16,fp16", "--key", "H=9,W=9,heads=2,d=8,k=3,rpb=1"]) == 0
    out = capsys.readouterr().out
    assert "fwd-bf16-k7x7-dil1x1-heads8-d8-zeros-rel_shared-rpb0-H64xW64" in out
    assert "bwd-fp16-k3x3-dil1x1-heads2-d8-zeros-rel_shared-rpb1-H16xW16" in out
    assert "fastv" in out and "not importable" in out
    assert "total: 20 keys (0 already tuned), 20 candidates, estimated 1m00s" in out


def test_cli_help_and_no_gpu_message():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "sasa_triton.autotune", "--help"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0
    for word in ("--suite", "--key", "--direction", "--dtype", "--out", "--ship", "--force",
                 "--dry-run", "resnet50", "ksweep", "heads", "det", "SASA_TRITON_CACHE_DIR"):
        assert word in run.stdout
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, "-m", "sasa_triton.autotune", "--suite", "det"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 2 and "no CUDA GPU" in run.stderr and "--dry-run" in run.stderr


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--suite", "nope", "--dry-run"], ["--dtype", "int8", "--dry-run"],
                 ["--key", "H=9", "--dry-run"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
    assert "lacks W, heads, d, k" in capsys.readouterr().err


def test_importing_autotune_and_lookup_stay_light():
    code = ("import sys\n"
            "from sasa_triton.autotune.keys import TuneKey\n"
            "from sasa_triton.autotune.lookup import lookup\n"
            "k = TuneKey.parse('fwd-bf16-k7x7-dil1x1-heads8-d16-zeros-rel_shared-rpb0-H32xW32')\n"
            "assert lookup(k, gpu='Fake GPU') is None\n"
            "from sasa_triton.autotune import tuned_table as table\n"
            "assert table.triton_version() and len(table.kernels_hash()) == 64\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
