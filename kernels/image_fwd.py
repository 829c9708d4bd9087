"""Forward kernel "image": one whole-image tile per (batch, head), for small maps.

On maps of at most MAX_PIXELS padded pixels (7 x 7 -> 8 x 8 = 64: the last stage of a
SASA-ResNet at 224 and the coarse FPN levels) every pixel's window covers most of the
image, so a program takes the whole image of one (batch, head) at once: pixel p of the
padded [BLOCK_Y, BLOCK_X] grid (p = y * BLOCK_X + x) is query p and key p.

What a program owns: batch b, head n, every pixel of the image. What it loads: q, k, v
of that image ([BLOCK_N, BLOCK_D] each, once), the rel tables, rpb entries (L1 gathers).
    S = Q K^T + bias                    one tl.dot [N, D] @ [D, N] -> [N, N]
    one softmax in base 2 (no online rescale), O = P V   one tl.dot [N, N] @ [N, D]
Without rpb (`fast_logits`): the rel bias and the window come from one-hot dots. Per
query, the row term q . rel_h[row] of every key row y' (-1e30 where y' is no window row;
a [N, YP] gather from q @ rel_h^T) times the one-hot of each key's row, plus the same for
columns (bf16 hi/lo pairs: float32-exact sums); the window is where that bias is above
-1e29, applied by a select (a NaN/inf k outside a window never reaches that query).
Zeros padding: the out-of-image taps are zero keys and values whose logit 2^(Ra + Rc)
is separable, so their mass is (rows out x all columns) + (rows in x columns out) from
[N, E] sums (`zero_taps`), nothing loaded; a zero key's logit holds q . 0 (NaN for a
NaN / inf q: the rel products carry it, and without rel `q_times_zero`, one small dot).
With rpb (`image_logits`): per (query, key) rel indices computed in-kernel, the rel
terms gathered ([N, N] tl.gather) and rpb gather-loaded; the zero taps' logits in a
[N, T] tap tile. Only up to MAX_TAPS_RPB tap slots and d <= MAX_D_RPB (else spills).
Non-finite v: a pass of 0 or 1 trips (only when some v is not finite) redoes O with
non-finite v zeroed and marks NaN the (query, channel) outputs whose window holds one, so
a NaN/inf stays inside the windows that hold it.

Saves lse = ln(sum exp(logit)) per query (float32, (B, H, W, heads) contiguous): the
format of every forward, which every backward reads.

Tap slots (shared with the backward, kernels/image_bwd.py): slot t = r * TAP_X + s,
r the rel-table row (zeros/mask: window row a; shift: (y' - y) / dh + kh - 1), s likewise
for columns; rpb index (r + KH - 1 - R0, s + KW - 1 - R0w) with R0 = kh // 2 (zeros/mask)
or kh - 1 (shift).

Non-finite rel tables (no rpb): a -inf row / column term enters the one-hot dots as
-1e28 (inf * 0 there would make every key's bias NaN), so it stays in its window and its
keys get no weight; a query whose every logit is -inf gets NaN, as the softmax would.
A +inf / NaN term makes its query NaN (it does so in the exact softmax too). The rpb
path gathers: exact as it is.

Registered as variant "image": `supports` covers 16-bit inputs on images of <= 64
padded pixels only; the dispatcher gives other calls to other variants.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .common import (
    INTERPRETED,
    LOG2E,
    PADDING_CODES,
    alloc_outputs,
    launch_options,
    next_pow2,
    table_strides,
    window_start,
)
from .fast_launch import launch_kernel
from .launch_cache import (
    NO_LAUNCH,
    LaunchPlan,
    args_key,
    config_key,
    contiguous_strides,
    launch_plan,
    per_call_key,
    plan_cache,
)

# The range that compiles for sm_90 without spills (tests/test_image_sm90.py): 128-pixel
# images spill in the backward (d 64: 376 bytes at 8 warps), so do float32 tiles (their
# dots run on CUDA cores) and rpb's gather path past 32 tap slots or d 64.
MAX_PIXELS = 64  # padded pixels per image (BLOCK_Y * BLOCK_X): S [N, N] in registers
MAX_D = 128  # head dim
MAX_D_RPB = 64  # head dim with rpb
MAX_TAPS_RPB = 32  # tap slots with rpb (k 3 x 5 in zeros / mask mode)


@triton.jit
def _log2(x, INTERP: tl.constexpr):
    """log2 of positive x by lg2.approx (the interpreter: tl.log2)."""
    if INTERP:
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def image_geometry(H, W, dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr,
                   SHIFT: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (query, key) pair of the padded image grid: (window mask [N, N], rel row and
    column indices [N, N]) and per query (y, x, in-image mask, window start row/column,
    (start - i) // dil per axis). Rel index r = a + off + R0 (R0 = K//2 zeros/mask,
    K - 1 shift) is the tap's rel-table row; its rpb index is r + K - 1 - R0."""
    o_p = tl.arange(0, BLOCK_N)
    y = o_p // BLOCK_X
    x = o_p % BLOCK_X
    m_p = (y < H) & (x < W)
    sy, offy = window_start(y, H, KH, dil_h, SHIFT)
    sx, offx = window_start(x, W, KW, dil_w, SHIFT)
    dys = y[None, :] - sy[:, None]
    dysc = tl.maximum(dys, 0)
    a = dysc // dil_h
    dxs = x[None, :] - sx[:, None]
    dxsc = tl.maximum(dxs, 0)
    c = dxsc // dil_w
    m_win = ((dys >= 0) & (dysc == a * dil_h) & (a < KH) & (dxs >= 0) & (dxsc == c * dil_w)
             & (c < KW) & m_p[:, None] & m_p[None, :])
    if SHIFT:
        r_idx = a + (offy + KH - 1)[:, None]
        s_idx = c + (offx + KW - 1)[:, None]
    else:
        r_idx = a
        s_idx = c
    return m_win, r_idx, s_idx, y, x, m_p, sy, sx, offy, offx


