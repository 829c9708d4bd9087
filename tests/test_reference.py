"""The reference implementation against the float64 oracle: forward, lse, gradients, memory."""
import pytest
import torch

import sasa_triton
from sasa_triton.args import check_attend_args
from sasa_triton.reference import reference_attend
from sasa_triton.report.memory import PeakLiveBytes

from cases import REFERENCE_CASES, Case, assert_close, make_inputs
from oracle import oracle_attend


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_matches_oracle(case, dtype):
    q, k, v, kw = make_inputs(case, dtype)
    out = sasa_triton.attend(q, k, v, case.k, backend="reference", **kw)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert_close(out, oracle_attend(q, k, v, case.k, **kw), dtype, case.id)


@pytest.mark.parametrize("layout", ["nchw_view", "channels_last"])
@pytest.mark.parametrize("case", [REFERENCE_CASES[0], REFERENCE_CASES[7]], ids=lambda c: c.id)
def test_strided_layouts(case, layout):
    q, k, v, kw = make_inputs(case, torch.float32, layout)
    assert not q.is_contiguous()
    out = sasa_triton.attend(q, k, v, case.k, **kw)
    assert_close(out, oracle_attend(q, k, v, case.k, **kw), torch.float32, case.id)


@pytest.mark.parametrize("case", REFERENCE_CASES[:10], ids=lambda c: c.id)
def test_lse_matches_oracle(case):
    q, k, v, kw = make_inputs(case, torch.float64)
    args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])
    _, lse = reference_attend(q, k, v, args, return_lse=True)
    _, want = oracle_attend(q, k, v, case.k, return_lse=True, **kw)
    assert_close(lse, want, torch.float64, case.id)


GRAD_CASES = [
    Case(B=1, H=4, W=3, heads=2, d=4, k=3, rel="per_head", rpb=True),
    Case(B=1, H=4, W=5, heads=1, d=4, k=3, dilation=2, padding="mask", rel="shared", rpb=True),
    Case(B=1, H=5, W=4, heads=2, d=3, k=3, padding="shift", rel="shared", rpb=True),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_gradcheck(case):
    q, k, v, kw = make_inputs(case, torch.float64, requires_grad=True)
    names = [n for n in ("rel_h", "rel_w", "rpb") if n in kw]

    def f(q, k, v, *tables):
        extra = dict(kw, **dict(zip(names, tables)))
        return sasa_triton.attend(q, k, v, case.k, backend="reference", **extra)

    assert torch.autograd.gradcheck(f, (q, k, v, *[kw[n] for n in names]))


def test_grads_match_oracle_in_float32():
    case = Case(H=5, W=6, k=3, padding="mask", rel="per_head", rpb=True)
    q, k, v, kw = make_inputs(case, torch.float32, requires_grad=True)
    leaves = [q, k, v, kw["rel_h"], kw["rel_w"], kw["rpb"]]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(sasa_triton.attend(q, k, v, case.k, **kw), leaves, dout)
    want = torch.autograd.grad(oracle_attend(q, k, v, case.k, **kw), leaves, dout.double())
    for name, g, w in zip(["q", "k", "v", "rel_h", "rel_w", "rpb"], got, want):
        assert_close(g, w, torch.float32, name)


def test_kernel_size_one_returns_v():
    q, k, v, kw = make_inputs(Case(k=1), torch.float32)
    torch.testing.assert_close(sasa_triton.attend(q, k, v, 1), v)


def test_nan_stays_in_its_windows():
    case = Case(B=1, H=8, W=8, heads=1, d=4, k=3)
    q, k, v, kw = make_inputs(case, torch.float32)
    k[0, 0, 0, 0, 0] = float("nan")
    out = sasa_triton.attend(q, k, v, 3)
    bad = out.isnan().any(-1)[0, :, :, 0]
    assert bad[:2, :2].all() and bad.sum() == 4


@pytest.mark.parametrize("shape", [(0, 4, 4, 2, 8), (1, 0, 4, 2, 8), (1, 4, 0, 2, 8), (1, 4, 4, 0, 8)])
def test_empty_inputs(shape):
    q = torch.randn(shape)
    out = sasa_triton.attend(q, q, q, 3, padding="mask")
    assert out.shape == shape
    q.requires_grad_()
    rpb = torch.randn(shape[3], 5, 5, requires_grad=True)
    sasa_triton.attend(q, q, q, 3, rpb=rpb).sum().backward()
    assert q.grad.shape == shape and not rpb.grad.any()


def test_forward_memory_does_not_grow_with_k2():
    q, k, v = (torch.randn(2, 56, 56, 8, 8) for _ in range(3))
    output_bytes = q.numel() * q.element_size()
    with torch.no_grad(), PeakLiveBytes() as mem:
        sasa_triton.attend(q, k, v, 7, backend="reference")
    assert 0 < mem.peak < 6 * output_bytes, f"peak {mem.peak / output_bytes:.2f}x the output"
