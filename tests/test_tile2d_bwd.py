"""The "tile2dbwd" backward (kernels/tile2d_bwd*.py) against float64 autograd of the oracle.

dq, dk, dv and the rel / rpb table gradients from the composed launches (query kernel,
table reduction, key kernel), out and lse from the oracle. Seeded random cases through
Triton's interpreter (zeros and mask padding, dilation, non-square odd k, shared /
per-head rel, rpb, fp16 / bf16 / fp32, odd d, strided layouts, several tiles per
image), pixel pairs (PIX = 2), quads (PIX = 4) and single pixels in either kernel,
repeat calls bit-identical, NaN / inf kept inside their windows, and the
config helpers. The generic backward tests (test_kernels_backward.py) run it too, as a
registered variant.
"""
import random

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.kernels import tile2d_bwd

from cases import Case, check_grads, make_inputs, oracle_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLES = ("rel_h", "rel_w", "rpb")


def _inputs(case, dtype, layout, seed=0):
    q, k, v, kw = make_inputs(case, dtype, layout, DEVICE, seed=seed)
    args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return q, k, v, kw, args, dout


def run_case(case, dtype=torch.float32, layout="contiguous", config=None, seed=0):
    q, k, v, kw, args, dout = _inputs(case, dtype, layout, seed)
    assert tile2d_bwd.supports(tuple(q.shape), dtype, args)
    out, lse, want = oracle_grads(q, k, v, kw, case.k, dout)
    grads = tile2d_bwd.backward(q, k, v, out.to(dtype).to(DEVICE), lse.float().to(DEVICE),
                                dout, args, config, _poison=True)
    got = dict(zip(["q", "k", "v", *TABLES], grads))
    for name in TABLES:
        assert (got[name] is None) == (kw.get(name) is None), name
    for name in want:
        ref = q if name in "qkv" else kw[name]
        assert got[name].shape == ref.shape and got[name].dtype == ref.dtype, name
    check_grads(got, want, dtype, case.id)
    return q, k, v, out, lse, dout, args


# hand-picked: each feature at least once, small B*H*W (interpreter)
CASES = [
    Case(B=2, H=5, W=6, heads=2, d=8, k=3, rel="shared"),
    Case(B=1, H=6, W=7, heads=3, d=8, k=3, rel="per_head", rpb=True, scale=0.7),
    Case(B=1, H=6, W=5, heads=2, d=5, k=5, padding="mask", rel="shared", rpb=True),
    Case(B=1, H=9, W=7, heads=1, d=4, k=(5, 3), dilation=(2, 1), padding="mask",
         rel="per_head"),
    Case(B=1, H=3, W=2, heads=1, d=16, k=5, rel="shared", rpb=True),  # image < window
    Case(B=1, H=4, W=4, heads=2, d=1, k=3, padding="mask", rpb=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_oracle_fp32(case):
    run_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    """16-bit inputs, row dilation, pixel pairs (PIX = 2)."""
    run_case(Case(B=1, H=6, W=7, heads=2, d=8, k=(3, 5), dilation=(2, 1), rel="per_head",
                  rpb=True), dtype)


@pytest.mark.parametrize("layout", ["nchw_view", "channels_last"])
def test_strided_layouts(layout):
    run_case(Case(B=2, H=5, W=6, heads=2, d=8, k=3, padding="mask", rel="shared", rpb=True),
             torch.float32, layout)


@pytest.mark.parametrize("pix, padding", [((2, 1), "zeros"), ((1, 2), "mask")],
                         ids=["Q_PIX2-zeros", "K_PIX2-mask"])
def test_many_tiles(pix, padding):
    """Small tiles: several programs per image, tiles cut at the border (an odd width:
    a pixel pair's second pixel outside), halos across tiles, partial slots of many
    programs summed; pixel pairs (PIX = 2) in one kernel, single pixels in the other."""
    config = {"Q_BLOCK_H": 2, "Q_BLOCK_W": 4, "Q_PIX": pix[0], "Q_num_warps": 1,
              "K_BLOCK_H": 4, "K_BLOCK_W": 2, "K_PIX": pix[1], "K_num_warps": 2}
    run_case(Case(B=1, H=5, W=7, heads=2, d=8, k=(3, 5), padding=padding, rel="shared",
                  rpb=True), config=config)


@pytest.mark.parametrize("dtype, padding", [(torch.bfloat16, "zeros"),
                                            (torch.float32, "mask")], ids=["bf16", "fp32"])
def test_pixel_quads(dtype, padding):
    """Four pixels per group in both kernels (PIX = 4): a quad's last pixels outside an
    odd-width image, halos across tiles, the rpb partial of a tap summed over the
    quad's pixels; bf16 d = 8 takes the channel-half rel path (a head's channels in one
    thread), fp32 the full-channel one."""
    config = {"Q_BLOCK_H": 2, "Q_BLOCK_W": 8, "Q_PIX": 4, "Q_num_warps": 1,
              "K_BLOCK_H": 2, "K_BLOCK_W": 8, "K_PIX": 4, "K_num_warps": 1}
    run_case(Case(B=1, H=3, W=7, heads=2, d=8, k=(3, 5), padding=padding, rel="shared",
                  rpb=True), dtype, config=config)


@pytest.mark.parametrize("seed", range(2))
def test_channel_halves_mask(seed):
    """bf16 d = 8 (a head's channels in one thread): the query kernel's rel dots, dq's rel
    terms and table partials on channel halves, with mask padding (rows and columns
    outside the image selected away) and per-head tables; default (fitted) tiles."""
    run_case(Case(B=1, H=5, W=6, heads=2, d=8, k=(3, 5), padding="mask", rel="per_head",
                  rpb=seed == 1), torch.bfloat16, seed=seed)


def test_fitted_tiles_two_warps():
    """A default config whose tiles were fitted to the image with half the warps (2 x 12,
    16 heads: 2 x 4 tiles over 2 warps pad nothing where 4 warps' 2 x 8 tiles would): the
    composed launches on it against the oracle."""
    case = Case(B=1, H=2, W=12, heads=16, d=8, k=3, rel="shared")
    config = tile2d_bwd.default_config((1, 2, 12, 16, 8), check_attend_args(
        *make_inputs(case, torch.bfloat16, "contiguous")[:3], 3, 1, "zeros", None, None,
        None, None))
    assert config["Q_num_warps"] == config["K_num_warps"] == 2, config
    run_case(case, torch.bfloat16, config=config)


def _random_case(seed: int) -> tuple:
    rng = random.Random(seed)
    padding = rng.choice(("zeros", "mask"))
    kh, kw = rng.choice((1, 3, 5)), rng.choice((1, 3, 5))
    dh, dw = rng.choice((1, 1, 2)), rng.choice((1, 1, 2))
    d = rng.choice((1, 2, 3, 8, 16))
    rel = rng.choice((None, "shared", "per_head")) if d >= 2 else None
    case = Case(B=rng.randint(1, 2), H=rng.randint(2, 7), W=rng.randint(2, 8),
                heads=rng.randint(1, 3), d=d, k=(kh, kw), dilation=(dh, dw), padding=padding,
                rel=rel, rpb=rng.random() < 0.5)
    dtype = rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))
    layout = rng.choice(("contiguous", "nchw_view", "channels_last"))
    return case, dtype, layout


