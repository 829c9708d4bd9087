"""Backward kernel 1 of the rows engine (kernels/rows_bwd_query.py) against float64
autograd through the oracle: dq, delta and the rel/rpb table gradients (all of which the
query kernel owns). out and lse come from the oracle too. Runs through Triton's
interpreter on CPU; cases stay small.
"""
import random

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.kernels import launch_cache
from sasa_triton.kernels import rows_bwd_query as mod

from cases import Case, check_grads, make_inputs, oracle_grads
from oracle import oracle_attend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLES = ("rel_h", "rel_w", "rpb")

# Every padding, dilation, non-square odd k, rel shared / per head, rpb, scale, head dims
# 1..80 (odd ones split rel_h / rel_w unevenly), odd W, image smaller than the window.
CASES = [
    Case(B=2, H=5, W=6, heads=2, d=8, k=3),
    Case(B=1, H=5, W=7, heads=2, d=8, k=3, rel="per_head", rpb=True, scale=0.7),
    Case(B=1, H=6, W=5, heads=2, d=16, k=5, padding="mask", rel="shared"),
    Case(B=1, H=9, W=7, heads=1, d=8, k=3, dilation=2, padding="mask", rpb=True, rel="shared"),
    Case(B=1, H=7, W=7, heads=2, d=8, k=3, padding="shift", rel="shared", rpb=True),
    Case(B=1, H=8, W=6, heads=2, d=5, k=(3, 5), dilation=(2, 1), padding="shift",
         rel="per_head", rpb=True),
    Case(B=1, H=9, W=10, heads=1, d=4, k=3, dilation=(2, 3), padding="shift", rel="per_head"),
    Case(B=1, H=3, W=2, heads=1, d=8, k=5, rel="shared", rpb=True),
    Case(B=1, H=4, W=5, heads=2, d=1, k=3, padding="mask", rpb=True),
    Case(B=1, H=4, W=3, heads=1, d=32, k=1, rel="shared", rpb=True),
    Case(B=1, H=6, W=9, heads=1, d=64, k=(5, 3), dilation=(1, 2), rel="per_head", rpb=True),
    Case(B=1, H=3, W=5, heads=1, d=80, k=3, padding="mask", rel="shared"),
    Case(B=1, H=7, W=8, heads=1, d=8, k=7, padding="shift", rel="per_head", rpb=True),
]
# Configs that split rows into segments and stack several rows per program.
CONFIGS = [None, {"Q_BLOCK_W": 8, "Q_BLOCK_H": 2}, {"Q_BLOCK_W": 16, "Q_BLOCK_H": 4}]


def _args(q, k, v, case, kw):
    return check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])


def _reference(q, k, v, kw, case, dout):
    """float64 (out, lse, {name: grad}) of the oracle for dq and the tables."""
    out, lse, want = oracle_grads(q, k, v, kw, case.k, dout)
    del want["k"], want["v"]
    return out, lse, want


def _run(case, dtype=torch.float32, layout="contiguous", config=None, tables_fp32=False):
    q, k, v, kw = make_inputs(case, dtype, layout, DEVICE)
    if tables_fp32:
        kw = {n: (t.float() if n in TABLES and t is not None else t) for n, t in kw.items()}
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    out64, lse64, want = _reference(q, k, v, kw, case, dout)
    out = out64.to(dtype).to(DEVICE)
    lse = lse64.float().to(DEVICE)
    args = _args(q, k, v, case, kw)
    dq, delta, drel_h, drel_w, drpb = mod.query_grads(q, k, v, out, lse, dout, args, config,
                                                      _poison=True)
    got = {"q": dq, "rel_h": drel_h, "rel_w": drel_w, "rpb": drpb}
    assert dq.shape == q.shape and dq.dtype == q.dtype and dq.is_contiguous()
    for name in TABLES:
        assert (got[name] is None) == (kw.get(name) is None), name
        if got[name] is not None:
            assert got[name].shape == kw[name].shape and got[name].dtype == kw[name].dtype
    want_delta = (dout.double() * out.double()).sum(-1)
    assert delta.dtype == torch.float32 and delta.shape == q.shape[:4] and delta.is_contiguous()
    torch.testing.assert_close(delta.cpu().double(), want_delta.cpu(), rtol=1e-5, atol=1e-5)
    return got, want


