"""rows_bwd_key.key_grads (backward kernel 2: dk, dv) against float64 autograd of the oracle.

out and lse come from the oracle too (float64, then cast), delta = rowsum(dout * out) in
float32, as the query kernel hands them over. Seeded random cases through Triton's
interpreter: every padding, dilation, non-square odd k, shared / per-head rel, rpb,
fp16/bf16/fp32, d in {1, 8, 16, 32, 64, 80}, odd W, strided layouts, several tiles per
image (row segments, row blocks), repeat calls bit-identical.
"""
import random

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.kernels import launch_cache, rows_bwd_key

from cases import TOLERANCES, Case, make_inputs, oracle_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(case, dtype, layout, seed=0, rel_w_f32=False):
    q, k, v, kw = make_inputs(case, dtype, layout, DEVICE, seed=seed)
    if rel_w_f32:  # tables may be float32 whatever q's dtype
        kw["rel_w"] = kw["rel_w"].float()
    args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return q, k, v, kw, args, dout


def _oracle(q, k, v, kw, case, dout):
    """(out, lse, dk, dv) in float64."""
    out, lse, grads = oracle_grads(q, k, v, kw, case.k, dout)
    return out, lse, grads["k"], grads["v"]


def run_case(case, dtype=torch.float32, layout="contiguous", config=None, seed=0,
             rel_w_f32=False):
    q, k, v, kw, args, dout = _inputs(case, dtype, layout, seed, rel_w_f32)
    out, lse, want_dk, want_dv = _oracle(q, k, v, kw, case, dout)
    delta = (dout.cpu().float() * out.to(dtype).float()).sum(-1).contiguous().to(DEVICE)
    lse32 = lse.float().to(DEVICE)
    dk, dv = rows_bwd_key.key_grads(q, k, v, dout, lse32, delta, args, config, _poison=True)
    for name, got, want in (("dk", dk, want_dk), ("dv", dv, want_dv)):
        assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous(), name
        assert not got.isnan().any(), f"{case.id}: {name} has unwritten (NaN) entries"
        atol, rtol = TOLERANCES[dtype]
        atol = atol * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{case.id} {name}: {m}")
    return q, k, v, dout, lse32, delta, args


