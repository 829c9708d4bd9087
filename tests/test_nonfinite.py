"""Non-finite inputs: a NaN or inf planted in q, k, v or a table reaches only the outputs
(out, lse) and the gradients whose windows hold it, on every implementation.

The expected pattern is the float64 oracle's, forward and through autograd: the oracle
touches nothing outside a window, so whatever it leaves finite no window-respecting
implementation may spoil. Where the oracle is finite the values must match too.
Seeded random cases: padding modes, dilation, kernels, heads, d, shared / per-head rel
tables, rpb, dtypes; NaN, +inf and -inf at 1-3 random positions.
"""
import random

import pytest
import torch
from fuzz_cases import FLOOR, SHORT, coarser, mismatch, own_out_gradients

from sasa_triton.args import check_attend_args
from sasa_triton.reference import reference_forward
from sasa_triton.variants import get as variant_module
from sasa_triton.variants import triton_usable, with_direction

from oracle import oracle_attend

TRITON = triton_usable("cpu")
FORWARD_VARIANTS = sorted(v.name for v in with_direction("fwd") if v.needs_triton)
BACKWARD_VARIANTS = sorted(v.name for v in with_direction("bwd") if v.needs_triton)
# plain-PyTorch implementations besides the reference (the CPU path) go last, so the
# seeds of the reference and the kernels stay those that found their bugs
PLAIN = sorted(v.name for v in with_direction("fwd") if not v.needs_triton
               and v.name != "reference")
FORWARDS = ["reference"] + (FORWARD_VARIANTS if TRITON else []) + PLAIN
BACKWARDS = ["reference"] + (BACKWARD_VARIANTS if TRITON else []) + PLAIN
CASES_PER_IMPL = 10
# The interpreter reduces NaN blocks with numpy, which says so: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
NAMES = ("q", "k", "v", "rel_h", "rel_w", "rpb")


