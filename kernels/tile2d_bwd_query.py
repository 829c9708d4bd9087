"""Backward kernel 1 of the "tile2dbwd" family (CUDA cores, query-owned): dq, the
(lse, delta) pairs for kernel 2, and per-program partials of the table gradients.

What a program owns: a BLOCK_H x BLOCK_W tile of query pixels of one image with all its
heads (BLOCK_N = next_pow2(heads)), as [P, N, D] tiles (P = BLOCK_H * BLOCK_W pixels,
D = next_pow2(d) channels; a (pixel, head) row is one vector load, held by one thread or
a few lanes). It loads q, out, dout and lse once, writes aux = (lse * log2(e), delta =
rowsum(dout * out)) per (pixel, head) for the key kernel, and walks the window: rows in
a runtime loop, columns unrolled (tl.static_range). Per tap, with that tap's k and v
loaded for every pixel (masked, 0 outside the image):

    s  = q.k * scale * log2(e) + column bias[c] + row bias (+ rpb)     (log2 units)
    p  = exp2(s - lse2)            dp = dout . v            ds = p * (dp - delta)
    dq += ds * k

The rel bias is split: the column part q[d/2:] . rel_w[c] once per program and column,
the row part q[:d/2] . rel_h[a] once per window row. The rel part of dq and the table
gradients need G_row[a] (window-row sums of ds) and G_col[c] (window-column sums):
    dq += G_row[a] rel_h[a] + sum_c G_col[c] rel_w[c]   (times scale at the end)
and per program the partials sum_pixels(G_row[a] q[:d/2]) * scale (rel_h row a),
sum_pixels(G_col[c] q[d/2:]) * scale (rel_w row c) and sum_pixels(ds) (rpb tap (a, c)),
per head, in the [row, slot, column] layout of rows_bwd_query._reduce_tables_kernel
(slot = program * HEADS + head), which sums them in a fixed order: no atomics.

Non-finite values stay in their windows: every product is per (pixel, tap), and in mask
mode the products with taps outside the image are selected away (not multiplied by 0).

Supported: zeros and mask padding (shift: `supports` says no), dilation, odd kh / kw
(kw <= 15: the columns are unrolled), shared / per-head rel tables, rpb, fp16 / bf16 /
fp32, next_pow2(heads) * next_pow2(d) <= 256. Any strides; 64-bit offsets where needed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E, to_f32


@triton.jit
def _load_rows(ptr, o_pix, o_nd, m_pix, m_nd, VEC: tl.constexpr):
    """float32 [P, N, D] tile: the (head, channel) rows of pixels at offsets o_pix [P]
    (multiples of VEC elements, as o_nd's head offsets: VEC channels per vector load)."""
    o_pix = tl.multiple_of(o_pix, VEC)
    b = tl.load(ptr + o_pix[:, None, None] + o_nd[None, :, :],
                mask=m_pix[:, None, None] & m_nd[None, :, :], other=0.0)
    return to_f32(b)


@triton.jit
def _halves(t):
    """The lower and upper channel halves of a [P, N, D] tile (registers only)."""
    shape: tl.constexpr = [t.shape[0], t.shape[1], 2, t.shape[2] // 2]
    return tl.split(tl.permute(tl.reshape(t, shape), (0, 1, 3, 2)))


@triton.jit
def _tile2d_bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
    dq_ptr, aux_ptr, parth_ptr, partw_ptr, partb_ptr,
    H, W, HEADS, TILES_W, TILES, N_SLOTS,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    sdq_b, sdq_h, sdq_w, sdq_n, sdq_d,
    dil_h, dil_w, qk_scale, scale,  # qk_scale = scale * log2(e)
    D: tl.constexpr, D_HALF: tl.constexpr,  # constexpr: channel masks stay per vector
    KH: tl.constexpr, KW: tl.constexpr, MASK: tl.constexpr,  # MASK: mask padding, else zeros
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IMG_I64: tl.constexpr, VEC: tl.constexpr,
):
    P: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    b = (pid // TILES).to(tl.int64)
    t = pid % TILES
    o_p = tl.arange(0, P)
    y = (t // TILES_W) * BLOCK_H + o_p // BLOCK_W  # [P]
    x = (t % TILES_W) * BLOCK_W + o_p % BLOCK_W
    m_p = (y < H) & (x < W)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < HEADS
    m_nd = m_n[:, None] & (o_d < D)[None, :]  # [N, D]
    if IMG_I64:  # offsets inside one image can pass 2**31
        yi = y.to(tl.int64)
        xi = x.to(tl.int64)
        o_nr = o_n.to(tl.int64)
    else:
        yi = y
        xi = x
        o_nr = o_n

    o_qnd = tl.multiple_of(o_nr * sq_n, VEC)[:, None] + o_d[None, :] * sq_d
    b_q = _load_rows(q_ptr + b * sq_b, yi * sq_h + xi * sq_w, o_qnd, m_p, m_nd, VEC)
    b_o = _load_rows(o_ptr + b * so_b, yi * so_h + xi * so_w,
                     tl.multiple_of(o_nr * so_n, VEC)[:, None] + o_d[None, :] * so_d, m_p, m_nd, VEC)
    b_do = _load_rows(do_ptr + b * sdo_b, yi * sdo_h + xi * sdo_w,
                      tl.multiple_of(o_nr * sdo_n, VEC)[:, None] + o_d[None, :] * sdo_d, m_p, m_nd, VEC)
    m_pn = m_p[:, None] & m_n[None, :]  # [P, N]
    b_lse2 = tl.load(lse_ptr + b * sl_b + (yi * sl_h + xi * sl_w)[:, None]
                     + (o_nr * sl_n)[None, :], mask=m_pn, other=0.0) * LOG2E
    b_delta = tl.sum(b_do * b_o, axis=2)  # [P, N]
    # aux: contiguous (B, H, W, HEADS, 2) float32, (lse2, delta) side by side
    o_aux = ((b * H + y) * W + x) * HEADS  # [P] int64
    p_aux = aux_ptr + (o_aux[:, None] + o_n[None, :]) * 2
    tl.store(p_aux, b_lse2, mask=m_pn)
    tl.store(p_aux + 1, b_delta, mask=m_pn)

    b_qs = b_q * qk_scale  # logits in log2 units
    m_dh = m_nd & (o_d < D_HALF)[None, :]  # [N, D]: channels meeting rel_h
    m_dw = m_nd & (o_d >= D_HALF)[None, :]  # channels meeting rel_w
    o_rh = o_n[:, None] * srh_n + o_d[None, :] * srh_d
    o_rw = o_n[:, None] * srw_n + (o_d[None, :] - D_HALF) * srw_d
    # per window column c: the column rel part of the logits and whether the tap is inside
    seeds = ()
    col_ok = ()
    for c in tl.static_range(KW):
        xk = x + (c - KW // 2) * dil_w
        col_ok = col_ok + ((xk >= 0) & (xk < W),)
        if HAS_REL:
            b_rw = tl.load(relw_ptr + c * srw_r + o_rw, mask=m_dw, other=0.0).to(tl.float32)
            seeds = seeds + (tl.sum(b_qs * b_rw[None, :, :], axis=2) - b_lse2,)
        else:
            seeds = seeds + (-b_lse2,)

    p_k0 = k_ptr + b * sk_b
    p_v0 = v_ptr + b * sv_b
    o_kp = yi * sk_h + xi * sk_w  # [P] the pixel's own position
    o_vp = yi * sv_h + xi * sv_w
    o_knd = tl.multiple_of(o_nr * sk_n, VEC)[:, None] + o_d[None, :] * sk_d  # [N, D]
    o_vnd = tl.multiple_of(o_nr * sv_n, VEC)[:, None] + o_d[None, :] * sv_d
    b_acc = tl.zeros([P, BLOCK_N, BLOCK_D], dtype=tl.float32)  # dq / scale
    gcols = ()
    for c in tl.static_range(KW):
        gcols = gcols + (tl.zeros([P, BLOCK_N], dtype=tl.float32),)
    slot = pid.to(tl.int64) * HEADS + o_n  # [N]: partial slot of (program, head)
    for a in range(KH):
        dy = (a - KH // 2) * dil_h
        yk = y + dy
        m_row = m_p & (yk >= 0) & (yk < H)
        if HAS_REL:
            b_rh = tl.load(relh_ptr + a * srh_r + o_rh, mask=m_dh, other=0.0).to(tl.float32)
            b_srow = tl.sum(b_qs * b_rh[None, :, :], axis=2)  # [P, N]
        else:
            b_srow = tl.zeros([P, BLOCK_N], dtype=tl.float32)
        grow = tl.zeros([P, BLOCK_N], dtype=tl.float32)
        new_gcols = ()
        for c in tl.static_range(KW):
            dx = (c - KW // 2) * dil_w
            m_tap = m_row & col_ok[c]
            b_k = _load_rows(p_k0, o_kp + (dy * sk_h + dx * sk_w), o_knd, m_tap, m_nd, VEC)
            b_v = _load_rows(p_v0, o_vp + (dy * sv_h + dx * sv_w), o_vnd, m_tap, m_nd, VEC)
            b_s = tl.sum(b_qs * b_k, axis=2) + seeds[c] + b_srow  # [P, N]
            if HAS_RPB:
                b_rpb = tl.load(rpb_ptr + o_n * srp_n + (a + KH // 2) * srp_h
                                + (c + KW // 2) * srp_w, mask=m_n, other=0.0)
                b_s += (b_rpb.to(tl.float32) * LOG2E)[None, :]
            b_p = tl.exp2(b_s)
            if MASK:  # taps outside the image drop out
                b_p = tl.where(m_tap[:, None], b_p, 0.0)
            b_dp = tl.sum(b_do * b_v, axis=2)
            b_ds = b_p * (b_dp - b_delta)  # [P, N]
            b_acc += b_ds[:, :, None] * b_k
            if HAS_REL:
                grow += b_ds
                new_gcols = new_gcols + (gcols[c] + b_ds,)
            if HAS_RPB:
                if MASK:
                    b_ds = tl.where(m_tap[:, None], b_ds, 0.0)
                else:
                    b_ds = tl.where(m_p[:, None], b_ds, 0.0)
                tl.store(partb_ptr + (a * N_SLOTS + slot) * KW + c, tl.sum(b_ds, axis=0),
                         mask=m_n)
        if HAS_REL:
            gcols = new_gcols
            b_prod = grow[:, :, None] * b_rh[None, :, :]
            b_part = grow[:, :, None] * b_q
            if MASK:  # a row outside the image meets neither rel_h[a] nor its q
                m_r = m_row[:, None, None]
                b_prod = tl.where(m_r, b_prod, 0.0)
                b_part = tl.where(m_r, b_part, 0.0)
            b_acc += b_prod
            b_part = tl.sum(b_part, axis=0) * scale  # [N, D]
            tl.store(parth_ptr + (a * N_SLOTS + slot)[:, None] * D_HALF + o_d[None, :],
                     b_part, mask=m_dh)
    if HAS_REL:
        for c in tl.static_range(KW):
            b_rw = tl.load(relw_ptr + c * srw_r + o_rw, mask=m_dw, other=0.0).to(tl.float32)
            b_prod = gcols[c][:, :, None] * b_rw[None, :, :]
            b_part = gcols[c][:, :, None] * b_q
            if MASK:
                m_c = (m_p & col_ok[c])[:, None, None]
                b_prod = tl.where(m_c, b_prod, 0.0)
                b_part = tl.where(m_c, b_part, 0.0)
            b_acc += b_prod
            b_part = tl.sum(b_part, axis=0) * scale
            tl.store(partw_ptr + (c * N_SLOTS + slot)[:, None] * (D - D_HALF)
                     + (o_d[None, :] - D_HALF), b_part, mask=m_dw)
    b_dq = b_acc * scale
    tl.store(dq_ptr + b * sdq_b + tl.multiple_of(yi * sdq_h + xi * sdq_w, VEC)[:, None, None]
             + (tl.multiple_of(o_nr * sdq_n, VEC)[:, None] + o_d[None, :] * sdq_d)[None, :, :],
             b_dq.to(dq_ptr.dtype.element_ty), mask=m_p[:, None, None] & m_nd[None, :, :])
