"""The rows forward with several column blocks per program (config key COLS, a runtime
loop over them; the rel tables loaded once) against the float64 oracle, and the
launcher's choice of COLS.

Seeded random cases over every padding, dilation, non-square k, rel shared / per head,
rpb, scale sign and dtype, with COLS 2 or 3 so that the last column group is partial
(its loop shorter); the non-finite isolation (slow pass) inside the loop.
"""
import random

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.kernels import rows_fwd
from sasa_triton.variants import triton_usable

from cases import Case, check_forward, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(torch.device(DEVICE).type),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

PADDINGS = ("zeros", "mask", "shift")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _args_of(case):
    q, k, v, kw = make_inputs(case)
    return check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])


def _random_case(seed: int) -> tuple:
    """(case, dtype, config): several 8-wide column blocks (W 9..27), COLS 2 or 3."""
    rng = random.Random(1000 + seed)
    padding = PADDINGS[seed % 3]
    kh, kw = rng.choice([3, 5, 7]), rng.choice([1, 3, 5, 7])
    dh, dw = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
    H = rng.randint(kh * dh if padding == "shift" else 2, max(9, kh * dh))
    W = rng.randint(max(9, kw * dw), 27)
    d = rng.choice([8, 16, 16, 24])
    case = Case(B=1, H=H, W=W, heads=rng.choice([1, 2]), d=d, k=(kh, kw),
                dilation=(dh, dw), padding=padding,
                rel=rng.choice([None, "shared", "per_head"]), rpb=rng.random() < 0.3,
                scale=rng.choice([None, 0.7, -0.5]))
    config = dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1, COLS=2 + seed % 2)
    return case, DTYPES[seed % len(DTYPES)], config


@pytest.mark.parametrize("seed", range(9))
def test_column_groups_match_oracle(seed):
    case, dtype, config = _random_case(seed)
    shape = (case.B, case.H, case.W, case.heads, case.d)
    strides = (rows_fwd.contiguous_strides(shape),) * 3
    plan = rows_fwd._plan(shape, dtype, strides, _args_of(case), dtype == torch.float32,
                          config)
    assert plan.flags["COLS"] == config["COLS"]
    check_forward(rows_fwd, case, dtype, "contiguous", config, DEVICE, seed=seed,
                  label="rows COLS")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_column_groups_isolate_non_finite_inputs(dtype):
    """A NaN k and an inf v in the middle column group: the slow pass (inside the column
    loop) marks exactly the outputs whose windows hold them, in that group only."""
    from fuzz_cases import coarser, mismatch

    from oracle import oracle_attend

    case = Case(B=1, H=6, W=26, heads=1, d=16, k=5, rel="shared")
    q, k, v, kw = make_inputs(case, dtype, seed=3)
    k[0, 2, 12, 0, 3] = float("nan")
    v[0, 4, 17, 0, 5] = float("inf")
    args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw["rel_h"],
                             kw["rel_w"], None, None)
    config = dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, num_stages=1, COLS=2)
    out, lse = rows_fwd.forward(q, k, v, args, config, _poison=True)
    want, want_lse = oracle_attend(*(t.double() for t in (q, k, v)), case.k, return_lse=True,
                                   rel_h=kw["rel_h"].double(), rel_w=kw["rel_w"].double())
    assert not want.isfinite().all()  # the case plants what it says
    tol = coarser(dtype, torch.float32)
    assert mismatch("out", out, want, tol, 1.0) is None, mismatch("out", out, want, tol, 1.0)
    assert mismatch("lse", lse, want_lse, tol, 1.0) is None


def test_column_groups_with_64bit_offsets(monkeypatch):
    """The int64 offset path (tensors past 2**31 elements) inside the column loop."""
    from sasa_triton.kernels import launch_cache

    monkeypatch.setattr(rows_fwd, "_offsets_fit_i32", lambda layouts, halo: False)
    monkeypatch.setattr(rows_fwd, "strides_fit_i32", lambda *a, **k: False)
    launch_cache.clear_all()  # launch plans decide the offset width once per call key
    case = Case(B=1, H=5, W=19, heads=2, d=16, k=3, dilation=(2, 1), rel="per_head")
    config = dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, COLS=2)
    check_forward(rows_fwd, case, torch.bfloat16, "nchw_view", config, DEVICE, seed=4,
                  label="rows COLS int64")
    plans = rows_fwd._plans.plans.values()
    assert plans and all(p.flags["OFF_I64"] and p.flags["COLS"] == 2 for p in plans)
    launch_cache.clear_all()  # no int64 plan outlives the patch


@pytest.mark.parametrize("shape,cols", [
    ((32, 28, 28, 8, 16), 4),  # s2: all 4 column blocks, 1792 programs
    ((8, 128, 128, 4, 16), 8),  # det: 1024 programs with 16 -> halved to 8
    ((32, 56, 56, 8, 8), 8),  # s1: its 7 blocks in one group
    ((32, 14, 14, 8, 32), 1),  # s3: d 32 (at the register limit)
    ((1, 28, 28, 1, 16), 1),  # too few programs to share
])
def test_default_column_blocks_per_program(shape, cols):
    args = _args_of(Case(B=1, H=8, W=8, heads=1, d=16, k=7, rel="shared"))
    assert rows_fwd.default_config(shape, args).get("COLS", 1) == cols


def test_bad_column_count_raises():
    case = Case(B=1, H=4, W=8, heads=1, d=16, k=3)
    q, k, v, _ = make_inputs(case)
    for cols in (0, 1.5):
        with pytest.raises(ValueError, match="COLS"):
            rows_fwd.forward(q, k, v, _args_of(case),
                             dict(BLOCK_M=32, BLOCK_W=8, num_warps=1, COLS=cols))


# --- sm_90 compile (no GPU): the default COLS of the suite's d <= 16 shapes, no spills ---

SUITE = [  # (compiled case, the suite shape whose default COLS it takes)
    (Case(B=2, H=28, W=28, heads=8, d=16, k=7, rel="shared"), (32, 28, 28, 8, 16)),  # s2
    (Case(B=2, H=56, W=56, heads=8, d=8, k=7, rel="shared"), (32, 56, 56, 8, 8)),  # s1
    (Case(B=2, H=128, W=128, heads=4, d=16, k=7, rel="shared"), (8, 128, 128, 4, 16)),  # det
]


def _compile_all() -> None:
    from aot_sm90 import compile_launch, record_launches

    for case, suite_shape in SUITE:
        q, k, v, kw = make_inputs(case, torch.bfloat16)
        args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"],
                                 kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"), kw["scale"])
        config = rows_fwd.default_config(suite_shape, args)
        assert config.get("COLS", 1) > 1, config
        with record_launches(rows_fwd, ["_rows_fwd_kernel"]) as recorders:
            rows_fwd.forward(q, k, v, args, config)
        (call,) = recorders["_rows_fwd_kernel"].calls
        _, usage = compile_launch(recorders["_rows_fwd_kernel"].fn, *call)
        print("compiled", case.id, config, usage, flush=True)


def test_column_groups_compile_for_sm90_without_spills():
    from aot_sm90 import compiled_spill_stores, run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile")
    lines, stores = compiled_spill_stores(proc, len(SUITE))
    assert max(stores) == 0, "a launch spills registers:\n" + "\n".join(lines)


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    if "--aot-compile" in sys.argv:
        _compile_all()