def nonfinite_case(seed: int) -> dict:
    """A small call with NaN / inf planted at random positions (input tensors by name)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    padding = rng.choice(("zeros", "mask", "shift"))
    kh, kw = rng.choice((1, 3, 3, 5)), rng.choice((1, 3, 3, 5))
    dh, dw = rng.choice((1, 1, 2)), rng.choice((1, 1, 2))
    H, W = rng.randint(4, 6), rng.randint(4, 6)
    if padding == "shift":
        H, W = max(H, kh * dh), max(W, kw * dw)
    N, D = rng.randint(1, 2), rng.choice((2, 3, 4, 8, 16))
    dtype = rng.choice((torch.float32,) * 3 + (torch.float16, torch.bfloat16))

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    t = {n: rand(1, H, W, N, D) for n in "qkv"}
    rel = rng.choice((None, "shared", "per_head"))
    if rel:
        rows, cols = (2 * kh - 1, 2 * kw - 1) if padding == "shift" else (kh, kw)
        lead = (N,) if rel == "per_head" else ()
        t["rel_h"], t["rel_w"] = rand(*lead, rows, D // 2, scale=0.5), \
            rand(*lead, cols, D - D // 2, scale=0.5)
    if rng.random() < 0.5:
        t["rpb"] = rand(N, 2 * kh - 1, 2 * kw - 1, scale=0.5)
    planted = []
    for _ in range(rng.randint(1, 3)):
        # mostly q, k, v: a table entry poisons many windows at once
        name = rng.choice([n for n in ("q", "k", "v") * 3 + tuple(t) if n in t])
        index = tuple(rng.randrange(s) for s in t[name].shape)
        value = rng.choice((float("nan"), float("inf"), float("-inf")))
        t[name][index] = value
        planted.append(f"{name}{list(index)}={value}")
    desc = (f"seed={seed}: q[1, {H}, {W}, {N}, {D}] {SHORT[dtype]} k=({kh}, {kw}) "
            f"dil=({dh}, {dw}) {padding} rel={rel} rpb={'rpb' in t} planted {planted}")
    return dict(t=t, kernel_size=(kh, kw), dilation=(dh, dw), padding=padding, dtype=dtype,
                desc=desc)


def _args(c):
    t = c["t"]
    return check_attend_args(t["q"], t["k"], t["v"], c["kernel_size"], c["dilation"],
                             c["padding"], t.get("rel_h"), t.get("rel_w"), t.get("rpb"), None)


def _oracle(c, tensors):
    return oracle_attend(tensors["q"], tensors["k"], tensors["v"], c["kernel_size"],
                         c["dilation"], c["padding"], tensors.get("rel_h"),
                         tensors.get("rel_w"), tensors.get("rpb"), return_lse=True)


def expected_gradients(c: dict, seed: int) -> tuple:
    """A case's float64 oracle gradients for a seeded random dout, with what a backward
    gets in training: (args, out, lse, dout, want_grads, largest finite gradient)."""
    t, args = c["t"], _args(c)
    leaves = {n: x.double().requires_grad_() for n, x in t.items()}
    want, want_lse = _oracle(c, leaves)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(c["dtype"]).double()
    out, lse = reference_forward(t["q"], t["k"], t["v"], args)
    want_grads = dict(zip(leaves, own_out_gradients(out, want, want_lse, dout,
                                                    list(leaves.values()))))
    finite = [g[g.isfinite()].abs().max().item() for g in want_grads.values()
              if g.isfinite().any()]
    return args, out, lse, dout, want_grads, max(finite, default=1.0)


def _seeds(impl_index: int):
    return range(1000 * (impl_index + 1), 1000 * (impl_index + 1) + CASES_PER_IMPL)


@pytest.mark.parametrize("impl", FORWARDS)
def test_nonfinite_forward_stays_in_its_windows(impl):
    partial = ran = 0  # partial: cases where some outputs stay finite and some do not
    first = _seeds(FORWARDS.index(impl))[0]
    # the first CASES_PER_IMPL seeds the implementation supports (as in the backward test:
    # e.g. the image forward runs 16-bit inputs of small images only)
    for seed in range(first, first + 10 * CASES_PER_IMPL):
        if ran == CASES_PER_IMPL:
            break
        c = nonfinite_case(seed)
        t, args = c["t"], _args(c)
        variant = variant_module(impl)
        if not variant.supports(tuple(t["q"].shape), t["q"].dtype, args):
            continue
        ran += 1
        poison = {"_poison": True} if variant.needs_triton else {}
        out, lse = variant.forward(t["q"], t["k"], t["v"], args, **poison)
        want, want_lse = _oracle(c, {n: x.double() for n, x in t.items()})
        tol = coarser(c["dtype"], torch.float32)
        for name, got, exp, floor in (("out", out, want, 1.0), ("lse", lse, want_lse, 1.0)):
            problem = mismatch(name, got, exp, tol, floor)
            assert problem is None, f"{impl}: {c['desc']}: {problem}"
        partial += 0 < int((~want.isfinite()).sum()) < want.numel()
    assert ran >= CASES_PER_IMPL, f"{impl} supports too few of the cases ({ran})"
    assert partial >= CASES_PER_IMPL // 3, "too few cases with a partial non-finite pattern"


@pytest.mark.parametrize("impl", BACKWARDS)
def test_nonfinite_gradients_stay_in_their_windows(impl):
    partial = ran = 0
    first = _seeds(10 + BACKWARDS.index(impl))[0]
    # the first CASES_PER_IMPL seeds the implementation supports (all of the first ones,
    # except e.g. rowsbwd's float32 before Triton 3.8, which the dispatcher skips too)
    for seed in range(first, first + 10 * CASES_PER_IMPL):
        if ran == CASES_PER_IMPL:
            break
        c = nonfinite_case(seed)
        t, args = c["t"], _args(c)
        if not variant_module(impl).supports(tuple(t["q"].shape), t["q"].dtype, args):
            continue
        ran += 1
        args, out, lse, dout, want_grads, largest = expected_gradients(c, seed)
        # the implementation's backward gets the forward it would get in training
        got = variant_module(impl).backward(t["q"], t["k"], t["v"], out, lse,
                                            dout.to(c["dtype"]), args)
        got = dict(zip(NAMES, got))
        for name, exp in want_grads.items():
            tol = coarser(c["dtype"], t[name].dtype)
            problem = mismatch(f"grad of {name}", got[name], exp, tol, FLOOR[tol] * largest)
            assert problem is None, f"{impl}: {c['desc']}: {problem}"
        dq = want_grads["q"]
        partial += 0 < int((~dq.isfinite()).sum()) < dq.numel()
    assert ran >= CASES_PER_IMPL, f"{impl} supports too few of the cases ({ran})"
    assert partial >= CASES_PER_IMPL // 3, "too few cases with a partial non-finite pattern"


@pytest.mark.skipif(not TRITON, reason="needs Triton")
@pytest.mark.parametrize("impl", ["rows", "image"])
def test_all_minus_inf_logits_beside_finite_zero_taps(impl):
    c = nonfinite_case(2044)  # q[0, 4, 4, 0, 1] = inf, k[0, 4, 3, 0, 0] = inf, k (3, 1)
    t, args = c["t"], _args(c)
    out, lse = variant_module(impl).forward(t["q"], t["k"], t["v"], args)
    want, want_lse = _oracle(c, {n: x.double() for n, x in t.items()})
    tol = coarser(c["dtype"], torch.float32)
    assert mismatch("out", out, want, tol, 1.0) is None
    assert mismatch("lse", lse, want_lse, tol, 1.0) is None