@triton.jit
def tap_geometry(y, x, m_p, offy, offx, H, W, dil_h, dil_w, KH: tl.constexpr,
                 KW: tl.constexpr, SHIFT: tl.constexpr, TAP_X: tl.constexpr,
                 TAP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr):
    """Per (query, tap slot) [N, T]: (slot in the query's window, key in the image, key
    index in the padded grid (clamped), slot row r [T], slot column s [T])."""
    if SHIFT:
        TH: tl.constexpr = 2 * KH - 1
        TW: tl.constexpr = 2 * KW - 1
        R0: tl.constexpr = KH - 1
        C0: tl.constexpr = KW - 1
    else:
        TH: tl.constexpr = KH
        TW: tl.constexpr = KW
        R0: tl.constexpr = KH // 2
        C0: tl.constexpr = KW // 2
    o_t = tl.arange(0, TAP_N)
    r = o_t // TAP_X
    s = o_t % TAP_X
    m_slot = (r < TH) & (s < TW)
    yk = y[:, None] + (r - R0)[None, :] * dil_h
    xk = x[:, None] + (s - C0)[None, :] * dil_w
    m_tap = m_slot[None, :] & m_p[:, None]
    if SHIFT:  # window tap a = r - (off + KH - 1) in [0, KH)
        a = r[None, :] - (offy + KH - 1)[:, None]
        c = s[None, :] - (offx + KW - 1)[:, None]
        m_tap = m_tap & (a >= 0) & (a < KH) & (c >= 0) & (c < KW)
    m_in = (yk >= 0) & (yk < H) & (xk >= 0) & (xk < W)
    key = tl.minimum(tl.maximum(yk * BLOCK_X + xk, 0), BLOCK_N - 1)
    return m_tap, m_in, key, r, s


@triton.jit
def rel_terms(b_q, relh_ptr, relw_ptr, n, srh_n, srh_r, srh_d, srw_n, srw_r, srw_d,
              D, D_HALF, n_rows_h, n_rows_w, BLOCK_D: tl.constexpr, E_PAD: tl.constexpr,
              REL_F32: tl.constexpr):
    """(q . rel_h[e] [N, E] over the first d/2 channels, q . rel_w[e] [N, E] over the
    rest, the [E, BLOCK_D] tables themselves, channel-placed), by two small dots."""
    o_d = tl.arange(0, BLOCK_D)
    o_e = tl.arange(0, E_PAD)
    m_h = (o_e < n_rows_h)[:, None] & (o_d < D_HALF)[None, :]
    b_th = tl.load(relh_ptr + n * srh_n + o_e[:, None] * srh_r + o_d[None, :] * srh_d,
                   mask=m_h, other=0.0)
    m_w = (o_e < n_rows_w)[:, None] & ((o_d >= D_HALF) & (o_d < D))[None, :]
    b_tw = tl.load(relw_ptr + n * srw_n + o_e[:, None] * srw_r + (o_d - D_HALF)[None, :] * srw_d,
                   mask=m_w, other=0.0)
    if REL_F32:
        b_qr = b_q.to(tl.float32)
        b_th = b_th.to(tl.float32)
        b_tw = b_tw.to(tl.float32)
    else:
        b_qr = b_q
        b_th = b_th.to(b_q.dtype)
        b_tw = b_tw.to(b_q.dtype)
    b_rh = tl.dot(b_qr, tl.trans(b_th), input_precision="ieee")  # [N, D] @ [D, E]
    b_rw = tl.dot(b_qr, tl.trans(b_tw), input_precision="ieee")
    return b_rh, b_rw, b_th, b_tw


