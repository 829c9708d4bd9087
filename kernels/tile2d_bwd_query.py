"""Backward kernel 1 of the "tile2dbwd" family (CUDA cores, query-owned): dq, the
(lse * log2(e), delta) pairs for kernel 2, and per-program partials of the table gradients.

What a program owns: a BLOCK_H x BLOCK_W tile of query pixels of one image with all its
heads (BLOCK_N = next_pow2(heads)), as G = BLOCK_H * TW groups of PIX horizontally
adjacent pixels (PIX = 1, 2 or 4, BLOCK_W = TW * PIX). A thread holds one (group, head)
row of each pixel: [G, N, D] tiles, D = next_pow2(d) channels, one vector load per
(pixel, head) held by one thread (16-bit d <= 8) or a few lanes. It loads q, out, dout
and lse once, writes aux = (lse * log2(e), delta = rowsum(dout * out)) per (pixel, head)
for the key kernel, and walks the window: rows in a runtime loop, columns unrolled
(tl.static_range). Per window row it loads the KW + PIX - 1 k / v columns its groups'
windows cover, each once (pixel j meets column u at tap c = u - j: a pixel pair loads
KW + 1 columns instead of 2 KW), from per-row pointers stepped by compile-time column
immediates. Per (pixel, tap):

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
Where a head's channels lie in one thread and the tables split them evenly (HALF), the
rel dots and the partials work on channel halves split off in registers: d / 2
multiply-adds per rel dot and half tiles in the cross-thread partial sums.

Non-finite values stay in their windows: every product is per (pixel, tap), and in mask
mode the products with taps outside the image are selected away (not multiplied by 0).

Supported: zeros and mask padding (shift: `supports` says no), dilation (PIX = 1 with
column dilation), odd kh / kw (kw <= 15: the columns are unrolled), shared / per-head
rel tables, rpb, fp16 / bf16 / fp32, next_pow2(heads) * next_pow2(d) <= 256. Any
strides; 64-bit offsets where an image's offsets pass 2**31 (IMG_I64).
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
def _dot_chain(acc, a, b, N: tl.constexpr):
    """acc + sum(a * b) over the last axis (N values in one thread) of [G, N, D] tiles as
    one chain of fused multiply-adds: halves split off in registers, no tree."""
    if N == 1:
        return acc + tl.sum(a * b, axis=2)
    else:
        shape: tl.constexpr = [a.shape[0], a.shape[1], N // 2, 2]
        a_e, a_o = tl.split(tl.reshape(a, shape))
        b_e, b_o = tl.split(tl.reshape(b, shape))
        return _dot_chain(_dot_chain(acc, a_e, b_e, N // 2), a_o, b_o, N // 2)


@triton.jit
def _dot(acc, a, b, CHAIN: tl.constexpr):
    """acc + sum(a * b, axis=2): a multiply-add chain when a head's channels lie in one
    thread (CHAIN, the launcher's flag), else a (cross-lane) tree."""
    if CHAIN:
        return _dot_chain(acc, a, b, a.shape[2])
    else:
        return acc + tl.sum(a * b, axis=2)


@triton.jit
def _halves(t):
    """(lower, upper) channel halves of a [G, N, D] tile whose D channels lie in one
    thread: a reshape and split in registers, no data movement."""
    shape: tl.constexpr = [t.shape[0], t.shape[1], 2, t.shape[2] // 2]
    return tl.split(tl.permute(tl.reshape(t, shape), (0, 1, 3, 2)))


@triton.jit
def _add_half(t, prod, UPPER: tl.constexpr, HALF: tl.constexpr):
    """t + prod on t's lower (upper: UPPER) channel half, prod a half tile (HALF: the
    other half is left alone, no multiply-adds with zeros), else t + prod."""
    if HALF:
        lo, hi = _halves(t)
        if UPPER:
            hi = hi + prod
        else:
            lo = lo + prod
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), t.shape)
    else:
        return t + prod


@triton.jit
def _lower(t, HALF: tl.constexpr):
    """The lower channel half of t (HALF), else t (its upper half zero or unused)."""
    if HALF:
        lo, _hi = _halves(t)
        return lo
    else:
        return t


@triton.jit
def _upper(t, HALF: tl.constexpr):
    """The upper channel half of t (HALF), else t (its lower half zero or unused)."""
    if HALF:
        _lo, hi = _halves(t)
        return hi
    else:
        return t