def _check(case, got, want, dtype):
    check_grads(got, want, dtype, case.id)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_query_grads_match_oracle_fp32(case):
    got, want = _run(case)
    _check(case, got, want, torch.float32)


@pytest.mark.parametrize("config", CONFIGS[1:], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: c.id)
def test_query_grads_tile_shapes(case, config):
    got, want = _run(case, config=config)
    _check(case, got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=lambda c: c.id)
def test_query_grads_half(case, dtype):
    got, want = _run(case, dtype)
    _check(case, got, want, dtype)


@pytest.mark.parametrize("d,m,warps", [(16, 32, 1), (32, 32, 1), (128, 64, 4)])
def test_query_grads_half_default_tile(d, m, warps):
    """bf16 without shift or rpb: the default tile (32 queries on one warp on a GPU for
    d <= 32 with a 16-column halo, 64 on 4 warps at d = 128), image rows and columns not
    multiples of it."""
    case = Case(B=1, H=9, W=10, heads=2 if d <= 32 else 1, d=d, k=5, padding="mask",
                rel="per_head")
    q, k, v, kw = make_inputs(case, torch.bfloat16, "contiguous", DEVICE)
    default = mod.default_config(tuple(q.shape), _args(q, k, v, case, kw), torch.bfloat16)
    assert default["Q_BLOCK_H"] * default["Q_BLOCK_W"] == m and default["Q_num_warps"] == warps
    got, want = _run(case, torch.bfloat16)
    _check(case, got, want, torch.bfloat16)


ONE_WARP = {"Q_BLOCK_W": 8, "Q_BLOCK_H": 4, "Q_num_warps": 1}


@pytest.mark.parametrize("dtype,case", [
    (torch.bfloat16, CASES[0]), (torch.float16, CASES[1]), (torch.bfloat16, CASES[3]),
    (torch.float16, CASES[5]), (torch.bfloat16, CASES[8]), (torch.bfloat16, CASES[10]),
], ids=lambda x: str(x) if isinstance(x, torch.dtype) else x.id)
def test_query_grads_row_term_by_one_hot_dot(dtype, case):
    """ROW_DOT (16-bit inputs, 32 queries per warp): the row term as a bf16 hi/lo pair
    per key row added by one-hot products, in every padding, dilation, rpb, no rel."""
    q, k, v, kw = make_inputs(case, dtype, "contiguous", DEVICE)
    strides = (q.stride(), k.stride(), v.stride(), q.stride(), q.stride(), q.stride()[:4])
    plan = mod._plan(tuple(q.shape), dtype, strides, _args(q, k, v, case, kw), False, ONE_WARP)
    assert plan.grads.flags["ROW_DOT"]
    got, want = _run(case, dtype, config=ONE_WARP)
    _check(case, got, want, dtype)


@pytest.mark.parametrize("dtype,case", [
    (torch.float16, Case(B=1, H=7, W=9, heads=2, d=16, k=3, dilation=(2, 1), rel="shared")),
    (torch.float16, Case(B=1, H=6, W=11, heads=1, d=32, k=5, padding="mask",
                         rel="per_head")),
], ids=lambda x: str(x) if isinstance(x, torch.dtype) else x.id)
def test_query_grads_d_fills_block_one_warp(dtype, case):
    """One warp with d == BLOCK_D (16, 32): d a constexpr (D_C), one hi/lo split of each
    G for both of its table products (fp16: the interpreter's half dots), and the row
    one-hot by window row at dilation 2."""
    q, k, v, kw = make_inputs(case, dtype, "contiguous", DEVICE)
    strides = (q.stride(), k.stride(), v.stride(), q.stride(), q.stride(), q.stride()[:4])
    plan = mod._plan(tuple(q.shape), dtype, strides, _args(q, k, v, case, kw), True, ONE_WARP)
    flags = plan.grads.flags
    assert flags["D_C"] == case.d and flags["ROW_DOT"] and flags["TABLE_HALF"]
    got, want = _run(case, dtype, config=ONE_WARP)
    _check(case, got, want, dtype)


@pytest.mark.parametrize("layout", ["nchw_view", "channels_last"])
def test_query_grads_strided(layout):
    case = CASES[2]
    got, want = _run(case, torch.float32, layout)
    _check(case, got, want, torch.float32)


def test_query_grads_half_inputs_fp32_tables():
    case = CASES[4]
    got, want = _run(case, torch.bfloat16, "channels_last", tables_fp32=True)
    _check(case, got, want, torch.bfloat16)