@pytest.mark.parametrize("seed", range(4))
def test_random_cases(seed):
    case, dtype, layout = _random_case(seed)
    run_case(case, dtype, layout, seed=seed)


def test_bit_identical_on_repeat():
    q, k, v, out, lse, dout, args = run_case(
        Case(B=1, H=6, W=5, heads=2, d=8, k=3, padding="mask", rel="shared", rpb=True))
    out, lse = out.float().to(DEVICE), lse.float().to(DEVICE)
    first = tile2d_bwd.backward(q, k, v, out, lse, dout, args)
    second = tile2d_bwd.backward(q, k, v, out, lse, dout, args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning")
def test_nonfinite_inputs_stay_in_their_windows():
    """NaN / inf planted in q, k, v or a table reaches only the gradients whose windows
    hold it: the random cases of test_nonfinite.py this backward supports."""
    from fuzz_cases import FLOOR, coarser, mismatch, own_out_gradients
    from test_nonfinite import _args as nonfinite_args
    from test_nonfinite import _oracle as nonfinite_oracle
    from test_nonfinite import nonfinite_case

    from sasa_triton.reference import reference_forward

    checked = partial = 0
    for seed in range(5000, 5012):
        c = nonfinite_case(seed)
        t, args = c["t"], nonfinite_args(c)
        if not tile2d_bwd.supports(tuple(t["q"].shape), c["dtype"], args):
            continue
        leaves = {n: x.double().requires_grad_() for n, x in t.items()}
        want, want_lse = nonfinite_oracle(c, leaves)
        dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64).to(c["dtype"]).double()
        out, lse = reference_forward(t["q"], t["k"], t["v"], args)
        grads = own_out_gradients(out, want, want_lse, dout, list(leaves.values()))
        want_grads = dict(zip(leaves, grads))
        got = dict(zip(["q", "k", "v", *TABLES], tile2d_bwd.backward(
            t["q"], t["k"], t["v"], out, lse, dout.to(c["dtype"]), args, _poison=True)))
        finite = [g[g.isfinite()].abs().max().item() for g in want_grads.values()
                  if g.isfinite().any()]
        largest = max(finite, default=1.0)
        for name in want_grads:
            tol = coarser(c["dtype"], t[name].dtype)
            problem = mismatch(f"grad of {name}", got[name], want_grads[name], tol,
                               FLOOR[tol] * largest)
            assert problem is None, f"{c['desc']}: {problem}"
        checked += 1
        partial += 0 < int((~want_grads["q"].isfinite()).sum()) < want_grads["q"].numel()
    assert checked >= 4 and partial >= 2, (checked, partial)


