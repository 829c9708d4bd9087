"""The tuner: benchmark every variant x pruned config for each case, store the fastest.

For each case (a key and a concrete shape) it builds random inputs (never zeros), asks
every variant of the direction whether it `supports` the case, runs each config the
variant's `prune` keeps once (compiling it; an exception, e.g. a compile failure,
out-of-resources or out-of-memory, marks the candidate failed), checks its result
against the reference (a wrong config must never win), times it with `timer(fn) ->
milliseconds` (default: triton.testing.do_bench median), and writes the key's entry to
the table at once: an interrupted run resumes where it stopped (tuned keys are skipped
unless force=True). A candidate that breaks the CUDA context (illegal address: nothing
can run after it in this process) is recorded as crashed, the run stops with a message,
and the next run finishes that key without it.

Variants default to the tuned entries of sasa_triton.variants (those with a search
space); tests pass `variants={"fwd": {name: module}, ...}`. The oracle results are
checked against is the table's "reference" entry unless `oracle` (anything with the
variant functions `forward` and `backward`) is given.
Planning (and --dry-run) calls `supports` and `prune` with AttendArgs whose tensors are
on the "meta" device: they must look at shapes and dtypes only.
"""
from __future__ import annotations

import importlib
import json
import sys
import time
import zlib
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from sasa_triton import variants as variant_table
from sasa_triton.types import DTYPES

from . import tuned_table as table
from .keys import TuneCase, TuneKey
from .progress import Progress, fmt_seconds

# Rough seconds per candidate (compile + benchmark) for the up-front estimate; the
# progress line's ETA follows the measured rate once candidates finish.
SECONDS_PER_CANDIDATE = {"fwd": 3.0, "bwd": 6.0}
# A candidate whose result is further than this from the reference (max abs error over
# max abs value) failed: it catches broken configs, it is not a precision test.
VERIFY_TOL = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-2, "fp64": 1e-6}


class Candidate(NamedTuple):
    variant: str
    module: object
    config: dict


class PlanItem(NamedTuple):
    case: TuneCase
    candidates: list  # [Candidate]
    counts: dict  # variant -> number of configs kept (0: unsupported or failed)
    notes: list  # why a variant is absent


def load_variants(direction: str, variants: Optional[dict] = None) -> tuple[dict, list]:
    """({name: variant}, [notes]) for a direction. `variants` overrides the table of
    sasa_triton.variants: a dict {"fwd": {name: module or "module.path"}, "bwd": {...}}."""
    if variants is None:
        found = {v.name: v for v in variant_table.with_direction(direction, tuned_only=True)}
    else:
        found = variants.get(direction, {})
    modules, notes = {}, []
    for name, target in found.items():
        try:
            if isinstance(target, str):
                target = importlib.import_module(target)
            elif isinstance(target, variant_table.Variant):
                target.load()
            modules[name] = target
        except Exception as e:
            notes.append(f"{direction} variant {name!r} not importable: {type(e).__name__}: {e}")
    return modules, notes


