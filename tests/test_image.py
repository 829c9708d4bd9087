"""The whole-image kernels "image" (kernels/image_fwd.py) and "imagebwd"
(kernels/image_bwd.py) against the float64 oracle.

The shared tests (test_kernels_forward, test_nonfinite, test_fuzz, ...) run "image" like
every forward variant. Here: seeded random cases over every padding, dilation,
non-square k, rel shared / per head, rpb, dtype, layout and odd d on images up to the
kernels' 128 padded pixels, forward and backward; run-to-run identity of the backward;
non-finite inputs in the backward; supports' range.
"""
import dataclasses
import random
import types

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.kernels import image_bwd, image_fwd
from sasa_triton.variants import triton_usable

from cases import Case, check_forward, check_grads, make_inputs, oracle_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(torch.device(DEVICE).type),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
TABLES = ("rel_h", "rel_w", "rpb")
PADDINGS = ("zeros", "mask", "shift")
DTYPES = (torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "nchw_view", "channels_last")
DIMS = (1, 5, 8, 16, 32, 64)


def _random_case(seed: int) -> tuple:
    """(case, dtype, layout) from a seeded generator: images of at most 64 padded
    pixels, every padding, odd and even sizes, non-square k, dilation, rel, rpb (where
    supported: 32 tap slots at most)."""
    rng = random.Random(seed)
    padding = PADDINGS[seed % 3]
    d = DIMS[seed % len(DIMS)]
    kh, kw = rng.choice([1, 3, 5, 7]), rng.choice([1, 3, 5, 7])
    dh, dw = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
    while True:
        H, W = rng.randint(1, 8), rng.randint(1, 9)
        if padding == "shift":
            H, W = max(H, kh * dh), max(W, kw * dw)
        if image_fwd.grid_shape(H, W)[2] <= image_fwd.MAX_PIXELS:
            break
        dh = dw = 1  # a shift window of over 8 rows and columns: smaller
    rel = rng.choice([None, "shared", "per_head"]) if d >= 2 else None
    rpb = rng.random() < 0.4
    case = Case(B=rng.choice([1, 2]), H=H, W=W, heads=rng.choice([1, 2, 3]), d=d, k=(kh, kw),
                dilation=(dh, dw), padding=padding, rel=rel, rpb=rpb,
                scale=rng.choice([None, 0.7, -0.5]))
    window = types.SimpleNamespace(kh=kh, kw=kw, padding=padding)
    if rpb and image_fwd.tap_shape(window)[2] > image_fwd.MAX_TAPS_RPB:
        case = dataclasses.replace(case, rpb=False)
    return case, DTYPES[(seed // 3) % 2], LAYOUTS[seed % len(LAYOUTS)]


def _inputs(case, dtype, layout, seed=0):
    q, k, v, kw = make_inputs(case, dtype, layout, DEVICE, seed=seed)
    args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return q, k, v, kw, args, dout


def check_backward(case, dtype=torch.float32, layout="contiguous", config=None, seed=0,
                   use_forward=False):
    """imagebwd's gradients against the oracle's; with use_forward, from the image
    forward's own out and lse (else the oracle's)."""
    q, k, v, kw, args, dout = _inputs(case, dtype, layout, seed)
    assert image_bwd.supports(tuple(q.shape), dtype, args), case.id
    out, lse, want = oracle_grads(q, k, v, kw, case.k, dout)
    out, lse = out.to(dtype).to(DEVICE), lse.float().to(DEVICE)
    if use_forward:
        out, lse = image_fwd.forward(q, k, v, args)
    grads = image_bwd.backward(q, k, v, out, lse, dout, args, config, _poison=True)
    got = dict(zip(["q", "k", "v", *TABLES], grads))
    for name in TABLES:
        assert (got[name] is None) == (kw.get(name) is None), name
    for name in want:
        ref = q if name in "qkv" else kw[name]
        assert got[name].shape == ref.shape and got[name].dtype == ref.dtype, name
    # the tables sum every pixel's rounding of delta (from the 16-bit out): twice the atol
    check_grads(got, want, dtype, f"{case.id} {dtype}", table_factor=2.0)
    return grads, (q, k, v, out, lse, dout, args)


# the suite's s4 shape (small B), and each feature at least once
CASES = [
    Case(B=1, H=7, W=7, heads=2, d=64, k=7, rel="shared"),
    Case(B=1, H=7, W=7, heads=2, d=16, k=(3, 5), padding="mask", rel="per_head", rpb=True),
    Case(B=1, H=7, W=7, heads=1, d=8, k=(3, 5), dilation=(2, 1), padding="shift",
         rel="shared"),
    Case(B=2, H=3, W=2, heads=1, d=5, k=3, rel="per_head", rpb=True, scale=0.7),
    Case(B=1, H=4, W=12, heads=1, d=8, k=3, dilation=(1, 2), rel="shared", rpb=True),
    Case(B=1, H=4, W=4, heads=2, d=1, k=3, padding="mask", rpb=True),
    Case(B=1, H=7, W=7, heads=1, d=128, k=5, padding="shift", rel="per_head", scale=-0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_oracle(case):
    for dtype in (torch.float16, torch.bfloat16):
        check_forward(image_fwd, case, dtype, "nchw_view", device=DEVICE, label="image")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_backward_matches_oracle(case):
    if case.d > image_bwd.MAX_D:
        pytest.skip(f"imagebwd supports d <= {image_bwd.MAX_D} (its slow pass spills above)")
    check_backward(case, torch.float16, "nchw_view")
    check_backward(case, torch.bfloat16, "contiguous", use_forward=True)


@pytest.mark.parametrize("seed", range(12))
def test_random_cases(seed):
    case, dtype, layout = _random_case(seed)
    check_forward(image_fwd, case, dtype, layout, device=DEVICE, seed=seed, label="image")
    check_backward(case, dtype, layout, seed=seed)


def test_backward_bit_identical_on_repeat():
    grads, (q, k, v, out, lse, dout, args) = check_backward(
        Case(B=1, H=5, W=6, heads=2, d=8, k=3, rel="shared"), torch.bfloat16)
    again = image_bwd.backward(q, k, v, out, lse, dout, args)
    for a, b in zip(grads, again):
        assert (a is None and b is None) or torch.equal(a, b)


def test_supports_range():
    def ok(shape, dtype=torch.bfloat16, k=7, padding="zeros", rel=False, rpb=False,
           table_dtype=None):
        q = torch.zeros(shape, dtype=dtype)
        kw = {}
        if rel:
            t = table_dtype or dtype
            rows = 2 * k - 1 if padding == "shift" else k
            kw = dict(rel_h=torch.zeros(rows, shape[4] // 2, dtype=t),
                      rel_w=torch.zeros(rows, shape[4] - shape[4] // 2, dtype=t))
        if rpb:
            kw["rpb"] = torch.zeros(shape[3], 2 * k - 1, 2 * k - 1, dtype=dtype)
        args = check_attend_args(q, q, q, k, 1, padding, kw.get("rel_h"), kw.get("rel_w"),
                                 kw.get("rpb"), None)
        fwd = image_fwd.supports(shape, dtype, args)
        assert image_bwd.supports(shape, dtype, args) == (fwd and shape[4] <= image_bwd.MAX_D)
        return fwd

    assert ok((32, 7, 7, 8, 64), rel=True)  # s4
    assert ok((2, 4, 16, 2, 128), k=3, padding="mask")  # forward only (ok checks that)
    assert not ok((2, 7, 7, 2, 64), dtype=torch.float32)
    assert not ok((2, 7, 7, 2, 64), rel=True, table_dtype=torch.float32)
    assert not ok((2, 8, 9, 2, 16))  # 8 x 16 padded pixels
    assert not ok((2, 7, 7, 2, 16), rpb=True)  # 64 tap slots with rpb
    assert ok((2, 7, 7, 2, 16), k=3, rpb=True)
    assert not ok((2, 7, 7, 2, 256), k=3)
    q = torch.zeros(2, 7, 7, 2, 16)
    args = check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None)
    assert image_fwd.prune(image_fwd.search_space(), (2, 7, 7, 2, 128), args) == [
        dict(num_warps=8, num_stages=1)]


def test_empty():
    q = torch.zeros(0, 7, 7, 2, 16, dtype=torch.float16, device=DEVICE)
    args = check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None)
    out, lse = image_fwd.forward(q, q, q, args)
    assert out.shape == q.shape and lse.shape == q.shape[:4]
    grads = image_bwd.backward(q, q, q, out, lse, q, args)
    assert all(g.shape == q.shape for g in grads[:3])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning",
                            "ignore:divide by zero encountered:RuntimeWarning")
def test_forward_nonfinite_inputs_stay_in_their_windows():
    """NaN / inf planted in q, k, v or a table reaches only the outputs whose windows hold
    it: the random cases of test_nonfinite.py this forward supports (test_nonfinite runs
    registered variants only)."""
    from fuzz_cases import coarser, mismatch
    from test_nonfinite import _args as nonfinite_args
    from test_nonfinite import _oracle as nonfinite_oracle
    from test_nonfinite import nonfinite_case

    checked = partial = 0
    for seed in range(7000, 7400):
        c = nonfinite_case(seed)
        t, args = c["t"], nonfinite_args(c)
        if not image_fwd.supports(tuple(t["q"].shape), c["dtype"], args):
            continue
        out, lse = image_fwd.forward(t["q"], t["k"], t["v"], args, _poison=True)
        want, want_lse = nonfinite_oracle(c, {n: x.double() for n, x in t.items()})
        tol = coarser(c["dtype"], torch.float32)
        for name, got, exp in (("out", out, want), ("lse", lse, want_lse)):
            problem = mismatch(name, got, exp, tol, 1.0)
            assert problem is None, f"{c['desc']}: {problem}"
        checked += 1
        partial += 0 < int((~want.isfinite()).sum()) < want.numel()
        if checked == 8:
            break
    assert checked == 8 and partial >= 3, (checked, partial)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning",
                            "ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("tables", ["none", "rpb", "rel"])
def test_nonfinite_q_beside_zero_taps(tables):
    """Zeros padding: a zero key's logit is q . 0, NaN when q holds a NaN / inf, so such a
    query's out and lse are NaN even where its in-image logits are all -inf and its zero
    taps (their rel / rpb terms) are finite (the kernel's zero-tap mass takes no q
    without rel). Seeded: +inf / -inf in q at border and inner pixels with the head's
    keys all of the other sign in that channel, a NaN elsewhere; the forward against the
    oracle."""
    from fuzz_cases import mismatch

    from oracle import oracle_attend

    for seed in range(4):
        rng = random.Random(100 * seed + len(tables))
        g = torch.Generator().manual_seed(seed)
        H, W, heads, d = rng.randint(4, 7), rng.randint(4, 7), rng.choice([1, 2]), 16
        k = (3, 5) if tables == "rpb" else rng.choice([(3, 1), (3, 3), (5, 5), (7, 7)])
        dil = (rng.choice([1, 2]), rng.choice([1, 2]))
        dtype = DTYPES[seed % 2]
        q, kk, v = (torch.randn(1, H, W, heads, d, generator=g).to(dtype) for _ in range(3))
        kw = {}
        if tables == "rpb":
            kw["rpb"] = (torch.randn(heads, 2 * k[0] - 1, 2 * k[1] - 1, generator=g) * 0.5).to(dtype)
        if tables == "rel":
            kw["rel_h"] = (torch.randn(k[0], d // 2, generator=g) * 0.5).to(dtype)
            kw["rel_w"] = (torch.randn(k[1], d - d // 2, generator=g) * 0.5).to(dtype)
        for _ in range(2):  # a border pixel (zero taps in its window) or any pixel
            y, x, n, c = rng.choice([0, H - 1, rng.randrange(H)]), rng.randrange(W), \
                rng.randrange(heads), rng.randrange(d)
            sign = rng.choice([1.0, -1.0])
            q[0, y, x, n, c] = sign * float("inf")
            # every key of the head against it: all in-image logits -inf
            kk[0, :, :, n, c] = -sign * (kk[0, :, :, n, c].abs() + 0.1)
        q[0, rng.randrange(H), rng.randrange(W), 0, 0] = float("nan")
        args = check_attend_args(q, kk, v, k, dil, "zeros", kw.get("rel_h"), kw.get("rel_w"),
                                 kw.get("rpb"), None)
        out, lse = image_fwd.forward(q.to(DEVICE), kk.to(DEVICE), v.to(DEVICE), args,
                                     _poison=True)
        want, want_lse = oracle_attend(q, kk, v, k, dil, "zeros", kw.get("rel_h"),
                                       kw.get("rel_w"), kw.get("rpb"), return_lse=True)
        assert not want.isfinite().all()
        for name, got, exp in (("out", out, want), ("lse", lse, want_lse)):
            problem = mismatch(name, got, exp, dtype, 1.0)
            assert problem is None, f"seed {seed} {tables} k {k} dil {dil}: {problem}"
