"""sasa_triton.natten against NATTEN's computation (tests/natten_reference.py, written from
NATTEN's sources) and the float64 oracle: module state dicts and outputs, na2d / na1d,
the split na2d_qk / na2d_av, and the arguments that are not supported."""
from __future__ import annotations

import random

import pytest
import torch

import sasa_triton
from sasa_triton import natten

from natten_reference import natten_av, natten_module_forward, natten_qk
from oracle import oracle_attend


def _random_config(rng: random.Random, one_d: bool = False) -> dict:
    """A window that fits: kernel sizes 1..7, per-axis dilation 1..3, image up to 4 pixels
    past the window (so borders, the interior and every dilation group are exercised)."""
    axes = []
    for _ in range(1 if one_d else 2):
        k, dil = rng.choice([1, 3, 3, 5, 5, 7]), rng.choice([1, 2, 2, 3])
        dil = dil if k * dil <= 10 else 1  # keeps the loop oracle fast
        axes.append((k, dil, k * dil + rng.randrange(0, 5)))
    return dict(kernel=tuple(a[0] for a in axes), dilation=tuple(a[1] for a in axes),
                size=tuple(a[2] for a in axes), heads=rng.choice([1, 2, 3]),
                d=rng.choice([2, 4, 5, 8]), rpb=rng.random() < 0.7,
                scale=rng.choice([None, 0.3]))


SEEDS = range(6)


def _qkv(shape, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
            for _ in range(3)]


def _rpb(heads, kernel, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (heads, *(2 * k - 1 for k in kernel))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()


def _grads(out, inputs, seed):
    g = torch.Generator().manual_seed(seed + 2000)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


# ---- na2d, na1d: fused, heads-last ----------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_na2d_matches_oracle_and_natten(seed):
    c = _random_config(random.Random(seed))
    (H, W), N, D = c["size"], c["heads"], c["d"]
    q, k, v = _qkv((2, H, W, N, D), seed)
    rpb = _rpb(N, c["kernel"], seed) if c["rpb"] else None
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])

    out = natten.na2d(q, k, v, c["kernel"], c["dilation"], rpb=rpb, scale=c["scale"])
    want = oracle_attend(q, k, v, c["kernel"], c["dilation"], "shift", rpb=rpb, scale=c["scale"])
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for got, exp in zip(_grads(out, inputs, seed), _grads(want, inputs, seed)):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)

    # NATTEN's own formulas (heads-first): softmax(scale * q.k + rpb) @ v
    scale = c["scale"] or D ** -0.5
    qf, kf, vf = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))
    attn = natten_qk(qf * scale, kf, c["kernel"], c["dilation"], rpb).softmax(-1)
    natten_out = natten_av(attn, vf, c["kernel"], c["dilation"]).permute(0, 2, 3, 1, 4)
    torch.testing.assert_close(out, natten_out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_na1d_matches_natten(seed):
    c = _random_config(random.Random(100 + seed), one_d=True)
    (L,), (K,), (dil,), N, D = c["size"], c["kernel"], c["dilation"], c["heads"], c["d"]
    q, k, v = _qkv((2, L, N, D), seed)
    rpb = _rpb(N, (K,), seed) if c["rpb"] else None
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    kernel = K if seed % 2 else (K,)  # NATTEN takes an int or a 1-tuple

    out = natten.na1d(q, k, v, kernel, dil, rpb=rpb, scale=c["scale"])
    # the 1-D rendering: a 1-pixel-high image with a (1, K) window and (1, 2K-1) rpb
    scale = c["scale"] or D ** -0.5
    qf, kf, vf = (t.permute(0, 2, 1, 3)[:, :, None] for t in (q, k, v))
    rpb2 = None if rpb is None else rpb[:, None]
    attn = natten_qk(qf * scale, kf, (1, K), (1, dil), rpb2).softmax(-1)
    want = natten_av(attn, vf, (1, K), (1, dil))[:, :, 0].permute(0, 2, 1, 3)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for got, exp in zip(_grads(out, inputs, seed), _grads(want, inputs, seed)):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)

    logits = natten.na1d_qk(qf[:, :, 0] * scale, kf[:, :, 0], kernel, dil, rpb=rpb)
    torch.testing.assert_close(logits, natten_qk(qf * scale, kf, (1, K), (1, dil), rpb2)[:, :, 0])
    torch.testing.assert_close(natten.na1d_av(logits.softmax(-1), vf[:, :, 0], kernel, dil),
                               want.permute(0, 2, 1, 3), atol=1e-10, rtol=1e-10)


