"""The paper's ablation knobs: SASA2d's position ("relative" | "absolute" | "none") and
logits ("content+position" | "content" | "position"), the stem's spatially-aware values;
each against a plain float64 PyTorch rendering of its formula, forward and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sasa_triton.nn import SASA2d, SpatialMixtureAttention2d
from sasa_triton.nn.stem import AttentionStem2d

from oracle import oracle_attend


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_sasa(layer: SASA2d, x: torch.Tensor) -> torch.Tensor:
    """The SASA formula, tap by tap, zero padding, stride as an average pool:
    x' = x + abs_h + abs_w (absolute); [q | k | v] = W x' (no k for "position" logits);
    y_ij = sum_ab softmax_ab((q_ij . k_ab [content] + q_ij . r_{a-i,b-j} [position])
    / sqrt(d)) v_ab, r = concat(rel_h[row], rel_w[col])."""
    B, _, H, W = x.shape
    if layer.position == "absolute":
        pos = layer.abs_h + layer.abs_w
        if pos.shape[1:] != (H, W):
            pos = F.interpolate(pos[None], size=(H, W), mode="bilinear",
                                align_corners=False)[0]
        x = x + pos
    proj = torch.einsum("oc,bchw->bohw", layer.qkv.weight[:, :, 0, 0], x)
    N, D, C = layer.heads, layer.head_dim, layer.out_channels
    parts = proj.split(C, dim=1)
    q, v = parts[0], parts[-1]
    k = parts[1] if layer.logits != "position" else None
    q, v = q.unflatten(1, (N, D)), v.unflatten(1, (N, D))  # (B, N, D, H, W)
    kh, kw = layer.kernel_size
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    v_pad = F.pad(v, pad)
    k_pad = F.pad(k.unflatten(1, (N, D)), pad) if k is not None else None
    logits, values = [], []
    for a in range(kh):
        for b in range(kw):
            term = torch.zeros(B, N, H, W, dtype=x.dtype)
            if layer.logits in ("content", "content+position"):
                term = term + (q * k_pad[..., a:a + H, b:b + W]).sum(2)
            if layer.logits in ("position", "content+position"):
                r = torch.cat([layer.rel_h[a], layer.rel_w[b]])  # (D,)
                term = term + torch.einsum("bndhw,d->bnhw", q, r)
            logits.append(term / D ** 0.5)
            values.append(v_pad[..., a:a + H, b:b + W])
    p = torch.softmax(torch.stack(logits, 2), dim=2)  # (B, N, taps, H, W)
    out = (p[:, :, :, None] * torch.stack(values, 2)).sum(2).flatten(1, 2)
    if layer.stride > 1:
        out = F.avg_pool2d(out, layer.stride, layer.stride, ceil_mode=True)
    return out


KNOBS = [
    dict(position="relative", logits="content+position"),
    dict(position="relative", logits="content"),
    dict(position="relative", logits="position"),
    dict(position="none"),
    dict(position="absolute", abs_size=(7, 6)),
    dict(position="absolute", abs_size=5),  # resized to the 7 x 6 input
    dict(position="relative", logits="position", stride=2),
    dict(position="absolute", abs_size=(7, 6), stride=2),
]


def _layer(seed=0, **kwargs) -> SASA2d:
    torch.manual_seed(seed)
    layer = SASA2d(6, 8, kernel_size=3, heads=2, **kwargs).double()
    if layer.abs_h is not None:
        with torch.no_grad():  # larger than the init, so a wrong embedding shows
            layer.abs_h.normal_()
            layer.abs_w.normal_()
    return layer


@pytest.mark.parametrize("kwargs", KNOBS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_knob_matches_its_formula_forward_and_backward(kwargs):
    layer = _layer(**kwargs)
    x = torch.randn(2, 6, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = layer(x1), naive_sasa(layer, x2)
    stride = kwargs.get("stride", 1)
    assert out.shape == (2, 8, -(-7 // stride), -(-6 // stride)) == want.shape
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(out, [x1, *params], g)
    ref = torch.autograd.grad(want, [x2, *params], g)
    for a, b in zip(got, ref):
        assert a.abs().sum() > 0  # every input of the formula gets a gradient
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_knobs_decide_the_parameters():
    C = 8
    assert _layer().qkv.out_channels == 3 * C and _layer().rel_h is not None
    content = _layer(logits="content")
    assert content.rel_h is None and content.qkv.out_channels == 3 * C
    position = _layer(logits="position")
    assert position.rel_h is not None and position.qkv.out_channels == 2 * C  # no keys
    none = _layer(position="none")
    assert none.rel_h is None and none.abs_h is None
    absolute = _layer(position="absolute", abs_size=(5, 4))
    assert absolute.abs_h.shape == (6, 5, 1) and absolute.abs_w.shape == (6, 1, 4)
    assert absolute.rel_h is None and absolute.logits == "content"
    assert "position='absolute'" in repr(absolute)
    assert _layer(rel_pos=False).position == "none"  # the old switch still works


@pytest.mark.parametrize("kwargs, word", [
    (dict(position="none", logits="position"), "logits"),
    (dict(position="absolute", logits="content+position", abs_size=4), "logits"),
    (dict(position="absolute"), "abs_size"),
    (dict(position="absolute", abs_size=(4, 4, 4)), "abs_size"),
    (dict(position="sinusoid"), "position"),
    (dict(logits="q.k"), "logits"),
    (dict(rel_pos=False, position="relative"), "rel_pos"),
])
def test_bad_knobs_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SASA2d(6, 8, kernel_size=3, heads=2, **kwargs)


def test_flops_follow_the_knobs():
    full, qr = _layer().attention_flops(8, 8), _layer(logits="position").attention_flops(8, 8)
    assert full - qr == 8 * 8 * 2 * 9 * 8  # the q.k dot products, 2 per multiply-add


# --- the stem's spatially-aware values ---------------------------------------------------

def test_stem_without_spatial_values_is_plain_local_attention():
    torch.manual_seed(0)
    layer = SpatialMixtureAttention2d(3, 8, kernel_size=3, heads=2, mixtures=4,
                                      spatial_values=False).double()
    assert layer.emb_row is None and layer.emb_mix is None and layer.mixtures == 1
    assert layer.qkv.out_channels == 3 * 8  # q, k and one value projection
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(x1)
    # formula: y = sum_ab softmax(q.k / sqrt(d)) W_V x_ab, zero padding, no position term
    proj = torch.einsum("oc,bchw->bhwo", layer.qkv.weight[:, :, 0, 0], x2)
    q, k, v = (t.unflatten(-1, (2, 4)) for t in proj.split(8, dim=-1))
    want = oracle_attend(q, k, v, (3, 3), (1, 1), "zeros", None, None, None)
    want = want.flatten(3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.randn(out.shape, dtype=torch.float64)
    a = torch.autograd.grad(out, [x1, layer.qkv.weight], g)
    b = torch.autograd.grad(want, [x2, layer.qkv.weight], g)
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w, rtol=1e-8, atol=1e-10)


def test_stem_spatial_values_switch_shapes_and_parameters():
    torch.manual_seed(0)
    on, off = AttentionStem2d(3, 16, kernel_size=3), AttentionStem2d(3, 16, kernel_size=3,
                                                                   spatial_values=False)
    x = torch.randn(2, 3, 16, 16)
    for stem in (on, off):
        y = stem(x)
        assert y.shape == (2, 16, 4, 4)
        y.sum().backward()
        assert stem.attention.qkv.weight.grad.abs().sum() > 0
    assert on.attention.emb_mix.grad.abs().sum() > 0  # the mixture is trained
    n_on = sum(p.numel() for p in on.parameters())
    n_off = sum(p.numel() for p in off.parameters())
    assert n_on - n_off == 3 * 16 * 3 + (3 + 3 + 4) * 16  # 3 more value projections + embs
    assert "spatial_values=False" in repr(off.attention)


@pytest.mark.parametrize("backend", ["rows", "tile2d"])
@pytest.mark.parametrize("kwargs", [dict(logits="position"), dict(position="absolute", abs_size=5)],
                         ids=["qr", "absolute"])
def test_knobs_run_on_the_kernels(monkeypatch, backend, kwargs):
    """The knobs change what reaches `attend`, not `attend`: the Triton kernels (through
    the interpreter here) give the formula's result too, forward and backward."""
    import functools

    import sasa_triton
    import sasa_triton.nn.sasa2d as sasa2d_module

    monkeypatch.setattr(sasa2d_module, "attend",
                        functools.partial(sasa_triton.attend, backend=backend))
    reference = _layer(**kwargs)  # float64
    layer = _layer(**kwargs).float()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(1, 6, 6, 5, generator=torch.Generator().manual_seed(5))
    x1, x2 = x.clone().requires_grad_(), x.double().requires_grad_()
    out = layer(x1)
    want = naive_sasa(reference, x2)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-4, atol=1e-5)
