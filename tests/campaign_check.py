"""The GPU campaign's correctness check, through the public `attend` only.

Every kernel variant x padding x dtype x bias combination x layout, forward and backward
against float64 (the vectorised reference there: the loop oracle takes seconds per case,
and the test suite holds the reference to the oracle); a batch that starts past element 2**31 of its buffer
(forward and backward); NaN isolation; bit-identical gradients over two runs.

Not collected by `make test` (the name does not start with test_):
`scripts/gpu_campaign.sh check` runs it on the real compiler (SASA_TEST_REAL_GPU=1), and
with --rehearse under Triton's interpreter at toy sizes on a covering subset of the
product (SASA_CAMPAIGN_REHEARSE=1; the > 2**31-element case needs a GPU and is skipped).
SASA_CHECK_SHARD=i/n keeps every n-th combination from the i-th, so n processes compile
kernels in parallel.
"""
import dataclasses
import itertools
import os
import random

import pytest
import torch

import sasa_triton

from cases import LAYOUTS, TOLERANCES, Case, assert_close, make_inputs
from oracle import oracle_attend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REHEARSE = os.environ.get("SASA_CAMPAIGN_REHEARSE") == "1"
VARIANTS = [v.name for v in sasa_triton.variants.VARIANTS.values()  # the Triton kernels
           if v.needs_triton and v.name in sasa_triton.backends(DEVICE)]
PADDINGS = ("zeros", "mask", "shift")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BIASES = ((None, False), ("shared", False), ("per_head", False), (None, True),
          ("shared", True), ("per_head", True))  # (rel, rpb)
TABLES = ("rel_h", "rel_w", "rpb")

pytestmark = pytest.mark.skipif(not VARIANTS, reason="no Triton kernel runs here: needs "
                                "CUDA or TRITON_INTERPRET=1")

# GPU: an image that is no multiple of any tile, two column tiles, d on tensor cores;
# rehearsal: the smallest shape with the same features.
BASE = (Case(B=1, H=5, W=6, heads=2, d=8, k=3) if REHEARSE
        else Case(B=1, H=9, W=19, heads=2, d=16, k=5))


def _combos() -> list:
    full = list(itertools.product(VARIANTS, PADDINGS, DTYPES, BIASES, LAYOUTS))
    if REHEARSE:  # the first fixed sample in which every value of every axis appears
        axes = (VARIANTS, PADDINGS, DTYPES, BIASES, LAYOUTS)
        for seed in range(1000):
            sample = random.Random(seed).sample(full, min(len(full), 12))
            if all({c[i] for c in sample} == set(values) for i, values in enumerate(axes)):
                full = sample
                break
        else:
            raise AssertionError("no covering sample of the product")
    shard = os.environ.get("SASA_CHECK_SHARD")
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        full = full[i::n]
    return full


def _id(combo) -> str:
    variant, padding, dtype, (rel, rpb), layout = combo
    bias = "+".join([f"rel_{rel}"] * bool(rel) + ["rpb"] * rpb) or "nobias"
    return f"{variant}-{padding}-{str(dtype)[6:]}-{bias}-{layout}"


def _leaves(q, k, v, kw) -> tuple:
    names = [n for n in TABLES if kw.get(n) is not None]
    return names, [q, k, v, *[kw[n] for n in names]]


def _oracle(q, k, v, kw, kernel_size, dout, loops=True):
    """out and gradients of every input, float64 on CPU: the loop oracle, or (loops=False)
    the reference, which is fast enough for the whole product."""
    names, tensors = _leaves(q, k, v, kw)
    leaves = [t.detach().cpu().double().requires_grad_() for t in tensors]
    extra = {**{n: (t.cpu() if torch.is_tensor(t) else t) for n, t in kw.items()},
             **dict(zip(names, leaves[3:]))}
    if loops:
        out = oracle_attend(*leaves[:3], kernel_size, **extra)
    else:
        out = sasa_triton.attend(*leaves[:3], kernel_size, backend="reference", **extra)
    grads = torch.autograd.grad(out, leaves, dout.cpu().double())
    return out.detach(), dict(zip(["q", "k", "v", *names], grads))


def _attend_grads(q, k, v, kw, kernel_size, variant, dout):
    """attend's out and the gradients of every input (leaves made here, storage shared)."""
    names, tensors = _leaves(q, k, v, kw)
    leaves = [t.detach().requires_grad_() for t in tensors]
    extra = {**kw, **dict(zip(names, leaves[3:]))}
    out = sasa_triton.attend(*leaves[:3], kernel_size, backend=variant, **extra)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), dict(zip(["q", "k", "v", *names], grads))


def _dout(q, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape, generator=g).to(q.dtype).to(q.device)