# hand-picked: each feature at least once, small B*H*W (interpreter)
CASES = [
    Case(B=1, H=5, W=6, heads=2, d=8, k=3),
    Case(B=1, H=6, W=7, heads=2, d=8, k=3, rel="per_head", rpb=True, scale=0.7),
    Case(B=1, H=6, W=5, heads=1, d=8, k=5, padding="mask", rel="shared"),
    Case(B=1, H=9, W=7, heads=1, d=8, k=3, dilation=2, padding="mask", rpb=True),
    Case(B=1, H=7, W=7, heads=2, d=8, k=3, padding="shift", rel="shared", rpb=True),
    Case(B=1, H=8, W=6, heads=1, d=5, k=(3, 5), dilation=(2, 1), padding="shift",
         rel="per_head", rpb=True),
    Case(B=1, H=9, W=10, heads=1, d=4, k=3, dilation=(2, 3), padding="shift", rel="per_head"),
    Case(B=1, H=3, W=2, heads=1, d=8, k=5, rel="shared", rpb=True),  # image < window
    Case(B=1, H=4, W=5, heads=1, d=6, k=1, rel="shared", rpb=True),
    Case(B=1, H=4, W=4, heads=1, d=1, k=3, padding="mask", rpb=True),
    Case(B=1, H=5, W=7, heads=1, d=4, k=13, padding="mask", rel="shared", rpb=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_oracle_fp32(case):
    run_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    run_case(Case(B=1, H=6, W=7, heads=2, d=16, k=(5, 3), dilation=(1, 2), rel="per_head",
                  rpb=True), dtype)


@pytest.mark.parametrize("layout", ["nchw_view", "channels_last"])
def test_strided_layouts(layout):
    run_case(Case(B=2, H=5, W=6, heads=2, d=8, k=3, padding="shift", rel="shared", rpb=True),
              torch.float32, layout)


@pytest.mark.parametrize("d", [32, 64, 80])
def test_head_dims(d):
    run_case(Case(B=1, H=3, W=5, heads=1, d=d, k=3, rel="shared"))


@pytest.mark.parametrize("padding", ["zeros", "mask", "shift"])
def test_many_tiles(padding):
    """A 16-column query sub-tile over a 19-wide image: row segments with halos, several
    rows per key tile, tiles cut at the image border."""
    case = Case(B=1, H=7, W=19, heads=1, d=8, k=(3, 5), padding=padding, rel="shared",
                rpb=True)
    rows_bwd_key_config = {"K_BLOCK_M": 32, "K_BLOCK_N": 16, "K_num_warps": 2}
    run_case(case, config=rows_bwd_key_config)


def test_one_dimensional_grid(monkeypatch):
    """Tiles or a batch beyond the grid's y / z limit launch a 1-D grid (GRID3 off): forced
    here by a tiny limit, on several segments, row blocks, heads and batches."""
    monkeypatch.setattr(rows_bwd_key, "_GRID_YZ", 1)
    launch_cache.clear_all()  # plans made with the real limit
    case = Case(B=2, H=3, W=17, heads=2, d=4, k=3, padding="shift", rel="shared", rpb=True)
    run_case(case, config={"K_BLOCK_M": 16, "K_BLOCK_N": 16, "K_num_warps": 1}, seed=3)
    launch_cache.clear_all()


@pytest.mark.parametrize("warps,seed,rel_w_f32", [(4, 11, False), (1, 12, True)])
def test_row_one_hot_builds(warps, seed, rel_w_f32):
    """A_row built from (even, odd) slot pairs (4+ warps, 16-bit) or one slot per entry
    (fewer warps) on 64-key tiles of six 9-column rows; RelT read by one load over both
    tables, or by two when their dtypes differ (rel_w float32, q bfloat16)."""
    case = Case(B=1, H=6, W=9, heads=1, d=16, k=3, rel="per_head", scale=0.6)
    run_case(case, torch.bfloat16, config={"K_BLOCK_M": 64, "K_BLOCK_N": 16,
                                           "K_num_warps": warps}, seed=seed,
             rel_w_f32=rel_w_f32)


@pytest.mark.parametrize("dtype,rpb,seed", [(torch.bfloat16, False, 21),
                                             (torch.float16, True, 22)])
def test_one_hots_from_a_wider_identity(dtype, rpb, seed):
    """The one-hots are rows of an identity table as wide as the larger of the query
    columns (16) and the tile's padded row count: 40 rows of 3 keys (ROWS_P = 64, a
    64 x 64 table), 8 padding slots whose row and column lie outside the tile; the
    window mask in the rel dots (bf16) and not (fp16). (A table too narrow is read past
    its end: checked while writing this, it fails here with the slow pass turned off.)"""
    case = Case(B=1, H=40, W=3, heads=1, d=8, k=3, rel="shared", rpb=rpb, scale=0.8)
    run_case(case, dtype, config={"K_BLOCK_M": 128, "K_BLOCK_N": 16, "K_num_warps": 2},
             seed=seed)


def _random_case(seed: int) -> tuple:
    rng = random.Random(seed)
    padding = rng.choice(("zeros", "mask", "shift"))
    kh, kw = rng.choice((1, 3, 5)), rng.choice((1, 3, 5))
    dh, dw = rng.choice((1, 1, 2)), rng.choice((1, 1, 2))
    H, W = rng.randint(2, 7), rng.randint(2, 9)
    if padding == "shift":
        H, W = max(H, kh * dh), max(W, kw * dw)
    d = rng.choice((1, 2, 3, 8, 16))
    rel = rng.choice((None, "shared", "per_head")) if d >= 2 else None
    case = Case(B=rng.randint(1, 2), H=H, W=W, heads=rng.randint(1, 2), d=d, k=(kh, kw),
                dilation=(dh, dw), padding=padding, rel=rel, rpb=rng.random() < 0.5)
    dtype = rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))
    layout = rng.choice(("contiguous", "nchw_view", "channels_last"))
    return case, dtype, layout


@pytest.mark.parametrize("seed", range(6))
def test_random_cases(seed):
    case, dtype, layout = _random_case(seed)
    run_case(case, dtype, layout, seed=seed)


