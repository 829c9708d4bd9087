"""Backward kernel 2 of the "tile2dbwd" family (CUDA cores, key-owned): dk and dv.

What a program owns: a BLOCK_H x BLOCK_W tile of key pixels of one image with all its
heads, as [P, N, D] tiles like the query kernel (kernels/tile2d_bwd_query.py). It loads
their k and v once and walks the inverse neighbourhood: with zeros / mask padding the
queries whose windows hold key (y, x) at tap (a, c) are (y - (a - kh//2) dh,
x - (c - kw//2) dw), rows in a runtime loop, columns unrolled. Per tap it loads that
query's q, dout and the (lse * log2(e), delta) pair the query kernel wrote (one 8-byte
load), and computes

    s   = q . (k + [rel_h[a], rel_w[c]]) * scale * log2(e) (+ rpb) - lse2
    p   = exp2(s)   (0 for a query outside the image)
    dv += p * dout        dp = dout . v        dk += p * (dp - delta) * q

(times scale at the end). The rel rows enter as the key's "effective" k: k + rel_h[a]
once per window row, + rel_w[c] per tap. Keys outside the image (zeros padding) have no
gradient; every dk / dv element is written by one program (no atomics).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E
from .tile2d_bwd_query import _halves, _load_rows


@triton.jit
def _tile2d_bwd_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, aux_ptr, relh_ptr, relw_ptr, rpb_ptr, dk_ptr, dv_ptr,
    H, W, HEADS, TILES_W, TILES,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    sdk_b, sdk_h, sdk_w, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_w, sdv_n, sdv_d,
    dil_h, dil_w, qk_scale, scale,  # qk_scale = scale * log2(e)
    D: tl.constexpr, D_HALF: tl.constexpr,  # constexpr: channel masks stay per vector
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IMG_I64: tl.constexpr, VEC: tl.constexpr, HALVES: tl.constexpr,
):
    P: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    b = (pid // TILES).to(tl.int64)
    t = pid % TILES
    o_p = tl.arange(0, P)
    y = (t // TILES_W) * BLOCK_H + o_p // BLOCK_W  # [P] key pixels
    x = (t % TILES_W) * BLOCK_W + o_p % BLOCK_W
    m_p = (y < H) & (x < W)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < HEADS
    m_nd = m_n[:, None] & (o_d < D)[None, :]  # [N, D]
    if IMG_I64:
        yi = y.to(tl.int64)
        xi = x.to(tl.int64)
        o_nr = o_n.to(tl.int64)
    else:
        yi = y
        xi = x
        o_nr = o_n

    b_k = _load_rows(k_ptr + b * sk_b, yi * sk_h + xi * sk_w,
                     tl.multiple_of(o_nr * sk_n, VEC)[:, None] + o_d[None, :] * sk_d, m_p, m_nd, VEC)
    b_v = _load_rows(v_ptr + b * sv_b, yi * sv_h + xi * sv_w,
                     tl.multiple_of(o_nr * sv_n, VEC)[:, None] + o_d[None, :] * sv_d, m_p, m_nd, VEC)
    m_dh = m_nd & (o_d < D_HALF)[None, :]
    m_dw = m_nd & (o_d >= D_HALF)[None, :]
    o_rh = o_n[:, None] * srh_n + o_d[None, :] * srh_d
    o_rw = o_n[:, None] * srw_n + (o_d[None, :] - D_HALF) * srw_d
    # HALVES (the launcher's flag: d a power of two > 1 held by one thread): the halves
    # split in registers, per tap the logit is q[:d/2] . (k[:d/2] + rel_h[a]) +
    # q[d/2:] . (k[d/2:] + rel_w[c]), the first effective half made once per window row,
    # the KW second ones once per program (no per-tap adds)
    o_p0 = (o_p * 0)[:, None, None]  # a table row loaded in the [P, N, D] tiles' layout
    col_ok = ()
    rws = ()
    if HALVES:
        k_lo, k_hi = _halves(b_k)
    for c in tl.static_range(KW):
        xq = x - (c - KW // 2) * dil_w
        col_ok = col_ok + ((xq >= 0) & (xq < W),)
        if HAS_REL:  # rel_w[c] in the upper channels
            b_rw = tl.load(relw_ptr + c * srw_r + o_p0 + o_rw[None, :, :], mask=m_dw[None, :, :],
                           other=0.0).to(tl.float32)
            if HALVES:
                rw_lo, rw_hi = _halves(b_rw)
                rws = rws + (k_hi + rw_hi,)
            else:
                rws = rws + (b_rw,)
        else:
            rws = rws + (0.0,)

    p_q0 = q_ptr + b * sq_b
    p_do0 = do_ptr + b * sdo_b
    o_qp = yi * sq_h + xi * sq_w  # [P] the key's own position
    o_dop = yi * sdo_h + xi * sdo_w
    o_qnd = tl.multiple_of(o_nr * sq_n, VEC)[:, None] + o_d[None, :] * sq_d
    o_dond = tl.multiple_of(o_nr * sdo_n, VEC)[:, None] + o_d[None, :] * sdo_d
    p_aux0 = aux_ptr + b * H * W * HEADS * 2
    o_auxp = ((yi * W + xi) * HEADS)[:, None] * 2 + (o_n * 2)[None, :]  # [P, N]
    b_dk = tl.zeros([P, BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([P, BLOCK_N, BLOCK_D], dtype=tl.float32)
    for a in range(KH):
        dy = (a - KH // 2) * dil_h
        yq = y - dy
        m_row = m_p & (yq >= 0) & (yq < H)
        if HAS_REL:
            b_rh = tl.load(relh_ptr + a * srh_r + o_p0 + o_rh[None, :, :], mask=m_dh[None, :, :],
                           other=0.0).to(tl.float32)
            if HALVES:
                rh_lo, rh_hi = _halves(b_rh)
                b_krow = k_lo + rh_lo
            else:
                b_krow = b_k + b_rh
        else:
            b_krow = b_k
        for c in tl.static_range(KW):
            dx = (c - KW // 2) * dil_w
            m_q = m_row & col_ok[c]
            b_q = _load_rows(p_q0, o_qp - (dy * sq_h + dx * sq_w), o_qnd, m_q, m_nd, VEC)
            b_do = _load_rows(p_do0, o_dop - (dy * sdo_h + dx * sdo_w), o_dond, m_q, m_nd, VEC)
            o_aux = o_auxp - (dy * W + dx) * (HEADS * 2)  # [P, N]
            b_aux = tl.load(p_aux0 + o_aux[:, :, None] + tl.arange(0, 2)[None, None, :],
                            mask=(m_q[:, None] & m_n[None, :])[:, :, None], other=0.0)
            b_lse2, b_delta = tl.split(b_aux)  # [P, N] each
            if HALVES:
                q_lo, q_hi = _halves(b_q)
                b_s = tl.sum(q_lo * b_krow, axis=2) + tl.sum(q_hi * rws[c], axis=2)
            elif HAS_REL:
                b_s = tl.sum(b_q * (b_krow + rws[c]), axis=2)
            else:
                b_s = tl.sum(b_q * b_krow, axis=2)
            b_s = b_s * qk_scale - b_lse2
            if HAS_RPB:
                b_rpb = tl.load(rpb_ptr + o_n * srp_n + (a + KH // 2) * srp_h
                                + (c + KW // 2) * srp_w, mask=m_n, other=0.0)
                b_s += (b_rpb.to(tl.float32) * LOG2E)[None, :]
            b_p = tl.where(m_q[:, None], tl.exp2(b_s), 0.0)  # [P, N]
            b_dv += b_p[:, :, None] * b_do
            b_dp = tl.sum(b_do * b_v, axis=2)
            b_dk += (b_p * (b_dp - b_delta))[:, :, None] * b_q
    m_out = m_p[:, None, None] & m_nd[None, :, :]
    tl.store(dk_ptr + b * sdk_b + tl.multiple_of(yi * sdk_h + xi * sdk_w, VEC)[:, None, None]
             + (tl.multiple_of(o_nr * sdk_n, VEC)[:, None] + o_d[None, :] * sdk_d)[None, :, :],
             (b_dk * scale).to(dk_ptr.dtype.element_ty), mask=m_out)
    tl.store(dv_ptr + b * sdv_b + tl.multiple_of(yi * sdv_h + xi * sdv_w, VEC)[:, None, None]
             + (tl.multiple_of(o_nr * sdv_n, VEC)[:, None] + o_d[None, :] * sdv_d)[None, :, :],
             b_dv.to(dv_ptr.dtype.element_ty), mask=m_out)