def test_na2d_runs_the_triton_kernels():
    """na2d on a forced kernel variant (Triton's interpreter on CPU, the compiler on CUDA),
    with q/k/v read in place from a qkv projection like the module's."""
    if "tiled" not in sasa_triton.backends("cpu"):
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 on CPU")
    B, H, W, N, D, kernel, dil = 1, 6, 5, 2, 16, (3, 5), (2, 1)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H, W, 3, N, D, generator=g).requires_grad_()
    rpb = (torch.randn(N, 5, 9, generator=g) * 0.5).requires_grad_()
    q, k, v = qkv.unbind(3)
    for backend in ("tiled", "tile2d", "rows"):
        out = natten.na2d(q, k, v, kernel, dil, rpb=rpb, backend=backend)
        want = oracle_attend(q, k, v, kernel, dil, "shift", rpb=rpb)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
        if backend != "tiled":
            continue  # one backward kernel serves every forward variant
        got_g = _grads(out, [qkv, rpb], 0)
        want_g = _grads(want, [qkv, rpb], 0)
        for got, exp in zip(got_g, want_g):
            torch.testing.assert_close(got.double(), exp.double(), atol=1e-4, rtol=1e-4)


# ---- na2d_qk / na2d_av: split, heads-first, materialised weights ------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_na2d_qk_av_match_natten_and_oracle(seed):
    c = _random_config(random.Random(200 + seed))
    (H, W), N, D = c["size"], c["heads"], c["d"]
    q, k, v = _qkv((2, N, H, W, D), seed)
    rpb = _rpb(N, c["kernel"], seed) if c["rpb"] else None
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    kernel = c["kernel"] if seed % 2 else list(c["kernel"])

    logits = natten.na2d_qk(q, k, kernel, c["dilation"], rpb=rpb)
    assert logits.shape == (2, N, H, W, c["kernel"][0] * c["kernel"][1])
    # the weights in NATTEN's order (window taps row-major) with NATTEN's rpb entries
    torch.testing.assert_close(logits, natten_qk(q, k, c["kernel"], c["dilation"], rpb))
    attn = torch.rand(logits.shape, dtype=torch.float64)  # any weights, not only softmax's
    torch.testing.assert_close(natten.na2d_av(attn, v, kernel, c["dilation"]),
                               natten_av(attn, v, c["kernel"], c["dilation"]))

    # NATTEN's unfused recipe (scaled query, softmax, av) is the oracle's attention
    scale = c["scale"] or D ** -0.5
    out = natten.na2d_av(natten.na2d_qk(q * scale, k, kernel, c["dilation"], rpb=rpb).softmax(-1),
                         v, kernel, c["dilation"])
    hl = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
    want = oracle_attend(*hl, c["kernel"], c["dilation"], "shift", rpb=rpb, scale=scale)
    want = want.permute(0, 3, 1, 2, 4)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for got, exp in zip(_grads(out, inputs, seed), _grads(want, inputs, seed)):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)


def test_split_form_with_additional_tokens():
    """NATTEN's unfused cross-attention: the extra tokens' logits `q . k_extra` (no rpb)
    follow the window's, and their weights multiply the extra values."""
    B, N, H, W, D, n, kernel, dil = 2, 2, 6, 7, 4, 3, (3, 5), (2, 1)
    q, k, v = _qkv((B, N, H, W, D), 0)
    extra_k, extra_v, _ = _qkv((B, N, n, D), 1)
    rpb = _rpb(N, kernel, 0)
    inputs = [q, k, v, extra_k, extra_v, rpb]

    logits = natten.na2d_qk(q, k, kernel, dil, additional_keys=extra_k, rpb=rpb)
    want_logits = torch.cat([natten_qk(q, k, kernel, dil, rpb),
                             torch.einsum("bnhwd,bnmd->bnhwm", q, extra_k)], dim=-1)
    torch.testing.assert_close(logits, want_logits)
    attn = logits.softmax(-1)
    out = natten.na2d_av(attn, v, kernel, dil, additional_values=extra_v)
    want = natten_av(want_logits.softmax(-1)[..., :15], v, kernel, dil) + torch.einsum(
        "bnhwm,bnmd->bnhwd", want_logits.softmax(-1)[..., 15:], extra_v)
    torch.testing.assert_close(out, want)
    for got, exp in zip(_grads(out, inputs, 0), _grads(want, inputs, 0)):
        torch.testing.assert_close(got, exp)

    # 1-D: a row of the 2-D case
    out1 = natten.na1d_av(natten.na1d_qk(q[:, :, 0], k[:, :, 0], 5, 1, additional_keys=extra_k,
                                         rpb=rpb[:, 2]).softmax(-1),
                          v[:, :, 0], 5, 1, additional_values=extra_v)
    logits1 = natten.na2d_qk(q[:, :, :1], k[:, :, :1], (1, 5), 1, additional_keys=extra_k,
                             rpb=rpb[:, 2:3])
    torch.testing.assert_close(out1, natten.na2d_av(logits1.softmax(-1), v[:, :, :1], (1, 5),
                                                    additional_values=extra_v)[:, :, 0])


