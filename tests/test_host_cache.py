"""The host path's per-key caches (docs/host.md): `check_call`'s cached verdict never
lets a bad call through and always gives what `check_attend_args` gives; the dispatch
result kept in a verdict follows `dispatch.clear_cache()` and a re-registered variant."""
from __future__ import annotations

import math
import random

import pytest
import torch

import sasa_triton
from sasa_triton import args as checks
from sasa_triton import dispatch, ops, variants


def _outcome(fn, *a):
    """(AttendArgs with the tables as ids, None) or (None, (exception type, message))."""
    try:
        got = fn(*a)
    except (TypeError, ValueError) as e:
        return None, (type(e), str(e))
    if isinstance(got, tuple) and not isinstance(got, checks.AttendArgs):
        got = got[0]  # check_call: (args, checked)
    tables = tuple(None if t is None else id(t) for t in got[5:8])
    return (*got[:5], *tables, got.scale), None


def _random_call(rng: random.Random) -> tuple:
    """Arguments of one attend call, valid or not in one property at a time (a seeded
    walk over what the checks read: types, shapes, dtypes, devices, window, scale)."""
    heads, d = rng.choice([(1, 8), (2, 4), (2, 8)])
    H, W = rng.choice([(5, 6), (3, 3)])
    shape = (1, H, W, heads, d)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    q = torch.empty(shape, dtype=dtype)
    k, v = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    kernel = rng.choice([3, (3, 3), (3, 1), 1])
    dilation = rng.choice([1, (1, 1), (2, 1)])
    padding = rng.choice(["zeros", "mask", "shift"])
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rows = 2 * kh - 1 if padding == "shift" else kh
    cols = 2 * kw - 1 if padding == "shift" else kw
    rel_h = rel_w = rpb = None
    if rng.random() < 0.6:
        lead = rng.choice([(), (heads,)])
        rel_h = torch.empty(*lead, rows, d // 2, dtype=dtype)
        rel_w = torch.empty(*lead, cols, d - d // 2, dtype=dtype)
    if rng.random() < 0.4:
        rpb = torch.empty(heads, 2 * kh - 1, 2 * kw - 1, dtype=torch.float32)
    scale = rng.choice([None, 0.5, 1, -0.0, 2.0])
    call = dict(q=q, k=k, v=v, kernel_size=kernel, dilation=dilation, padding=padding,
                rel_h=rel_h, rel_w=rel_w, rpb=rpb, scale=scale)
    # one property changed, or none
    bad = rng.choice([None] * 6 + [
        ("k", torch.empty(shape, dtype=torch.float16)),
        ("v", torch.empty(shape, dtype=dtype, device="meta")),
        ("v", torch.empty((1, H, W, heads, d + 1), dtype=dtype)),
        ("q", torch.empty(shape[:4], dtype=dtype)),
        ("q", [0.0]),
        ("kernel_size", True), ("kernel_size", (3, True)), ("kernel_size", [3, 3]),
        ("kernel_size", 2), ("dilation", (1, 1.0)), ("dilation", False),
        ("padding", "reflect"), ("scale", True), ("scale", "0.5"),
        ("rel_h", None if rel_h is not None else torch.empty(rows, d // 2, dtype=dtype)),
        ("rel_w", None if rel_w is None else rel_w.to(torch.float64)),
        ("rel_h", None if rel_h is None else rel_h.to("meta")),
        ("rpb", torch.empty(heads + 1, 2 * kh - 1, 2 * kw - 1)),
        ("rpb", torch.empty(heads, 2 * kh - 1, 2 * kw - 1, dtype=torch.float16)),
    ])
    if bad is not None:
        call[bad[0]] = bad[1]
    return tuple(call[n] for n in ("q", "k", "v", "kernel_size", "dilation", "padding",
                                   "rel_h", "rel_w", "rpb", "scale"))


def test_cached_verdict_gives_what_the_checks_give():
    """Seeded random calls, valid and not, each checked three times (the 2nd and 3rd hit
    the cache when the 1st passed): the same AttendArgs (the call's own tables and scale,
    -0.0 kept) or the same exception and message as `check_attend_args`."""
    checks.clear_cache()
    rng = random.Random(14)
    calls = [_random_call(rng) for _ in range(300)]
    seen_valid = seen_invalid = 0
    for call in calls + calls:  # the second round meets every key again
        want = _outcome(checks.check_attend_args, *call)
        for _ in range(2):
            got = _outcome(checks.check_call, *call)
            assert got == want, call[3:6]
            if want[0] is not None:
                assert math.copysign(1.0, got[0][-1]) == math.copysign(1.0, want[0][-1])
        seen_valid += want[0] is not None
        seen_invalid += want[0] is None
    assert seen_valid > 100 and seen_invalid > 100  # the walk covers both
    assert checks._VERDICTS  # and the cache was used


def test_a_cached_key_still_rejects_what_differs_from_it():
    """A valid call first (its verdict cached), then calls that differ from it in one
    property the checks read: each raises as the uncached check does."""
    checks.clear_cache()
    q, k, v = (torch.randn(1, 6, 6, 2, 8) for _ in range(3))
    rel = dict(rel_h=torch.randn(3, 4), rel_w=torch.randn(3, 4))
    sasa_triton.attend(q, k, v, 3, **rel)
    sasa_triton.attend(q, k, v, (3, 3), **rel)
    for bad, exc in [
        (dict(kernel_size=True), TypeError), (dict(kernel_size=(3, True)), TypeError),
        (dict(scale=True), TypeError), (dict(v=v.half()), TypeError),
        (dict(v=v.to("meta")), ValueError), (dict(rel_w=rel["rel_w"].double()), TypeError),
        (dict(rel_h=rel["rel_h"].to("meta")), ValueError), (dict(backend="nope"), ValueError),
    ]:
        call = dict(q=q, k=k, v=v, kernel_size=3, **rel)
        call.update(bad)
        with pytest.raises(exc):
            sasa_triton.attend(call.pop("q"), call.pop("k"), call.pop("v"),
                               call.pop("kernel_size"), **call)


def test_scale_comes_from_each_call():
    """Same key, different scales: each call's own scale reaches the computation."""
    checks.clear_cache()
    q, k, v = (torch.randn(1, 5, 5, 1, 4, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    outs = [sasa_triton.attend(q, k, v, 3, scale=s) for s in (None, 0.5, 0.5, 2.0, None)]
    want = [sasa_triton.attend(q, k, v, 3, scale=s, backend="reference")
            for s in (None, 0.5, 2.0)]
    for got, ref in zip(outs, [want[0], want[1], want[1], want[2], want[0]]):
        torch.testing.assert_close(got, ref)
    assert not torch.equal(outs[1], outs[3])


def _function(f):
    """A variant's function itself (a Lazy resolved)."""
    if isinstance(f, variants.Lazy):
        return getattr(f.module(), f.target.partition(":")[2])
    return f


def _checked(q, k, v):
    return checks.check_call(q, k, v, 3, 1, "zeros", None, None, None, None)


def test_kept_dispatch_follows_clear_cache_and_register(monkeypatch):
    """`ops._impl` keeps (variant, function, config) in the call's verdict; a new choice
    after `dispatch.clear_cache()` and a variant registered again under its name are seen
    at once, and every call gets its own copy of the config."""
    q = k = v = torch.randn(1, 5, 5, 2, 8)
    args, checked = _checked(q, k, v)
    assert checked is not None
    cpu_forward = _function(variants.VARIANTS["cpu"].forward)
    assert _function(ops._impl("auto", 0, q, args, "", checked)[0]) is cpu_forward
    assert ops._impl("auto", 0, q, args, "", checked)[0] is cpu_forward  # kept
    # the module's function replaced (as Lazy promises, the replacement shows)
    import sasa_triton.cpu

    patched = lambda *a: None  # noqa: E731
    monkeypatch.setattr(sasa_triton.cpu, "forward", patched)
    assert ops._impl("auto", 0, q, args, "", checked)[0] is patched
    monkeypatch.setattr(sasa_triton.cpu, "forward", cpu_forward)

    # a new choice (say, a new tuned table) after clear_cache()
    monkeypatch.setattr(dispatch, "_choose",
                        lambda q, args, direction: ("reference", {"x": [1]}))
    assert ops._impl("auto", 0, q, args, "", checked)[0] is cpu_forward  # still kept
    dispatch.clear_cache()
    fn, config, _ = ops._impl("auto", 0, q, args, "", checked)
    assert _function(fn) is _function(variants.VARIANTS["reference"].forward)
    assert config == {"x": [1]}
    config.pop("x")  # the caller may change its copy (implementations pop keys)
    assert ops._impl("auto", 0, q, args, "", checked)[1] == {"x": [1]}

    # the variant registered again under its name
    old = variants.VARIANTS["reference"]
    replacement = variants.Variant("reference", lambda *a: "new", old.backward, old.supports,
                                   old.default_config, None, old.prune, needs_triton=False)
    monkeypatch.setitem(variants.VARIANTS, "reference", replacement)
    assert ops._impl("auto", 0, q, args, "", checked)[0] is replacement.forward
    dispatch.clear_cache()


def test_attend_with_a_kept_dispatch_matches_the_reference():
    """Forward and backward through the eager path twice (the second call runs on the kept
    verdict and dispatch): the same output and gradients as the reference backend."""
    checks.clear_cache()
    gen = torch.Generator().manual_seed(3)
    leaves = [torch.randn(1, 5, 6, 2, 8, generator=gen).requires_grad_() for _ in range(3)]
    leaves += [torch.randn(3, 4, generator=gen).requires_grad_() for _ in range(2)]
    q, k, v, rel_h, rel_w = leaves
    dout = torch.randn(1, 5, 6, 2, 8, generator=gen)
    want = torch.autograd.grad(sasa_triton.attend(q, k, v, 3, rel_h=rel_h, rel_w=rel_w,
                                                  backend="reference"), leaves, dout)
    for _ in range(2):
        out = sasa_triton.attend(q, k, v, 3, rel_h=rel_h, rel_w=rel_w)
        assert out.grad_fn.name().endswith("_EagerAttendBackward")
        for got, ref in zip(torch.autograd.grad(out, leaves, dout), want):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_cost_recorder_takes_run_launches():
    """`kernel.run(*args, grid=..., warmup=False)` (docs/host.md, "Launching without
    `[grid]`") records the same launch as `kernel[grid](*args)`; a warmup records none."""
    from sasa_triton.cost.record import _Recorder

    def kernel():
        pass

    launches = []
    recorder = _Recorder(kernel, launches)
    recorder[(4, 2)](1, 2.0, None, num_warps=4)
    recorder.run(1, 2.0, None, grid=(4, 2), warmup=False, num_warps=4)
    recorder.run(1, grid=(4,), warmup=True)
    assert len(launches) == 2
    assert [(x.args, x.kwargs, x.grid) for x in launches] == [
        ((1, 2.0, None), {"num_warps": 4}, (4, 2, 1))] * 2
