"""imagebwd's non-finite slow pass: exact gradients of a (batch, head) image whose
tensor-core results came out non-finite.

`exact_gradients` runs inside `_image_bwd_kernel` (kernels/image_bwd.py), in a loop of
0 trips unless that program's sum of dq / dk / dv / partials is NaN or inf (which the
dots may have spread outside the windows that hold them, through 0 * inf); then 1 trip,
after a barrier, overwriting what the program stored. It walks the queries one at a
time, CUDA cores only: per query it loads the keys, values and table rows of its window
(key space: every in-image key, masked by the window geometry; zeros mode's
out-of-image taps apart, in tap space), and every product is behind a `where` on the
window, so a non-finite value reaches only the gradients of the windows that hold it
(the float64 oracle's pattern). dk, dv and the partials accumulate in registers in query
order: deterministic. It overwrites dq rows as it goes and dk, dv and the partials at
the end.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E, window_start


@triton.jit
def _axis_taps(p, i, size, dil, K: tl.constexpr, SHIFT: tl.constexpr):
    """Along one axis, for query coordinate i (scalar) and key coordinates p (vector):
    (in the window, window index a, rel index (p - i) // dil + K - 1)."""
    s, off = window_start(i, size, K, dil, SHIFT)
    d = p - s
    a = tl.where(d >= 0, d, 0) // dil
    inside = (d >= 0) & (d == a * dil) & (a < K)
    return inside, a, off + a + K - 1


@triton.jit
def _key_rows(k0, sk_h, sk_w, sk_d, relh_ptr, relw_ptr, n, srh_n, srh_r, srh_d, srw_n, srw_r,
              srw_d, yk, xk, row, col, m, o_c, D, D_HALF, HAS_REL: tl.constexpr,
              HAS_K: tl.constexpr):
    """[rows, channels o_c] k (HAS_K) plus the rel row / column of each, 0 where m is
    False (never read there)."""
    m_rc = m[:, None] & (o_c < D)[None, :]
    if HAS_K:
        b = tl.load(k0 + yk[:, None] * sk_h + xk[:, None] * sk_w + o_c[None, :] * sk_d,
                    mask=m_rc, other=0.0).to(tl.float32)
    else:
        b = tl.where(m_rc, 0.0, 0.0)
    if HAS_REL:  # rel_h[row] on the first d / 2 channels, rel_w[col] on the rest
        h = o_c < D_HALF
        b += tl.load(relh_ptr + n * srh_n + row[:, None] * srh_r + o_c[None, :] * srh_d,
                     mask=m_rc & h[None, :], other=0.0).to(tl.float32)
        b += tl.load(relw_ptr + n * srw_n + col[:, None] * srw_r + (o_c - D_HALF)[None, :] * srw_d,
                     mask=m_rc & (~h)[None, :], other=0.0).to(tl.float32)
    return b


@triton.jit
def exact_gradients(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
    dq_ptr, dk_ptr, dv_ptr, parth_ptr, partw_ptr, partb_ptr, pid, n, b, flagged,
    H, W, D, D_HALF, n_slots,
    sq_b, sq_h, sq_w, sq_n, sq_d, sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d, so_b, so_h, so_w, so_n, so_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h, sl_w, sl_n, sg_b, sg_h, sg_w, sg_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    dil_h, dil_w, scale,
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    E_PAD: tl.constexpr, TAP_X: tl.constexpr, TAP_N: tl.constexpr, OFF_I64: tl.constexpr,
    ZT_N: tl.constexpr, DC: tl.constexpr,
):
    """Exact dq, dk, dv and partial slot `pid` of image (b, n) (module docstring);
    ZT_N: kh * kw padded; DC: channels per chunk of the key tiles."""
    ZEROS: tl.constexpr = PADDING == 0
    SHIFT: tl.constexpr = PADDING == 2
    if SHIFT:
        TH: tl.constexpr = 2 * KH - 1
        TW: tl.constexpr = 2 * KW - 1
    else:
        TH: tl.constexpr = KH
        TW: tl.constexpr = KW
    if OFF_I64:
        n64 = n.to(tl.int64)
        b64 = b.to(tl.int64)
    else:
        n64 = n
        b64 = b
    q0 = q_ptr + b64 * sq_b + n64 * sq_n
    k0 = k_ptr + b64 * sk_b + n64 * sk_n
    v0 = v_ptr + b64 * sv_b + n64 * sv_n
    o0 = o_ptr + b64 * so_b + n64 * so_n
    do0 = do_ptr + b64 * sdo_b + n64 * sdo_n
    l0 = lse_ptr + b64 * sl_b + n64 * sl_n
    g_off = b64 * sg_b + n64 * sg_n
    o_p = tl.arange(0, BLOCK_N)  # keys: pixel p = y * BLOCK_X + x
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    yk = o_p // BLOCK_X
    xk = o_p % BLOCK_X
    m_k = (yk < H) & (xk < W)
    if OFF_I64:
        yk_o = yk.to(tl.int64)
        xk_o = xk.to(tl.int64)
    else:
        yk_o = yk
        xk_o = xk
    m_kd = m_k[:, None] & m_d[None, :]
    h_half = o_d < D_HALF  # rel_h channels; the rest rel_w's
    o_e = tl.arange(0, E_PAD)
    o_t = tl.arange(0, ZT_N)  # zeros mode's taps
    ta = o_t // KW
    tc = o_t % KW
    g_pix = yk_o[:, None] * sg_h + xk_o[:, None] * sg_w + o_d[None, :]
    acc_ph = tl.zeros((E_PAD, BLOCK_D), tl.float32)
    acc_pw = tl.zeros((E_PAD, BLOCK_D), tl.float32)
    acc_pb = tl.zeros((TAP_N,), tl.float32)
    for PASS in range(0, tl.where(flagged, 2, 0)):  # dv, dq and partials; then dk (fewer live tiles)
        acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for i in range(0, H * W):
            yi = i // W
            xi = i % W
            if OFF_I64:
                yi = yi.to(tl.int64)
                xi = xi.to(tl.int64)
            b_q = tl.load(q0 + yi * sq_h + xi * sq_w + o_d * sq_d, mask=m_d, other=0.0).to(tl.float32)
            b_do = tl.load(do0 + yi * sdo_h + xi * sdo_w + o_d * sdo_d, mask=m_d,
                           other=0.0).to(tl.float32)
            b_o = tl.load(o0 + yi * so_h + xi * so_w + o_d * so_d, mask=m_d, other=0.0).to(tl.float32)
            lse = tl.load(l0 + yi * sl_h + xi * sl_w)
            delta = tl.sum(b_do * b_o, axis=0)
            in_y, a_y, r_y = _axis_taps(yk, yi, H, dil_h, KH, SHIFT)
            in_x, a_x, r_x = _axis_taps(xk, xi, W, dil_w, KW, SHIFT)
            win = in_y & in_x & m_k
            m_wd = win[:, None] & m_d[None, :]
            if SHIFT:
                row = r_y
                col = r_x
            else:
                row = a_y
                col = a_x
            if ZEROS and (HAS_REL or HAS_RPB):  # out-of-image taps: k = v = 0, tables only
                sy, offy = window_start(yi, H, KH, dil_h, False)
                sx, offx = window_start(xi, W, KW, dil_w, False)
                ty = sy + ta * dil_h
                tx = sx + tc * dil_w
                z = (o_t < KH * KW) & ~((ty >= 0) & (ty < H) & (tx >= 0) & (tx < W))
            else:
                z = o_t < 0
            # logits and dP, channel chunks of DC (fewer live registers at d 128)
            b_s = tl.zeros((BLOCK_N,), tl.float32)
            b_dp = tl.zeros((BLOCK_N,), tl.float32)
            b_zs = tl.zeros((ZT_N,), tl.float32)
            for c0 in range(0, BLOCK_D, DC):
                o_c = c0 + tl.arange(0, DC)
                m_c = o_c < D
                q_c = tl.load(q0 + yi * sq_h + xi * sq_w + o_c * sq_d, mask=m_c,
                              other=0.0).to(tl.float32)
                do_c = tl.load(do0 + yi * sdo_h + xi * sdo_w + o_c * sdo_d, mask=m_c,
                               other=0.0).to(tl.float32)
                b_kr = _key_rows(k0, sk_h, sk_w, sk_d, relh_ptr, relw_ptr, n, srh_n, srh_r,
                                 srh_d, srw_n, srw_r, srw_d, yk_o, xk_o, row, col, win, o_c,
                                 D, D_HALF, HAS_REL, True)
                b_s += tl.sum(q_c[None, :] * b_kr, axis=1)
                b_v = tl.load(v0 + yk_o[:, None] * sv_h + xk_o[:, None] * sv_w
                              + o_c[None, :] * sv_d, mask=win[:, None] & m_c[None, :],
                              other=0.0).to(tl.float32)
                b_dp += tl.sum(do_c[None, :] * b_v, axis=1)
                if ZEROS and HAS_REL:
                    b_zr = _key_rows(k0, sk_h, sk_w, sk_d, relh_ptr, relw_ptr, n, srh_n,
                                     srh_r, srh_d, srw_n, srw_r, srw_d, ta, tc, ta, tc, z,
                                     o_c, D, D_HALF, HAS_REL, False)
                    b_zs += tl.sum(q_c[None, :] * b_zr, axis=1)
            b_s = b_s * scale
            if HAS_RPB:
                b_s += tl.load(rpb_ptr + n * srp_n + r_y * srp_h + r_x * srp_w, mask=win,
                               other=0.0).to(tl.float32)
            b_p = tl.where(win, tl.exp2((b_s - lse) * LOG2E), 0.0)
            b_ds = tl.where(win, b_p * (b_dp - delta), 0.0)
            if ZEROS and (HAS_REL or HAS_RPB):
                b_zs = b_zs * scale
                if HAS_RPB:
                    zy = offy + ta + KH - 1
                    zx = offx + tc + KW - 1
                    b_zs += tl.load(rpb_ptr + n * srp_n + zy * srp_h + zx * srp_w, mask=z,
                                    other=0.0).to(tl.float32)
                b_zds = tl.where(z, tl.exp2((b_zs - lse) * LOG2E) * (0.0 - delta), 0.0)
            if PASS == 0:
                acc += tl.where(m_wd, b_p[:, None] * b_do[None, :], 0.0)
                for c0 in range(0, BLOCK_D, DC):  # dq, chunk by chunk
                    o_c = c0 + tl.arange(0, DC)
                    m_c = o_c < D
                    b_kr = _key_rows(k0, sk_h, sk_w, sk_d, relh_ptr, relw_ptr, n, srh_n,
                                     srh_r, srh_d, srw_n, srw_r, srw_d, yk_o, xk_o, row, col,
                                     win, o_c, D, D_HALF, HAS_REL, True)
                    dq_c = tl.sum(tl.where(win[:, None], b_ds[:, None] * b_kr, 0.0), axis=0)
                    if ZEROS and HAS_REL:
                        b_zr = _key_rows(k0, sk_h, sk_w, sk_d, relh_ptr, relw_ptr, n, srh_n,
                                         srh_r, srh_d, srw_n, srw_r, srw_d, ta, tc, ta, tc, z,
                                         o_c, D, D_HALF, HAS_REL, False)
                        dq_c += tl.sum(tl.where(z[:, None], b_zds[:, None] * b_zr, 0.0), axis=0)
                    tl.store(dq_ptr + g_off + yi * sg_h + xi * sg_w + o_c,
                             (dq_c * scale).to(dq_ptr.dtype.element_ty), mask=m_c)
                if HAS_REL:  # per rel row / column: dS sum and whether any tap uses it
                    on_h = win[:, None] & (row[:, None] == o_e[None, :])
                    on_w = win[:, None] & (col[:, None] == o_e[None, :])
                    g_h = tl.sum(tl.where(on_h, b_ds[:, None], 0.0), axis=0)
                    g_w = tl.sum(tl.where(on_w, b_ds[:, None], 0.0), axis=0)
                    c_h = tl.sum(on_h.to(tl.int32), axis=0)
                    c_w = tl.sum(on_w.to(tl.int32), axis=0)
                    if ZEROS:
                        zon_h = z[:, None] & (ta[:, None] == o_e[None, :])
                        zon_w = z[:, None] & (tc[:, None] == o_e[None, :])
                        g_h += tl.sum(tl.where(zon_h, b_zds[:, None], 0.0), axis=0)
                        g_w += tl.sum(tl.where(zon_w, b_zds[:, None], 0.0), axis=0)
                        c_h += tl.sum(zon_h.to(tl.int32), axis=0)
                        c_w += tl.sum(zon_w.to(tl.int32), axis=0)
                    # only rows some tap uses see q (a NaN q elsewhere stays out)
                    acc_ph += tl.where((c_h > 0)[:, None] & m_d[None, :],
                                       g_h[:, None] * b_q[None, :], 0.0)
                    acc_pw += tl.where((c_w > 0)[:, None] & m_d[None, :],
                                       g_w[:, None] * b_q[None, :], 0.0)
                if HAS_RPB:  # partial slots: rel rows / columns (tap slots)
                    o_s = tl.arange(0, TAP_N)
                    on_b = win[:, None] & ((row * TAP_X + col)[:, None] == o_s[None, :])
                    acc_pb += tl.sum(tl.where(on_b, b_ds[:, None], 0.0), axis=0)
                    if ZEROS:
                        zon_b = z[:, None] & ((ta * TAP_X + tc)[:, None] == o_s[None, :])
                        acc_pb += tl.sum(tl.where(zon_b, b_zds[:, None], 0.0), axis=0)
            else:
                acc += tl.where(m_wd, b_ds[:, None] * b_q[None, :], 0.0)
        tl.store(dv_ptr + g_off + g_pix, acc.to(dv_ptr.dtype.element_ty), mask=m_kd & (PASS == 0))
        tl.store(dk_ptr + g_off + g_pix, (acc * scale).to(dk_ptr.dtype.element_ty),
                 mask=m_kd & (PASS == 1))
    if HAS_REL:
        if flagged:
            D_W = D - D_HALF
            tl.store(parth_ptr + (o_e[:, None] * n_slots + pid) * D_HALF + o_d[None, :],
                     acc_ph * scale, mask=(o_e < TH)[:, None] & h_half[None, :])
            tl.store(partw_ptr + (o_e[:, None] * n_slots + pid) * D_W + (o_d - D_HALF)[None, :],
                     acc_pw * scale, mask=(o_e < TW)[:, None] & ((~h_half) & m_d)[None, :])
    if HAS_RPB:
        if flagged:
            o_s = tl.arange(0, TAP_N)
            r = o_s // TAP_X
            s = o_s % TAP_X
            tl.store(partb_ptr + (r * n_slots + pid) * TW + s, acc_pb, mask=(r < TH) & (s < TW))
