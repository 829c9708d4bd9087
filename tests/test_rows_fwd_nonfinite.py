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
