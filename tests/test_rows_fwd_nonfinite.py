"""rows forward: non-finite patterns that the fast walk's additive masks alone would miss.

* A non-finite q: every logit is non-finite (inf * (k + r) or inf * 0), so out is NaN,
  also where the in-image logits are all -inf and the zero taps' mass (zeros padding:
  computed from the tables, without q . 0) would be finite.
* All of a query's in-window logits -inf (a -inf k): the exact softmax is 0 / 0 = NaN;
  the walk's running max would stay at the marked rows' -1e30 term.
Seeded random tensors, each case against the float64 oracle (pattern and values).
"""
import pytest
import torch
from fuzz_cases import coarser, mismatch

from sasa_triton.args import check_attend_args
from sasa_triton.variants import get as variant_module
from sasa_triton.variants import triton_usable

from oracle import oracle_attend

pytestmark = [
    pytest.mark.skipif(not triton_usable("cpu"), reason="needs Triton"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                               "ignore:divide by zero encountered:RuntimeWarning",
                               "ignore:overflow encountered:RuntimeWarning"),
]
INF = float("inf")


def _q_inf(t):  # q +inf in channel 1, every key's channel 1 negative: in-image logits -inf
    t["q"][0, 4, 4, 0, 1] = INF
    t["k"][..., 1] = -t["k"][..., 1].abs() - 0.1


def _q_nan(t):
    t["q"][0, 1, 1, 0, 3] = float("nan")


def _k_minus_inf(t):  # every query reads only channel 1; a row of keys -inf there
    t["q"].zero_()
    t["q"][..., 1] = 1.0
    t["k"][0, 2, 1:4, 0, 1] = -INF


CASES = [  # (plant, padding, kernel, dilation, scale)
    (_q_inf, "zeros", (3, 1), (2, 2), None),  # the zero row's mass is the start state
    (_q_inf, "zeros", (3, 3), (1, 1), None),
    (_q_inf, "mask", (3, 1), (2, 2), None),
    (_q_inf, "zeros", (3, 3), (1, 1), 0.0),  # scale 0 zeroes q inside the kernel
    (_q_nan, "shift", (3, 3), (1, 1), None),
    (_k_minus_inf, "mask", (1, 1), (1, 1), None),
    (_k_minus_inf, "zeros", (1, 3), (1, 1), None),
    (_k_minus_inf, "mask", (1, 3), (1, 1), -0.5),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_rows_nonfinite_matches_oracle(case, dtype):
    plant, padding, kernel, dilation, scale = CASES[case]
    gen = torch.Generator().manual_seed(31 + case)
    t = {n: torch.randn(1, 5, 5, 1, 16, generator=gen, dtype=torch.float64).to(dtype)
         for n in "qkv"}
    plant(t)
    args = check_attend_args(t["q"], t["k"], t["v"], kernel, dilation, padding,
                             None, None, None, scale)
    out, lse = variant_module("rows").forward(t["q"], t["k"], t["v"], args)
    want, want_lse = oracle_attend(*(t[n].double() for n in "qkv"), kernel, dilation,
                                   padding, scale=scale, return_lse=True)
    assert not want.isfinite().all()  # the case plants what it says
    tol = coarser(dtype, torch.float32)
    assert mismatch("out", out, want, tol, 1.0) is None, mismatch("out", out, want, tol, 1.0)
    assert mismatch("lse", lse, want_lse, tol, 1.0) is None


# With rel tables the kernel drops its own q test (a q @ 0 dot): each table is
# q @ [rel half; zeros], so a non-finite channel of q, in either half, turns every column
# bias or every row term of its query into NaN (inf * 0). These cases pin that: zeros
# padding (the zero taps' mass comes from the tables), the in-image logits of the inf
# channel -inf (k negative there, as in the seed-2044 case), both halves of d, odd d.
REL_CASES = [  # (d, channel, value, kernel, dilation, scale, rel, rpb)
    (16, 1, INF, (3, 1), (2, 2), None, "shared", False),  # lo half: the row term's
    (16, 12, INF, (3, 1), (2, 2), None, "shared", False),  # hi half: the column bias
    (16, 3, float("nan"), (3, 3), (1, 1), -0.5, "per_head", False),
    (16, 9, -INF, (5, 3), (1, 1), 2.0, "shared", True),
    (5, 0, INF, (3, 3), (1, 1), None, "per_head", False),  # odd d: channel masks
    (5, 4, INF, (3, 3), (1, 2), None, "shared", False),
    (32, 20, INF, (7, 7), (1, 1), None, "shared", False),  # s3's shape family (SPARE)
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(REL_CASES)))
def test_rows_nonfinite_q_with_rel_tables_matches_oracle(case, dtype):
    d, channel, value, kernel, dilation, scale, rel, rpb = REL_CASES[case]
    gen = torch.Generator().manual_seed(71 + case)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    H, W, N = 5, 9, 2
    t = {n: rand(1, H, W, N, d) for n in "qkv"}
    t["k"][..., channel] = -t["k"][..., channel].abs() - 0.1
    t["q"][0, 0, 4, 1, channel] = value  # a top-row query: out-of-image window rows
    t["q"][0, 2, 0, 0, channel] = value  # a left-edge query: out-of-image columns
    lead = (N,) if rel == "per_head" else ()
    kh, kw = kernel
    t["rel_h"] = rand(*lead, kh, d // 2, scale=0.5)
    t["rel_w"] = rand(*lead, kw, d - d // 2, scale=0.5)
    t["rpb"] = rand(N, 2 * kh - 1, 2 * kw - 1, scale=0.5) if rpb else None
    args = check_attend_args(t["q"], t["k"], t["v"], kernel, dilation, "zeros",
                             t["rel_h"], t["rel_w"], t["rpb"], scale)
    out, lse = variant_module("rows").forward(t["q"], t["k"], t["v"], args)
    want, want_lse = oracle_attend(
        *(t[n].double() for n in "qkv"), kernel, dilation, "zeros",
        *(None if t[n] is None else t[n].double() for n in ("rel_h", "rel_w", "rpb")),
        scale=scale, return_lse=True)
    assert want[0, 0, 4, 1].isnan().all() and want[0, 2, 0, 0].isnan().all()
    tol = coarser(dtype, torch.float32)
    assert mismatch("out", out, want, tol, 1.0) is None, mismatch("out", out, want, tol, 1.0)
    assert mismatch("lse", lse, want_lse, tol, 1.0) is None