def test_query_grads_int64_key_row_offsets(monkeypatch):
    """The key-row walk's int64 path (k / v images past 2**31 elements), forced on a small
    case, matches the oracle like the int32 one."""
    monkeypatch.setattr(mod, "kv_offsets_fit_i32", lambda *args: False)
    launch_cache.clear_all()  # launch plans decide the offset width once per call key
    try:
        got, want = _run(CASES[1])
    finally:
        launch_cache.clear_all()  # no int64 plan outlives the patch
    _check(CASES[1], got, want, torch.float32)


def test_query_grads_int64_delta_and_partial_offsets(monkeypatch):
    """The int64 offsets of delta and the table partials (buffers past 2**31 elements),
    forced on a small case with rel tables and rpb, match the oracle like int32."""
    assert mod.partials_fit_i32((32, 56, 56, 8, 8), 4, 8, 25088, 7, 7)
    assert not mod.partials_fit_i32((2**16, 128, 128, 8, 8), 4, 8, 2**25, 7, 7)
    case = Case(B=2, H=6, W=5, heads=2, d=8, k=3, padding="mask", rel="per_head", rpb=True)
    monkeypatch.setattr(mod, "partials_fit_i32", lambda *args: False)
    launch_cache.clear_all()  # launch plans decide the offset width once per call key
    try:
        got, want = _run(case)
    finally:
        launch_cache.clear_all()  # no int64 plan outlives the patch
    _check(case, got, want, torch.float32)


def test_kv_offsets_fit_i32():
    small = torch.empty_strided((1, 56, 56, 8, 16), (56 * 56 * 128, 56 * 128, 128, 16, 1),
                                device="meta")
    huge = torch.empty_strided((1, 4, 4, 1, 8), (2**33, 2**29, 8, 8, 1), device="meta")
    assert mod.kv_offsets_fit_i32((small.stride(), small.stride()), 16, 56 + 7, 56 + 16)
    assert not mod.kv_offsets_fit_i32((small.stride(), huge.stride()), 8, 4 + 7, 4 + 16)
    assert not mod.kv_offsets_fit_i32((huge.stride(), small.stride()), 8, 4 + 7, 4 + 16)


def test_query_grads_deterministic():
    """Two runs give bit-identical dq, delta and table gradients (no atomics)."""
    case = Case(B=2, H=6, W=5, heads=2, d=8, k=3, padding="shift", rel="shared", rpb=True)
    q, k, v, kw = make_inputs(case, torch.float32, "contiguous", DEVICE)
    args = _args(q, k, v, case, kw)
    out, lse = oracle_attend(q, k, v, case.k, return_lse=True, **kw)
    out, lse = out.float().to(DEVICE), lse.float().to(DEVICE)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    first = mod.query_grads(q, k, v, out, lse, dout, args)
    second = mod.query_grads(q, k, v, out, lse, dout, args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_configs_and_supports():
    q = torch.zeros(2, 56, 56, 8, 8)
    args = check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None)
    default = mod.default_config(tuple(q.shape), args)
    assert all(key.startswith("Q_") for key in default)
    assert default["Q_BLOCK_W"] * default["Q_BLOCK_H"] >= 32
    kept = mod.prune(mod.search_space(), tuple(q.shape), args)
    assert kept and all(c in mod.search_space() for c in kept)
    assert mod.supports(tuple(q.shape), torch.bfloat16, args)
    assert not mod.supports(tuple(q.shape), torch.float64, args)
    assert not mod.supports((1, 4, 4, 2, 256), torch.float32, args)
    with pytest.raises(ValueError, match="Q_BLOCK_W"):
        mod.query_grads(q, q, q, q, q[..., 0], q, args, {"BLOCK_W": 16})


def test_empty():
    q = torch.zeros(0, 4, 4, 2, 8, device=DEVICE)
    rel_h, rel_w = torch.zeros(3, 4), torch.zeros(3, 4)
    args = check_attend_args(q, q, q, 3, 1, "zeros", rel_h, rel_w, None, None)
    dq, delta, drel_h, drel_w, drpb = mod.query_grads(q, q, q, q, q[..., 0], q, args)
    assert dq.shape == q.shape and delta.shape == q.shape[:4] and drpb is None
    assert torch.equal(drel_h, rel_h) and torch.equal(drel_w, rel_w)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning")