@triton.jit
def _store_part(ptr, row, part, o_d, m_n, m_d, WIDTH: tl.constexpr, SHIFT: tl.constexpr,
                HALF: tl.constexpr):
    """One table partial [N, channels] at rows `row` [N] of a (rows, WIDTH) buffer: a
    half tile (HALF) or a full one whose channels SHIFT..SHIFT + WIDTH are stored."""
    if HALF:
        o_h = tl.arange(0, WIDTH)
        tl.store(ptr + row[:, None] * WIDTH + o_h[None, :], part, mask=m_n[:, None])
    else:
        tl.store(ptr + row[:, None] * WIDTH + (o_d[None, :] - SHIFT), part, mask=m_d)


@triton.jit
def _pixel_inputs(q_ptr, o_ptr, do_ptr, lse_ptr, aux_ptr, b, y, yi, x, m_y, H, W, HEADS,
                  o_qnd, o_ond, o_dond, o_n, m_n, m_nd, sq_h, sq_w, so_h, so_w, sdo_h, sdo_w,
                  sl_h, sl_w, sl_n, qk_scale, IMG_I64: tl.constexpr, VEC: tl.constexpr):
    """(q * scale * log2(e), dout, lse * log2(e), delta, pixel mask) of pixel column x of
    every group ([G] y, x); stores the (lse2, delta) pairs for the key kernel."""
    m_p = m_y & (x < W)
    if IMG_I64:
        xi = x.to(tl.int64)
    else:
        xi = x
    b_qs = _load_rows(q_ptr, yi * sq_h + xi * sq_w, o_qnd, m_p, m_nd, VEC) * qk_scale
    b_o = _load_rows(o_ptr, yi * so_h + xi * so_w, o_ond, m_p, m_nd, VEC)
    b_do = _load_rows(do_ptr, yi * sdo_h + xi * sdo_w, o_dond, m_p, m_nd, VEC)
    m_pn = m_p[:, None] & m_n[None, :]  # [G, N]
    b_lse2 = tl.load(lse_ptr + (yi * sl_h + xi * sl_w)[:, None] + (o_n * sl_n)[None, :],
                     mask=m_pn, other=0.0) * LOG2E
    b_delta = tl.sum(b_do * b_o, axis=2)  # [G, N]
    # aux: contiguous (B, H, W, HEADS, 2) float32, (lse2, delta) side by side
    p_aux = aux_ptr + (((b * H + y) * W + x) * HEADS)[:, None] * 2 + (o_n * 2)[None, :]
    tl.store(p_aux, b_lse2, mask=m_pn)
    tl.store(p_aux + 1, b_delta, mask=m_pn)
    return b_qs, b_do, b_lse2, b_delta, m_p


@triton.jit
def _tap(b_k, b_v, b_qs, b_do, b_delta, b_seed, m_tap, b_acc, MASK: tl.constexpr,
         CHAIN: tl.constexpr):
    """One window tap of one pixel column: (dq accumulator, ds [G, N])."""
    b_p = tl.exp2(_dot(b_seed, b_qs, b_k, CHAIN))
    if MASK:  # taps outside the image drop out
        b_p = tl.where(m_tap[:, None], b_p, 0.0)
    b_ds = b_p * _dot(-b_delta, b_do, b_v, CHAIN)
    return b_acc + b_ds[:, :, None] * b_k, b_ds


@triton.jit
def _store_dq(dq_ptr, b_acc, scale, yi, x, m_p, o_dqnd, m_nd, sdq_h, sdq_w,
              IMG_I64: tl.constexpr, VEC: tl.constexpr):
    if IMG_I64:
        xi = x.to(tl.int64)
    else:
        xi = x
    o = tl.multiple_of(yi * sdq_h + xi * sdq_w, VEC)
    tl.store(dq_ptr + o[:, None, None] + o_dqnd[None, :, :],
             (b_acc * scale).to(dq_ptr.dtype.element_ty),
             mask=m_p[:, None, None] & m_nd[None, :, :])


