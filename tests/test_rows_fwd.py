"""The "rows" forward kernel (kernels/rows_fwd.py) against the float64 oracle, and its
sm_90 compile without spills.

The shared forward tests (test_kernels_forward, test_nonfinite, test_fuzz) run "rows"
with its default config like every variant. Here: seeded random cases over the paths
only this kernel has -- key tiles clipped to the image or not (zeros mode's out-of-image
taps as zero keys in the tile, or as a separate log-sum-exp per window row), the row
term as a one-hot dot (a bf16 hi/lo pair for 16-bit inputs) or picked per row, tiles of
several rows and of several column blocks, dilation groups, 64-bit offsets -- under
forced configs. Interpreter runs are tiny: every program runs one after the other.
"""
import random

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.kernels import launch_cache, rows_fwd
from sasa_triton.variants import triton_usable

from cases import Case, check_forward, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(torch.device(DEVICE).type),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

# (BLOCK_M, BLOCK_W, num_warps): one warp x 32 rows (the default for d <= 32), 2 and 4
# warps, whole-row tiles (BLOCK_W >= W), narrow tiles (several column blocks)
CONFIGS = [(32, 8, 1), (32, 16, 1), (64, 8, 2), (64, 32, 4), (128, 16, 4)]
PADDINGS = ("zeros", "mask", "shift")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIMS = (1, 8, 16, 32, 64, 80)
LAYOUTS = ("contiguous", "nchw_view", "channels_last")


def _random_case(seed: int) -> tuple:
    """(case, dtype, layout, config) drawn from a seeded generator: every padding, odd
    and even sizes, non-square k, dilation, rel shared / per head, rpb, d up to 80."""
    rng = random.Random(seed)
    padding = PADDINGS[seed % 3]
    d = DIMS[seed % len(DIMS)]
    kh, kw = rng.choice([1, 3, 5, 7]), rng.choice([1, 3, 5, 7])
    dh, dw = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
    H = rng.randint(max(1, kh * dh) if padding == "shift" else 1, 11)
    W = rng.randint(max(1, kw * dw) if padding == "shift" else 1, 19)
    if padding == "shift":
        H, W = max(H, kh * dh), max(W, kw * dw)
    rel = rng.choice([None, "shared", "per_head"]) if d >= 2 else None
    case = Case(B=rng.choice([1, 2]), H=H, W=W, heads=rng.choice([1, 2, 3]), d=d, k=(kh, kw),
                dilation=(dh, dw), padding=padding, rel=rel, rpb=rng.random() < 0.4,
                scale=rng.choice([None, 0.7]))
    dtype = DTYPES[(seed // 3) % 3]
    layout = LAYOUTS[seed % len(LAYOUTS)]
    bm, bw, nw = CONFIGS[seed % len(CONFIGS)]
    return case, dtype, layout, dict(BLOCK_M=bm, BLOCK_W=bw, num_warps=nw, num_stages=1)


def _run(case, dtype=torch.float32, layout="contiguous", config=None, seed=0):
    check_forward(rows_fwd, case, dtype, layout, config, DEVICE, seed=seed, label="rows")


@pytest.mark.parametrize("seed", range(16))
def test_random_cases_match_oracle(seed):
    case, dtype, layout, config = _random_case(seed)
    if not rows_fwd._fits((case.B, case.H, case.W, case.heads, case.d),
                          _args_of(case), config, strict=False):
        config = None  # this tile does not fit the case: the default one
    _run(case, dtype, layout, config, seed=seed)


def _args_of(case):
    q, k, v, kw = make_inputs(case)
    return check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])


@pytest.mark.parametrize("config,dtype", [
    # zeros, whole-row tile W=14 -> BLOCK_K 16 < 32: clipped, out-of-image columns as a
    # log-sum-exp per window row (VIRT)
    (dict(BLOCK_M=32, BLOCK_W=16, num_warps=1, num_stages=1), torch.bfloat16),
    # zeros, 8-wide tiles: the halo (14 columns) fits 16 unclipped: zero keys in the tile
    (dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=2), torch.float16),
    (dict(BLOCK_M=64, BLOCK_W=8, num_warps=4, num_stages=2), torch.float32),
], ids=str)
def test_clipped_and_unclipped_zero_taps(config, dtype):
    case = Case(B=1, H=8, W=14, heads=1, d=16, k=7, rel="shared")
    _run(case, dtype, config=config)