# ---- NeighborhoodAttention2D -------------------------------------------------------------

def _natten_state_dict(dim, heads, kernel, rel_pos_bias, qkv_bias, seed):
    """A state dict with the names and shapes NATTEN's module saves (random values)."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    shapes = {"qkv.weight": (3 * dim, dim), "proj.weight": (dim, dim), "proj.bias": (dim,)}
    if qkv_bias:
        shapes["qkv.bias"] = (3 * dim,)
    if rel_pos_bias:
        shapes["rpb"] = (heads, 2 * kh - 1, 2 * kw - 1)
    return {name: torch.randn(*shape, generator=g) * 0.3 for name, shape in shapes.items()}


@pytest.mark.parametrize("rel_pos_bias, qkv_bias, kernel", [
    (True, True, 7), (False, True, 5), (True, False, (3, 5)), (False, False, 3)])
def test_module_state_dict_has_nattens_names_and_shapes(rel_pos_bias, qkv_bias, kernel):
    dim, heads = 24, 3
    sd = _natten_state_dict(dim, heads, kernel, rel_pos_bias, qkv_bias, seed=0)
    layer = natten.NeighborhoodAttention2D(dim, heads, kernel, rel_pos_bias=rel_pos_bias,
                                           qkv_bias=qkv_bias)
    assert {n: tuple(t.shape) for n, t in layer.state_dict().items()} == \
        {n: tuple(t.shape) for n, t in sd.items()}
    layer.load_state_dict(sd, strict=True)
    # a checkpoint with an rpb does not load into a layer without one, and vice versa
    other = natten.NeighborhoodAttention2D(dim, heads, kernel, rel_pos_bias=not rel_pos_bias,
                                           qkv_bias=qkv_bias)
    with pytest.raises(RuntimeError, match="rpb"):
        other.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_module_matches_natten_forward_and_backward(seed):
    rng = random.Random(300 + seed)
    c = _random_config(rng)
    heads, head_dim = c["heads"], rng.choice([2, 4, 8])
    dim = heads * head_dim
    kernel = c["kernel"] if seed % 2 else c["kernel"][0]
    dil, (H, W) = c["dilation"], c["size"]
    if isinstance(kernel, int):  # a square window on a square image
        dil, W = dil[0], H
    if seed == len(SEEDS) - 1:  # smaller than the window along one or both axes: padded
        kernel, dil, H, W = (5, 3), (2, 1), 6, 2
    qk_scale = rng.choice([None, 0.25])
    sd = _natten_state_dict(dim, heads, kernel, c["rpb"], rng.random() < 0.8, seed)

    layer = natten.NeighborhoodAttention2D(dim, heads, kernel, dil, rel_pos_bias=c["rpb"],
                                           qkv_bias="qkv.bias" in sd, qk_scale=qk_scale)
    layer.load_state_dict(sd, strict=True)
    layer = layer.double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, H, W, dim, generator=g, dtype=torch.float64, requires_grad=True)

    out = layer(x)
    sd64 = {n: t.double().requires_grad_() for n, t in sd.items()}
    want = natten_module_forward(sd64, x, heads, kernel, dil, qk_scale)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    names = sorted(sd)
    params = dict(layer.named_parameters())
    got = _grads(out, [x] + [params[n] for n in names], seed)
    exp = _grads(want, [x] + [sd64[n] for n in names], seed)
    for name, a, b in zip(["x"] + names, got, exp):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_module_attention_dropout_follows_nattens_unfused_path():
    dim, heads, kernel, p = 16, 2, 3, 0.3
    sd = _natten_state_dict(dim, heads, kernel, True, True, seed=1)
    layer = natten.NeighborhoodAttention2D(dim, heads, kernel, rel_pos_bias=True, attn_drop=p)
    layer.load_state_dict(sd)
    layer = layer.double()
    x = torch.randn(2, 6, 5, dim, dtype=torch.float64)
    torch.manual_seed(7)
    out = layer.train()(x)
    torch.manual_seed(7)
    want = natten_module_forward(sd, x, heads, kernel, attn_drop=p)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    # eval: no dropout, the fused path
    torch.testing.assert_close(layer.eval()(x), natten_module_forward(sd, x, heads, kernel),
                               atol=1e-10, rtol=1e-10)


# ---- arguments ----------------------------------------------------------------------------

def test_unsupported_arguments_raise_naming_them():
    q = torch.randn(1, 5, 5, 2, 4)
    qf = q.permute(0, 3, 1, 2, 4)
    extra = torch.randn(1, 2, 3, 4)
    calls = {
        "is_causal": [lambda: natten.na2d(q, q, q, 3, is_causal=True),
                      lambda: natten.na2d(q, q, q, 3, is_causal=(False, True)),
                      lambda: natten.na2d_qk(qf, qf, 3, is_causal=True),
                      lambda: natten.na1d(q[:, 0], q[:, 0], q[:, 0], 3, is_causal=True),
                      lambda: natten.NeighborhoodAttention2D(8, 2, 3, is_causal=True)],
        "additional_keys": [lambda: natten.na2d(q, q, q, 3, additional_keys=extra),
                            lambda: natten.na1d(q[:, 0], q[:, 0], q[:, 0], 3,
                                                additional_keys=extra)],
        "additional_values": [lambda: natten.na2d(q, q, q, 3, additional_values=extra)],
        "stride": [lambda: natten.na2d(q, q, q, 3, stride=2)],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(NotImplementedError, match=name):
                fn()
    # the defaults NATTEN callers pass explicitly are accepted
    natten.na2d(q, q, q, 3, is_causal=(False, False), stride=(1, 1))


def test_bad_arguments_raise_before_running():
    q = torch.randn(1, 5, 5, 2, 4)
    qf = q.permute(0, 3, 1, 2, 4)
    with pytest.raises(ValueError, match="query"):
        natten.na2d(q[0], q, q, 3)
    with pytest.raises(ValueError, match="query"):
        natten.na1d(q, q, q, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        natten.na2d(q, q, q, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        natten.na2d(q, q, q, 3, dilation=2)  # 3 * 2 > 5: the window does not fit
    with pytest.raises(ValueError, match="rpb"):
        natten.na2d(q, q, q, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        natten.na2d_qk(qf, qf, 7)
    with pytest.raises(ValueError, match="rpb"):
        natten.na2d_qk(qf, qf, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="key"):
        natten.na2d_qk(qf, qf[..., :2], 3)
    with pytest.raises(ValueError, match="attn"):
        natten.na2d_av(qf[..., :1].expand(1, 2, 5, 5, 8), qf, 3)
    with pytest.raises(ValueError, match="additional_keys"):
        natten.na2d_qk(qf, qf, 3, additional_keys=torch.zeros(1, 3, 2, 4))
    with pytest.raises(ValueError, match="attn"):  # 9 window weights + 2 extras expected
        natten.na2d_av(qf[..., :1].expand(1, 2, 5, 5, 9), qf, 3,
                       additional_values=torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="num_heads"):
        natten.NeighborhoodAttention2D(10, 3, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        natten.NeighborhoodAttention2D(8, 2, 2)
    with pytest.raises(ValueError, match=r"\(B, H, W, dim\)"):
        natten.NeighborhoodAttention2D(8, 2, 3)(torch.randn(1, 8, 5, 5, 1))


def test_scale_zero_means_the_default_like_natten():
    q, k, v = _qkv((1, 5, 6, 2, 4), 0, requires_grad=False)
    torch.testing.assert_close(natten.na2d(q, k, v, 3, scale=0.0), natten.na2d(q, k, v, 3))


def test_rpb_of_another_dtype_is_cast_like_natten():
    q, k, v = _qkv((1, 5, 6, 2, 4), 0, requires_grad=False)
    q, k, v = q.float(), k.float(), v.float()
    rpb = torch.randn(2, 5, 5, dtype=torch.float64)  # NATTEN casts rpb to the query dtype
    torch.testing.assert_close(natten.na2d(q, k, v, 3, rpb=rpb),
                               sasa_triton.attend(q, k, v, 3, padding="shift", rpb=rpb.float()))