@triton.jit
def _tile2d_bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,  # absent: None
    dq_ptr, aux_ptr, parth_ptr, partw_ptr, partb_ptr,  # partials without their table: None
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, TILES_W, TILES, N_SLOTS)
    # (batch, row, column, head, channel) strides; v's even where they are k's (a flag
    # for that, as in the key kernel, cost ptxas 65 more registers and spills at s1)
    sq, sk, sv, so, sdo,
    sl,  # lse's (batch, row, column, head) strides
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    dil,  # (dil_h, dil_w)
    qk_scale, scale,  # qk_scale = scale * log2(e)
    D: tl.constexpr, D_HALF: tl.constexpr,  # constexpr: channel masks stay per vector
    KH: tl.constexpr, KW: tl.constexpr, MASK: tl.constexpr,  # MASK: mask padding, else zeros
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, TW: tl.constexpr, PIX: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IMG_I64: tl.constexpr, VEC: tl.constexpr,
    K_COL: tl.constexpr, V_COL: tl.constexpr,  # window column steps (elements)
    CHAIN: tl.constexpr,  # a head's channels in one thread: dots as multiply-add chains
):
    H, W, HEADS, TILES_W, TILES, N_SLOTS = sizes
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    sv_b, sv_h, sv_w, sv_n, sv_d = sv
    so_b, so_h, so_w, so_n, so_d = so
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d = sdo
    sl_b, sl_h, sl_w, sl_n = sl
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    dil_h, dil_w = dil
    # dq is the launcher's fresh contiguous tensor: its strides follow from the sizes
    # (tl.cast: H or W may be the constant 1; 64-bit from the row stride up)
    sdq_d = 1
    sdq_n = D
    sdq_w = HEADS * D
    if IMG_I64:
        sdq_h = tl.cast(W, tl.int64) * sdq_w
    else:  # offsets inside one image fit int32
        sdq_h = W * sdq_w
    sdq_b = H * sdq_h  # int32 unless IMG_I64: no product shared with aux's offsets
    # G pixel groups of PIX horizontally adjacent pixels (PIX = 2: column dilation 1);
    # pixel j of a group meets window column u = j + c at its tap c, so per window row
    # the group loads KW + PIX - 1 k / v columns, each serving up to PIX pixels
    G: tl.constexpr = BLOCK_H * TW
    NCOL: tl.constexpr = KW + PIX - 1
    # a head's channels in one thread, split evenly by the rel tables: the rel dots and
    # table partials on channel halves (fewer multiply-adds, half the partial reductions)
    HALF: tl.constexpr = CHAIN & (BLOCK_D == 2 * D_HALF)
    pid = tl.program_id(0)
    b = (pid // TILES).to(tl.int64)
    t = pid % TILES
    o_g = tl.arange(0, G)
    y = (t // TILES_W) * BLOCK_H + o_g // TW  # [G]
    x = (t % TILES_W) * (TW * PIX) + (o_g % TW) * PIX  # [G] the group's first pixel
    m_y = y < H
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
    o_ond = tl.multiple_of(o_nr * so_n, VEC)[:, None] + o_d[None, :] * so_d
    o_dond = tl.multiple_of(o_nr * sdo_n, VEC)[:, None] + o_d[None, :] * sdo_d
    p_q0 = q_ptr + b * sq_b
    p_o0 = o_ptr + b * so_b
    p_do0 = do_ptr + b * sdo_b
    p_l0 = lse_ptr + b * sl_b
    qss = ()  # per pixel j of the group: q * scale * log2(e), dout, lse2, delta, mask
    dos = ()
    lses = ()
    deltas = ()
    m_ps = ()
    for j in tl.static_range(PIX):
        b_qs, b_do, b_lse, b_delta, m_p = _pixel_inputs(
            p_q0, p_o0, p_do0, p_l0, aux_ptr, b, y, yi, x + j, m_y, H, W, HEADS, o_qnd,
            o_ond, o_dond, o_n, m_n, m_nd, sq_h, sq_w, so_h, so_w, sdo_h, sdo_w, sl_h,
            sl_w, sl_n, qk_scale, IMG_I64, VEC)
        qss = qss + (b_qs,)
        dos = dos + (b_do,)
        lses = lses + (b_lse,)
        deltas = deltas + (b_delta,)
        m_ps = m_ps + (m_p,)

    m_dh = m_nd & (o_d < D_HALF)[None, :]  # [N, D]: channels meeting rel_h
    m_dw = m_nd & (o_d >= D_HALF)[None, :]  # channels meeting rel_w
    o_g0 = (o_g * 0)[:, None, None]  # a table row loaded in the [G, N, D] tiles' layout
    o_rh = o_g0 + (o_n[:, None] * srh_n + o_d[None, :] * srh_d)[None, :, :]
    o_rw = o_g0 + (o_n[:, None] * srw_n + (o_d[None, :] - D_HALF) * srw_d)[None, :, :]
    # per pixel j and tap c (flat, j * KW + c): the column rel part of the logit less
    # lse2 (the chain's seed)
    zero_gn = tl.zeros([G, BLOCK_N], dtype=tl.float32)
    seeds = ()
    for j in tl.static_range(PIX):
        for c in tl.static_range(KW):
            if HAS_REL:
                b_rw = tl.load(relw_ptr + c * srw_r + o_rw, mask=m_dw[None, :, :],
                               other=0.0).to(tl.float32)
                seeds = seeds + (_dot(-lses[j], _upper(qss[j], HALF), _upper(b_rw, HALF),
                                      CHAIN),)
            else:
                seeds = seeds + (-lses[j],)

    p_k0 = k_ptr + b * sk_b
    p_v0 = v_ptr + b * sv_b
    o_kp = yi * sk_h + xi * sk_w  # [G] the group's first pixel
    o_vp = yi * sv_h + xi * sv_w
    o_knd = tl.multiple_of(o_nr * sk_n, VEC)[:, None] + o_d[None, :] * sk_d  # [N, D]
    o_vnd = tl.multiple_of(o_nr * sv_n, VEC)[:, None] + o_d[None, :] * sv_d
    zero = tl.zeros([G, BLOCK_N, BLOCK_D], dtype=tl.float32)
    accs = ()  # dq / scale per pixel
    for _j in tl.static_range(PIX):
        accs = accs + (zero,)
    gs = ()  # G_col per pixel and tap (flat, j * KW + c)
    for _i in tl.static_range(PIX * KW):
        gs = gs + (zero_gn,)
    opq = pid * 0  # 0; with quads opaque to the compiler after the loop (below)
    for a in range(KH):
        if PIX > 2:
            opq = tl.where(W > 0, opq, 1)  # W > 0: stays 0
        slot = pid.to(tl.int64) * HEADS + o_n  # [N]: partial slot of (program, head)
        dy = (a - KH // 2) * dil_h
        yk = y + dy
        m_row = m_y & (yk >= 0) & (yk < H)
        srows = ()  # per pixel: the row rel part of the logit
        growz = ()  # per pixel: G_row[a], the window row's sum of ds
        for _j in tl.static_range(PIX):
            growz = growz + (zero_gn,)
        if HAS_REL:
            b_rh = tl.load(relh_ptr + a * srh_r + o_rh, mask=m_dh[None, :, :],
                           other=0.0).to(tl.float32)
            for j in tl.static_range(PIX):
                srows = srows + (_dot(zero_gn, _lower(qss[j], HALF), _lower(b_rh, HALF),
                                      CHAIN),)  # [G, N]
        else:
            srows = growz
        grows = growz
        pbs = ()  # rpb: per tap, the ds summed over the pixels met so far
        for _c in tl.static_range(KW):
            pbs = pbs + (zero_gn,)
        # the row's pointers once; the window columns step by compile-time immediates
        p_kr = p_k0 + tl.multiple_of(o_kp + dy * sk_h, VEC)[:, None, None] + o_knd[None, :, :]
        p_vr = p_v0 + tl.multiple_of(o_vp + dy * sv_h, VEC)[:, None, None] + o_vnd[None, :, :]
        for u in tl.static_range(NCOL):
            # window column u inside the image: one unsigned compare, recomputed
            xk = x + (u - KW // 2) * dil_w
            m_col = m_row & (xk.to(tl.uint32, bitcast=True) < W)
            m_knd = m_col[:, None, None] & m_nd[None, :, :]
            b_k = to_f32(tl.load(p_kr + (u - KW // 2) * K_COL, mask=m_knd, other=0.0))
            b_v = to_f32(tl.load(p_vr + (u - KW // 2) * V_COL, mask=m_knd, other=0.0))
            naccs = ()
            ngrows = ()
            dss = ()  # per pixel: ds at its tap c = u - j (zeros where it has none)
            for j in tl.static_range(PIX):
                b_acc = accs[j]
                b_grow = grows[j]
                ds = zero_gn
                if u - j >= 0:
                    if u - j < KW:  # pixel j, tap c = u - j
                        seed = seeds[j * KW + u - j] + srows[j]
                        if HAS_RPB:
                            b_rpb = tl.load(rpb_ptr + o_n * srp_n + (a + KH // 2) * srp_h
                                            + ((u - j) + KW // 2) * srp_w, mask=m_n,
                                            other=0.0)
                            seed += (b_rpb.to(tl.float32) * LOG2E)[None, :]
                        m_tap = m_col & m_ps[j]
                        b_acc, ds = _tap(b_k, b_v, qss[j], dos[j], deltas[j], seed, m_tap,
                                         b_acc, MASK, CHAIN)
                        if HAS_REL:
                            b_grow += ds
                        if HAS_RPB:  # zeros padding: taps outside the image count
                            ds_b = tl.where((m_tap if MASK else m_ps[j])[:, None], ds, 0.0)
                            npbs = ()
                            for c in tl.static_range(KW):
                                if c == u - j:
                                    if j == PIX - 1:  # the tap's last pixel: store
                                        tl.store(partb_ptr + (a * N_SLOTS + slot) * KW + c,
                                                 tl.sum(pbs[c] + ds_b, axis=0), mask=m_n)
                                        npbs = npbs + (zero_gn,)
                                    else:
                                        npbs = npbs + (pbs[c] + ds_b,)
                                else:
                                    npbs = npbs + (pbs[c],)
                            pbs = npbs
                naccs = naccs + (b_acc,)
                ngrows = ngrows + (b_grow,)
                dss = dss + (ds,)
            accs = naccs
            grows = ngrows
            if HAS_REL:  # G_col of pixel j, tap c = u - j
                ngs = ()
                for i in tl.static_range(PIX * KW):
                    if i % KW == u - i // KW:
                        ngs = ngs + (gs[i] + dss[i // KW],)
                    else:
                        ngs = ngs + (gs[i],)
                gs = ngs
        if HAS_REL:
            # rel_h row a: dq += G_row rel_h[a]; partial sum over pixels of G_row q[:d/2]
            # (a row outside the image meets neither, with mask padding: selected away)
            naccs = ()
            part = tl.zeros([G, BLOCK_N, D_HALF if HALF else BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(PIX):
                prod = grows[j][:, :, None] * _lower(b_rh, HALF)
                part_j = grows[j][:, :, None] * _lower(qss[j], HALF)
                if MASK:
                    m_r = (m_row & m_ps[j])[:, None, None]
                    prod = tl.where(m_r, prod, 0.0)
                    part_j = tl.where(m_r, part_j, 0.0)
                naccs = naccs + (_add_half(accs[j], prod, False, HALF),)
                if j == 0:
                    part = part_j
                else:
                    part += part_j
            accs = naccs
            part = tl.sum(part, axis=0) * 0.6931471805599453  # q * scale: qs / log2(e)
            _store_part(parth_ptr, a * N_SLOTS + slot, part, o_d, m_n, m_dh, D_HALF, 0, HALF)
    # after the loop, the program's pixels, pointers and masks afresh: with quads from an
    # opaque copy of pid, else the prologue's (opq is the constant 0). Reusing them kept
    # them live through the loop: Triton 3.6 spilled 8 bytes at k3 (quads over 2 warps)
    pid = pid + opq
    b = (pid // TILES).to(tl.int64)
    t = pid % TILES
    y = (t // TILES_W) * BLOCK_H + o_g // TW
    x = (t % TILES_W) * (TW * PIX) + (o_g % TW) * PIX
    m_y = y < H
    if IMG_I64:
        yi = y.to(tl.int64)
    else:
        yi = y
    m_ps = ()
    for j in tl.static_range(PIX):
        m_ps = m_ps + (m_y & (x + j < W),)
    slot = pid.to(tl.int64) * HEADS + o_n
    if HAS_REL:
        for c in tl.static_range(KW):
            b_rw = tl.load(relw_ptr + c * (srw_r + opq) + o_rw, mask=m_dw[None, :, :],
                           other=0.0).to(tl.float32)
            naccs = ()
            part = tl.zeros([G, BLOCK_N, BLOCK_D - D_HALF if HALF else BLOCK_D],
                            dtype=tl.float32)
            for j in tl.static_range(PIX):
                prod = gs[j * KW + c][:, :, None] * _upper(b_rw, HALF)
                part_j = gs[j * KW + c][:, :, None] * _upper(qss[j], HALF)
                if MASK:  # pixel j meets rel_w[c] at window column u = j + c
                    xk = x + (j + c - KW // 2) * dil_w
                    m_c = (m_ps[j] & (xk.to(tl.uint32, bitcast=True) < W))[:, None, None]
                    prod = tl.where(m_c, prod, 0.0)
                    part_j = tl.where(m_c, part_j, 0.0)
                naccs = naccs + (_add_half(accs[j], prod, True, HALF),)
                if j == 0:
                    part = part_j
                else:
                    part += part_j
            accs = naccs
            part = tl.sum(part, axis=0) * 0.6931471805599453  # q * scale: qs / log2(e)
            _store_part(partw_ptr, c * N_SLOTS + slot, part, o_d, m_n, m_dw, D - D_HALF,
                        D_HALF, HALF)
    o_dqnd = tl.multiple_of(o_nr * sdq_n, VEC)[:, None] + o_d[None, :] * sdq_d
    p_dq0 = dq_ptr + b * sdq_b
    for j in tl.static_range(PIX):
        _store_dq(p_dq0, accs[j], scale, yi, x + j, m_ps[j], o_dqnd, m_nd, sdq_h, sdq_w,
                  IMG_I64, VEC)
