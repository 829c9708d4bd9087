"""The CPU implementation ("cpu", sasa_triton/cpu.py) against the float64 oracle:
forward, lse and every gradient, on the reference's coverage matrix and on seeded random
cases, in one chunk and in many; dtypes; strides; its memory bound; `auto` picks it."""
import random

import pytest
import torch

import sasa_triton
from sasa_triton import cpu, dispatch
from sasa_triton.args import check_attend_args
from sasa_triton.report.memory import PeakLiveBytes

from cases import REFERENCE_CASES, TOLERANCES, Case, assert_close, make_inputs
from oracle import oracle_attend

NAMES = ("q", "k", "v", "rel_h", "rel_w", "rpb")
# one chunk per call (the default budget) or one image row per chunk
CONFIGS = {"one-chunk": None, "row-chunks": {"chunk_bytes": 1}}


def random_cases(count: int, seed: int) -> list[Case]:
    """Small random cases over every option (shift windows fit the image)."""
    rng, cases = random.Random(seed), []
    while len(cases) < count:
        kh, kw = rng.choice((1, 3, 5)), rng.choice((1, 3, 5))
        dh, dw = rng.choice((1, 1, 2)), rng.choice((1, 1, 2))
        padding = rng.choice(("zeros", "mask", "shift"))
        low_h, low_w = (kh * dh, kw * dw) if padding == "shift" else (1, 1)
        H, W = rng.randint(max(low_h, 1), max(low_h, 7)), rng.randint(max(low_w, 1), max(low_w, 7))
        d = rng.randint(2, 9)
        cases.append(Case(B=rng.randint(1, 2), H=H, W=W, heads=rng.randint(1, 3), d=d,
                          k=(kh, kw), dilation=(dh, dw), padding=padding,
                          rel=rng.choice((None, "shared", "per_head")), rpb=rng.random() < 0.5,
                          scale=rng.choice((None, 0.3))))
    return cases


def _args(q, k, v, case, kw):
    return check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])


def _check_against_oracle(case: Case, config, seed: int = 0) -> None:
    q, k, v, kw = make_inputs(case, torch.float64, seed=seed, requires_grad=True)
    args = _args(q, k, v, case, kw)
    out, lse = cpu.forward(q, k, v, args, config)
    want, want_lse = oracle_attend(q, k, v, case.k, return_lse=True, **kw)
    assert_close(out, want, torch.float64, f"{case.id} out")
    assert_close(lse, want_lse, torch.float64, f"{case.id} lse")
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    leaves = [q, k, v] + [kw[n] for n in NAMES[3:] if n in kw]
    want_grads = torch.autograd.grad(want, leaves, dout)
    grads = [g for g in cpu.backward(q, k, v, out, lse, dout, args, config) if g is not None]
    assert len(grads) == len(leaves)
    for name, g, w in zip([n for n in NAMES if n in "qkv" or n in kw], grads, want_grads):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, w, torch.float64, f"{case.id} d{name}")


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.id)
def test_matches_oracle(case):
    _check_against_oracle(case, CONFIGS["one-chunk"])


@pytest.mark.parametrize("case", REFERENCE_CASES[1:15:2], ids=lambda c: c.id)
def test_matches_oracle_in_row_chunks(case):
    _check_against_oracle(case, CONFIGS["row-chunks"])


@pytest.mark.parametrize("seed", range(12))
def test_random_cases_match_oracle(seed):
    (case,) = random_cases(1, seed)
    _check_against_oracle(case, CONFIGS["row-chunks" if seed % 2 else "one-chunk"], seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [REFERENCE_CASES[8], REFERENCE_CASES[9], REFERENCE_CASES[11]],
                         ids=lambda c: c.id)
def test_dtypes_through_attend(case, dtype):
    """backend="cpu" through the custom op (autograd), tables in q's dtype, against the
    oracle on the same (rounded) inputs."""
    q, k, v, kw = make_inputs(case, dtype, requires_grad=True)
    leaves = [q, k, v] + [kw[n] for n in NAMES[3:] if n in kw]
    out = sasa_triton.attend(q, k, v, case.k, backend="cpu", **kw)
    want = oracle_attend(q, k, v, case.k, **kw)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, want, dtype, case.id)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = torch.autograd.grad(out, leaves, dout)
    expected = torch.autograd.grad(want, leaves, dout.double())
    for name, g, w in zip(NAMES, got, expected):
        assert g.dtype == dtype
        atol, rtol = TOLERANCES[dtype]  # scaled to the gradient's size, as for the kernels
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol,
                                   atol=atol * max(1.0, w.abs().max().item()),
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("layout", ["nchw_view", "channels_last"])
def test_strided_inputs(layout):
    case = Case(H=7, W=6, k=3, rel="per_head", rpb=True)
    q, k, v, kw = make_inputs(case, torch.float32, layout, requires_grad=True)
    assert not q.is_contiguous()
    out = sasa_triton.attend(q, k, v, case.k, backend="cpu", **kw)
    assert_close(out, oracle_attend(q, k, v, case.k, **kw), torch.float32, layout)
    out.sum().backward()  # expanded (stride 0) output gradient
    want = torch.autograd.grad(oracle_attend(q, k, v, case.k, **kw).sum(), [q])[0]
    assert_close(q.grad, want, torch.float32, "dq")


def test_auto_is_cpu_on_cpu():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q, k, v, kw = make_inputs(Case(), dtype)
        args = _args(q, k, v, Case(), kw)
        assert dispatch.choose(q, args, 0) == ("cpu", None)
        assert dispatch.choose(q, args, 1) == ("cpu", None)
    assert "cpu" in sasa_triton.backends("cpu")


def test_memory_is_bounded_by_the_chunk_budget():
    """Peak extra memory: a few copies of the input plus the chunk budget, where the
    unfolded windows alone would be 2 k^2 = 50 x the input."""
    q, k, v = (torch.randn(8, 32, 32, 4, 8) for _ in range(3))
    input_bytes = q.numel() * q.element_size()
    budget = 4 * 2 ** 20  # 4 x the input
    args = check_attend_args(q, k, v, 5, 1, "zeros", None, None, None, None)
    with PeakLiveBytes() as mem:
        out, lse = cpu.forward(q, k, v, args, {"chunk_bytes": budget})
    assert 0 < mem.peak < 4 * input_bytes + 2 * budget, f"forward peak {mem.peak / input_bytes:.1f}x"
    with PeakLiveBytes() as mem:
        cpu.backward(q, k, v, out, lse, torch.randn_like(out), args, {"chunk_bytes": budget})
    assert 0 < mem.peak < 8 * input_bytes + 2 * budget, f"backward peak {mem.peak / input_bytes:.1f}x"