@triton.jit
def image_logits(b_q, b_k, relh_ptr, relw_ptr, rpb_ptr, n, H, W, D, D_HALF,
                 srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
                 dil_h, dil_w, qk_scale,
                 KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,
                 HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, REL_F32: tl.constexpr,
                 BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 E_PAD: tl.constexpr, TAP_X: tl.constexpr, TAP_N: tl.constexpr):
    """Base-2 logits of the image: s2 [N, N] (-inf outside each query's window), zeros
    mode's zero-tap logits z2 [N, T] (-inf where the tap is not an out-of-image one;
    else all -inf), the rel products (rh, rw [N, E]; tables th, tw [E, BLOCK_D]) and the
    geometry the backward reuses."""
    ZEROS: tl.constexpr = PADDING == 0
    SHIFT: tl.constexpr = PADDING == 2
    m_win, r_idx, s_idx, y, x, m_p, sy, sx, offy, offx = image_geometry(
        H, W, dil_h, dil_w, KH, KW, SHIFT, BLOCK_X, BLOCK_N)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [N, N]
    b_rh = tl.zeros([BLOCK_N, E_PAD], dtype=tl.float32)
    b_rw = b_rh
    b_th = tl.zeros([E_PAD, BLOCK_D], dtype=tl.float32)
    b_tw = b_th
    if SHIFT:
        n_rows_h = 2 * KH - 1
        n_rows_w = 2 * KW - 1
    else:
        n_rows_h = KH
        n_rows_w = KW
    if HAS_REL:
        b_rh, b_rw, b_th, b_tw = rel_terms(
            b_q, relh_ptr, relw_ptr, n, srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, D, D_HALF,
            n_rows_h, n_rows_w, BLOCK_D, E_PAD, REL_F32)
        b_s += tl.gather(b_rh, tl.minimum(r_idx, E_PAD - 1), axis=1)
        b_s += tl.gather(b_rw, tl.minimum(s_idx, E_PAD - 1), axis=1)
    b_s = b_s * qk_scale
    if HAS_RPB:
        if SHIFT:
            o_rpb = r_idx * srp_h + s_idx * srp_w
        else:
            o_rpb = (r_idx + KH // 2) * srp_h + (s_idx + KW // 2) * srp_w
        b_rpb = tl.load(rpb_ptr + n * srp_n + o_rpb, mask=m_win, other=0.0)
        b_s += b_rpb.to(tl.float32) * LOG2E
    b_s = tl.where(m_win, b_s, float("-inf"))
    b_z = tl.full([BLOCK_N, TAP_N], float("-inf"), tl.float32)
    if ZEROS:  # zero keys of the out-of-image taps: rel / rpb logit only
        m_tap, m_in, key, r, s = tap_geometry(y, x, m_p, offy, offx, H, W, dil_h, dil_w, KH,
                                              KW, False, TAP_X, TAP_N, BLOCK_N, BLOCK_X)
        b_z = tl.zeros([BLOCK_N, TAP_N], dtype=tl.float32)
        if HAS_REL:
            r2 = tl.minimum(r, E_PAD - 1)[None, :] + tl.zeros([BLOCK_N, TAP_N], tl.int32)
            s2 = tl.minimum(s, E_PAD - 1)[None, :] + tl.zeros([BLOCK_N, TAP_N], tl.int32)
            b_z = (tl.gather(b_rh, r2, axis=1) + tl.gather(b_rw, s2, axis=1)) * qk_scale
        if HAS_RPB:
            m_slot = (r < KH) & (s < KW)
            b_zp = tl.load(rpb_ptr + n * srp_n + (r + KH // 2) * srp_h + (s + KW // 2) * srp_w,
                           mask=m_slot, other=0.0)
            b_z += b_zp.to(tl.float32)[None, :] * LOG2E
        b_z = tl.where(m_tap & (m_in == 0), b_z, float("-inf"))
    return b_s, b_z, m_win, b_rh, b_rw, b_th, b_tw, y, x, m_p, offy, offx


@triton.jit
def dot_exact(a, b, INTERP: tl.constexpr):
    """a [M, K] float32 @ b [K, N]: b float32 -> one float32 dot (CUDA cores); b 16-bit
    (exact values: one-hots, inputs) -> a as a (hi, lo) pair of b's dtype, two
    tensor-core dots (about 16 significant bits of a, float32 sums)."""
    if b.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        if INTERP:  # the interpreter's bf16 tl.dot is wrong: the same values in float32
            bf = b.to(tl.float32)
            return (tl.dot(hi.to(tl.float32), bf, input_precision="ieee")
                    + tl.dot(lo.to(tl.float32), bf, input_precision="ieee"))
        else:
            return tl.dot(hi, b, tl.dot(lo, b))


@triton.jit
def dot_exact_sum(a, b, c, e, INTERP: tl.constexpr):
    """a @ b + c @ e as `dot_exact` makes each, in one chain of dots (one accumulator:
    no [M, N] add)."""
    if b.dtype == tl.float32:
        return tl.dot(a, b, tl.dot(c, e, input_precision="ieee"), input_precision="ieee")
    elif INTERP:
        return dot_exact(a, b, INTERP) + dot_exact(c, e, INTERP)
    else:
        a_hi = a.to(b.dtype)
        a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
        c_hi = c.to(e.dtype)
        c_lo = (c - c_hi.to(tl.float32)).to(e.dtype)
        return tl.dot(a_hi, b, tl.dot(a_lo, b, tl.dot(c_hi, e, tl.dot(c_lo, e))))


@triton.jit
def q_times_zero(b_q, BLOCK_D: tl.constexpr):
    """Per query [N]: q . 0, the logit of a zero key without tables: 0, NaN where q's row
    holds a NaN / inf (one small dot on tensor cores: no per-element work)."""
    return tl.sum(tl.dot(b_q, tl.zeros([BLOCK_D, 16], dtype=b_q.dtype)), axis=1)


@triton.jit
def axis_window(i, size, dil, K: tl.constexpr, SHIFT: tl.constexpr, P: tl.constexpr):
    """Queries at coordinate i [N] against the positions 0..P-1 of one axis: (position in
    the window and the image [N, P], its rel-table row [N, P])."""
    st, off = window_start(i, size, K, dil, SHIFT)
    o = tl.arange(0, P)
    ds = o[None, :] - st[:, None]
    dsc = tl.maximum(ds, 0)
    a = dsc // dil
    m = (ds >= 0) & (dsc == a * dil) & (a < K) & (o < size)[None, :]
    if SHIFT:
        e = a + (off + K - 1)[:, None]
    else:
        e = a
    return m, e


@triton.jit
def axis_taps(i, size, dil, K: tl.constexpr, E_PAD: tl.constexpr):
    """Zeros mode, one axis: per query i [N] and tap a < E_PAD, (tap exists (a < K) [1, E],
    its position is outside the image [N, E], its position [N, E])."""
    o_e = tl.arange(0, E_PAD)
    pos = (i - (K // 2) * dil)[:, None] + o_e[None, :] * dil
    return (o_e < K)[None, :], (pos < 0) | (pos >= size), pos


@triton.jit
def zero_taps(b_rh, y, H, dil_h, qk_scale, KH: tl.constexpr, HAS_REL: tl.constexpr,
              E_PAD: tl.constexpr):
    """Zeros mode without rpb, one axis (rows: b_rh, y, H; columns likewise): the zero
    taps' logits are separable, 2^(Ra + Rc) over the out-of-image taps (a, c), so their
    mass is max-shifted sums over taps: (exp2(Ra - mh) [N, E] (0 past K), out of the image
    [N, E], mh [N], sum over all taps [N], over those out of the image [N]). Without rel,
    b_rh is q . 0 per query (0, or NaN: `q_times_zero`) broadcast over E."""
    m_tap, m_out, _ = axis_taps(y, H, dil_h, KH, E_PAD)
    b_r = tl.where(m_tap, b_rh * qk_scale, float("-inf"))
    b_mh = tl.max(b_r, axis=1)
    b_e = tl.exp2(b_r - b_mh[:, None])
    return b_e, m_out, b_mh, tl.sum(b_e, axis=1), tl.sum(tl.where(m_out, b_e, 0.0), axis=1)


@triton.jit
def fast_logits(b_q, b_k, relh_ptr, relw_ptr, n, H, W, D, D_HALF,
                srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, dil_h, dil_w, qk_scale,
                KH: tl.constexpr, KW: tl.constexpr, SHIFT: tl.constexpr,
                HAS_REL: tl.constexpr, REL_F32: tl.constexpr,
                BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                E_PAD: tl.constexpr, YP: tl.constexpr, XP: tl.constexpr,
                INTERP: tl.constexpr):
    """Base-2 logits without rpb: s2 [N, N], -inf outside each query's window. The rel
    bias and the window ride on one-hot dots: per query the row term of every key row
    y' (q . rel_h[row], -1e30 where y' is not a window row: a gather of [N, YP]) times the
    one-hot of each key's row, plus the same for columns, so no [N, N] gather; the window
    is where that bias is above -1e29 (a select, so NaN/inf k outside it stays out).
    Also returns the rel products (rh, rw [N, E]) and tables (th, tw [E, BLOCK_D])."""
    o_p = tl.arange(0, BLOCK_N)
    y = o_p // BLOCK_X
    x = o_p % BLOCK_X
    m_row, e_row = axis_window(y, H, dil_h, KH, SHIFT, YP)  # [N, YP]
    m_col, e_col = axis_window(x, W, dil_w, KW, SHIFT, XP)  # [N, XP]
    b_rh = tl.zeros([BLOCK_N, E_PAD], dtype=tl.float32)
    b_rw = b_rh
    b_th = tl.zeros([E_PAD, BLOCK_D], dtype=tl.float32)
    b_tw = b_th
    b_ry = tl.zeros([BLOCK_N, YP], dtype=tl.float32)
    b_rx = tl.zeros([BLOCK_N, XP], dtype=tl.float32)
    if HAS_REL:
        if SHIFT:
            n_rows_h = 2 * KH - 1
            n_rows_w = 2 * KW - 1
        else:
            n_rows_h = KH
            n_rows_w = KW
        b_rh, b_rw, b_th, b_tw = rel_terms(
            b_q, relh_ptr, relw_ptr, n, srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, D, D_HALF,
            n_rows_h, n_rows_w, BLOCK_D, E_PAD, REL_F32)
        # scaled here ([N, YP]), so the logits take the bias by one FMA per element
        b_ry = tl.gather(b_rh, tl.minimum(e_row, E_PAD - 1), axis=1) * qk_scale
        b_rx = tl.gather(b_rw, tl.minimum(e_col, E_PAD - 1), axis=1) * qk_scale
    # -inf (scaled) row / column terms become -1e28 (still in the window, exp2 -> 0): in
    # the dots inf * 0 would make every key's bias NaN (+inf and NaN make the query NaN
    # anyway); -1e30 (unscaled) marks the rows / columns outside the window
    b_ry = tl.where(m_row, tl.where(b_ry == float("-inf"), -1.0e28, b_ry), -1.0e30)
    b_rx = tl.where(m_col, tl.where(b_rx == float("-inf"), -1.0e28, b_rx), -1.0e30)
    if REL_F32:
        sel_dtype: tl.constexpr = tl.float32
    else:
        sel_dtype: tl.constexpr = tl.bfloat16
    sel_y = tl.where(y[None, :] == tl.arange(0, YP)[:, None], 1.0, 0.0).to(sel_dtype)  # [YP, N]
    sel_x = tl.where(x[None, :] == tl.arange(0, XP)[:, None], 1.0, 0.0).to(sel_dtype)
    b_bias = dot_exact_sum(b_ry, sel_y, b_rx, sel_x, INTERP)  # [N, N]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [N, N]
    b_s = tl.where(b_bias > -1.0e29, b_s * qk_scale + b_bias, float("-inf"))
    return b_s, b_rh, b_rw, b_th, b_tw


@triton.jit
def load_image(p0, s_h, s_w, s_d, y, x, m_p, D, BLOCK_D: tl.constexpr,
               EVEN_D: tl.constexpr, OFF_I64: tl.constexpr):
    """[N, BLOCK_D] tile of one (batch, head) image (0 outside it)."""
    o_d = tl.arange(0, BLOCK_D)
    if OFF_I64:
        o_pix = y.to(tl.int64) * s_h + x.to(tl.int64) * s_w
    else:
        o_pix = y * s_h + x * s_w
    if EVEN_D:
        m = m_p[:, None]
    else:
        m = m_p[:, None] & (o_d < D)[None, :]
    return tl.load(p0 + o_pix[:, None] + o_d[None, :] * s_d, mask=m, other=0.0)


@triton.jit
def store_image(p0, s_h, s_w, y, x, m_p, D, val, BLOCK_D: tl.constexpr, OFF_I64: tl.constexpr):
    """Stores [N, BLOCK_D] `val` into a contiguous (B, H, W, heads, d) image."""
    o_d = tl.arange(0, BLOCK_D)
    if OFF_I64:
        o_pix = y.to(tl.int64) * s_h + x.to(tl.int64) * s_w
    else:
        o_pix = y * s_h + x * s_w
    tl.store(p0 + o_pix[:, None] + o_d[None, :], val.to(p0.dtype.element_ty),
             mask=m_p[:, None] & (o_d < D)[None, :])


@triton.jit
def contiguous_image_strides(H, W, HEADS, D, OFF_I64: tl.constexpr):
    """(batch, row, column, head) strides of a contiguous (B, H, W, heads, D) tensor (D 1:
    lse), 64-bit with OFF_I64."""
    if OFF_I64:
        s_w = tl.cast(HEADS, tl.int64) * D  # tl.cast: any of them may be the constant 1
    else:
        s_w = HEADS * D
    s_h = W * s_w
    return H * s_h, s_h, s_w, D


@triton.jit
def image_base(ptr, b, n, s_b, s_n, OFF_I64: tl.constexpr):
    """Pointer to image (b, n) of a (B, H, W, heads, d) tensor."""
    if OFF_I64:
        return ptr + b.to(tl.int64) * s_b + n.to(tl.int64) * s_n
    else:
        return ptr + b * s_b + n * s_n


@triton.jit
def image_pixels(H, W, BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr):
    """The program's pixel slots: row y, column x, and whether the slot is in the image."""
    o_p = tl.arange(0, BLOCK_N)
    y = o_p // BLOCK_X
    x = o_p % BLOCK_X
    return y, x, (y < H) & (x < W)


@triton.jit
def load_qkv(q_ptr, k_ptr, v_ptr, b, n, sq_b, sq_h, sq_w, sq_n, sq_d,
             sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
             y, x, m_p, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
             OFF_I64: tl.constexpr):
    """q, k and v of image b, head n, as [BLOCK_N, BLOCK_D] tiles (zeros off the image)."""
    b_q = load_image(image_base(q_ptr, b, n, sq_b, sq_n, OFF_I64), sq_h, sq_w, sq_d, y, x,
                     m_p, D, BLOCK_D, EVEN_D, OFF_I64)
    b_k = load_image(image_base(k_ptr, b, n, sk_b, sk_n, OFF_I64), sk_h, sk_w, sk_d, y, x,
                     m_p, D, BLOCK_D, EVEN_D, OFF_I64)
    b_v = load_image(image_base(v_ptr, b, n, sv_b, sv_n, OFF_I64), sv_h, sv_w, sv_d, y, x,
                     m_p, D, BLOCK_D, EVEN_D, OFF_I64)
    return b_q, b_k, b_v


@triton.jit
def _image_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,  # absent tables: None
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, D, D_HALF)
    sq, sk, sv,  # (batch, row, column, head, channel) strides; sv None if KV_SAME_STRIDES
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    dil,  # (dil_h, dil_w)
    qk_scale,  # scale * log2(e)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, REL_F32: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    E_PAD: tl.constexpr, TAP_X: tl.constexpr, TAP_N: tl.constexpr,
    YP: tl.constexpr, XP: tl.constexpr,
    EVEN_D: tl.constexpr, OFF_I64: tl.constexpr, DOT_F32: tl.constexpr,
    INTERP: tl.constexpr, KV_SAME_STRIDES: tl.constexpr,
):
    """Program (b, n) (head fastest): the whole image of batch b, head n (module
    docstring). out and lse are the launcher's contiguous allocations: their strides come
    from the sizes."""
    H, W, HEADS, D, D_HALF = sizes
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    if KV_SAME_STRIDES:
        sv_b, sv_h, sv_w, sv_n, sv_d = sk
    else:
        sv_b, sv_h, sv_w, sv_n, sv_d = sv
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    dil_h, dil_w = dil
    so_b, so_h, so_w, so_n = contiguous_image_strides(H, W, HEADS, D, OFF_I64)
    sl_b, sl_h, sl_w, sl_n = contiguous_image_strides(H, W, HEADS, 1, OFF_I64)
    ZEROS: tl.constexpr = PADDING == 0
    pid = tl.program_id(0)
    n = pid % HEADS
    b = pid // HEADS
    y, x, m_p = image_pixels(H, W, BLOCK_N, BLOCK_X)
    b_q, b_k, b_v = load_qkv(q_ptr, k_ptr, v_ptr, b, n, sq_b, sq_h, sq_w, sq_n, sq_d,
                             sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
                             y, x, m_p, D, BLOCK_D, EVEN_D, OFF_I64)
    if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
        b_q = b_q.to(tl.float32)
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_zl = tl.full([BLOCK_N], float("-inf"), tl.float32)  # log2 mass of the zero taps
    if ZEROS and not HAS_REL:  # a zero key's logit is q . 0: NaN for a NaN / inf q
        b_qz = q_times_zero(b_q, BLOCK_D)  # (with rel, the rel products carry it)
    if HAS_RPB:
        b_s, b_z, m_win, b_rh, b_rw, b_th, b_tw, y, x, m_p, offy, offx = image_logits(
            b_q, b_k, relh_ptr, relw_ptr, rpb_ptr, n, H, W, D, D_HALF,
            srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w, dil_h, dil_w,
            qk_scale, KH, KW, PADDING, HAS_REL, HAS_RPB, REL_F32, BLOCK_X, BLOCK_N, BLOCK_D,
            E_PAD, TAP_X, TAP_N)
        if ZEROS:
            if not HAS_REL:
                b_z += b_qz[:, None]
            b_zm = tl.maximum(tl.max(b_z, axis=1), -1.0e30)
            b_zl = b_zm + _log2(tl.sum(tl.exp2(b_z - b_zm[:, None]), axis=1), INTERP)
    else:
        b_s, b_rh, b_rw, b_th, b_tw = fast_logits(
            b_q, b_k, relh_ptr, relw_ptr, n, H, W, D, D_HALF,
            srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, dil_h, dil_w, qk_scale,
            KH, KW, PADDING == 2, HAS_REL, REL_F32, BLOCK_X, BLOCK_N, BLOCK_D, E_PAD, YP, XP,
            INTERP)
        m_win = b_s != float("-inf")
        if ZEROS:
            if not HAS_REL:
                b_rh = b_qz[:, None] + b_rh
                b_rw = b_rh
            b_eh, m_oh, b_mh, b_sh, b_soh = zero_taps(b_rh, y, H, dil_h, qk_scale, KH,
                                                      HAS_REL, E_PAD)
            b_ew, m_ow, b_mw, b_sw, b_sow = zero_taps(b_rw, x, W, dil_w, qk_scale, KW,
                                                      HAS_REL, E_PAD)
            # out-of-image taps: rows out x every column, rows in x columns out
            b_zl = b_mh + b_mw + _log2(b_soh * b_sw + (b_sh - b_soh) * b_sow, INTERP)
    b_m = tl.maximum(tl.max(b_s, axis=1), b_zl)
    b_m = tl.where(m_p, b_m, 0.0)  # padding rows: all -inf
    b_p = tl.exp2(b_s - b_m[:, None])
    b_l = tl.sum(b_p, axis=1) + tl.exp2(b_zl - b_m)
    # every logit -inf (-1e28 terms from -inf rel entries): NaN, as the softmax of all -inf
    b_l = tl.where(m_p, tl.where(b_m < -1.0e27, float("nan"), b_l), 1.0)
    b_pl = b_p.to(b_v.dtype)
    b_acc = tl.dot(b_pl, b_v, input_precision="ieee")  # [N, N] @ [N, D]
    # non-finite v (a 0/1-trip loop, a branch in SASS: the cost tool counts it): 0 * inf
    # in P V would reach queries whose window misses it; redo with it zeroed and mark the
    # windows that hold it
    # (a non-finite v makes every query's acc non-finite in that channel, 0 * inf being
    # NaN: so the sum of acc, already in float32, tells; a NaN/inf from q or k, or an
    # overflowing sum, only sends a program down the exact path needlessly)
    b_tot = tl.sum(tl.sum(b_acc, axis=1), axis=0)
    n_bad = tl.where(tl.abs(b_tot) < float("inf"), 0, 1)
    for _ in range(0, n_bad):
        m_vok = tl.abs(b_v.to(tl.float32)) < float("inf")
        b_v0 = tl.where(m_vok, b_v, tl.zeros_like(b_v))
        b_win = tl.where(m_win, 1.0, 0.0).to(tl.float16)
        b_vnan = tl.where(m_vok, 0.0, 1.0).to(tl.float16)
        b_bad = tl.dot(b_win, b_vnan)  # [N, N] @ [N, D]: window holds a non-finite v
        b_acc = tl.dot(b_pl, b_v0, input_precision="ieee")
        b_acc = tl.where(b_bad > 0, float("nan"), b_acc)
    b_o = b_acc * (1.0 / b_l)[:, None]  # one division per query, not per element
    store_image(image_base(o_ptr, b, n, so_b, so_n, OFF_I64), so_h, so_w, y, x, m_p, D, b_o,
                BLOCK_D, OFF_I64)
    b_lse = (b_m + _log2(b_l, INTERP)) * 0.6931471805599453
    p_l = image_base(lse_ptr, b, n, sl_b, sl_n, OFF_I64)
    tl.store(p_l + y * sl_h + x * sl_w, b_lse, mask=m_p)


# --- host side --------------------------------------------------------------------------

def grid_shape(H: int, W: int) -> tuple[int, int, int]:
    """(BLOCK_Y, BLOCK_X, BLOCK_N): the padded image grid (BLOCK_N >= 16 for tl.dot)."""
    bx = next_pow2(max(W, 1))
    by = max(next_pow2(max(H, 1)), -(-16 // bx))
    return by, bx, by * bx


def tap_shape(args) -> tuple[int, int, int]:
    """(E_PAD, TAP_X, TAP_N): rel-table rows padded (>= 16, a dot operand), tap-slot
    columns per row and slots (>= 16)."""
    shift = args.padding == "shift"
    th = 2 * args.kh - 1 if shift else args.kh
    tw = 2 * args.kw - 1 if shift else args.kw
    tap_x = next_pow2(tw)
    return max(16, next_pow2(max(th, tw))), tap_x, max(16, next_pow2(th) * tap_x)


def search_space() -> list[dict]:
    return [dict(num_warps=nw, num_stages=1) for nw in (2, 4, 8)]


def prune(configs, q_shape, args) -> list[dict]:
    """At least the default's warps (fewer spill)."""
    least = default_config(q_shape, args)["num_warps"]
    return [c for c in configs if c.get("num_warps", 4) >= least]


@per_call_key
def default_config(q_shape, args) -> dict:
    """4 warps (16 query rows each at 64 pixels; fewer on smaller images), 8 for d > 64
    (their tiles would spill at 4)."""
    n = grid_shape(q_shape[1], q_shape[2])[2]
    return dict(num_warps=8 if q_shape[4] > 64 else max(1, min(4, n // 16)), num_stages=1)


@per_call_key
def supports(q_shape, dtype, args) -> bool:
    """Images of at most MAX_PIXELS padded pixels, d <= MAX_D (MAX_D_RPB with rpb),
    float16 / bfloat16 inputs and rel tables (float32 ones spill: another variant runs
    them)."""
    B, H, W, heads, d = q_shape
    if dtype not in (torch.float16, torch.bfloat16) or not 1 <= d <= MAX_D:
        return False
    if args.rel_h is not None and torch.float32 in (args.rel_h.dtype, args.rel_w.dtype):
        return False
    if args.rpb is not None and (d > MAX_D_RPB or tap_shape(args)[2] > MAX_TAPS_RPB):
        return False
    return grid_shape(H, W)[2] <= MAX_PIXELS


def offsets_fit_i32(layouts) -> bool:
    """Whether every element offset into each (shape, strides) stays below 2**31."""
    for shape, strides in layouts:
        if sum((size - 1) * abs(st) for size, st in zip(shape, strides)) + 1 >= 2**31:
            return False
    return True


def _plan(q_shape, dtype, strides, args, rel_f32: bool, config) -> LaunchPlan:
    B, H, W, heads, d = q_shape
    if not supports(q_shape, dtype, args):
        raise ValueError(f"image forward does not support q {q_shape} {dtype} with kernel "
                         f"({args.kh}, {args.kw}) and padding {args.padding!r}")
    config = default_config(q_shape, args) if config is None else config
    if not isinstance(config, dict) or "num_warps" not in config:
        raise ValueError(f"image config must be a dict with key 'num_warps', got {config!r}")
    lse_strides = contiguous_strides(q_shape[:4])
    if B * H * W * heads * d == 0:
        return NO_LAUNCH._replace(layouts=((q_shape[:4], lse_strides),))
    _, bx, bn = grid_shape(H, W)
    e_pad, tap_x, tap_n = tap_shape(args)
    out_strides = contiguous_strides(q_shape)
    block_d = max(16, next_pow2(d))
    kv_same = strides[1] == strides[2]
    return launch_plan(
        _PARAMS,
        grid=(B * heads,),
        head=((H, W, heads, d, d // 2), *strides[:2], None if kv_same else strides[2]),
        tail=((args.dh, args.dw), args.scale * LOG2E.value),
        flags=dict(
            KH=args.kh, KW=args.kw, PADDING=PADDING_CODES[args.padding],
            HAS_REL=args.rel_h is not None, HAS_RPB=args.rpb is not None, REL_F32=rel_f32,
            BLOCK_X=bx, BLOCK_N=bn, BLOCK_D=block_d, E_PAD=e_pad, TAP_X=tap_x, TAP_N=tap_n,
            YP=max(16, bn // bx), XP=max(16, bx), EVEN_D=d == block_d,
            OFF_I64=not offsets_fit_i32([(q_shape, st) for st in (*strides, out_strides)]),
            DOT_F32=INTERPRETED and dtype == torch.bfloat16, INTERP=INTERPRETED,
            KV_SAME_STRIDES=kv_same,
            **launch_options(config),
        ),
        layouts=((q_shape[:4], lse_strides),),
    )


_plans = plan_cache(_plan)
_PARAMS = _image_fwd_kernel.arg_names  # read at import: a recorder may stand in later


def rel_in_f32(q, args) -> bool:
    """Whether the rel products run in float32 (float32 inputs or tables)."""
    return args.rel_h is not None and (q.dtype == torch.float32
                                       or args.rel_h.dtype == torch.float32
                                       or args.rel_w.dtype == torch.float32)


def forward(q, k, v, args, config=None, _poison=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the forward; see the module docstring and SASA's SPEC.md."""
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    rel_f32 = rel_in_f32(q, args)
    shape, strides = q.shape, (q.stride(), k.stride(), v.stride())
    plan = _plans((shape, q.dtype, strides, args_key(args), rel_f32, config_key(config)),
                  tuple(shape), q.dtype, strides, args, rel_f32, config)
    out, lse = alloc_outputs(q, _poison, plan.layouts[0])
    if plan.grid is None:
        return out, lse
    launch_kernel(_image_fwd_kernel, plan,
        q, k, v, out, lse, rel_h, rel_w, rpb,  # None when absent (never read then)
        *plan.head, table_strides(rel_h, rel_w, rpb), *plan.tail, **plan.options,
    )
    return out, lse