def make_args(case: TuneCase, device, generator=None) -> tuple:
    """q, k, v and AttendArgs for a case: random normal inputs (rel and rpb scaled by 0.5),
    contiguous; on the "meta" device only shapes (for planning without a GPU)."""
    from sasa_triton.args import check_attend_args

    dtype = DTYPES[case.dtype]

    def rand(*shape, scale=1.0):
        if torch.device(device).type == "meta":
            return torch.empty(shape, dtype=dtype, device=device)
        t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return (t * scale).to(dtype)

    q, k, v = (rand(*case.q_shape) for _ in range(3))
    rel_h = rel_w = rpb = None
    if case.rel != "none":
        rows = 2 * case.kh - 1 if case.padding == "shift" else case.kh
        cols = 2 * case.kw - 1 if case.padding == "shift" else case.kw
        lead = (case.heads,) if case.rel == "per_head" else ()
        rel_h = rand(*lead, rows, case.d // 2, scale=0.5)
        rel_w = rand(*lead, cols, case.d - case.d // 2, scale=0.5)
    if case.rpb:
        rpb = rand(case.heads, 2 * case.kh - 1, 2 * case.kw - 1, scale=0.5)
    args = check_attend_args(q, k, v, (case.kh, case.kw), (case.dh, case.dw), case.padding,
                             rel_h, rel_w, rpb, None)
    return q, k, v, args


def limit_configs(configs: list, default: Optional[dict], limit: Optional[int]) -> list:
    """At most `limit` configs: the variant's default first (the heuristic's choice is
    always measured), then evenly spaced picks across the pruned list."""
    if limit is None or len(configs) <= limit:
        return configs
    chosen = [default] if default is not None else []
    step = len(configs) / max(limit - len(chosen), 1)
    for i in range(max(limit - len(chosen), 0)):
        chosen.append(configs[int(i * step)])
    out, seen = [], set()
    for c in chosen:
        if _cand_id("", c) not in seen:
            seen.add(_cand_id("", c))
            out.append(c)
    return out[:limit]


def plan(cases, variants: Optional[dict] = None, limit: Optional[int] = None) -> list[PlanItem]:
    """The candidates of each case: supported variants x pruned configs (no GPU needed),
    at most `limit` configs per variant when given."""
    loaded = {}
    items = []
    for case in cases:
        if case.direction not in loaded:
            loaded[case.direction] = load_variants(case.direction, variants)
        modules, import_notes = loaded[case.direction]
        _, _, _, args = make_args(case, "meta")
        candidates, counts, notes = [], {}, list(import_notes)
        for name, mod in modules.items():
            try:
                if not mod.supports(case.q_shape, DTYPES[case.dtype], args):
                    counts[name] = 0
                    continue
                configs = list(mod.prune(mod.search_space(), case.q_shape, args))
                if limit is not None and len(configs) > limit:
                    configs = limit_configs(configs, mod.default_config(case.q_shape, args),
                                            limit)
            except Exception as e:
                counts[name] = 0
                notes.append(f"{name}: supports/prune failed: {type(e).__name__}: {e}")
                continue
            counts[name] = len(configs)
            candidates += [Candidate(name, mod, dict(c)) for c in configs]
        items.append(PlanItem(case, candidates, counts, notes))
    return items


def estimate_seconds(items, per_candidate: Optional[dict] = None) -> float:
    per = per_candidate or SECONDS_PER_CANDIDATE
    return sum(len(it.candidates) * per[it.case.direction] for it in items)


def default_timer(fn: Callable) -> float:
    """Median milliseconds of fn on the GPU (warm-up included)."""
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def _rel_err(got, want) -> float:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return float("inf")
    err = (got - want).abs().max().item() if got.numel() else 0.0
    return err / max(want.abs().max().item() if want.numel() else 0.0, 1.0)


class _Bench:
    """Inputs, reference results and the call of one candidate for one case."""

    def __init__(self, case: TuneCase, device, verify: bool, oracle=None):
        oracle = variant_table.get(variant_table.REFERENCE) if oracle is None else oracle
        g = torch.Generator(device=device).manual_seed(zlib.crc32(str(case.key).encode()))
        self.case = case
        self.q, self.k, self.v, self.args = make_args(case, device, g)
        self.ref = None
        if case.direction == "fwd":
            if verify:
                self.ref = oracle.forward(self.q, self.k, self.v, self.args, None)
            return
        # backward: out and lse come from the oracle; dout is random
        self.out, self.lse = oracle.forward(self.q, self.k, self.v, self.args, None)
        self.dout = torch.randn(self.out.shape, generator=g, device=device,
                                dtype=torch.float32).to(self.out.dtype)
        if verify:
            self.ref = oracle.backward(self.q, self.k, self.v, self.out, self.lse, self.dout,
                                       self.args, None)

    def runner(self, cand: Candidate) -> Callable:
        mod, cfg, q, k, v, a = cand.module, cand.config, self.q, self.k, self.v, self.args
        if self.case.direction == "fwd":
            return lambda: mod.forward(q, k, v, a, cfg)
        out, lse, dout = self.out, self.lse, self.dout
        return lambda: mod.backward(q, k, v, out, lse, dout, a, cfg)

    def check(self, result) -> None:
        """Raises if a candidate's result is off the reference."""
        if self.ref is None:
            return
        tol = VERIFY_TOL[self.case.dtype]
        names = ("out", "lse") if self.case.direction == "fwd" else \
            ("dq", "dk", "dv", "drel_h", "drel_w", "drpb")
        for name, got, want in zip(names, result, self.ref):
            if want is None:
                continue
            err = _rel_err(got, want)
            if not err <= tol:  # NaN fails too
                raise ValueError(f"wrong result: {name} off the reference by {err:.2e} "
                                 f"(relative to its max; tolerance {tol:.0e})")


class ContextLost(RuntimeError):
    """A candidate broke the CUDA context (illegal address, ...): nothing more can run in
    this process. Its entry is written (incomplete); re-running resumes and skips it."""


def _context_lost(device) -> bool:
    """After a failure: is the device still usable? (A sticky CUDA error fails every
    later call, so a synchronize tells.)"""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        return False
    except Exception:
        return True


def _cand_id(variant, config) -> str:
    return f"{variant} {json.dumps(config, sort_keys=True)}"


def _bench_candidate(bench: _Bench, cand: Candidate, timer, device) -> dict:
    row = {"variant": cand.variant, "config": cand.config}
    fn = bench.runner(cand)
    try:
        bench.check(fn())  # the first call compiles
        row["time_us"] = float(timer(fn)) * 1e3
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # compile failure, out of resources/memory, wrong result
        row["time_us"] = None
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        if _context_lost(device):
            row["crashed"] = True
        elif device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def tune(cases, out_path, gpu: str, *, variants: Optional[dict] = None,
         timer: Optional[Callable] = None, device=None, force: bool = False,
         verify: bool = True, stream=None, per_candidate: Optional[dict] = None,
         limit: Optional[int] = None, oracle=None) -> list[dict]:
    """Tunes each case into the table at `out_path` (named for `gpu`) and returns one
    summary dict per case: key, status ("tuned" | "skipped" | "failed" | "no candidates"),
    variant, config, time_us. `oracle`: see the module docstring."""
    stream = sys.stderr if stream is None else stream
    timer = default_timer if timer is None else timer
    device = torch.device("cuda" if device is None else device)
    done = table.load_entries(out_path, gpu) or {}
    todo, summary = [], []
    for case in _unique(cases):
        entry = done.get(str(case.key))
        if entry is not None and entry.get("complete", True) and not force:
            summary.append(_summary(case.key, "skipped", entry))
        else:
            todo.append(case)
    items = plan(todo, variants, limit)
    for note in dict.fromkeys(n for it in items for n in it.notes):  # once each, in order
        stream.write(f"note: {note}\n")
    total = sum(len(it.candidates) for it in items)
    est = estimate_seconds(items, per_candidate)
    stream.write(f"tuning {len(items)} keys ({len(summary)} already in {out_path}): "
                 f"{total} candidates, estimated {fmt_seconds(est)}\n")
    progress = Progress(total, est, stream)
    try:
        for i, it in enumerate(items):
            previous = None if force else done.get(str(it.case.key))
            summary.append(_tune_one(it, out_path, gpu, timer, device, verify, progress,
                                     f"key {i + 1}/{len(items)}", previous, oracle))
    finally:
        progress.close()
    return summary


def _tune_one(it: PlanItem, out_path, gpu, timer, device, verify, progress, label,
              previous: Optional[dict], oracle=None) -> dict:
    key = it.case.key
    if not it.candidates:
        progress.note_key(f"{key}: no variant supports it; the heuristic serves it")
        return _summary(key, "no candidates", None)
    try:
        bench = _Bench(it.case, device, verify, oracle)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # e.g. out of memory for the inputs: skip the key, keep going
        progress.step(len(it.candidates), label)
        progress.note_key(f"{key}: inputs failed ({type(e).__name__}: {e}); not tuned")
        return _summary(key, "failed", None)
    # an earlier run of this key that broke the context: keep its rows, skip its crasher
    rows = [r for r in (previous or {}).get("candidates", []) if r.get("crashed")
            or r.get("time_us") is not None]
    ran = {_cand_id(r["variant"], r["config"]) for r in rows}
    crashed = None
    for cand in it.candidates:
        if _cand_id(cand.variant, cand.config) not in ran:
            rows.append(_bench_candidate(bench, cand, timer, device))
            if rows[-1].get("crashed"):
                crashed = rows[-1]
                break
        progress.step(1, f"{label} {cand.variant}")
    del bench
    ok = [r for r in rows if r["time_us"] is not None]
    best = min(ok, key=lambda r: r["time_us"]) if ok else None
    entry = table.make_entry(best and best["variant"], best and best["config"],
                             best and best["time_us"], it.case.q_shape, rows)
    if crashed:
        entry["complete"] = False
    table.record(out_path, gpu, {str(key): entry})
    if crashed:
        raise ContextLost(
            f"{key}: candidate {crashed['variant']} {crashed['config']} broke the CUDA context "
            f"({crashed['error']}). It is recorded and will be skipped: run the same command "
            f"again to continue.")
    if best:
        progress.note_key(f"{key}: {best['variant']} {best['config']} {best['time_us']:.1f} us "
                          f"({len(ok)}/{len(rows)} candidates ran)")
    else:
        progress.note_key(f"{key}: every candidate failed, e.g. {rows[0]['error']}")
    return _summary(key, "tuned" if best else "failed", entry)


def _summary(key: TuneKey, status: str, entry: Optional[dict]) -> dict:
    entry = entry or {}
    return {"key": str(key), "status": status, "variant": entry.get("variant"),
            "config": entry.get("config"), "time_us": entry.get("time_us")}


def _unique(cases) -> Iterator[TuneCase]:
    seen = set()
    for c in cases:
        if c.key not in seen:
            seen.add(c.key)
            yield c


def tune_on_miss(key: TuneKey, gpu: str, shape=None) -> None:
    """Tunes one key into the user's table (SASA_TRITON_TUNE_ON_MISS=1): the call's own
    shape when given, else a representative one of the key's bucket."""
    case = TuneCase.from_key(key)
    if shape is not None:
        B, H, W = shape[:3]
        if case._replace(B=B, H=H, W=W).key == key:  # a shape of another bucket: ignored
            case = case._replace(B=B, H=H, W=W)
    start = time.monotonic()
    sys.stderr.write(f"sasa_triton: tuning unseen key {key} (SASA_TRITON_TUNE_ON_MISS=1)\n")
    tune([case], table.table_path(table.user_dir(), gpu), gpu)
    sys.stderr.write(f"sasa_triton: tuned {key} in {fmt_seconds(time.monotonic() - start)}\n")
