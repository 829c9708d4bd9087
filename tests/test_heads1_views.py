"""Regression: single-head layers fed by an NCHW projection (issue 16).

With heads = 1, q, k, v are permuted views of the (B, 3C, H, W) projection whose
(B, H, W, 1, d) strides cannot be flattened to (B, H*W, 1, d) without a copy; the
reference backward `.view`ed its per-tap gradient parts (which take q's strides) and
crashed in every padding mode. Checked here forward and backward on every backend,
against the float64 oracle, and through SASA2d.
"""
import pytest
import torch
from fuzz_cases import FLOOR, mismatch

import sasa_triton
from sasa_triton.args import check_attend_args
from sasa_triton.nn import SASA2d, split_qkv
from sasa_triton.reference import reference_attend
from sasa_triton.reference_bwd import reference_backward
from sasa_triton.variants import triton_usable

from oracle import oracle_attend

BACKENDS = ["reference"] + (["tiled", "tile2d", "rows"] if triton_usable("cpu") else [])


def _projection(B, C, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3 * C, H, W, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("padding", ["zeros", "mask", "shift"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_heads1_nchw_views_forward_and_backward(backend, padding):
    """The issue's case: B=1, H=W=8, d=12, k=3, one head, views of an NCHW projection."""
    proj = _projection(1, 12, 8, 8, torch.float32).requires_grad_()
    q, k, v = split_qkv(proj, 1)
    assert q.shape == (1, 8, 8, 1, 12) and not q.is_contiguous()
    out = sasa_triton.attend(q, k, v, 3, padding=padding, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out, proj, dout)

    proj64 = proj.detach().double().requires_grad_()
    want = oracle_attend(*split_qkv(proj64, 1), 3, padding=padding)
    (want_grad,) = torch.autograd.grad(want, proj64, dout.double())
    assert mismatch("out", out, want.detach(), torch.float32) is None
    assert mismatch("grad of proj", grad, want_grad, torch.float32) is None


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "size1_odd_strides"])
def test_reference_backward_accepts_any_strides(layout):
    """reference_backward itself, with q / dout in layouts whose (B, H*W, N, d) form is
    not a view: every gradient matches autograd through the reference forward."""
    proj = _projection(2, 5, 4, 3, torch.float64)
    if layout == "channels_last":
        proj = proj.contiguous(memory_format=torch.channels_last)
    q, k, v = split_qkv(proj, 1)
    if layout == "size1_odd_strides":  # the heads dim (size 1) with a stride of 0
        q = q.as_strided(q.shape, (*q.stride()[:3], 0, q.stride(4)), q.storage_offset())
    g = torch.Generator().manual_seed(2)
    rel_h = torch.randn(3, 2, generator=g, dtype=torch.float64)
    rel_w = torch.randn(3, 3, generator=g, dtype=torch.float64)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).transpose(1, 2) \
        .contiguous().transpose(1, 2)  # non-contiguous too
    args = check_attend_args(q, k, v, 3, 1, "zeros", rel_h, rel_w, None, None)
    out, lse = reference_attend(q, k, v, args, return_lse=True)
    got = reference_backward(q, k, v, out, lse, dout, args)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    want_out = reference_attend(*leaves[:3], args._replace(rel_h=leaves[3], rel_w=leaves[4]))
    want = torch.autograd.grad(want_out, leaves, dout)
    for name, a, b in zip(("q", "k", "v", "rel_h", "rel_w"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("padding", ["zeros", "mask", "shift"])
def test_single_head_sasa2d_trains(padding):
    """The issue's repro: SASA2d(8, 8, kernel_size=3, heads=1) backward on the CPU path,
    with the parameters' gradients checked against float64 autograd."""
    torch.manual_seed(0)
    layer = SASA2d(8, 8, kernel_size=3, heads=1, padding=padding, rpb=True)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    got = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}

    layer64 = SASA2d(8, 8, kernel_size=3, heads=1, padding=padding, rpb=True).double()
    layer64.load_state_dict(layer.state_dict())
    x64 = x.detach().double().requires_grad_()
    proj = layer64.qkv(x64)
    want = oracle_attend(*split_qkv(proj, 1), 3, padding=padding, rel_h=layer64.rel_h,
                         rel_w=layer64.rel_w, rpb=layer64.rpb)
    want.sum().backward()
    expected = {"x": x64.grad, **{n: p.grad for n, p in layer64.named_parameters()}}
    assert got.keys() == expected.keys()
    largest = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        problem = mismatch(f"grad of {name}", got[name], expected[name], torch.float32,
                           FLOOR[torch.float32] * largest)
        assert problem is None, problem
