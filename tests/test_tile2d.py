"""tile2d's own paths against the float64 oracle: pixels per thread (PIX 4, 2, 1) sharing
window columns, a head's vectors spread over lanes (SPLIT: d 16 and 32 in 16-bit dtypes,
d 8 in float32) or kept in one thread (narrow vectors of strided views), tails of pixel
groups past the image edge, wide windows, explicit configs and their rejection.

Seeded random cases (shape, window, padding, biases, dtype, layout drawn per seed) plus a
few fixed ones; run through Triton's interpreter on CPU like the other kernel tests.
"""
import random

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.kernels import tile2d_fwd
from sasa_triton.variants import triton_usable

from cases import Case, check_forward, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(torch.device(DEVICE).type),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(case, dtype, layout="contiguous", config=None, v_layout=None):
    check_forward(tile2d_fwd, case, dtype, layout, config, DEVICE, v_layout=v_layout,
                  label="tile2d")


def _random_case(seed: int):
    """A small case drawn from the seed: mostly column dilation 1 and zeros / mask
    padding (the shared-column paths), d across 2..32, any odd window up to 9."""
    rng = random.Random(seed)
    d = rng.choice([2, 4, 6, 8, 8, 12, 16, 16, 24, 32])
    heads = rng.choice([h for h in (1, 2, 3, 4, 8) if tile2d_fwd.next_pow2(h)
                        * tile2d_fwd.next_pow2(d) <= tile2d_fwd.MAX_ROW])
    padding = rng.choice(["zeros", "zeros", "mask", "mask", "shift"])
    kh, kw = rng.choice([1, 3, 5, 7]), rng.choice([3, 5, 7, 9])
    dh, dw = rng.choice([1, 1, 2]), rng.choice([1, 1, 1, 2])
    H, W = rng.randint(2, 6), rng.randint(3, 11)
    if padding == "shift":
        H, W = max(H, kh * dh), max(W, kw * dw)
    case = Case(B=1, H=H, W=W, heads=heads, d=d, k=(kh, kw),
                dilation=(dh, dw), padding=padding,
                rel=rng.choice([None, "shared", "per_head"]) if d >= 2 else None,
                rpb=rng.random() < 0.4, scale=rng.choice([None, 0.6]))
    dtype = rng.choice(DTYPES)
    layout = rng.choice(["contiguous", "contiguous", "channels_last", "nchw_view"])
    return case, dtype, layout


@pytest.mark.parametrize("seed", range(10), ids=lambda s: f"seed{s}")
def test_random_cases_match_oracle(seed):
    _check(*_random_case(seed))


@pytest.mark.parametrize("case,dtype,layout", [
    # PIX 4, whole head per thread; W = 10: the last pixel group half outside
    (Case(B=1, H=5, W=10, heads=2, d=8, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    # PIX 4 in mask mode: every pixel's own out-of-image taps
    (Case(B=1, H=4, W=9, heads=2, d=8, k=(3, 7), padding="mask", rel="per_head", rpb=True),
     torch.float16, "contiguous"),
    # SPLIT: d 16 over two lanes (bf16), d 32 over four, d 8 float32 over two
    (Case(B=1, H=5, W=7, heads=2, d=16, k=5, rel="shared", rpb=True), torch.bfloat16,
     "contiguous"),
    (Case(B=1, H=3, W=6, heads=1, d=32, k=3, padding="mask", rel="per_head"), torch.bfloat16,
     "channels_last"),
    (Case(B=1, H=4, W=8, heads=4, d=8, k=5, rel="shared"), torch.float32, "contiguous"),
    # odd d, rel halves not at a vector boundary; window wider than the image
    (Case(B=1, H=4, W=5, heads=3, d=12, k=(3, 11), rel="shared", rpb=True), torch.float16,
     "contiguous"),
    # the widest window (kw 15) on PIX 2 / 1
    (Case(B=1, H=2, W=17, heads=1, d=16, k=(1, 15), padding="mask", rel="shared"),
     torch.bfloat16, "contiguous"),
], ids=lambda x: x.id if isinstance(x, Case) else str(x).split(".")[-1])
def test_fixed_paths_match_oracle(case, dtype, layout):
    _check(case, dtype, layout)


def test_narrow_v_vectors_keep_a_head_in_one_thread():
    """v a strided NCHW view: scalar loads, no lane split, fewer pixels per thread."""
    _check(Case(B=1, H=4, W=9, heads=2, d=16, k=5, rel="shared"), torch.bfloat16,
           v_layout="nchw_view")


@pytest.mark.parametrize("config", [
    dict(BLOCK_H=2, BLOCK_W=8, PIX=2, num_warps=1, num_stages=1),
    dict(BLOCK_H=2, BLOCK_W=4, PIX=1, num_warps=1, num_stages=1),
    dict(BLOCK_H=4, BLOCK_W=16, PIX=4, num_warps=2, num_stages=1),
    dict(BLOCK_H=2, BLOCK_W=8, num_warps=1, num_stages=1),  # PIX from pixels_per_thread
], ids=str)
def test_explicit_configs(config):
    _check(Case(B=1, H=3, W=10, heads=2, d=8, k=(3, 5), padding="mask", rel="shared",
                rpb=True), torch.bfloat16, config=config)


def test_split_loads_of_older_tritons(monkeypatch):
    """Before Triton 3.8 the tiles load through another permutation (_load_tile)."""
    monkeypatch.setattr(tile2d_fwd, "_TIES_ASCENDING", not tile2d_fwd._TIES_ASCENDING)
    _check(Case(B=1, H=4, W=6, heads=2, d=16, k=(3, 5), padding="mask", rel="per_head",
                rpb=True), torch.bfloat16, "channels_last")


@pytest.mark.parametrize("config,padding", [
    (dict(BLOCK_H=2, BLOCK_W=8, PIX=3), "zeros"),
    (dict(BLOCK_H=2, BLOCK_W=6, PIX=4), "zeros"),
    (dict(BLOCK_H=2, BLOCK_W=8, PIX=2), "shift"),
], ids=str)
def test_configs_that_cannot_share_columns_are_refused(config, padding):
    case = Case(B=1, H=5, W=6, heads=2, d=8, k=3, padding=padding)
    q, k, v, kw = make_inputs(case, torch.float32, "contiguous", DEVICE)
    args = check_attend_args(q, k, v, case.k, 1, padding, None, None, None, None)
    with pytest.raises(ValueError, match="PIX"):
        tile2d_fwd.forward(q, k, v, args, config)


def test_default_configs_fit_the_search_space_and_prune():
    space = tile2d_fwd.search_space()
    for shape, padding, dw in [((32, 56, 56, 8, 8), "zeros", 1), ((32, 28, 28, 8, 16), "zeros", 1),
                               ((8, 128, 128, 4, 16), "zeros", 1), ((32, 14, 14, 8, 32), "mask", 1),
                               ((2, 9, 9, 2, 8), "shift", 1), ((2, 9, 9, 2, 8), "zeros", 2)]:
        q = torch.empty(shape, dtype=torch.bfloat16)
        args = check_attend_args(q, q, q, 7 if padding != "shift" else 3, (1, dw), padding,
                                 None, None, None, None)
        cfg = tile2d_fwd.default_config(shape, args)
        assert cfg in space and cfg in tile2d_fwd.prune([cfg], shape, args), (shape, cfg)
        assert cfg["PIX"] == (1 if padding == "shift" or dw > 1 else 4), (shape, cfg)