def test_bit_identical_on_repeat():
    q, k, v, dout, lse, delta, args = run_case(
        Case(B=1, H=6, W=5, heads=2, d=8, k=3, padding="shift", rel="shared", rpb=True))
    first = rows_bwd_key.key_grads(q, k, v, dout, lse, delta, args)
    second = rows_bwd_key.key_grads(q, k, v, dout, lse, delta, args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# the default tiles, and 64-key tiles whatever the image (the slow pass's 16-key sub-tiles
# at m0 = 0, 16, 32, 48, padding slots included)
NONFINITE_RUNS = [(None, range(5000, 5008)),
                  ({"K_BLOCK_M": 64, "K_BLOCK_N": 16, "K_num_warps": 1}, range(5100, 5106))]


@pytest.mark.parametrize("config,seeds", NONFINITE_RUNS, ids=["default", "m64"])
def test_nonfinite_inputs_stay_in_their_windows(config, seeds):
    """NaN / inf planted in q, k, v or a table reaches only the dk / dv entries whose
    windows hold it (the slow pass), with the oracle's values elsewhere: the cases and
    checks of test_nonfinite.py, for this kernel alone."""
    from fuzz_cases import FLOOR, coarser, mismatch
    from test_nonfinite import expected_gradients, nonfinite_case

    partial = 0
    for seed in seeds:
        c = nonfinite_case(seed)
        t = c["t"]
        args, out, lse, dout, want_grads, largest = expected_gradients(c, seed)
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        dk, dv = rows_bwd_key.key_grads(t["q"], t["k"], t["v"], dout.to(c["dtype"]), lse,
                                        delta, args, config, _poison=True)
        for name, got in (("k", dk), ("v", dv)):
            tol = coarser(c["dtype"], t[name].dtype)
            problem = mismatch(f"grad of {name}", got, want_grads[name], tol,
                               FLOOR[tol] * largest)
            assert problem is None, f"{c['desc']}: {problem}"
        partial += 0 < int((~want_grads["k"].isfinite()).sum()) < want_grads["k"].numel()
    assert partial >= 2, "too few cases with a partial non-finite pattern"


@pytest.mark.parametrize("scale", [-0.5, 1e-25])
def test_negative_and_tiny_scale(scale):
    """Negative and tiny scales: the window mask bias must not turn into softmax mass."""
    run_case(Case(B=1, H=5, W=6, heads=1, d=8, k=3, rel="shared", scale=scale))


def test_every_pruned_tile_agrees():
    """Each tile shape the tuner may pick for this shape gives the oracle's gradients."""
    case = Case(B=1, H=6, W=7, heads=1, d=8, k=3, padding="mask", rel="per_head")
    q = torch.zeros(1, 6, 7, 1, 8)
    args = check_attend_args(q, q, q, 3, 1, "mask", None, None, None, None)
    configs = rows_bwd_key.prune(rows_bwd_key.search_space(), tuple(q.shape), args)
    tiles = {(c["K_BLOCK_M"], c["K_BLOCK_N"]): c for c in configs}
    assert len(tiles) >= 2
    for config in tiles.values():
        run_case(case, config=config)


@pytest.mark.parametrize("d", [1, 8, 16, 64, 80, 256])
@pytest.mark.parametrize("hw", [(3, 4), (7, 7), (56, 56), (128, 128), (9, 300)])
@pytest.mark.parametrize("padding", ["zeros", "shift"])
def test_default_config_survives_prune(d, hw, padding):
    """The launcher's default is one of the configs the tuner keeps, and supported."""
    q = torch.zeros(1, *hw, 2, d)
    k = 3 if padding == "shift" else 7
    args = check_attend_args(q, q, q, k, 1, padding, None, None, None, None)
    default = rows_bwd_key.default_config(tuple(q.shape), args)
    assert default in rows_bwd_key.search_space()
    assert default in rows_bwd_key.prune(rows_bwd_key.search_space(), tuple(q.shape), args)
    assert rows_bwd_key.supports(tuple(q.shape), torch.bfloat16, args)


def test_bad_config_and_unsupported_inputs():
    q = torch.zeros(1, 4, 5, 1, 8)
    args = check_attend_args(q, q, q, 3, 1, "zeros", None, None, None, None)
    lse = torch.zeros(q.shape[:4])
    with pytest.raises(ValueError, match="K_BLOCK_M"):
        rows_bwd_key.key_grads(q, q, q, q, lse, lse, args, {"Q_BLOCK_M": 32})
    assert not rows_bwd_key.supports(tuple(q.shape), torch.float64, args)
    assert not rows_bwd_key.supports((1, 4, 5, 1, 512), torch.float32, args)
    empty = torch.zeros(0, 4, 5, 1, 8)
    dk, dv = rows_bwd_key.key_grads(empty, empty, empty, empty, lse[:0], lse[:0], args)
    assert dk.shape == empty.shape and dv.shape == empty.shape


def test_cols_magic_divides_exactly():
    """The kernel splits key slots into (row, column) by a multiply and shift."""
    for cols in range(1, 257):
        magic = rows_bwd_key.cols_magic(cols)
        assert all((p * magic) >> 20 == p // cols for p in range(257)), cols


def test_pixel_offsets_shared():
    """One int32 pixel-offset vector serves k, v, dk, dv only when their row and column
    strides agree (strided layouts take the per-tensor int64 offsets)."""
    t = torch.zeros(1, 4, 5, 2, 8)
    assert rows_bwd_key.pixel_offsets_shared((t.stride(), t.clone().stride()), 4, 5)
    assert not rows_bwd_key.pixel_offsets_shared((t.stride(), t.transpose(1, 2).stride()), 4, 5)


def _flags(case, dtype, config) -> dict:
    """The constexpr flags of key_grads' launch for this case."""
    q, k, v, kw, args, dout = _inputs(case, dtype, "contiguous")
    strides = (q.stride(), k.stride(), v.stride(), dout.stride(), (1, 1, 1, 1), (1, 1, 1, 1))
    return rows_bwd_key._plan(tuple(q.shape), dtype, strides, args, config, 16).flags


# tiles of two parts (top ceil(rows / 2) rows, bottom the rest) walked in three query-row
# walks: odd row counts (a shorter bottom part), a last row block cut by the image, row
# segments, every padding, dilation (rows that skip a part), rpb and fp16 (the masked
# paths: per-part window taps), per-head rel, float32; one-hot A and gather B combined
# (COLS + ROWS <= 16) or not (the last case: 5 columns x 12 rows)
HALVES_CASES = [
    (Case(B=1, H=11, W=9, heads=2, d=16, k=3, rel="per_head", scale=0.6), torch.bfloat16, 41,
     True),
    (Case(B=2, H=13, W=8, heads=1, d=8, k=(5, 3), padding="mask", rel="shared", rpb=True),
     torch.float16, 42, True),
    (Case(B=1, H=15, W=6, heads=1, d=4, k=(3, 5), dilation=(2, 1), padding="shift",
          rel="per_head", rpb=True), torch.float32, 43, True),
    (Case(B=1, H=9, W=19, heads=1, d=8, k=3, dilation=(1, 2), padding="zeros"),
     torch.bfloat16, 44, True),
    (Case(B=1, H=12, W=5, heads=2, d=16, k=(5, 3), dilation=(2, 1), rel="shared"),
     torch.bfloat16, 45, False),
]


@pytest.mark.parametrize("case,dtype,seed,combined", HALVES_CASES,
                         ids=lambda c: getattr(c, "id", None))
def test_two_part_tiles(case, dtype, seed, combined):
    """HALVES (64 key slots on 1 warp as two 32-slot parts) against the oracle."""
    config = {"K_BLOCK_M": 64, "K_BLOCK_N": 16, "K_num_warps": 1}
    flags = _flags(case, dtype, config)
    assert flags["HALVES"] and flags["COMBINED"] == combined, flags
    assert flags["NEG_V"] == (not combined), flags  # -v in the walks where not combined
    run_case(case, dtype, config=config, seed=seed)


# one-part tiles with the combined one-hot A and gather B, against the oracle: every
# padding, dilation, rpb and fp16 (no mask in the dots), a row segment with halos
COMBINED_CASES = [
    (Case(B=1, H=6, W=13, heads=2, d=16, k=5, padding="shift", rel="per_head", rpb=True),
     torch.float16, 51),
    (Case(B=2, H=5, W=21, heads=1, d=8, k=(3, 5), dilation=(2, 1), padding="mask",
          rel="shared"), torch.bfloat16, 52),
]


@pytest.mark.parametrize("case,dtype,seed", COMBINED_CASES, ids=lambda c: getattr(c, "id", None))
def test_combined_one_hot(case, dtype, seed):
    config = {"K_BLOCK_M": 32, "K_BLOCK_N": 16, "K_num_warps": 1}
    flags = _flags(case, dtype, config)
    assert flags["COMBINED"] and not flags["HALVES"], flags
    run_case(case, dtype, config=config, seed=seed)


def test_halves_fit():
    """Two parts only where each holds its rows (ceil(rows / 2) x cols <= block_m / 2),
    from 4 rows, up to d = 16 (32-bit counts below are block_d)."""
    assert rows_bwd_key.halves_fit(64, 16, 6, 10)  # s2, det: 3 + 3 rows of 10
    assert rows_bwd_key.halves_fit(64, 16, 5, 10)  # 3 + 2
    assert not rows_bwd_key.halves_fit(64, 16, 7, 9)  # 4 rows of 9 > 32 slots
    assert not rows_bwd_key.halves_fit(32, 32, 2, 14)  # s3: 2 rows, d = 32
    assert not rows_bwd_key.halves_fit(64, 16, 3, 10)  # 3 rows: set-up not paid back
    assert not rows_bwd_key.halves_fit(16, 16, 4, 2)  # parts below 16 slots


def test_int64_row_offsets(monkeypatch):
    """ROW32 off (query-row offsets in int64, as for a tensor with 2^31+ elements per
    batch and head) on a two-part tile at d = 16, where ROW32 is otherwise on: forced by
    a tiny limit."""
    case = Case(B=1, H=9, W=6, heads=2, d=16, k=3, rel="per_head", scale=0.5)
    config = {"K_BLOCK_M": 64, "K_BLOCK_N": 16, "K_num_warps": 1}
    assert _flags(case, torch.bfloat16, config)["ROW32"]
    monkeypatch.setattr(rows_bwd_key, "_ROW32_LIMIT", 1)
    launch_cache.clear_all()  # plans made with the real limit
    flags = _flags(case, torch.bfloat16, config)
    assert not flags["ROW32"] and flags["HALVES"], flags
    run_case(case, torch.bfloat16, config=config, seed=61)
    launch_cache.clear_all()


@pytest.mark.parametrize("cols,block_m", [(10, 64), (14, 32), (3, 16), (1, 64)])
def test_combined_one_hot_table(cols, block_m):
    """`combined_onehots` row s: the sum of identity rows s % cols and cols + s // cols
    (none when past the table's 16 columns), the one-hots COMBINED builds per slot."""
    table = rows_bwd_key.combined_onehots(torch.device("cpu"), cols, block_m, 16,
                                          torch.bfloat16).float()
    eye = torch.eye(16 + block_m)
    slot = torch.arange(block_m)
    want = eye[slot % cols, :16] + eye[cols + slot // cols, :16]
    assert torch.equal(table, want)


def test_dout_and_delta_strides_of_their_own():
    """QD_SHARED off (dout's strides differ from q's, delta's from lse's: a channels-last
    dout and a delta sliced from a wider buffer) on a two-part tile at d = 16, where it is
    otherwise on; QD_SHARED on is every contiguous case here."""
    case = Case(B=2, H=9, W=6, heads=2, d=16, k=3, rel="per_head", scale=0.5)
    config = {"K_BLOCK_M": 64, "K_BLOCK_N": 16, "K_num_warps": 1}
    assert _flags(case, torch.bfloat16, config)["QD_SHARED"]
    q, k, v, kw, args, dout = _inputs(case, torch.bfloat16, "contiguous", seed=71)
    out, lse, want_dk, want_dv = _oracle(q, k, v, kw, case, dout)
    dout_cl = dout.permute(0, 4, 1, 2, 3).contiguous().permute(0, 2, 3, 4, 1)
    delta = (dout.float() * out.to(torch.bfloat16).float()).sum(-1)
    wide = torch.zeros(*delta.shape[:3], 2 * delta.shape[3])
    wide[..., ::2] = delta
    delta_view = wide[..., ::2]
    strides = (q.stride(), k.stride(), v.stride(), dout_cl.stride(), lse.float().stride(),
               delta_view.stride())
    assert not rows_bwd_key._plan(tuple(q.shape), torch.bfloat16, strides, args, config,
                                  16).flags["QD_SHARED"]
    dk, dv = rows_bwd_key.key_grads(q, k, v, dout_cl, lse.float(), delta_view, args, config,
                                    _poison=True)
    atol, rtol = TOLERANCES[torch.bfloat16]
    for got, want in ((dk, want_dk), (dv, want_dv)):
        torch.testing.assert_close(got.double(), want, rtol=rtol,
                                   atol=atol * max(1.0, want.abs().max().item()))


def test_int32_row_offsets_on_32_query_columns():
    """ROW32 on a one-part tile of 32 query columns (k = 11, as k11's launch)."""
    case = Case(B=1, H=3, W=17, heads=1, d=4, k=11, rel="shared")
    flags = _flags(case, torch.bfloat16, None)
    assert flags["ROW32"] and flags["BLOCK_N"] == 32 and not flags["HALVES"], flags
    run_case(case, torch.bfloat16, seed=81)


def test_all_live_flag():
    """ALL_LIVE (no liveness test per walked query row) only without row dilation or
    shift; the oracle cases above run it (zeros / mask, dh = 1) and the test (dilated
    rows, shift) both."""
    config = {"K_BLOCK_M": 32, "K_BLOCK_N": 16, "K_num_warps": 1}
    for padding, dil, want in (("zeros", 1, True), ("mask", (1, 2), True),
                               ("mask", (2, 1), False), ("shift", 1, False)):
        case = Case(B=1, H=6, W=7, heads=1, d=8, k=3, dilation=dil, padding=padding)
        assert _flags(case, torch.bfloat16, config)["ALL_LIVE"] == want, (padding, dil)