@pytest.mark.parametrize("case,config,pairs", [
    # 4-row blocks of 9 rows, k 7: blocks walk 7 (odd: the last step reads its row twice),
    # 8 and 4 key rows two per step
    (Case(B=1, H=9, W=14, heads=1, d=16, k=7, rel="shared"),
     dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1), True),
    (Case(B=1, H=7, W=9, heads=2, d=8, k=(5, 3), dilation=(2, 1), padding="mask",
          rel="per_head", scale=-0.4), dict(BLOCK_M=32, BLOCK_W=16, num_warps=1), True),
    # d = 32 on one warp: the second score tile just fits (s3's tile)
    (Case(B=1, H=9, W=14, heads=1, d=32, k=7, rel="shared"),
     dict(BLOCK_M=32, BLOCK_W=16, num_warps=1, num_stages=1), True),
    # d = 64 on one warp: no room for a second score tile, one row per step
    (Case(B=1, H=9, W=14, heads=1, d=64, k=7, rel="shared"),
     dict(BLOCK_M=32, BLOCK_W=16, num_warps=1, num_stages=1), False),
], ids=["pairs-odd-even", "pairs-mask-dil", "pairs-d32", "single"])
def test_walk_two_key_rows_per_step(case, config, pairs):
    args = _args_of(case)
    shape = (case.B, case.H, case.W, case.heads, case.d)
    strides = (rows_fwd.contiguous_strides(shape),) * 3
    plan = rows_fwd._plan(shape, torch.bfloat16, strides, args, False, config)
    assert plan.flags["PAIR"] is pairs
    _run(case, torch.bfloat16, config=config, seed=5)


@pytest.mark.parametrize("case,config,grid_3d", [
    # heads, column blocks and row blocks all > 1: (head, blocks, batch x dilation group)
    (Case(B=2, H=9, W=19, heads=3, d=16, k=(3, 5), dilation=(2, 1), rel="shared"),
     dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1), True),
    # one head, one column block: the flat grid (one division)
    (Case(B=2, H=11, W=7, heads=1, d=8, k=3, padding="mask", rel="per_head"),
     dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1), False),
], ids=["3d", "flat"])
def test_grid_shapes(case, config, grid_3d):
    args = _args_of(case)
    shape = (case.B, case.H, case.W, case.heads, case.d)
    strides = (rows_fwd.contiguous_strides(shape),) * 3
    plan = rows_fwd._plan(shape, torch.bfloat16, strides, args, False, config)
    assert plan.flags["GRID_3D"] is grid_3d and len(plan.grid) == (3 if grid_3d else 1)
    _run(case, torch.bfloat16, config=config, seed=9)


def test_grid_falls_back_to_flat_past_the_y_limit():
    """More than 65535 row and column blocks: the flat grid (no launch: the plan only)."""
    shape, args = (1, 2**13, 2**8, 2, 16), _args_of(Case(B=1, H=8, W=8, heads=2, d=16, k=3))
    strides = (rows_fwd.contiguous_strides(shape),) * 3
    config = dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1)
    plan = rows_fwd._plan(shape, torch.bfloat16, strides, args, False, config)
    assert not plan.flags["GRID_3D"] and len(plan.grid) == 1


def test_small_quotient_in_float32_is_exact():
    """The 3-D grid's y index splits by a float32 division (`_small_quotient`): for every
    y index < 2**16 and divisors 1..600 and up to 2**16, with the division's result moved
    by +-2 ulp (div.approx's bound), the truncated quotient is a // b."""
    import numpy as np

    a = np.arange(2**16, dtype=np.int64)
    for b in [*range(1, 601), 1021, 4096, 65535]:
        exact = (a.astype(np.float32) + np.float32(0.5)) / np.float32(b)
        for ulps in (-2, 0, 2):
            got = exact
            for _ in range(abs(ulps)):
                got = np.nextafter(got, np.float32(np.inf if ulps > 0 else -np.inf))
            assert (got.astype(np.int64) == a // b).all(), (b, ulps)


@pytest.mark.parametrize("rpb", [False, True])
def test_zero_taps_with_rpb_and_per_head_rel(rpb):
    """rpb makes the zero taps' mass depend on the window row: the [M, E] tables."""
    case = Case(B=1, H=6, W=13, heads=2, d=8, k=(5, 7), rel="per_head", rpb=rpb)
    for config in (dict(BLOCK_M=32, BLOCK_W=16, num_warps=1), dict(BLOCK_M=32, BLOCK_W=8,
                                                                    num_warps=1)):
        _run(case, torch.bfloat16, config=config)


@pytest.mark.parametrize("padding", ["zeros", "mask"])
def test_windows_that_fill_the_rel_tables(padding):
    """k = 15 columns and 9 rows: the column table (E_PAD 16) has one spare column, the
    -inf sentinel the gathers read for taps outside a window; zeros mode's out-of-image
    rows' start mass then spans the whole tables (not their left halves)."""
    case = Case(B=1, H=10, W=17, heads=2, d=16, k=(9, 15), padding=padding, rel="per_head")
    _run(case, torch.bfloat16, config=dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1))


@pytest.mark.parametrize("k,rel", [(1, None), ((3, 1), "shared")])
def test_shift_tiles_mostly_idle(k, rel):
    """Shift mode on a 3 x 1 image in a 32-query tile: the idle queries' window offsets
    would index the rel tables far below 0 (the interpreter raises under -16); the
    gathers clamp them to the sentinel."""
    case = Case(B=1, H=3, W=1, heads=2, d=3, k=k, padding="shift", rel=rel)
    _run(case, torch.float16, config=dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1))


