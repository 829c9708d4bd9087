"""Backward kernel 2 of the "tile2dbwd" family (CUDA cores, key-owned): dk and dv.

What a program owns: a BLOCK_H x BLOCK_W tile of key pixels of one image with all its
heads, as G groups of PIX horizontally adjacent pixels held as [G, N, D] tiles like the
query kernel (kernels/tile2d_bwd_query.py). It loads their k and v once and walks the
inverse neighbourhood: with zeros / mask padding the queries whose windows hold key
(y, x) at tap (a, c) are (y - (a - kh//2) dh, x - (c - kw//2) dw), rows in a runtime
loop, columns unrolled; per window row a group loads the KW + PIX - 1 query columns
its pixels meet (key pixel j meets column u at tap c = j + KW - 1 - u), each column's
q, dout and (lse * log2(e), delta) pair (written by the query kernel; one 8-byte load)
once. Per (key pixel, tap):

    s   = q . (k + [rel_h[a], rel_w[c]]) * scale * log2(e) (+ rpb) - lse2
    p   = exp2(s)   (0 for a query outside the image)
    dv += p * dout        dp = dout . v        dk += p * (dp - delta) * q

(times scale at the end). The rel rows enter as the key's "effective" k: k + rel_h[a]
once per window row, + rel_w[c] per tap; with key pixel quads (PIX = 4, where a head's
channels lie in one thread) the logit is split by channel halves instead (fewer
registers: no effective k per pixel). Keys outside the image (zeros padding) have no
gradient; every dk / dv element is written by one program (no atomics).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E, to_f32
from .tile2d_bwd_query import _dot, _halves, _load_rows


@triton.jit
def _key_tap(b_q, b_q_hi, b_do, b_seed, b_delta, b_k, b_rw, b_v, m_q, b_dk, b_dv, qk_scale,
             HAS_REL: tl.constexpr, HALF: tl.constexpr, CHAIN: tl.constexpr):
    """One (key pixel, query) pair: (dk / scale, dv) accumulators. b_seed: the query's
    -lse2 (+ rpb), with HALF plus its rel_h part. b_k: k * scale * log2(e), except with
    rel and not HALF: k + rel_h[a]. b_rw: rel_w[c] in float32, its upper channel half
    times scale * log2(e) (HALF) or all channels (zeros below d / 2)."""
    if HAS_REL:
        if HALF:  # b_rw scaled by scale * log2(e) once: one chain from the seed
            b_s = _dot(_dot(b_seed, b_q_hi, b_rw, CHAIN), b_q, b_k, CHAIN)
        else:
            zero = tl.zeros(b_seed.shape, dtype=tl.float32)
            b_s = _dot(zero, b_q, b_k + b_rw, CHAIN) * qk_scale + b_seed
    else:
        b_s = _dot(b_seed, b_q, b_k, CHAIN)
    b_p = tl.where(m_q[:, None], tl.exp2(b_s), 0.0)  # [G, N]
    b_dv += b_p[:, :, None] * b_do
    b_ds = b_p * _dot(-b_delta, b_do, b_v, CHAIN)
    return b_dk + b_ds[:, :, None] * b_q, b_dv


@triton.jit
def _store_rows(ptr, b_t, yi, x, J: tl.constexpr, m_p, o_nd, m_nd, s_h, s_w,
                IMG_I64: tl.constexpr, VEC: tl.constexpr):
    """Stores pixel J of the groups starting at image columns x [G]."""
    if IMG_I64:
        xi = x.to(tl.int64)
    else:
        xi = x
    o = tl.multiple_of(yi * s_h + xi * s_w + J * s_w, VEC)
    tl.store(ptr + o[:, None, None] + o_nd[None, :, :], b_t.to(ptr.dtype.element_ty),
             mask=m_p[:, None, None] & m_nd[None, :, :])


@triton.jit
def _tile2d_bwd_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, aux_ptr, relh_ptr, relw_ptr, rpb_ptr,  # absent tables: None
    dk_ptr, dv_ptr,
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, TILES_W, TILES)
    sq, sk, sv, sdo,  # (batch, row, column, head, channel) strides; sv None if KV_SAME
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    dil,  # (dil_h, dil_w)
    qk_scale, scale,  # qk_scale = scale * log2(e)
    D: tl.constexpr, D_HALF: tl.constexpr,  # constexpr: channel masks stay per vector
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, TW: tl.constexpr, PIX: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IMG_I64: tl.constexpr, VEC: tl.constexpr,
    Q_COL: tl.constexpr, DO_COL: tl.constexpr, AUX_COL: tl.constexpr,  # window column steps
    CHAIN: tl.constexpr,  # a head's channels in one thread: dots as multiply-add chains
    KV_SAME: tl.constexpr,  # v's strides are k's (sv is None)
):
    H, W, HEADS, TILES_W, TILES = sizes
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    if KV_SAME:
        sv_b, sv_h, sv_w, sv_n, sv_d = sk
    else:
        sv_b, sv_h, sv_w, sv_n, sv_d = sv
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d = sdo
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    dil_h, dil_w = dil
    # G groups of PIX horizontally adjacent key pixels (PIX = 2 or 4: column dilation 1);
    # key pixel j meets query column u (image column x + (u - KW // 2) * dil_w) at its
    # tap c = j + KW - 1 - u: per window row a group loads KW + PIX - 1 query columns.
    # HALF (quads, a head's channels in one thread, split evenly by the tables): the
    # logit is q . k + q[:d/2] . rel_h[a] + q[d/2:] . rel_w[c], k and rel_h scaled by
    # scale * log2(e) once, the rel_h part once per query column (its key pixels share
    # it), the rel_w part per tap on the upper half: no effective k per pixel (PIX x d
    # registers). Pairs keep the effective k: 3% fewer instructions there (s1).
    G: tl.constexpr = BLOCK_H * TW
    NCOL: tl.constexpr = KW + PIX - 1
    HALF: tl.constexpr = CHAIN & (BLOCK_D == 2 * D_HALF) & (PIX > 2)
    pid = tl.program_id(0)
    b = (pid // TILES).to(tl.int64)
    t = pid % TILES
    o_g = tl.arange(0, G)
    y = (t // TILES_W) * BLOCK_H + o_g // TW  # [G] key pixels
    x = (t % TILES_W) * (TW * PIX) + (o_g % TW) * PIX  # [G] the group's first pixel
    m_y = y < H
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

    o_knd = tl.multiple_of(o_nr * sk_n, VEC)[:, None] + o_d[None, :] * sk_d
    o_vnd = tl.multiple_of(o_nr * sv_n, VEC)[:, None] + o_d[None, :] * sv_d
    p_k0 = k_ptr + b * sk_b
    p_v0 = v_ptr + b * sv_b
    ks = ()  # per key pixel j of the group: k (* scale * log2(e)), v
    vs = ()
    for j in tl.static_range(PIX):
        m_p = m_y & (x + j < W)
        b_k = _load_rows(p_k0, yi * sk_h + (xi + j) * sk_w, o_knd, m_p, m_nd, VEC)
        if HALF or not HAS_REL:
            b_k = b_k * qk_scale
        ks = ks + (b_k,)
        vs = vs + (_load_rows(p_v0, yi * sv_h + (xi + j) * sv_w, o_vnd, m_p, m_nd, VEC),)
    m_dh = m_nd & (o_d < D_HALF)[None, :]
    m_dw = m_nd & (o_d >= D_HALF)[None, :]
    o_g0 = (o_g * 0)[:, None, None]  # a table row loaded in the [G, N, D] tiles' layout
    o_rh = o_g0 + (o_n[:, None] * srh_n + o_d[None, :] * srh_d)[None, :, :]
    o_rw = o_g0 + (o_n[:, None] * srw_n + (o_d[None, :] - D_HALF) * srw_d)[None, :, :]
    rws = ()  # rel_w[c] in float32: the upper half * scale * log2(e) (HALF), else all
    for c in tl.static_range(KW):
        if HAS_REL:
            b_rw = tl.load(relw_ptr + c * srw_r + o_rw, mask=m_dw[None, :, :], other=0.0)
            if HALF:
                _lo, b_rw = _halves(b_rw.to(tl.float32) * qk_scale)
            else:
                b_rw = b_rw.to(tl.float32)
            rws = rws + (b_rw,)
        else:
            rws = rws + (0.0,)
    p_q0 = q_ptr + b * sq_b
    p_do0 = do_ptr + b * sdo_b
    o_qp = yi * sq_h + xi * sq_w  # [G] the group's first pixel
    o_dop = yi * sdo_h + xi * sdo_w
    o_qnd = tl.multiple_of(o_nr * sq_n, VEC)[:, None] + o_d[None, :] * sq_d
    o_dond = tl.multiple_of(o_nr * sdo_n, VEC)[:, None] + o_d[None, :] * sdo_d
    if IMG_I64:
        p_aux0 = aux_ptr + b * H * W * HEADS * 2
    else:  # an int32 image size: no product shared with dk's base kept through the loop
        p_aux0 = aux_ptr + b * (H * W * HEADS * 2)
    o_auxp = ((yi * W + xi) * HEADS)[:, None] * 2 + (o_n * 2)[None, :]  # [G, N]
    zero = tl.zeros([G, BLOCK_N, BLOCK_D], dtype=tl.float32)
    dks = ()
    dvs = ()
    for _j in tl.static_range(PIX):
        dks = dks + (zero,)
        dvs = dvs + (zero,)
    for a in range(KH):
        dy = (a - KH // 2) * dil_h
        yq = y - dy
        m_row = m_y & (yq >= 0) & (yq < H)
        krs = ks
        if HAS_REL:  # rel_h[a]: lower half * scale * log2(e) (HALF), else in k's lower half
            b_rh = tl.load(relh_ptr + a * srh_r + o_rh, mask=m_dh[None, :, :],
                           other=0.0).to(tl.float32)
            if HALF:
                b_rh, _hi = _halves(b_rh * qk_scale)
            else:
                krs = ()
                for j in tl.static_range(PIX):
                    krs = krs + (ks[j] + b_rh,)
        # the row's pointers once; the window columns step by compile-time immediates
        p_qr = p_q0 + tl.multiple_of(o_qp - dy * sq_h, VEC)[:, None, None] + o_qnd[None, :, :]
        p_dor = (p_do0 + tl.multiple_of(o_dop - dy * sdo_h, VEC)[:, None, None]
                 + o_dond[None, :, :])
        p_ar = p_aux0 + (o_auxp - dy * W * (HEADS * 2))[:, :, None] + tl.arange(0, 2)[None, None, :]
        for u in tl.static_range(NCOL):
            # inside the image: one unsigned compare, recomputed (fewer live registers)
            xq = x + (u - KW // 2) * dil_w
            m_q = m_row & (xq.to(tl.uint32, bitcast=True) < W)
            m_qnd = m_q[:, None, None] & m_nd[None, :, :]
            b_q = to_f32(tl.load(p_qr + (u - KW // 2) * Q_COL, mask=m_qnd, other=0.0))
            b_do = to_f32(tl.load(p_dor + (u - KW // 2) * DO_COL, mask=m_qnd, other=0.0))
            b_aux = tl.load(p_ar + (u - KW // 2) * AUX_COL,
                            mask=(m_q[:, None] & m_n[None, :])[:, :, None], other=0.0)
            b_lse2, b_delta = tl.split(b_aux)  # [G, N] each
            b_q_hi = b_q
            b_seed = -b_lse2  # the query column's logit parts shared by its key pixels
            if HAS_REL:
                if HALF:
                    b_q_lo, b_q_hi = _halves(b_q)
                    b_seed = _dot(b_seed, b_q_lo, b_rh, CHAIN)
            ndks = ()
            ndvs = ()
            for j in tl.static_range(PIX):
                b_dk = dks[j]
                b_dv = dvs[j]
                if j + KW - 1 - u >= 0:  # key pixel j's tap c = j + KW - 1 - u
                    if j + KW - 1 - u < KW:
                        seed = b_seed
                        if HAS_RPB:
                            seed += (tl.load(rpb_ptr + o_n * srp_n + (a + KH // 2) * srp_h
                                             + (j + KW - 1 - u + KW // 2) * srp_w, mask=m_n,
                                             other=0.0).to(tl.float32) * LOG2E)[None, :]
                        b_dk, b_dv = _key_tap(b_q, b_q_hi, b_do, seed, b_delta, krs[j],
                                              rws[j + KW - 1 - u], vs[j], m_q, b_dk, b_dv,
                                              qk_scale, HAS_REL, HALF, CHAIN)
                ndks = ndks + (b_dk,)
                ndvs = ndvs + (b_dv,)
            dks = ndks
            dvs = ndvs
    # dk and dv are the launcher's fresh contiguous tensors: their strides follow from
    # the sizes (tl.cast: H or W may be the constant 1; 64-bit from the row stride up)
    sg_d = 1
    sg_n = D
    sg_w = HEADS * D
    if IMG_I64:
        sg_h = tl.cast(W, tl.int64) * sg_w
    else:  # offsets inside one image fit int32
        sg_h = W * sg_w
    sg_b = H * sg_h  # int32 unless IMG_I64 (see p_aux0)
    o_gnd = tl.multiple_of(o_nr * sg_n, VEC)[:, None] + o_d[None, :] * sg_d
    p_dk0 = dk_ptr + b * sg_b
    p_dv0 = dv_ptr + b * sg_b
    for j in tl.static_range(PIX):  # pixel j's column and mask derived from x afresh:
        # kept from the start, the PIX columns would outlive the loop (spills at PIX 4)
        m_p = m_y & (x < W - j)
        _store_rows(p_dk0, dks[j] * scale, yi, x, j, m_p, o_gnd, m_nd, sg_h, sg_w, IMG_I64,
                    VEC)
        _store_rows(p_dv0, dvs[j], yi, x, j, m_p, o_gnd, m_nd, sg_h, sg_w, IMG_I64, VEC)
