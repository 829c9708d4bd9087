"""Inputs that share storage, and gradients wanted for some inputs only: correct results
or a clear error on every backend, never silent corruption.

Each case builds q, k, v and the tables as views of a few leaf tensors (the same views
of float64 copies for the oracle) and compares out and the leaves' gradients. The fuzz
(tests/test_fuzz.py) draws such layouts at random too; these are the named cases.
"""
import pytest
import torch
from fuzz_cases import FLOOR, mismatch

import sasa_triton
from sasa_triton.variants import triton_usable

from oracle import oracle_attend

BACKENDS = ["reference"] + (["tiled", "tile2d", "rows"] if triton_usable("cpu") else [])
B, H, W, N, D, K = 1, 4, 5, 2, 4, 3
SHAPE = (B, H, W, N, D)


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _overlapping_strides(buf):
    """(B, H, W, N, D) view in which pixel j + 1 starts 3 values after pixel j: the rows
    of neighboring pixels overlap (each value is several pixels' channels)."""
    return buf.as_strided(SHAPE, (64, 16, 3, D, 1))


# name -> (leaves, build(leaves) -> dict of attend inputs)
LAYOUTS = {
    "q_is_k_is_v": (lambda: {"x": _rand(*SHAPE)},
                    lambda s: dict(q=s["x"], k=s["x"], v=s["x"])),
    "q_is_k": (lambda: {"x": _rand(*SHAPE), "v": _rand(*SHAPE, seed=1)},
               lambda s: dict(q=s["x"], k=s["x"], v=s["v"])),
    "overlapping_channel_views": (
        lambda: {"buf": _rand(B, H, W, N, D + 2)},
        lambda s: dict(q=s["buf"][..., 0:D], k=s["buf"][..., 1:D + 1], v=s["buf"][..., 2:D + 2])),
    "overlapping_strides": (
        lambda: {"buf": _rand(3, 128)},
        lambda s: dict(q=_overlapping_strides(s["buf"][0]), k=_overlapping_strides(s["buf"][1]),
                       v=_overlapping_strides(s["buf"][2]))),
    "one_projection_and_tables_from_one_tensor": (
        lambda: {"proj": _rand(B, 3 * N * D, H, W), "rel": _rand(K, D, seed=2, scale=0.5)},
        lambda s: dict(
            **dict(zip("qkv", s["proj"].unflatten(1, (3, N, D)).permute(1, 0, 4, 5, 2, 3)
                       .unbind(0))),
            rel_h=s["rel"][:, :D // 2], rel_w=s["rel"][:, D // 2:])),
}


def _run(build, leaves, backend, padding="zeros", dout=None):
    x = build(leaves)
    kw = {n: x[n] for n in ("rel_h", "rel_w", "rpb") if n in x}
    if backend == "oracle":
        return oracle_attend(x["q"], x["k"], x["v"], K, padding=padding, **kw)
    return sasa_triton.attend(x["q"], x["k"], x["v"], K, padding=padding, backend=backend, **kw)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_aliased_inputs_forward_and_backward(backend, layout):
    make, build = LAYOUTS[layout]
    assert build(make())["q"].shape == SHAPE
    dtype = torch.float32
    leaves = {n: t.to(dtype).requires_grad_() for n, t in make().items()}
    out = _run(build, leaves, backend, "mask")
    dout = _rand(*SHAPE, seed=9).to(dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)

    leaves64 = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    want = _run(build, leaves64, "oracle", "mask")
    want_grads = torch.autograd.grad(want, list(leaves64.values()), dout.double())
    assert mismatch("out", out, want.detach(), dtype) is None
    largest = max(g.abs().max().item() for g in want_grads)
    for name, g, w in zip(leaves, grads, want_grads):
        problem = mismatch(f"grad of {name}", g, w, dtype, FLOOR[dtype] * largest)
        assert problem is None, problem


SUBSETS = [("q",), ("v",), ("rel_h",), ("k", "rpb"), ("q", "v", "rel_w")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_requires_grad_on_some_inputs_only(backend):
    """Gradients for exactly the inputs that want them, each right; none for the rest."""
    base = {"q": _rand(*SHAPE), "k": _rand(*SHAPE, seed=1), "v": _rand(*SHAPE, seed=2),
            "rel_h": _rand(N, 2 * K - 1, D // 2, seed=3, scale=0.5),
            "rel_w": _rand(N, 2 * K - 1, D - D // 2, seed=4, scale=0.5),
            "rpb": _rand(N, 2 * K - 1, 2 * K - 1, seed=5, scale=0.5)}
    dout = _rand(*SHAPE, seed=9)
    want_leaves = {n: t.clone().requires_grad_() for n, t in base.items()}
    want = oracle_attend(want_leaves["q"], want_leaves["k"], want_leaves["v"], K,
                         padding="shift", rel_h=want_leaves["rel_h"],
                         rel_w=want_leaves["rel_w"], rpb=want_leaves["rpb"])
    want.backward(dout)
    largest = max(t.grad.abs().max().item() for t in want_leaves.values())
    for subset in SUBSETS:
        t = {n: x.float().requires_grad_(n in subset) for n, x in base.items()}
        out = sasa_triton.attend(t["q"], t["k"], t["v"], K, padding="shift", rel_h=t["rel_h"],
                                 rel_w=t["rel_w"], rpb=t["rpb"], backend=backend)
        assert out.requires_grad
        out.backward(dout.float())
        for name, x in t.items():
            if name not in subset:
                assert x.grad is None, f"{subset}: {name} got a gradient"
                continue
            problem = mismatch(f"grad of {name}", x.grad, want_leaves[name].grad,
                               torch.float32, FLOOR[torch.float32] * largest)
            assert problem is None, f"{subset}: {problem}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_modified_in_place_after_forward_raise(backend):
    """A saved input changed before backward: autograd's clear error, not wrong grads."""
    q, k, v = (_rand(*SHAPE, seed=i).float().requires_grad_() for i in range(3))
    qq = q * 1  # a non-leaf, so it may be modified in place
    out = sasa_triton.attend(qq, k, v, K, backend=backend)
    with torch.no_grad():
        qq.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_never_aliases_an_input(backend):
    """kernel_size 1 computes out == v; out is still a new tensor (writing it leaves v)."""
    q, k, v = (_rand(*SHAPE, seed=i).float() for i in range(3))
    for grad in (False, True):
        vv = v.clone().requires_grad_(grad)
        out = sasa_triton.attend(q, k, vv, 1, backend=backend)
        torch.testing.assert_close(out, vv.detach())
        assert out.untyped_storage().data_ptr() != vv.untyped_storage().data_ptr()
        with torch.no_grad():
            out.zero_()
        assert vv.detach().abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dout_that_is_the_output_itself(backend):
    """backward(out): the upstream gradient shares storage with a saved tensor."""
    q, k, v = (_rand(*SHAPE, seed=i).float().requires_grad_() for i in range(3))
    out = sasa_triton.attend(q, k, v, K, backend=backend)
    got = torch.autograd.grad(out, (q, k, v), out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = oracle_attend(*leaves, K)
    want_grads = torch.autograd.grad(want, leaves, want.detach())
    largest = max(g.abs().max().item() for g in want_grads)
    for name, g, w in zip("qkv", got, want_grads):
        problem = mismatch(f"grad of {name}", g, w, torch.float32, 0.05 * largest)
        assert problem is None, problem