@pytest.mark.parametrize("scale,rpb", [(-0.6, False), (0.0, False), (-0.6, True), (0.0, True)])
def test_negative_and_zero_scale(scale, rpb):
    """A negative scale negates q (qk_scale = |scale| log2(e) > 0, so the -1e30 row-term
    marker stays the lowest logit); scale 0 zeroes q. Raw logits (RAW) for every nonzero
    scale without rpb, the scaled walk otherwise."""
    case = Case(B=1, H=9, W=11, heads=1, d=16, k=5, rel="shared", rpb=rpb, scale=scale)
    assert rows_fwd.raw_logits(_args_of(case), False) == (scale != 0 and not rpb)
    _run(case, torch.bfloat16, config=dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1))


def test_64bit_offsets(monkeypatch):
    """The int64 offset path (taken for tensors past 2**31 elements) on a small case."""
    monkeypatch.setattr(rows_fwd, "_offsets_fit_i32", lambda layouts, halo: False)
    monkeypatch.setattr(rows_fwd, "strides_fit_i32", lambda *a, **k: False)
    launch_cache.clear_all()  # launch plans decide the offset width once per call key
    case = Case(B=2, H=7, W=9, heads=2, d=16, k=3, dilation=(2, 1), rel="shared", rpb=True)
    _run(case, torch.float16, "nchw_view", dict(BLOCK_M=32, BLOCK_W=8, num_warps=1))
    plans = rows_fwd._plans.plans.values()
    assert plans and all(p.flags["ROW_I64"] and p.flags["OFF_I64"] for p in plans)
    launch_cache.clear_all()  # no int64 plan outlives the patch


def test_supports_and_configs():
    """d above 128 and tables wider than 32 rows fall back (supports is False); every
    default and pruned config fits its own spill model; bad configs raise."""
    args = _args_of(Case(B=1, H=28, W=28, heads=8, d=16, k=7, rel="shared"))
    shape = (1, 28, 28, 8, 16)
    assert rows_fwd.supports(shape, torch.bfloat16, args)
    assert not rows_fwd.supports((1, 28, 28, 1, 256), torch.bfloat16, args)
    assert not rows_fwd.supports(shape, torch.float64, args)
    kept = rows_fwd.prune(rows_fwd.search_space(), shape, args)
    assert kept and all(rows_fwd._fits(shape, args, c) for c in kept)
    assert rows_fwd._fits(shape, args, rows_fwd.default_config(shape, args))
    q = torch.randn(shape)
    with pytest.raises(ValueError, match="BLOCK_M"):
        rows_fwd.forward(q, q, q, args, dict(BLOCK_M=16, BLOCK_W=32, num_warps=1))


# --- sm_90 compile (no GPU): the suite's shapes and the feature paths, no spills --------

SPECS = [  # (case, dtype)
    (Case(B=2, H=56, W=56, heads=8, d=8, k=7, rel="shared"), torch.bfloat16),  # s1
    (Case(B=2, H=28, W=28, heads=8, d=16, k=7, rel="shared"), torch.bfloat16),  # s2
    (Case(B=2, H=14, W=14, heads=8, d=32, k=7, rel="shared"), torch.bfloat16),  # s3: VIRT
    (Case(B=2, H=7, W=7, heads=8, d=64, k=7, rel="shared"), torch.bfloat16),  # s4
    (Case(B=2, H=16, W=32, heads=4, d=16, k=(5, 3), dilation=(1, 2), padding="mask",
          rel="per_head", rpb=True), torch.float32),
    (Case(B=2, H=12, W=20, heads=3, d=80, k=5, padding="shift", rel="shared", rpb=True),
     torch.float16),
    (Case(B=2, H=14, W=14, heads=2, d=32, k=7, rel="per_head", rpb=True), torch.bfloat16),
]


def _compile_all() -> None:
    from aot_sm90 import compile_launch, record_launches

    for case, dtype in SPECS:
        q, k, v, kw = make_inputs(case, dtype)
        args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"],
                                 kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"), kw["scale"])
        config = rows_fwd.default_config(tuple(q.shape), args)
        with record_launches(rows_fwd, ["_rows_fwd_kernel"]) as recorders:
            rows_fwd.forward(q, k, v, args)
        (call,) = recorders["_rows_fwd_kernel"].calls
        _, usage = compile_launch(recorders["_rows_fwd_kernel"].fn, *call)
        print("compiled", case.id, dtype, config, usage, flush=True)


def test_rows_compiles_for_sm90_without_spills():
    from aot_sm90 import compiled_spill_stores, run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile")
    lines, stores = compiled_spill_stores(proc, len(SPECS))
    assert max(stores) == 0, "a launch spills registers:\n" + "\n".join(lines)


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    if "--aot-compile" in sys.argv:
        _compile_all()