def _check_grads(got: dict, want: dict, dtype, what: str) -> None:
    assert got.keys() == want.keys(), what
    atol, rtol = TOLERANCES[dtype]
    for name, w in want.items():
        g = got[name].cpu()
        assert not g.isnan().any(), f"{what}: d{name} has NaN entries"
        # table gradients sum over every pixel: tolerance relative to their size
        scale = max(1.0, w.abs().max().item()) if name in TABLES else 1.0
        torch.testing.assert_close(g.double(), w, atol=atol * scale, rtol=rtol,
                                   msg=lambda m, name=name: f"{what} d{name}: {m}")


@pytest.mark.parametrize("combo", _combos(), ids=_id)
def test_forward_backward_match_oracle(combo):
    variant, padding, dtype, (rel, rpb), layout = combo
    case = dataclasses.replace(BASE, padding=padding, rel=rel, rpb=rpb)
    q, k, v, kw = make_inputs(case, dtype, layout, DEVICE)
    dout = _dout(q)
    out, grads = _attend_grads(q, k, v, kw, case.k, variant, dout)
    want_out, want_grads = _oracle(q, k, v, kw, case.k, dout, loops=False)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out.cpu(), want_out, dtype, f"{_id(combo)} out")
    _check_grads(grads, want_grads, dtype, _id(combo))


@pytest.mark.skipif(DEVICE != "cuda", reason="the > 2**31-element buffer needs a GPU "
                    "(skipped in the CPU rehearsal)")
@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_past_2_31_elements_forward_backward(variant):
    """Batch 2 of q, k, v starts past element 2**31 of one 4 GiB buffer (batch stride
    fits in int32): 32-bit offset math (b * stride) would wrap, forward or backward."""
    B, H, W, N, D = 3, 5, 6, 2, 16
    per_batch, batch_stride = H * W * N * D, 2**30 + 512
    buf = torch.empty(2 * batch_stride + 3 * per_batch, dtype=torch.float16, device=DEVICE)
    strides = (batch_stride, W * N * D, N * D, D, 1)
    q, k, v = (buf.as_strided((B, H, W, N, D), strides, i * per_batch) for i in range(3))
    g = torch.Generator().manual_seed(0)
    for t in (q, k, v):
        t.copy_(torch.randn(B, H, W, N, D, generator=g).half())
    kw = dict(padding="mask", rel_h=(torch.randn(3, D // 2, generator=g) * 0.5).half().cuda(),
              rel_w=(torch.randn(3, D - D // 2, generator=g) * 0.5).half().cuda())
    dout = _dout(q)
    out, grads = _attend_grads(q, k, v, kw, 3, variant, dout)
    want_out, want_grads = _oracle(q, k, v, kw, 3, dout)
    assert_close(out.cpu(), want_out, torch.float16, f"{variant} out")
    _check_grads(grads, want_grads, torch.float16, variant)
    del buf, q, k, v


@pytest.mark.parametrize("padding", ["zeros", "mask"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_reaches_only_its_windows(variant, padding):
    """A NaN in k or v makes exactly the outputs whose window holds it NaN."""
    case = Case(B=1, H=7, W=9, heads=2, d=8, k=3, padding=padding, rel="shared")
    q, k, v, kw = make_inputs(case, torch.float32, "contiguous", DEVICE)
    k[0, 2, 3, 0, 1] = float("nan")
    v[0, 5, 7, 1, 4] = float("nan")
    out = sasa_triton.attend(q, k, v, case.k, backend=variant, **kw).cpu()
    want = oracle_attend(q.cpu(), k.cpu(), v.cpu(), case.k,
                         **{n: (t.cpu() if torch.is_tensor(t) else t) for n, t in kw.items()})
    assert torch.equal(out.isnan(), want.isnan()), "NaN pattern differs from the oracle's"
    assert 0 < int(want.isnan().any(-1).sum()) < out[..., 0].numel()
    finite = ~want.isnan()
    assert_close(out[finite], want[finite], torch.float32, "finite outputs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_bit_identical_over_two_runs(variant, dtype):
    """No float atomics: the same inputs give the same gradient bits, run after run
    (on the GPU at an s2-like size, so many programs meet on the same outputs)."""
    case = (Case(B=1, H=6, W=5, heads=2, d=8, k=3, rel="shared", rpb=True) if REHEARSE
            else Case(B=2, H=28, W=28, heads=8, d=16, k=7, rel="shared", rpb=True))
    q, k, v, kw = make_inputs(case, dtype, "nchw_view", DEVICE)
    dout = _dout(q)
    first = _attend_grads(q, k, v, kw, case.k, variant, dout)
    second = _attend_grads(q, k, v, kw, case.k, variant, dout)
    assert torch.equal(first[0], second[0]), "out differs between runs"
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d{name} differs between runs"