def test_configs_and_supports():
    q = torch.zeros(2, 56, 56, 8, 8)
    args = check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None)
    shape = tuple(q.shape)
    default = tile2d_bwd.default_config(shape, args)
    assert default in tile2d_bwd.search_space()
    assert default in tile2d_bwd.prune(tile2d_bwd.search_space(), shape, args)
    # pixels per group (query, key): key quads where a head lies in one lane (s1), both
    # kernels' with kw <= 3, pairs at d = 16 (s2) and on narrow images, single pixels
    # with column dilation
    k3 = check_attend_args(q, q, q, 3, 1, "zeros", None, None, None, None)
    dilated = check_attend_args(q, q, q, 7, (1, 2), "zeros", None, None, None, None)
    for q_shape, a, pix in ((shape, args, (2, 4)), ((2, 28, 28, 8, 16), args, (2, 2)),
                            ((2, 28, 28, 8, 16), k3, (4, 4)), ((2, 6, 6, 8, 8), args, (2, 2)),
                            (shape, dilated, (1, 1))):
        config = tile2d_bwd.default_config(q_shape, a)
        assert (config["Q_PIX"], config["K_PIX"]) == pix, (q_shape, a.kw, pix)
    # group tiles fitted to the image at one (group, head lane) slot per thread: s1's key
    # quads in 8 x 8 tiles (4 x 16 padded 56 columns to 64), 4 x 4 at 28 x 28 (d = 16:
    # pairs; 16 heads: quads over 2 warps), det's 4 x 8 kept
    for q_shape, a, tiles in (
            (shape, args, (8, 4, 8, 8, 4)), ((2, 28, 28, 8, 16), args, (4, 4, 4, 4, 4)),
            ((2, 28, 28, 16, 8), args, (4, 2, 4, 4, 2)), ((2, 28, 28, 8, 16), k3, (4, 4, 4, 4, 2)),
            ((2, 128, 128, 4, 16), args, (4, 8, 4, 8, 4))):
        c = tile2d_bwd.default_config(q_shape, a)
        assert (c["Q_BLOCK_H"], c["Q_BLOCK_W"], c["K_BLOCK_H"], c["K_BLOCK_W"],
                c["Q_num_warps"]) == tiles, (q_shape, c)
        assert c["K_num_warps"] == c["Q_num_warps"] and c in tile2d_bwd.search_space()
        for pre in ("Q_", "K_"):
            assert tile2d_bwd._slots_per_thread(
                q_shape, c[pre + "BLOCK_H"], c[pre + "BLOCK_W"], c[pre + "num_warps"],
                c[pre + "PIX"]) == 1, (q_shape, c)
    assert tile2d_bwd.supports(shape, torch.bfloat16, args)
    assert tile2d_bwd.supports((2, 28, 28, 8, 16), torch.bfloat16, args)
    assert not tile2d_bwd.supports(shape, torch.float64, args)
    assert not tile2d_bwd.supports((1, 4, 4, 8, 64), torch.bfloat16, args)  # 8 x 64 > 256
    shift = check_attend_args(q, q, q, 7, 1, "shift", None, None, None, None)
    assert not tile2d_bwd.supports(shape, torch.bfloat16, shift)
    with pytest.raises(ValueError, match="Q_BLOCK_H"):
        tile2d_bwd.backward(q, q, q, q, q[..., 0], q, args, {"BLOCK_H": 4})
    quads = dict(default, K_BLOCK_W=8, K_PIX=4)
    with pytest.raises(ValueError, match="Q_PIX"):
        tile2d_bwd.backward(q, q, q, q, q[..., 0], q, args, dict(quads, Q_PIX=3))
    with pytest.raises(ValueError, match="K_PIX"):
        tile2d_bwd.backward(q, q, q, q, q[..., 0], q, dilated, quads)
    with pytest.raises(ValueError, match="does not support"):
        tile2d_bwd.backward(q, q, q, q, q[..., 0], q, shift)


def test_empty():
    q = torch.zeros(0, 4, 4, 2, 8, device=DEVICE)
    rel = torch.ones(3, 4, device=DEVICE)
    args = check_attend_args(q, q, q, 3, 1, "zeros", rel, rel, None, None)
    dq, dk, dv, drel_h, drel_w, drpb = tile2d_bwd.backward(q, q, q, q, q[..., 0], q, args)
    assert dq.shape == dk.shape == dv.shape == q.shape and drpb is None
    assert not drel_h.any() and not drel_w.any()