def test_query_grads_nonfinite_stay_in_their_windows():
    """NaN / inf planted in q, k, v or a table reaches only the dq / table-gradient
    entries whose windows hold it (the kernel's slow pass), on the random cases of
    test_nonfinite."""
    from test_nonfinite import nonfinite_case

    partial = 0
    for seed in range(5000, 5006):
        partial += _nonfinite_matches_oracle(nonfinite_case(seed), seed)
    assert partial >= 2, "too few cases with a partial non-finite pattern"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning")
def test_query_grads_nonfinite_half_tables():
    """The same for fp16 with rel tables (the hi/lo table products on the tensor cores
    under the interpreter: an inf dS sum there makes a NaN, not a guarded zero, and the
    program goes through the slow pass all the same)."""
    from test_nonfinite import nonfinite_case

    seeds = [s for s in range(7000, 7200) if nonfinite_case(s)["dtype"] == torch.float16
             and "rel_h" in nonfinite_case(s)["t"]][:3]
    assert len(seeds) == 3
    for seed in seeds:
        _nonfinite_matches_oracle(nonfinite_case(seed), seed)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning")
def test_query_grads_nonfinite_one_warp_tile():
    """The same through the one-warp tile (ROW_DOT), whose non-finite check sums the
    results (a NaN / inf makes a sum so) before one integer max: 16-bit cases, tables
    and rpb or not."""
    from test_nonfinite import nonfinite_case

    seeds = [s for s in range(7000, 7100)
             if nonfinite_case(s)["dtype"] in (torch.float16, torch.bfloat16)][:4]
    assert len(seeds) == 4
    partial = 0
    for seed in seeds:
        partial += _nonfinite_matches_oracle(nonfinite_case(seed), seed, ONE_WARP)
    assert partial >= 1, "no case with a partial non-finite pattern"


def _nonfinite_matches_oracle(c, seed, config=None) -> bool:
    """query_grads of a test_nonfinite case against the float64 oracle, entry by entry
    (non-finite where the oracle is); whether dq is partly non-finite."""
    from fuzz_cases import FLOOR, coarser, mismatch
    from test_nonfinite import expected_gradients

    t = c["t"]
    args, out, lse, dout, want_grads, largest = expected_gradients(c, seed)
    if config is not None:
        q = t["q"]
        strides = (q.stride(), t["k"].stride(), t["v"].stride(), out.stride(),
                   dout.stride(), lse.stride())
        plan = mod._plan(tuple(q.shape), q.dtype, strides, args,
                         mod.plan_table_half(q, args), config)
        assert plan.grads.flags["ROW_DOT"]
    dq, _, drel_h, drel_w, drpb = mod.query_grads(t["q"], t["k"], t["v"], out, lse,
                                                  dout.to(c["dtype"]), args, config,
                                                  _poison=True)
    got = {"q": dq, "rel_h": drel_h, "rel_w": drel_w, "rpb": drpb}
    for name in ("q", *[n for n in TABLES if n in t]):
        tol = coarser(c["dtype"], t[name].dtype)
        problem = mismatch(f"grad of {name}", got[name], want_grads[name], tol,
                           FLOOR[tol] * largest)
        assert problem is None, f"{c['desc']}: {problem}"
    return 0 < int((~want_grads["q"].isfinite()).sum()) < dq.numel()


