"""Forward kernel family "tile2d": CUDA cores, a 2-D pixel tile with all its heads.

What a program owns: a BLOCK_H x BLOCK_W tile of pixels of one image with all heads
(BLOCK_N = next_pow2(heads)). A thread holds PIX horizontally adjacent pixels of one
head (PIX = 1, 2 or 4; BLOCK_W = TW * PIX): their q, output accumulators, running max
and sum, as [DS, G, N, PIX, DV] tiles (G = BLOCK_H * TW pixel groups; channels in DS
vectors of DV, DS * DV = next_pow2(d), all in the thread's registers).

What it loads: per window row (a runtime loop over the kh rows) the KW + PIX - 1 k
columns and as many v columns the group's windows cover, each one vector load of a
(group, head) row, once: with PIX > 1 adjacent pixels share the columns their windows
have in common (zeros / mask padding with column dilation 1; shift padding or column
dilation take PIX = 1), so a thread reads (KW + PIX - 1) / PIX columns per pixel
instead of KW. The window columns are unrolled (tl.static_range): a sliding set of PIX
columns is joined into the pixels' [.., PIX, ..] tile (tl.join: registers only, no
shuffles). Per window row and pixel: KW logits as fused multiply-add chains, one max,
one rescale of the accumulator, then KW exp2 and p * v chains. Logits are in log2 units
(q is scaled by scale * log2(e) once). The relative term is split: the column part
q[d/2:] . rel_w[col] is computed once per program for every window column and seeds
each logit's chain; the row part q[:d/2] . rel_h[row] once per window row and goes into
the row's max. It saves lse = ln(sum exp(logit)) per (pixel, head).

Supported: every padding mode, dilation, any odd kh/kw (kw <= 15: the columns are
unrolled), shared/per-head rel tables, rpb, fp16/bf16/fp32, head dims while
next_pow2(heads) * next_pow2(d) <= 256 (e.g. 8 heads x d <= 32, one head x d <= 256).
Any strides of q, k, v (out and lse are the launcher's contiguous allocations: the kernel
derives their strides); 64-bit pixel offsets.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    PADDING_CODES,
    check_config,
    launch_options,
    new_lse,
    new_output_like,
    next_pow2,
    pointer_alignment,
    stride_vector_width,
    strides_fit_i32,
    table_strides,
    to_f32,
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

# Triton before 3.8 orders a load's non-contiguous dims upwards (see _load_tile)
_TIES_ASCENDING = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8)
MAX_ROW = 256  # next_pow2(heads) * next_pow2(d) held per pixel
MAX_KW = 15  # window columns are unrolled


@triton.jit
def _dot_chain(acc, a, b, N: tl.constexpr):
    """acc + sum(a * b) over the last axis of the 5-D tiles a and b (N values held by one
    thread), as one chain of fused multiply-adds: halves are split off, no tree."""
    if N == 1:
        return acc + tl.sum(a * b, axis=4)
    else:
        shape: tl.constexpr = [a.shape[0], a.shape[1], a.shape[2], a.shape[3], N // 2, 2]
        a_e, a_o = tl.split(tl.reshape(a, shape))
        b_e, b_o = tl.split(tl.reshape(b, shape))
        acc = _dot_chain(acc, a_e, b_e, N // 2)
        return _dot_chain(acc, a_o, b_o, N // 2)


@triton.jit
def _half_dot(a, b, UPPER: tl.constexpr):
    """sum(a * b) over the lower or upper half of the last axis of the 5-D tiles a and b
    (held by one thread, DS = 1) as one fused multiply-add chain: [1, G, N, PIX] -> [G, N, PIX]."""
    N: tl.constexpr = a.shape[4] // 2
    shape: tl.constexpr = [a.shape[0], a.shape[1], a.shape[2], a.shape[3], 2, N]
    a_lo, a_hi = tl.split(tl.permute(tl.reshape(a, shape), (0, 1, 2, 3, 5, 4)))
    b_lo, b_hi = tl.split(tl.permute(tl.reshape(b, shape), (0, 1, 2, 3, 5, 4)))
    zero = tl.zeros([a.shape[0], a.shape[1], a.shape[2], a.shape[3]], dtype=tl.float32)
    if UPPER:
        return tl.sum(_dot_chain(zero, a_hi, b_hi, N), axis=0)
    else:
        return tl.sum(_dot_chain(zero, a_lo, b_lo, N), axis=0)


@triton.jit
def _load_tile(p, m, TIES_ASCENDING: tl.constexpr, SPLIT: tl.constexpr):
    """Masked load (0 elsewhere) of a [DS, G, N, DV] tile. The coalescer gives threads to
    the dims after the contiguous one in index order, ties broken downwards from Triton
    3.8 on, upwards before; the tile is loaded permuted so that threads go to heads and
    pixel groups and a thread keeps its DS vectors, or with SPLIT to heads, vectors and
    groups (a head's channels spread over DS lanes)."""
    m = tl.broadcast_to(m, p.shape)
    if SPLIT:
        if TIES_ASCENDING:  # as [N, DS, G, DV]
            b = tl.load(tl.permute(p, (2, 0, 1, 3)), mask=tl.permute(m, (2, 0, 1, 3)),
                        other=0.0)
            return tl.permute(b, (1, 2, 0, 3))
        else:  # as [G, DS, N, DV]
            b = tl.load(tl.permute(p, (1, 0, 2, 3)), mask=tl.permute(m, (1, 0, 2, 3)),
                        other=0.0)
            return tl.permute(b, (1, 0, 2, 3))
    elif TIES_ASCENDING:  # as [G, N, DS, DV]
        b = tl.load(tl.permute(p, (1, 2, 0, 3)), mask=tl.permute(m, (1, 2, 0, 3)), other=0.0)
        return tl.permute(b, (2, 0, 1, 3))
    else:
        return tl.load(p, mask=m, other=0.0)


@triton.jit
def _stack(c0, c1, c2, c3, PIX: tl.constexpr):
    """[DS, G, N, PIX, DV] tile whose pixel p is c_p ([DS, G, N, DV] each; c1..c3 unused
    below PIX). Joins only: the pixel axis lies in the thread's registers."""
    if PIX == 1:
        return tl.expand_dims(c0, 3)
    elif PIX == 2:
        return tl.permute(tl.join(c0, c1), (0, 1, 2, 4, 3))
    else:
        shape: tl.constexpr = [c0.shape[0], c0.shape[1], c0.shape[2], c0.shape[3], 4]
        t = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # [..., a, b] is c_(2a + b)
        return tl.permute(tl.reshape(t, shape), (0, 1, 2, 4, 3))


@triton.jit
def _unstack(t, PIX: tl.constexpr):
    """The PIX [DS, G, N, DV] tiles of a [DS, G, N, PIX, DV] tile (padded to 4 by repeats)."""
    if PIX == 1:
        c = tl.sum(t, axis=3)
        return c, c, c, c
    elif PIX == 2:
        c0, c1 = tl.split(tl.permute(t, (0, 1, 2, 4, 3)))
        return c0, c1, c0, c1
    else:
        shape: tl.constexpr = [t.shape[0], t.shape[1], t.shape[2], t.shape[4], 2, 2]
        e, o = tl.split(tl.reshape(tl.permute(t, (0, 1, 2, 4, 3)), shape))
        c0, c2 = tl.split(e)  # e: [..., a] is pixel 2a, o: pixel 2a + 1
        c1, c3 = tl.split(o)
        return c0, c1, c2, c3


@triton.jit
def _unstack3(t, PIX: tl.constexpr):
    """The PIX [G, N] tiles of a [G, N, PIX] tile (padded to 4 by repeats)."""
    if PIX == 1:
        c = tl.sum(t, axis=2)
        return c, c, c, c
    elif PIX == 2:
        c0, c1 = tl.split(t)
        return c0, c1, c0, c1
    else:
        shape: tl.constexpr = [t.shape[0], t.shape[1], 2, 2]
        e, o = tl.split(tl.reshape(t, shape))
        c0, c2 = tl.split(e)
        c1, c3 = tl.split(o)
        return c0, c1, c2, c3


@triton.jit
def _column(ptr, o_row, o_nd, m_row, m_nd, start_x, W, c: tl.constexpr, dil_w, s_w,
            COL_STEP: tl.constexpr, CHECK_X: tl.constexpr, TIES_ASCENDING: tl.constexpr,
            SPLIT: tl.constexpr):
    """float32 [DS, G, N, DV] tile of window column c of every group (0 outside the
    image). o_row: [G] offset of the group's row and first column."""
    if COL_STEP > 0:  # compile-time column step: an immediate in the load's address
        o = o_row + c * COL_STEP
    else:
        o = o_row + (tl.full([], c, tl.int64) * dil_w) * s_w  # dil_w, s_w may be int 1
    m = m_row
    if CHECK_X:
        xc = start_x + c * dil_w
        m = m & (xc >= 0) & (xc < W)
    b = _load_tile(ptr + o[None, :, None, None] + o_nd[:, None, :, :],
                   m[None, :, None, None] & m_nd[:, None, :, :], TIES_ASCENDING, SPLIT)
    return to_f32(b)


@triton.jit
def _store_pixel(o_ptr, lse_ptr, b_o, b_lse, b, y, x, W, m_y, o_ond, m_nd, o_n, HEADS,
                 so_b, so_h, so_w, sl_b, sl_h, sl_w, sl_n, VEC: tl.constexpr):
    m_p = m_y & (x < W)  # [G]
    o_o = tl.multiple_of(b * so_b + y.to(tl.int64) * so_h + x.to(tl.int64) * so_w, VEC)
    tl.store(o_ptr + o_o[None, :, None, None] + o_ond[:, None, :, :],
             b_o.to(o_ptr.dtype.element_ty), mask=m_p[None, :, None, None] & m_nd[:, None, :, :])
    o_l = (b * sl_b + y.to(tl.int64) * sl_h + x.to(tl.int64) * sl_w)[:, None] + o_n[None, :] * sl_n
    tl.store(lse_ptr + o_l, b_lse, mask=m_p[:, None] & (o_n[None, :] < HEADS))


@triton.jit
def _load_q(q_ptr, b, y, x, W, m_y, o_qnd, m_nd, sq_b, sq_h, sq_w, VEC: tl.constexpr,
            TIES_ASCENDING: tl.constexpr, SPLIT: tl.constexpr):
    o_qp = tl.multiple_of(b * sq_b + y.to(tl.int64) * sq_h + x.to(tl.int64) * sq_w, VEC)
    m_p = m_y & (x < W)
    return _load_tile(q_ptr + o_qp[None, :, None, None] + o_qnd[:, None, :, :],
                      m_p[None, :, None, None] & m_nd[:, None, :, :], TIES_ASCENDING,
                      SPLIT).to(tl.float32)


@triton.jit
def _tile2d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,  # absent tables: None
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, D, D_HALF, TILES_W, TILES)
    sq, sk, sv,  # (batch, row, column, head, channel) strides; sv None if KV_SAME_STRIDES
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    dil,  # (dil_h, dil_w)
    qk_scale,  # scale * log2(e)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, TW: tl.constexpr, PIX: tl.constexpr, BLOCK_N: tl.constexpr,
    DS: tl.constexpr, DV: tl.constexpr,
    ROW_I64: tl.constexpr, KV_SAME_STRIDES: tl.constexpr, EVEN_ROW: tl.constexpr,
    VEC: tl.constexpr, COL_STEP: tl.constexpr, TIES_ASCENDING: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # Channel c of a head sits at (c // DV, c % DV) of a [DS, ..., DV] tile: DV channels
    # are one vector load, the DS vectors of a head lie in the same thread.
    H, W, HEADS, D, D_HALF, TILES_W, TILES = sizes
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    if KV_SAME_STRIDES:
        sv_b, sv_h, sv_w, sv_n, sv_d = sk
    else:
        sv_b, sv_h, sv_w, sv_n, sv_d = sv
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    dil_h, dil_w = dil
    G: tl.constexpr = BLOCK_H * TW
    BLOCK_D: tl.constexpr = DS * DV
    # rel halves split at compile time: one vector per head, d even and a power of two
    HALVES: tl.constexpr = EVEN_ROW and DS == 1 and DV > 1
    pid = tl.program_id(0)
    b = (pid // TILES).to(tl.int64)
    t = pid % TILES
    o_g = tl.arange(0, G)
    o_g0 = o_g * 0  # [G] zeros: a group-independent tile takes the groups' layout
    y = (t // TILES_W) * BLOCK_H + o_g // TW  # [G]
    x = (t % TILES_W) * (TW * PIX) + (o_g % TW) * PIX  # [G] the group's first pixel
    m_y = y < H

    o_n = tl.arange(0, BLOCK_N)
    o_ch = (tl.arange(0, DS) * DV)[:, None, None] + tl.arange(0, DV)[None, None, :]  # [DS, 1, DV]
    if EVEN_ROW:  # heads == BLOCK_N and d == BLOCK_D: masks stay per pixel
        n_heads = BLOCK_N
        d_all = BLOCK_D
        d_half = BLOCK_D // 2
    else:
        n_heads = HEADS
        d_all = D
        d_half = D_HALF
    m_nd = (o_n[None, :, None] < n_heads) & (o_ch < d_all)  # [DS, N, DV]
    if ROW_I64:  # offsets inside one pixel's heads x d row can pass 2**31
        o_nr = o_n.to(tl.int64)
        o_chr = o_ch.to(tl.int64)
    else:
        o_nr = o_n
        o_chr = o_ch
    # VEC > 1: every pixel and head offset is a multiple of VEC elements, d contiguous
    o_qnd = tl.multiple_of(o_nr * sq_n, VEC)[None, :, None] + o_chr * sq_d  # [DS, N, DV]
    o_knd = tl.multiple_of(o_nr * sk_n, VEC)[None, :, None] + o_chr * sk_d
    if KV_SAME_STRIDES:
        o_vnd = o_knd
    else:
        o_vnd = tl.multiple_of(o_nr * sv_n, VEC)[None, :, None] + o_chr * sv_d

    # q of the group's PIX pixels, [DS, G, N, PIX, DV], logits come out in log2 units
    q0 = _load_q(q_ptr, b, y, x, W, m_y, o_qnd, m_nd, sq_b, sq_h, sq_w, VEC,
                     TIES_ASCENDING, SPLIT)
    q1 = q0
    q2 = q0
    q3 = q0
    if PIX > 1:
        q1 = _load_q(q_ptr, b, y, x + 1, W, m_y, o_qnd, m_nd, sq_b, sq_h, sq_w, VEC,
                     TIES_ASCENDING, SPLIT)
    if PIX > 2:
        q2 = _load_q(q_ptr, b, y, x + 2, W, m_y, o_qnd, m_nd, sq_b, sq_h, sq_w, VEC,
                     TIES_ASCENDING, SPLIT)
        q3 = _load_q(q_ptr, b, y, x + 3, W, m_y, o_qnd, m_nd, sq_b, sq_h, sq_w, VEC,
                     TIES_ASCENDING, SPLIT)
    b_q = _stack(q0, q1, q2, q3, PIX) * qk_scale
    start_y, off_y = window_start(y, H, KH, dil_h, PADDING == 2)  # [G]
    start_x, off_x = window_start(x, W, KW, dil_w, PADDING == 2)  # of the first pixel

    # the column part of the rel term of every window column: seeds of the logit chains
    b_zero = tl.zeros([DS, G, BLOCK_N, PIX], dtype=tl.float32)
    seeds = ()
    for j in tl.static_range(KW):
        if HAS_REL:  # q[d/2:] meets rel_w
            m_dw = m_nd & (o_ch >= d_half)
            o_rw_nd = o_n[None, :, None] * srw_n + (o_ch - d_half) * srw_d  # [DS, N, DV]
            if PADDING == 2:  # shift: the rel column follows the pixel's window (PIX = 1)
                o_rx = (off_x + j + KW - 1) * srw_r  # [G]
                p_rw = relw_ptr + o_rx[None, :, None, None] + o_rw_nd[:, None, :, :]
                m_rw = m_y[None, :, None, None] & m_dw[:, None, :, :]
            else:  # the same for every group, loaded in the groups' layout
                p_rw = relw_ptr + j * srw_r + o_rw_nd[:, None, :, :] + o_g0[None, :, None, None]
                m_rw = m_dw[:, None, :, :]
            b_rw = _load_tile(p_rw, m_rw, TIES_ASCENDING, SPLIT)  # [DS, G, N, DV]
            b_rw = tl.broadcast_to(b_rw.to(tl.float32)[:, :, :, None, :], b_q.shape)
            if HALVES:  # only the upper channels meet rel_w
                seeds = seeds + (_half_dot(b_q, b_rw, True),)
            else:
                seeds = seeds + (tl.sum(_dot_chain(b_zero, b_q, b_rw, DV), axis=0),)
        else:
            seeds = seeds + (tl.zeros([G, BLOCK_N, PIX], dtype=tl.float32),)
    if HAS_REL:
        m_dh = (o_n[None, :, None] < n_heads) & (o_ch < d_half)  # [DS, N, DV]
        o_rh_nd = o_n[None, :, None] * srh_n + o_ch * srh_d

    o_kb = b * sk_b + start_x.to(tl.int64) * sk_w  # [G]
    o_vb = b * sv_b + start_x.to(tl.int64) * sv_w
    o_px = tl.arange(0, PIX)
    b_m = tl.full([G, BLOCK_N, PIX], -1.0e30, dtype=tl.float32)  # finite: no inf - inf
    b_l = tl.zeros([G, BLOCK_N, PIX], dtype=tl.float32)
    b_acc = tl.zeros([DS, G, BLOCK_N, PIX, DV], dtype=tl.float32)
    for a in range(KH):
        yk = start_y + a * dil_h  # [G]
        m_row = m_y & (yk >= 0) & (yk < H)
        o_krow = o_kb + yk.to(tl.int64) * sk_h
        # pass 1: the KW logits of each pixel, sharing the k columns
        k0 = _column(k_ptr, o_krow, o_knd, m_row, m_nd, start_x, W, 0, dil_w, sk_w,
                     COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
        k1 = k0
        k2 = k0
        if PIX > 2:
            k1 = _column(k_ptr, o_krow, o_knd, m_row, m_nd, start_x, W, 1, dil_w, sk_w,
                         COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
            k2 = _column(k_ptr, o_krow, o_knd, m_row, m_nd, start_x, W, 2, dil_w, sk_w,
                         COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
        b_mx = tl.full([G, BLOCK_N, PIX], float("-inf"), dtype=tl.float32)
        logits = ()
        for j in tl.static_range(KW):
            if PIX == 1:
                k0 = _column(k_ptr, o_krow, o_knd, m_row, m_nd, start_x, W, j, dil_w, sk_w,
                             COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
                b_k = _stack(k0, k0, k0, k0, PIX)
            elif PIX == 2:
                kn = _column(k_ptr, o_krow, o_knd, m_row, m_nd, start_x, W, j + 1, dil_w, sk_w,
                             COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
                b_k = _stack(k0, kn, kn, kn, PIX)
                k0 = kn
            else:
                kn = _column(k_ptr, o_krow, o_knd, m_row, m_nd, start_x, W, j + 3, dil_w, sk_w,
                             COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
                b_k = _stack(k0, k1, k2, kn, PIX)
                k0 = k1
                k1 = k2
                k2 = kn
            if DS == 1:  # the column rel part seeds the chain
                b_s = tl.sum(_dot_chain(seeds[j][None, :, :, :], b_q, b_k, DV), axis=0)
            else:
                b_s = tl.sum(_dot_chain(b_zero, b_q, b_k, DV), axis=0) + seeds[j]  # [G, N, PIX]
            if HAS_RPB:  # the same offset for every pixel of a group
                o_rpb = (off_y + a + KH - 1) * srp_h + (off_x + j + KW - 1) * srp_w  # [G]
                b_rpb = tl.load(rpb_ptr + o_rpb[:, None] + (o_n * srp_n)[None, :],
                                mask=m_y[:, None] & (o_n < HEADS)[None, :], other=0.0)
                b_s += (b_rpb.to(tl.float32) * LOG2E)[:, :, None]
            if PADDING == 1:  # mask: taps outside the image drop out
                xt = start_x[:, None, None] + (j + o_px)[None, None, :] * dil_w  # [G, 1, PIX]
                b_s = tl.where((xt >= 0) & (xt < W), b_s, float("-inf"))
            b_mx = tl.maximum(b_mx, b_s)
            logits = logits + (b_s,)

        # the row part of the rel term is the same for the whole window row: into the max
        # (after the logits: fewer registers live while they are computed)
        b_srow = tl.zeros([G, BLOCK_N, PIX], dtype=tl.float32)
        if HAS_REL:
            if PADDING == 2:
                o_row = off_y + a + KH - 1
                p_rh = relh_ptr + (o_row * srh_r)[None, :, None, None] + o_rh_nd[:, None, :, :]
                m_rh = m_y[None, :, None, None] & m_dh[:, None, :, :]
            else:
                p_rh = relh_ptr + a * srh_r + o_rh_nd[:, None, :, :] + o_g0[None, :, None, None]
                m_rh = m_dh[:, None, :, :]
            b_rh = _load_tile(p_rh, m_rh, TIES_ASCENDING, SPLIT).to(tl.float32)  # [DS, G, N, DV]
            b_rh = tl.broadcast_to(b_rh[:, :, :, None, :], b_q.shape)
            if HALVES:  # only the lower channels meet rel_h
                b_srow = _half_dot(b_q, b_rh, False)
            else:
                b_srow = tl.sum(_dot_chain(b_zero, b_q, b_rh, DV), axis=0)
        if PADDING == 1:  # mask: a row outside the image drops out as a whole
            b_srow = tl.where(((yk >= 0) & (yk < H))[:, None, None], b_srow, float("-inf"))

        b_m_new = tl.maximum(b_m, b_mx + b_srow)  # [G, N, PIX]
        b_alpha = tl.exp2(b_m - b_m_new)
        b_mrow = b_m_new - b_srow
        b_l = b_l * b_alpha
        b_acc = b_acc * b_alpha[None, :, :, :, None]
        b_m = b_m_new

        # pass 2: p * v, sharing the v columns
        if KV_SAME_STRIDES:
            o_vrow = o_krow
        else:
            o_vrow = o_vb + yk.to(tl.int64) * sv_h
        v0 = _column(v_ptr, o_vrow, o_vnd, m_row, m_nd, start_x, W, 0, dil_w, sv_w,
                     COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
        v1 = v0
        v2 = v0
        if PIX > 2:
            v1 = _column(v_ptr, o_vrow, o_vnd, m_row, m_nd, start_x, W, 1, dil_w, sv_w,
                         COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
            v2 = _column(v_ptr, o_vrow, o_vnd, m_row, m_nd, start_x, W, 2, dil_w, sv_w,
                         COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
        for j in tl.static_range(KW):
            if PIX == 1:
                v0 = _column(v_ptr, o_vrow, o_vnd, m_row, m_nd, start_x, W, j, dil_w, sv_w,
                             COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
                b_v = _stack(v0, v0, v0, v0, PIX)
            elif PIX == 2:
                vn = _column(v_ptr, o_vrow, o_vnd, m_row, m_nd, start_x, W, j + 1, dil_w, sv_w,
                             COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
                b_v = _stack(v0, vn, vn, vn, PIX)
                v0 = vn
            else:
                vn = _column(v_ptr, o_vrow, o_vnd, m_row, m_nd, start_x, W, j + 3, dil_w, sv_w,
                             COL_STEP, PADDING != 2, TIES_ASCENDING, SPLIT)
                b_v = _stack(v0, v1, v2, vn, PIX)
                v0 = v1
                v1 = v2
                v2 = vn
            b_p = tl.exp2(logits[j] - b_mrow)  # [G, N, PIX]
            b_l += b_p
            b_acc += b_p[None, :, :, :, None] * b_v

    b_o = b_acc * (1.0 / b_l)[None, :, :, :, None]
    b_lse = (b_m + tl.log2(b_l)) * 0.6931471805599453
    # out and lse are the launcher's fresh contiguous tensors: their strides follow from
    # the shape (constants with EVEN_ROW), 64-bit from the pixel stride up
    so_w = n_heads * d_all
    so_h = tl.cast(W, tl.int64) * so_w  # tl.cast: H or W may be the constant 1
    so_b = tl.cast(H, tl.int64) * so_h
    sl_h = tl.cast(W, tl.int64) * n_heads
    sl_b = tl.cast(H, tl.int64) * sl_h
    o_ond = tl.multiple_of(o_nr * d_all, VEC)[None, :, None] + o_chr
    o0, o1, o2, o3 = _unstack(b_o, PIX)
    l0, l1, l2, l3 = _unstack3(b_lse, PIX)
    _store_pixel(o_ptr, lse_ptr, o0, l0, b, y, x, W, m_y, o_ond, m_nd, o_n, HEADS,
                 so_b, so_h, so_w, sl_b, sl_h, n_heads, 1, VEC)
    if PIX > 1:
        _store_pixel(o_ptr, lse_ptr, o1, l1, b, y, x + 1, W, m_y, o_ond, m_nd, o_n, HEADS,
                     so_b, so_h, so_w, sl_b, sl_h, n_heads, 1, VEC)
    if PIX > 2:
        _store_pixel(o_ptr, lse_ptr, o2, l2, b, y, x + 2, W, m_y, o_ond, m_nd, o_n, HEADS,
                     so_b, so_h, so_w, sl_b, sl_h, n_heads, 1, VEC)
        _store_pixel(o_ptr, lse_ptr, o3, l3, b, y, x + 3, W, m_y, o_ond, m_nd, o_n, HEADS,
                     so_b, so_h, so_w, sl_b, sl_h, n_heads, 1, VEC)


# --- host side --------------------------------------------------------------------------

def _row(q_shape) -> int:
    B, H, W, heads, d = q_shape
    return next_pow2(heads) * next_pow2(d)


def lanes_per_head(d: int) -> int:
    """Lanes sharing one head's channels: 16-byte vectors of a 16-bit dtype each (a head
    of d > 8 spreads over next_pow2(d) / 8 lanes; float32 spreads further at launch)."""
    return max(1, next_pow2(d) // 8)


def max_pixels(channels: int, kw: int, vectors: bool = True) -> int:
    """Most pixels (4, 2, 1) a thread may hold with `channels` channels of a head each:
    q and the accumulator (2 x channels), kw column rel parts and kw logits, the sliding
    columns (channels), about 180 registers in all (s1: 4 pixels, 203 registers); scalar
    loads need an address per channel: half that."""
    budget = 180 if vectors else 90
    for pix in (4, 2):
        if pix * (3 * channels + 2 * kw + 2) <= budget:
            return pix
    return 1


def pixels_per_thread(q_shape, args) -> int:
    """Horizontally adjacent pixels a thread serves: they share k/v columns only with a
    centred window and column dilation 1 (not in shift mode); as many as registers allow
    with the head's 16-byte vectors spread over lanes (max_pixels)."""
    B, H, W, heads, d = q_shape
    if args.padding == "shift" or args.dw != 1 or W < 2:
        return 1
    return min(4 if W >= 4 else 2, max_pixels(min(next_pow2(d), 8), args.kw))


def search_space() -> list[dict]:
    """Tile shapes and launch settings the tuner may try."""
    return [
        dict(BLOCK_H=bh, BLOCK_W=bw, PIX=pix, num_warps=nw, num_stages=1)
        for bh in (1, 2, 4, 8, 16)
        for bw in (4, 8, 16)
        for pix in (1, 2, 4)
        for nw in (1, 2, 4, 8)
    ]


def _pix(cfg: dict, q_shape, args) -> int:
    pix = cfg.get("PIX")
    return pixels_per_thread(q_shape, args) if pix is None else pix


def prune(configs, q_shape, args) -> list[dict]:
    """Keeps configs whose PIX pixels can share columns (PIX 1 otherwise), BLOCK_W a
    multiple of PIX, 1 to 4 (pixel group, head lane) pairs per thread and tiles no larger
    than the image."""
    B, H, W, heads, d = q_shape
    kept = []
    for cfg in configs:
        bh, bw, nw = cfg["BLOCK_H"], cfg["BLOCK_W"], cfg.get("num_warps", 4)
        pix = _pix(cfg, q_shape, args)
        if (pix > 1 and (args.padding == "shift" or args.dw != 1)) or bw % pix:
            continue
        pairs = bh * (bw // pix) * next_pow2(heads) * lanes_per_head(d) / (32 * nw)
        if bh > max(1, next_pow2(H)) or bw > max(4, next_pow2(W)) or not 1 <= pairs <= 4:
            continue
        kept.append(cfg)
    return kept


@per_call_key
def default_config(q_shape, args, sms: int = 132) -> dict:
    """PIX = pixels_per_thread; two pixel groups per tile row (BLOCK_W = 2 * PIX, twice
    that on images wider than 64, at least 4); BLOCK_H the power of two up to about 128
    (pixel group, head lane) pairs per program, one per thread, at least a warp of them,
    that wastes the least on
    the last wave of programs over `sms` SMs (an H100 has 132) and on rows past the image
    (ties: the taller tile)."""
    B, H, W, heads, d = q_shape
    pix = pixels_per_thread(q_shape, args)
    tw = max(4 // pix, 4 if W > 64 else 2)
    bw = tw * pix
    lanes = next_pow2(heads) * lanes_per_head(d)
    tallest = max(1, min(128 // (lanes * tw), next_pow2(H)))
    heights = [1 << i for i in range(tallest.bit_length())
               if 1 << i <= tallest and (1 << i) * tw * lanes >= 32] or [tallest]  # a warp

    def rounds(bh: int) -> int:  # program waves x rows each program walks
        programs = max(1, B) * -(-H // bh) * -(-W // bw)
        return -(-programs // sms) * bh

    bh = min(heights, key=lambda h: (rounds(h), -h))
    threads = bh * tw * lanes
    return dict(BLOCK_H=bh, BLOCK_W=bw, PIX=pix,
                num_warps=max(1, min(8, threads // 32)), num_stages=1)


@per_call_key
def supports(q_shape, dtype, args) -> bool:
    B, H, W, heads, d = q_shape
    return (dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= d <= 256
            and _row(q_shape) <= MAX_ROW and args.kw <= MAX_KW)


def _plan(q_shape, dtype, esize: int, strides, args, align: int, config) -> LaunchPlan:
    """Everything a launch of this call key needs besides the tensors and the table
    strides (`align`: the largest power of two dividing the element offsets of q, k, v
    and out); raises for an unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    if not supports(q_shape, dtype, args):
        raise ValueError(
            f"tile2d forward does not support q {q_shape} {dtype} (needs "
            f"next_pow2(heads) * next_pow2(d) <= {MAX_ROW}, kw <= {MAX_KW})"
        )
    config = default_config(q_shape, args) if config is None else config
    check_config(config, ("BLOCK_H", "BLOCK_W"), "tile2d")
    pix = _pix(config, q_shape, args)
    if pix not in (1, 2, 4) or config["BLOCK_W"] % pix or (
            pix > 1 and (args.padding == "shift" or args.dw != 1)):
        raise ValueError(f"tile2d config {config!r}: PIX must be 1, 2 or 4 dividing BLOCK_W, "
                         "and 1 in shift mode or with column dilation")
    lse_layout = (q_shape[:4], contiguous_strides(q_shape[:4]))
    if B * H * W * heads * d == 0:
        return NO_LAUNCH._replace(layouts=(lse_layout,))
    out_strides = contiguous_strides(q_shape)  # the kernel derives out's and lse's strides
    vec = min(align, stride_vector_width([(d, st) for st in (*strides, out_strides)],
                                         next_pow2(d)))
    dv = min(next_pow2(d), 16 // esize, vec)  # channels per vector load
    ds = next_pow2(d) // dv
    # whole 16-byte vectors: a head's vectors go to DS lanes; narrower ones stay in one
    # thread, which then may hold fewer pixels (the tile narrows with them: the same
    # threads, one pixel group each)
    split = ds > 1 and dv * esize == 16
    tw = config["BLOCK_W"] // pix
    pix = min(pix, max_pixels(dv if split else next_pow2(d), args.kw, dv * esize >= 8))
    bh = config["BLOCK_H"]
    options = launch_options(config)
    # configs plan lanes_per_head lanes (16-bit vectors); float32 takes more: more warps
    # (at most 8), then shorter tiles, so that a thread keeps one (pixel group, head lane)
    more = (ds if split else 1) // lanes_per_head(d)
    if more > 1:
        warps = options.get("num_warps", 4)
        options["num_warps"] = min(8, warps * more)
        bh = max(1, bh // (warps * more // options["num_warps"]))
    tiles_w = triton.cdiv(W, tw * pix)
    tiles = triton.cdiv(H, bh) * tiles_w
    kv_same = strides[1] == strides[2]
    return launch_plan(
        _PARAMS,
        grid=(B * tiles,),
        head=((H, W, heads, d, d // 2, tiles_w, tiles), *strides[:2],
              None if kv_same else strides[2]),
        tail=((args.dh, args.dw), args.scale * LOG2E.value),
        flags=dict(
            KH=args.kh, KW=args.kw, PADDING=PADDING_CODES[args.padding],
            HAS_REL=args.rel_h is not None, HAS_RPB=args.rpb is not None,
            BLOCK_H=bh, TW=tw, PIX=pix, BLOCK_N=next_pow2(heads), DS=ds, DV=dv,
            ROW_I64=not strides_fit_i32((*strides, out_strides), 1, d, heads),
            KV_SAME_STRIDES=kv_same,
            EVEN_ROW=heads == next_pow2(heads) and d == next_pow2(d),
            VEC=vec, COL_STEP=args.dw * strides[1][2] if kv_same else 0,
            TIES_ASCENDING=_TIES_ASCENDING, SPLIT=split,
            **options,
        ),
        layouts=(lse_layout,),
    )


_plans = plan_cache(_plan)
_PARAMS = _tile2d_fwd_kernel.arg_names  # read at import: a recorder may stand in later


def forward(q, k, v, args, config=None, _poison=False):
    """(out, lse) of the forward; see kernels/__init__ and SASA's SPEC.md."""
    out = new_output_like(q, _poison)  # first: its address is part of the key
    shape, esize, strides = q.shape, q.element_size(), (q.stride(), k.stride(), v.stride())
    align = pointer_alignment((q, k, v, out))
    plan = _plans((shape, q.dtype, strides, args_key(args), align, config_key(config),
                   _TIES_ASCENDING),  # a test flips it
                  tuple(shape), q.dtype, esize, strides, args, align, config)
    lse = new_lse(plan.layouts[0], q.device, _poison)
    if plan.grid is None:
        return out, lse
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    launch_kernel(_tile2d_fwd_kernel, plan,
        q, k, v, out, lse, rel_h, rel_w, rpb,  # None when absent (never read then)
        *plan.head, table_strides(rel_h, rel_w, rpb), *plan.tail, **plan.options,
    )
    return out, lse