@pytest.mark.parametrize("shape", [(32, 56, 56, 8, 8), (32, 28, 28, 8, 16), (32, 14, 14, 8, 32),
                                   (32, 7, 7, 8, 64), (8, 128, 128, 4, 16), (1, 3, 4, 2, 1),
                                   (1, 64, 64, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_default_config_is_kept_by_prune(shape, dtype):
    """The default (the tile the heuristic picks) is in the search space and survives
    prune, so the tuner's table and the launcher agree; M = 32 on the suite shapes up
    to d = 32, 64 past it (d = 128 too, without rpb)."""
    q = torch.zeros(1, *shape[1:])
    args = check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None)
    default = mod.default_config(shape, args, dtype)
    assert default in mod.search_space()
    assert default in mod.prune(mod.search_space(), shape, args)
    if dtype != torch.float32 and shape[1] * shape[2] >= 64:
        m = 32 if shape[4] <= 32 else 64  # 4 x 8 tiles on one warp for d <= 32
        assert default["Q_BLOCK_W"] * default["Q_BLOCK_H"] == m


@pytest.mark.parametrize("k,padding,dtype,one_warp", [
    (7, "zeros", torch.bfloat16, True), (5, "mask", torch.float16, True),
    (11, "zeros", torch.bfloat16, False),  # a 32-column halo: 4 warps
    (7, "shift", torch.bfloat16, False), (7, "zeros", torch.float32, False),
])
def test_default_config_d32_one_warp(k, padding, dtype, one_warp):
    """d = 32: M = 32 on one warp only in 16 bits, without shift or rpb and with a
    16-column halo (else M = 64 on 4 warps); pruning keeps it."""
    shape = (32, 14, 14, 8, 32)
    q = torch.zeros(1, *shape[1:])
    args = check_attend_args(q, q, q, k, 1, padding, None, None, None, None)
    default = mod.default_config(shape, args, dtype)
    m = default["Q_BLOCK_W"] * default["Q_BLOCK_H"]
    if one_warp:
        assert (m, default["Q_num_warps"]) == (32, 1)
    else:
        assert default["Q_num_warps"] >= 2
    if dtype != torch.float32:
        assert default in mod.prune(mod.search_space(), shape, args)


@pytest.mark.parametrize("case,dtype,config", [
    (Case(B=1, H=3, W=13, heads=1, d=8, k=(3, 5), padding="mask", rel="per_head"),
     torch.float32, {"Q_BLOCK_W": 8, "Q_BLOCK_H": 2}),
    (Case(B=1, H=4, W=5, heads=1, d=16, k=5, rel="shared", rpb=True), torch.float16, None),
    (Case(B=1, H=4, W=19, heads=1, d=8, k=7, padding="mask", rel="shared"), torch.bfloat16,
     {"Q_BLOCK_W": 8, "Q_BLOCK_H": 4}),
])
def test_query_grads_wrapped_column_gather(monkeypatch, case, dtype, config):
    """XT_WRAP (dil_w 1, no shift): G_col's gather reads halo column (c + t) mod BLOCK_K
    unmasked, so a tap t >= KW lands on a column outside the query's window (a column
    outside the image with mask padding), where dS is 0; COL_WRAP (also BLOCK_K ==
    TX_PAD, no rpb): the column bias reads Bw at tap (x - c) mod TX_PAD, -inf at its
    padding columns, no window mask. The same gradients as with the masks (zero columns:
    equal up to the sign of a zero), on tiles where the wrap happens (the last query
    column of a row segment) and at the image borders."""
    q, k, v, kw = make_inputs(case, dtype)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    out64, lse64, _ = _reference(q, k, v, kw, case, dout)
    args = _args(q, k, v, case, kw)
    runs = []
    for wrap in (True, False):
        monkeypatch.setattr(mod, "XT_WRAP_ON", wrap)
        launch_cache.clear_all()
        plan = mod._plan(tuple(q.shape), q.dtype, (q.stride(),) * 6, args,
                         mod.plan_table_half(q, args), config)
        assert plan.grads.flags["XT_WRAP"] == wrap
        assert plan.grads.flags["BLOCK_K"] == plan.grads.flags["TX_PAD"] == 16
        assert plan.grads.flags["COL_WRAP"] == (wrap and not case.rpb)
        runs.append(mod.query_grads(q, k, v, out64.to(dtype), lse64.float(), dout, args,
                                    config, _poison=True))
    launch_cache.clear_all()
    for got, want in zip(runs[0], runs[1]):
        if want is not None:
            assert torch.equal(got, want)


def test_div_magic_divides_every_program_id():
    """The multipliers that replace the kernel's runtime divisions of the program id
    (div_magic): x // d exactly for 0 <= x < 2**31, at the ends of the range and at
    random, for divisors 1..300 and a few large ones."""
    rng = random.Random(14)
    for d in [*range(1, 301), 4095, 65535, 2**20 + 7, 2**30 + 1, 2**31 - 1]:
        m, s = mod.div_magic(d)
        assert 2**31 <= m < 2**32
        xs = [0, 1, d - 1, d, d + 1, 2**31 - 1, 2**31 - 2, 2**31 - 1 - d]
        xs += [rng.randrange(2**31) for _ in range(50)]
        for x in xs:
            if 0 <= x < 2**31:
                assert ((2 * x * m) >> 32) >> s == x // d, (d, x)
