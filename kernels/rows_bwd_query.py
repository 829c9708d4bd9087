"""Backward kernel 1 of the "rows" engine (query-owned, tensor cores): dq, delta and the
table gradients, deterministic (no atomics).

What a program owns: a tile of M = BLOCK_H x BLOCK_W query pixels (BLOCK_H image rows,
each a row segment of BLOCK_W columns) of one batch b and one head n; M = 64 at d = 64
and 128 (s4, h1; 16 past d = 64 with rpb; 8 x 8 for k = 7: 14 key rows of a 16-column
halo, the fewest score elements per pixel for one wgmma row block; whole 56-pixel rows
would need 7 rows of 64 columns, 2.3x more), M = 32 on one warp for 16-bit d <= 32
without shift or rpb (4 x 8: 10 key rows per 4 query rows, 29% fewer score elements per
pixel; mma.sync; past d = 16 only with a 16-column halo). It loads their q, out, dout
and lse once, writes delta = rowsum(dout * out) for kernel 2 (rows_bwd_key),
and walks the key rows that its queries' windows cover (their union; each key row is
loaded once and serves every query row whose window holds it). Per key row y, with the
row's k/v halo of BLOCK_K columns:
    S  = Q K^T                     tl.dot [M, D] @ [D, BK]
    S  = S*scale*log2(e) + (column term + row term) (+ rpb);  P = exp2(S)
    dP = dO V^T                    tl.dot [M, D] @ [D, BK]
    dS = P * (dP - delta)
    dq += dS K                     tl.dot [M, BK] @ [BK, D]
The rel bias comes from two small products made once per program, Bh = Q rel_h^T and
Bw = Q rel_w^T; the column bias tile (the column tap of a halo column depends only on
the query's column, never on the key row) is expanded once. The rel part of dq needs,
per query, G_row[t] = sum of dS over the window row with rel index t (one row sum per
key row) and G_col[t] = sum over the window column t (a running [M, BK] sum of dS over
key rows, split into columns once after the row loop); then
    dq += G_row @ rel_h + G_col @ rel_w,  drel_h part = G_row^T Q,  drel_w part = G_col^T Q
and drpb part [t_row, t_col] = sum of dS at that tap. Table indices are "rel indices":
the tap (zeros/mask) or offset + k - 1 (shift), so a shift program's partial covers the
whole 2k-1 table. The partials go to per-program buffers that `_reduce_tables_kernel`
sums in a fixed order (one more launch; a program per table row and chunk of positions),
summing over heads for 2-D tables and casting to the table dtype.

The window rides in the two terms, with no select per score element: the column term
(column bias, made once) is -inf at halo columns outside the query's window, the row term
(row bias - lse*log2(e), one value per query and key row) is -inf where the key row is
outside it, so P is exactly 0 there and so is dS (for a finite dP). With ROW_DOT (16-bit
inputs, 32 queries per warp) the row term is instead a table made once, [M, NS_PAD]: for
each walked key row, Bh at the query's window row (-1e30 outside the window), split into
bf16 hi + lo and added to the logits by two one-hot tensor-core products per key row
(`common.identity_table`); - lse joins the column bias. With dil_w 1 and no shift the
column maps need no masks either: query column c's rel column t reads halo column
(c + t) mod BLOCK_K for G_col (`XT_WRAP`: a t >= KW lands where dS is 0) and halo column
x reads Bw at (x - c) mod TX_PAD, whose padding columns are -inf (`COL_WRAP`: BLOCK_K ==
TX_PAD, no rpb).

Non-finite inputs: a NaN / inf outside some query's window reaches that query's results
through S or dP (k, v: -inf + inf, 0 * inf) or a 0 * NaN inside a product (dS K, G rel,
G^T Q, the rpb one-hot product).
A program whose results come out non-finite stores nothing but delta and is redone by
`_safe_program`: the same results one window offset at a time on CUDA cores, every dead
(query, tap) product left out (the offsets backward's arithmetic), so NaN / inf reach
exactly the gradients whose windows hold them. It never runs on finite inputs.

Supported: every padding mode, dilation, odd kh/kw with BLOCK_K <= 256, shared/per-head
rel tables, rpb, fp16/bf16/fp32 (fp32 and the table products use input_precision="ieee"),
d = 1..128 (larger d spills: `supports` says no). Any strides; 64-bit base offsets.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from sasa_triton.types import AttendArgs

from .common import (
    INTERPRETED,
    LOG2E,
    PADDING_CODES,
    halo_span,
    head_block,
    identity_table,
    launch_options,
    new_output,
    new_output_like,
    new_table_grads,
    next_pow2,
    split_partials,
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
from .offsets_bwd import _key_of_query

MAX_BLOCK_K = 256
MAX_D = 128
MAX_GRID = 2**31 - 1  # programs of the query kernel (grid axis 0)
MAX_GRID_Y = 65535  # heads: axis 1 of the reduction's grid
PREFIX = "Q_"
XT_WRAP_ON = True  # tests switch it off to compare


@triton.jit
def _div(x, m, shift):
    """x // d for 0 <= x < 2**31 by d's multiplier m (2**31 <= m < 2**32) and shift
    (`div_magic`): one high multiply and a shift instead of a runtime integer division."""
    xu = x.to(tl.uint32)
    return (tl.umulhi(xu + xu, m.to(tl.uint32)) >> shift.to(tl.uint32)).to(tl.int32)


@triton.jit
def _unravel(pid, HEADS, N_COL, N_ROW, divs):
    """common.unravel_program (head fastest, then column blocks, row blocks, batch) by
    the multipliers and shifts of HEADS, N_COL and N_ROW in `divs`."""
    m_h, s_h, m_c, s_c, m_r, s_r = divs
    t = _div(pid, m_h, s_h)
    n = pid - t * HEADS
    t2 = _div(t, m_c, s_c)
    jb = t - t2 * N_COL
    b = _div(t2, m_r, s_r)
    return n, jb, t2 - b * N_ROW, b


@triton.jit
def _split(a, dtype: tl.constexpr):
    """(hi, lo): a float32 `a` as a high and a low half-precision part (~16 significant
    bits; hi + lo == a up to lo's rounding)."""
    a_hi = a.to(dtype)
    return a_hi, (a - a_hi.to(tl.float32)).to(dtype)


@triton.jit
def _table_dot(a, b, HALF: tl.constexpr):
    """a @ b for a float32 `a` (dS sums) and a table / query tile `b` already in the
    dot dtype: with HALF, `a` is split into a high and a low half-precision part (two
    tensor-core products, ~16 significant bits, exact products); else fp32 ("ieee")."""
    if HALF:
        a_hi = a.to(b.dtype)
        a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
        return tl.dot(a_hi, b) + tl.dot(a_lo, b)
    else:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")


@triton.jit
def _table_dot_t(a, b, HALF: tl.constexpr):
    """a @ b for a query tile `a` in the dot dtype and a float32 `b` (dS sums): with
    HALF, `b` split into a high and a low half-precision part (as _table_dot)."""
    if HALF:
        b_hi = b.to(a.dtype)
        b_lo = (b - b_hi.to(tl.float32)).to(a.dtype)
        return tl.dot(a, b_hi) + tl.dot(a, b_lo)
    else:
        return tl.dot(a.to(tl.float32), b, input_precision="ieee")


@triton.jit
def _grads_pass(
    b_q, b_do, b_lse2, b_delta, b_bh, b_colbias, b_relh, b_relw,
    start_y, off_y, off_x, o_tap, m_q, m_col, m_xt, o_xt, o_cm, o_ty, y_lo, y_hi, H,
    p_k0, p_v0, o_kx, o_vx, m_kv_x, sk_h, sv_h, p_rpb, srp_h, srp_w, qk_scale, scale,
    b_qrow, b_qlo, p_sel, o_sel,
    KH: tl.constexpr, KW: tl.constexpr, SHIFT: tl.constexpr, dil_h: tl.constexpr,
    TY: tl.constexpr, TY_PAD: tl.constexpr, TX_PAD: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, HALF: tl.constexpr,
    TABLE_HALF: tl.constexpr, KV_I32: tl.constexpr, ROW_DOT: tl.constexpr,
    TABLES_T: tl.constexpr, XT_WRAP: tl.constexpr,
):
    """The key-row walk and the table products of one program: (dq / scale [M, D],
    drel_h part [TY_PAD, D], drel_w part [TX_PAD, D] (transposed with TABLES_T: [D, T]),
    drpb part [TY_PAD, TX_PAD]).
    With ROW_DOT, b_colbias holds - lse too and the row term of walked row r is column r
    of b_qrow + b_qlo (a bf16 hi/lo pair), added by one-hot tensor-core products.
    """
    b_acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)  # dS K
    # - delta as dP's C tile, made once; + (column * qk_scale) * 0.0, which the compiler
    # cannot fold, makes its elements distinct values held through the walk (a plain
    # broadcast is rebuilt into mma.sync's C registers every key row)
    b_cdelta = (tl.arange(0, BLOCK_K).to(tl.float32) * qk_scale * 0.0)[None, :] - b_delta[:, None]
    b_gacc = tl.zeros([M, BLOCK_K], dtype=tl.float32)  # dS summed over key rows
    b_grow = tl.zeros([M, TY_PAD], dtype=tl.float32)  # G_row in rel-index space
    b_prpb = tl.zeros([TY_PAD, TX_PAD], dtype=tl.float32)  # drpb partial
    if SHIFT or dil_h != 1 or TY > 8:  # (k = 11: 16 columns at 2 warps read +12%)
        TY_M: tl.constexpr = TY
    else:  # o_tyq = o_dy: t in [TY, TY_M) only for rows past the window (dS 0 there; rel_h's
        # padding rows are 0 and the partials' are not stored): a whole group of 8 columns
        TY_M: tl.constexpr = 8
    for r in range(0, y_hi + 1 - y_lo):  # key rows: the union of the queries' windows
        y = y_lo + r
        o_yv = y + tl.zeros([BLOCK_K], dtype=tl.int32)  # row check as a vector (interpreter)
        m_kv = m_kv_x & ((o_yv >= 0) & (o_yv < H))[:, None]
        if KV_I32:  # offsets inside one (batch, head) image fit int32: one IMAD per row
            b_k = tl.load(p_k0 + (y * sk_h + o_kx), mask=m_kv, other=0.0)  # [BK, BD]
            b_v = tl.load(p_v0 + (y * sv_h + o_vx), mask=m_kv, other=0.0)  # [BK, BD]
        else:
            y64 = y.to(tl.int64)
            b_k = tl.load(p_k0 + y64 * sk_h + o_kx, mask=m_kv, other=0.0)
            b_v = tl.load(p_v0 + y64 * sv_h + o_vx, mask=m_kv, other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        # which window row of each query key row y is (and its rel index)
        o_dy = y - start_y  # [M]
        o_dyc = tl.maximum(o_dy, 0)
        o_a = o_dyc // dil_h
        m_row = (o_dy >= 0) & (o_dyc - o_a * dil_h == 0) & (o_a < KH)
        if SHIFT:
            o_tyq = off_y + o_a + KH - 1
        elif dil_h == 1:  # o_dy itself: a row above the window (o_dy < 0) selects no t
            o_tyq = o_dy
        else:
            o_tyq = o_a
        if HAS_REL:
            # (o_ty < TY_M: columns past it are never selected; the compiler drops them)
            m_ty = (o_ty[None, :] == o_tyq[:, None]) & (o_ty < TY_M)[None, :]  # [M, TY_PAD]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [M, D] @ [D, BK] -> [M, BK]
        if ROW_DOT:  # row term (-1e30 outside the window) by a one-hot dot: no selects
            b_sel = tl.trans(tl.load(p_sel + r * b_qrow.shape[1] + o_sel).to(b_qrow.dtype))
            b_s = tl.dot(b_qlo, b_sel, b_s * qk_scale + b_colbias, input_precision="ieee")
            b_s = tl.dot(b_qrow, b_sel, b_s, input_precision="ieee")  # [M, NS] @ [NS, BK]
        else:
            # The row part of the logit (row bias - lse, or -inf where key row y is outside
            # the query's window) added to the column part (column bias, -inf outside the
            # window columns): P = exp2(S * qk_scale + bias) is exactly 0 outside each
            # window, no select.
            b_rowterm = -b_lse2
            if HAS_REL:
                b_rowterm += tl.sum(tl.where(m_ty, b_bh, 0.0), axis=1)  # [M], in-thread
            b_rowterm = tl.where(m_row, b_rowterm, float("-inf"))
            b_s = b_s * qk_scale + (b_colbias + b_rowterm[:, None])
        if HAS_RPB:
            m_win = m_col & m_row[:, None]
            o_rpb = (off_y + o_a + KH - 1)[:, None] * srp_h + (off_x[:, None] + o_tap + KW - 1) * srp_w
            b_s += tl.load(p_rpb + o_rpb, mask=m_win, other=0.0).to(tl.float32) * LOG2E
        b_p = tl.exp2(b_s)
        if ROW_DOT:  # dP - delta: delta rides in mma.sync's C operand (no FADD per element)
            b_ds = b_p * tl.dot(b_do, tl.trans(b_v), b_cdelta, input_precision="ieee")
        else:  # (wgmma accumulates in place: the C tile would be copied every key row)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [M, D] @ [D, BK]
            b_ds = b_p * (b_dp - b_delta[:, None])  # [M, BK]; 0 outside the windows
        b_acc += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision="ieee")  # [M, BK] @ [BK, D]
        if HAS_REL:
            b_gacc += b_ds
            if TY <= 8:  # the sum selected, not a selected addend (a predicated add)
                b_grow = tl.where(m_ty, b_grow + tl.sum(b_ds, axis=1)[:, None], b_grow)
            else:  # (k = 11 at 2 warps: +908 instructions the other way)
                b_grow += tl.where(m_ty, tl.sum(b_ds, axis=1)[:, None], 0.0)
        if HAS_RPB:  # per query: dS summed into its column taps; then summed over queries
            b_rt = tl.where(m_xt, tl.gather(b_ds, o_xt, axis=1), 0.0)  # [M, TX_PAD]
            b_oh = tl.where(o_ty[None, :] == o_tyq[:, None], 1.0, 0.0)  # [M, TY_PAD]
            b_prpb = tl.dot(tl.trans(b_oh), b_rt, b_prpb, input_precision="ieee")  # [TYP, TXP]

    if HAS_REL:
        # G_col in rel-index space: each (query, t) reads its one halo column
        if XT_WRAP:
            # t -> halo column o_cm + t mod BLOCK_K is one-to-one (dil_w 1, TX_PAD <=
            # BLOCK_K, no shift): a t >= KW lands on a column outside the query's window
            # (or the image, mask padding), where P and so dS are 0 -- no mask (made
            # here, after the walk: nothing more held through it)
            o_xw = (o_cm[:, None] + tl.arange(0, TX_PAD)[None, :]) & (BLOCK_K - 1)
            b_gcol = tl.gather(b_gacc, o_xw, axis=1)  # [M, TX_PAD]
        else:
            b_gcol = tl.where(m_xt, tl.gather(b_gacc, o_xt, axis=1), 0.0)
        if TABLE_HALF:  # (so HALF too) one hi/lo split of each G serves its two products
            gr_hi, gr_lo = _split(b_grow, b_q.dtype)
            gc_hi, gc_lo = _split(b_gcol, b_q.dtype)
            b_acc = tl.dot(gr_lo, b_relh, tl.dot(gr_hi, b_relh, b_acc))  # [M, D]
            b_acc = tl.dot(gc_lo, b_relw, tl.dot(gc_hi, b_relw, b_acc))
            if TABLES_T:
                b_qt = tl.trans(b_q)
                b_ph = tl.dot(b_qt, gr_lo, tl.dot(b_qt, gr_hi)) * scale  # [D, TYP]
                b_pw = tl.dot(b_qt, gc_lo, tl.dot(b_qt, gc_hi)) * scale  # [D, TXP]
            else:
                b_ph = tl.dot(tl.trans(gr_lo), b_q, tl.dot(tl.trans(gr_hi), b_q)) * scale
                b_pw = tl.dot(tl.trans(gc_lo), b_q, tl.dot(tl.trans(gc_hi), b_q)) * scale
        else:
            b_acc += _table_dot(b_grow, b_relh, TABLE_HALF)  # [M, TYP] @ [TYP, D] -> [M, D]
            b_acc += _table_dot(b_gcol, b_relw, TABLE_HALF)  # [M, TXP] @ [TXP, D] -> [M, D]
        if TABLE_HALF:
            pass
        elif TABLES_T:  # transposed: q^T as the first operand, one transpose instead of four
            b_qt = tl.trans(b_q)
            b_ph = _table_dot_t(b_qt, b_grow, HALF) * scale  # [D, M] @ [M, TYP] -> [D, TYP]
            b_pw = _table_dot_t(b_qt, b_gcol, HALF) * scale  # [D, M] @ [M, TXP] -> [D, TXP]
        else:
            b_ph = _table_dot(tl.trans(b_grow), b_q, HALF) * scale  # [TYP, M] @ [M, D]
            b_pw = _table_dot(tl.trans(b_gcol), b_q, HALF) * scale  # [TXP, M] @ [M, D]
    else:
        b_ph = tl.zeros([TY_PAD, BLOCK_D], dtype=tl.float32)
        b_pw = tl.zeros([TX_PAD, BLOCK_D], dtype=tl.float32)
    return b_acc, b_ph, b_pw, b_prpb


@triton.jit
def _bad(b_acc, b_ph, b_pw, b_prpb, HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
         SAME: tl.constexpr):
    """1 if a result is NaN / inf (element by element, integer maxima), else 0."""
    bad = tl.max(tl.max(tl.where(tl.abs(b_acc) < float("inf"), 0, 1), axis=1), axis=0)
    if HAS_REL:
        if SAME:  # one reduction: a NaN / inf in either makes the sum so
            b_pt = tl.abs(b_ph) + tl.abs(b_pw)  # (a finite overflow only costs the slow pass)
            bad += tl.max(tl.max(tl.where(b_pt < float("inf"), 0, 1), axis=1), axis=0)
        else:
            bad += tl.max(tl.max(tl.where(tl.abs(b_ph) < float("inf"), 0, 1), axis=1), axis=0)
            bad += tl.max(tl.max(tl.where(tl.abs(b_pw) < float("inf"), 0, 1), axis=1), axis=0)
    if HAS_RPB:
        bad += tl.max(tl.max(tl.where(tl.abs(b_prpb) < float("inf"), 0, 1), axis=1), axis=0)
    return bad


@triton.jit
def _program(
    pid, divs,
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr, sel_ptr,
    dq_ptr, delta_ptr, parth_ptr, partw_ptr, partb_ptr,
    H, W, HEADS, D, D_HALF, qk_scale, scale,  # qk_scale = scale * log2(e)
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    sdq_b, sdq_h, sdq_w, sdq_n, sdq_d,
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    dil_h: tl.constexpr, dil_w: tl.constexpr,  # constexpr: no runtime integer division
    TY: tl.constexpr, TX: tl.constexpr, TY_PAD: tl.constexpr, TX_PAD: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, ROW_I64: tl.constexpr,
    HALF: tl.constexpr, TABLE_HALF: tl.constexpr, KV_I32: tl.constexpr,
    ROW_DOT: tl.constexpr, NS_PAD: tl.constexpr, TABLES_T: tl.constexpr,
    D_C: tl.constexpr, XT_WRAP: tl.constexpr, COL_WRAP: tl.constexpr, PART_I32: tl.constexpr,
    ROW_F32: tl.constexpr,
):
    """One program of _query_grads_kernel: loads, the pass, stores. Returns 1 (storing
    only delta) when a result came out non-finite, else 0."""
    if D_C > 0:  # d as a constexpr (d < BLOCK_D: vector k/v loads under the channel mask;
        # d == BLOCK_D on one warp: the channel masks fold away)
        D = D_C
        D_HALF = D_C // 2
    SHIFT: tl.constexpr = PADDING == 2
    M: tl.constexpr = BLOCK_H * BLOCK_W
    # head fastest: the heads of one tile run side by side (full cache sectors)
    n, jb, ib, b = _unravel(pid, HEADS, tl.cdiv(W, BLOCK_W), tl.cdiv(H, BLOCK_H), divs)

    o_m = tl.arange(0, M)
    o_i = ib * BLOCK_H + o_m // BLOCK_W  # query rows
    o_j = jb * BLOCK_W + o_m % BLOCK_W  # query columns
    m_q = (o_i < H) & (o_j < W)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_qd = m_q[:, None] & m_d[None, :]
    if ROW_I64:
        o_dr = o_d.to(tl.int64)
        o_jr = o_j.to(tl.int64)
    else:
        o_dr = o_d
        o_jr = o_j
    o_i64 = o_i.to(tl.int64)
    b64 = b.to(tl.int64)
    n64 = n.to(tl.int64)

    # ---- the query tile: q, out, dout, lse once; delta for kernel 2
    b_q = tl.load(q_ptr + b64 * sq_b + n64 * sq_n + o_i64[:, None] * sq_h
                  + (o_jr[:, None] * sq_w + o_dr[None, :] * sq_d), mask=m_qd, other=0.0)
    b_o = tl.load(o_ptr + b64 * so_b + n64 * so_n + o_i64[:, None] * so_h
                  + (o_jr[:, None] * so_w + o_dr[None, :] * so_d), mask=m_qd, other=0.0)
    b_do = tl.load(do_ptr + b64 * sdo_b + n64 * sdo_n + o_i64[:, None] * sdo_h
                   + (o_jr[:, None] * sdo_w + o_dr[None, :] * sdo_d), mask=m_qd, other=0.0)
    b_lse = tl.load(lse_ptr + b64 * sl_b + n64 * sl_n + o_i64 * sl_h + o_jr * sl_w,
                    mask=m_q, other=0.0)
    b_lse2 = b_lse * LOG2E
    b_delta = tl.sum(to_f32(b_do) * to_f32(b_o), axis=1)  # [M] (bf16: one op per value)
    if PART_I32:  # delta and the partial buffers have < 2**31 elements: int32 offsets
        tl.store(delta_ptr + ((b * H + o_i) * W + o_j) * HEADS + n, b_delta, mask=m_q)
    else:
        tl.store(delta_ptr + ((b64 * H + o_i64) * W + o_j) * HEADS + n64, b_delta, mask=m_q)
    b_qf = b_q.to(tl.float32)
    if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
        b_q = b_qf
        b_do = b_do.to(tl.float32)

    # ---- window geometry of every query
    start_y, off_y = window_start(o_i, H, KH, dil_h, SHIFT)  # [M]
    start_x, off_x = window_start(o_j, W, KW, dil_w, SHIFT)  # [M]
    if SHIFT:
        x0 = tl.min(tl.where(m_q, start_x, W), axis=0)
        y_lo = tl.min(tl.where(m_q, start_y, H), axis=0)
        y_hi = tl.max(tl.where(m_q, start_y, 0), axis=0) + (KH - 1) * dil_h
    else:
        x0 = jb * BLOCK_W - (KW // 2) * dil_w
        i_first = ib * BLOCK_H
        i_last = tl.minimum(i_first + BLOCK_H, H) - 1
        y_lo = i_first - (KH // 2) * dil_h
        y_hi = i_last + (KH // 2) * dil_h
        if PADDING == 1:  # mask: only rows inside the image
            y_lo = tl.maximum(y_lo, 0)
            y_hi = tl.minimum(y_hi, H - 1)
    o_x = x0 + tl.arange(0, BLOCK_K)  # halo columns
    m_x = (o_x >= 0) & (o_x < W)
    if ROW_I64:
        o_xr = o_x.to(tl.int64)
    else:
        o_xr = o_x
    o_kx = o_xr[:, None] * sk_w + o_dr[None, :] * sk_d  # [BK, BD]
    o_vx = o_xr[:, None] * sv_w + o_dr[None, :] * sv_d
    m_kv_x = m_x[:, None] & m_d[None, :]

    # Column pattern, shared by every key row: tap of halo column x for query (i, j).
    o_diff = o_x[None, :] - start_x[:, None]  # [M, BK]
    o_diffc = tl.maximum(o_diff, 0)
    o_tap = o_diffc // dil_w
    m_col = (o_diff >= 0) & (o_diffc - o_tap * dil_w == 0) & (o_tap < KW) & m_q[:, None]
    if PADDING == 1:
        m_col = m_col & m_x[None, :]
    o_ty = tl.arange(0, TY_PAD)
    o_txp = tl.arange(0, TX_PAD)
    # Rel column index t of a halo column (o_tx, [M, BK]) and, the other way round, the
    # halo column of each query's rel column t (o_xt, [M, TX_PAD]; m_xt where t is one of
    # its taps): the gathers between [M, BK] tiles and [M, TX] tables use them.
    if SHIFT:
        o_tx = off_x[:, None] + o_tap + KW - 1
        o_tapt = o_txp[None, :] - off_x[:, None] - (KW - 1)  # [M, TX_PAD]
    else:
        o_tx = o_tap
        o_tapt = o_txp[None, :] + 0 * off_x[:, None]
    m_xt = (o_tapt >= 0) & (o_tapt < KW) & m_q[:, None]
    o_xt = start_x[:, None] - x0 + o_tapt * dil_w
    if PADDING == 1:
        m_xt = m_xt & (o_xt + x0 >= 0) & (o_xt + x0 < W)
    o_xt = tl.where(m_xt, o_xt, 0)
    o_txc = tl.where(m_col, o_tx, 0)
    m_dh = o_d < D_HALF
    m_dw = (o_d >= D_HALF) & m_d

    # Rel tables as [T, BLOCK_D] tiles over the full channel axis (zero elsewhere), and
    # the bias products Bh = Q rel_h^T [M, TY_PAD], Bw = Q rel_w^T [M, TX_PAD].
    b_colbias = tl.zeros([M, BLOCK_K], dtype=tl.float32)
    b_bh = tl.zeros([M, TY_PAD], dtype=tl.float32)
    b_relh = tl.zeros([TY_PAD, BLOCK_D], dtype=tl.float32)  # (unused without rel)
    b_relw = tl.zeros([TX_PAD, BLOCK_D], dtype=tl.float32)
    if HAS_REL:
        b_relh = tl.load(relh_ptr + n64 * srh_n + o_ty[:, None] * srh_r + o_d[None, :] * srh_d,
                         mask=(o_ty[:, None] < TY) & m_dh[None, :], other=0.0)
        b_relw = tl.load(relw_ptr + n64 * srw_n + o_txp[:, None] * srw_r
                         + (o_d[None, :] - D_HALF) * srw_d,
                         mask=(o_txp[:, None] < TX) & m_dw[None, :], other=0.0)
        if TABLE_HALF:  # half q and tables: tensor cores, exact products
            b_relh = b_relh.to(b_q.dtype)
            b_relw = b_relw.to(b_q.dtype)
            b_bh = tl.dot(b_q, tl.trans(b_relh)) * qk_scale  # [M, D] @ [D, TYP] -> [M, TYP]
            b_bw = tl.dot(b_q, tl.trans(b_relw)) * qk_scale  # [M, D] @ [D, TXP] -> [M, TXP]
        else:
            b_relh = b_relh.to(tl.float32)
            b_relw = b_relw.to(tl.float32)
            b_bh = tl.dot(b_qf, tl.trans(b_relh), input_precision="ieee") * qk_scale
            b_bw = tl.dot(b_qf, tl.trans(b_relw), input_precision="ieee") * qk_scale
        if COL_WRAP:
            # halo column -> tap mod TX_PAD is one-to-one (BLOCK_K == TX_PAD, dil_w 1, no
            # shift): a column outside the query's window lands on a padding column t >= TX
            # of Bw, made -inf -- no [M, BK] window mask (invalid queries: q = 0, dS = 0)
            b_bw = tl.where((o_txp < TX)[None, :], b_bw, float("-inf"))
            b_colbias = tl.gather(b_bw, o_diff & (TX_PAD - 1), axis=1)  # [M, BK]
        else:
            b_colbias = tl.gather(b_bw, o_txc, axis=1)  # [M, BK]: Bw at each column's tap
    if not COL_WRAP:
        b_colbias = tl.where(m_col, b_colbias, float("-inf"))  # the window's columns only
    elif PADDING == 1:  # mask: and inside the image
        b_colbias = tl.where(m_x[None, :], b_colbias, float("-inf"))
    b_qrow = b_bh  # (unused without ROW_DOT)
    b_qlo = b_bh
    o_sel = o_ty
    if ROW_DOT:
        # Row term of walked key row s = y_lo + s for each query (Bh at its window row),
        # -1e30 where the window misses that row: column s of b_qrow as a bf16 hi/lo
        # pair (columns 2s, 2s + 1; ~16 significant bits); - lse joins the column bias.
        o_s = tl.arange(0, NS_PAD)
        o_dys = (y_lo + o_s)[None, :] - start_y[:, None]  # [M, NS_PAD]
        o_dysc = tl.maximum(o_dys, 0)
        o_as = o_dysc // dil_h
        m_rs = (o_dys >= 0) & (o_dysc - o_as * dil_h == 0) & (o_as < KH)
        b_g = tl.zeros([M, NS_PAD], dtype=tl.float32)
        if HAS_REL:
            if SHIFT:
                o_tys = off_y[:, None] + o_as + KH - 1
            else:
                o_tys = o_as
            b_g = tl.gather(b_bh, tl.where(m_rs, o_tys, 0), axis=1)
        b_g = tl.where(m_rs, b_g, -1.0e30)
        b_qrow = b_g.to(tl.bfloat16)  # the high part; b_qlo the rest
        b_qlo = (b_g - b_qrow.to(tl.float32)).to(tl.bfloat16)
        if ROW_F32:  # the interpreter's bf16 tl.dot is wrong: the bf16 values, in float32
            b_qrow = b_qrow.to(tl.float32)
            b_qlo = b_qlo.to(tl.float32)
        b_colbias = b_colbias - b_lse2[:, None]
        # one-hot rows (sel_ptr: the [NS_PAD, NS_PAD] identity, row s = slot s), the same
        # row for each key column
        o_sel = (tl.arange(0, BLOCK_K) * 0)[:, None] + tl.arange(0, NS_PAD)[None, :]

    p_k0 = k_ptr + b64 * sk_b + n64 * sk_n
    p_v0 = v_ptr + b64 * sv_b + n64 * sv_n
    p_rpb = rpb_ptr  # (None without rpb)
    if HAS_RPB:
        p_rpb = rpb_ptr + n64 * srp_n
    b_acc, b_ph, b_pw, b_prpb = _grads_pass(
        b_q, b_do, b_lse2, b_delta, b_bh, b_colbias, b_relh, b_relw,
        start_y, off_y, off_x, o_tap, m_q, m_col, m_xt, o_xt, start_x - x0, o_ty, y_lo, y_hi, H,
        p_k0, p_v0, o_kx, o_vx, m_kv_x, sk_h, sv_h, p_rpb, srp_h, srp_w, qk_scale, scale,
        b_qrow, b_qlo, sel_ptr, o_sel,
        KH, KW, SHIFT, dil_h, TY, TY_PAD, TX_PAD, HAS_REL, HAS_RPB, M, BLOCK_K, BLOCK_D,
        DOT_F32, HALF, TABLE_HALF, KV_I32, ROW_DOT, TABLES_T, XT_WRAP)
    # A non-finite result may come from a NaN / inf input outside some query's window
    # that a 0 * NaN inside a product spread over the tile (a k row in dS K, a table row
    # in G rel, a q in G^T Q, a tap in the rpb sums): then nothing is stored here and the
    # kernel redoes the program with _safe_program.
    if ROW_DOT:  # one warp: sums (a NaN / inf among the results makes its sum so; a
        # finite overflow only costs the slow pass), then one integer max (uniform)
        b_tot = tl.sum(b_acc, axis=1)  # [M]
        if HAS_REL:
            if TY_PAD == TX_PAD:
                b_tot += tl.sum(tl.sum(b_ph + b_pw, axis=1), axis=0)
            else:
                b_tot += tl.sum(tl.sum(b_ph, axis=1), axis=0) + tl.sum(tl.sum(b_pw, axis=1), axis=0)
        if HAS_RPB:
            b_tot += tl.sum(tl.sum(b_prpb, axis=1), axis=0)
        bad = tl.max(tl.where(tl.abs(b_tot) < float("inf"), 0, 1), axis=0)
    else:
        bad = _bad(b_acc, b_ph, b_pw, b_prpb, HAS_REL, HAS_RPB, TY_PAD == TX_PAD)
    if bad == 0:  # (the fast pass of a program with a non-finite result stores nothing)
        prog = pid  # partial-buffer slot: (tile, head), fixed by the grid
        n_prog = tl.num_programs(0)  # partials: [row, slot, column]
        if not PART_I32:
            prog = prog.to(tl.int64)
            n_prog = n_prog.to(tl.int64)
        if HAS_REL:
            d_w = D - D_HALF
            if TABLES_T:  # [D, T] tiles
                tl.store(parth_ptr + (o_ty[None, :] * n_prog + prog) * D_HALF + o_d[:, None],
                         b_ph, mask=(o_ty[None, :] < TY) & m_dh[:, None])
                tl.store(partw_ptr + (o_txp[None, :] * n_prog + prog) * d_w
                         + (o_d[:, None] - D_HALF), b_pw,
                         mask=(o_txp[None, :] < TX) & m_dw[:, None])
            else:  # [T, D] tiles
                tl.store(parth_ptr + (o_ty[:, None] * n_prog + prog) * D_HALF + o_d[None, :],
                         b_ph, mask=(o_ty[:, None] < TY) & m_dh[None, :])
                tl.store(partw_ptr + (o_txp[:, None] * n_prog + prog) * d_w
                         + (o_d[None, :] - D_HALF), b_pw,
                         mask=(o_txp[:, None] < TX) & m_dw[None, :])
        if HAS_RPB:
            tl.store(partb_ptr + (o_ty[:, None] * n_prog + prog) * TX + o_txp[None, :], b_prpb,
                     mask=(o_ty[:, None] < TY) & (o_txp[None, :] < TX))
        p_dq = (dq_ptr + b64 * sdq_b + n64 * sdq_n + o_i64[:, None] * sdq_h
                + (o_jr[:, None] * sdq_w + o_dr[None, :] * sdq_d))
        tl.store(p_dq, (b_acc * scale).to(dq_ptr.dtype.element_ty), mask=m_qd)
    return bad


@triton.jit
def _safe_program(
    pid, divs, q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
    dq_ptr, parth_ptr, partw_ptr, partb_ptr, H, W, HEADS, D, D_HALF, scale,
    sq_b, sq_h, sq_w, sq_n, sq_d, sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d, so_b, so_h, so_w, so_n, so_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    sdq_b, sdq_h, sdq_w, sdq_n, sdq_d,
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,
    dil_h: tl.constexpr, dil_w: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
    TY_PAD: tl.constexpr, TX_PAD: tl.constexpr, HAS_REL: tl.constexpr,
    HAS_RPB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr, SUB: tl.constexpr,
):
    """The slow pass: dq and the table partials of program `pid`, computed one window
    offset at a time on CUDA cores (the offsets backward's per-tap arithmetic), where
    every product of a dead (query, tap) pair is left out, so a NaN / inf input reaches
    only the results whose windows hold it. Runs only for programs whose fast pass met a
    non-finite result; SUB queries at a time, so it adds few registers to the kernel."""
    n, jb, ib, b = _unravel(pid, HEADS, tl.cdiv(W, BLOCK_W), tl.cdiv(H, BLOCK_H), divs)
    b = b.to(tl.int64)
    n64 = n.to(tl.int64)
    prog = pid.to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)  # partials: [row, slot, column]
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_tx = tl.arange(0, TX_PAD)
    o_ty = tl.arange(0, TY_PAD)
    scale2 = scale * LOG2E

    acc_h = tl.zeros([TY_PAD, BLOCK_D], dtype=tl.float32)  # drel_h partial, row ty
    acc_w = tl.zeros([TX_PAD, BLOCK_D], dtype=tl.float32)  # drel_w partial, row tx
    acc_b = tl.zeros([TY_PAD, TX_PAD], dtype=tl.float32)  # drpb partial
    for sub in range(0, BLOCK_H * BLOCK_W // SUB):
        o_m = sub * SUB + tl.arange(0, SUB)
        i = ib * BLOCK_H + o_m // BLOCK_W
        j = jb * BLOCK_W + o_m % BLOCK_W
        m_p = (i < H) & (j < W)
        m_pd = m_p[:, None] & m_d[None, :]
        i64 = i.to(tl.int64)
        j64 = j.to(tl.int64)
        o_q = b * sq_b + i64 * sq_h + j64 * sq_w + n64 * sq_n
        b_q = tl.load(q_ptr + o_q[:, None] + o_d[None, :] * sq_d, mask=m_pd,
                      other=0.0).to(tl.float32)
        o_o = b * so_b + i64 * so_h + j64 * so_w + n64 * so_n
        b_o = tl.load(o_ptr + o_o[:, None] + o_d[None, :] * so_d, mask=m_pd,
                      other=0.0).to(tl.float32)
        o_do = b * sdo_b + i64 * sdo_h + j64 * sdo_w + n64 * sdo_n
        b_do = tl.load(do_ptr + o_do[:, None] + o_d[None, :] * sdo_d, mask=m_pd,
                       other=0.0).to(tl.float32)
        b_lse = tl.load(lse_ptr + b * sl_b + i64 * sl_h + j64 * sl_w + n64 * sl_n, mask=m_p,
                        other=0.0)
        b_lse2 = b_lse * LOG2E
        b_delta = tl.sum(b_do * b_o, axis=1)
        acc_dq = tl.zeros([SUB, BLOCK_D], dtype=tl.float32)
        for ty in range(0, TY):
            y, m_y = _key_of_query(i, ty, H, KH, dil_h, PADDING == 2)
            b_rh = tl.zeros([BLOCK_D], dtype=tl.float32)
            if HAS_REL:
                b_rh = tl.load(relh_ptr + n64 * srh_n + ty * srh_r + o_d * srh_d,
                               mask=o_d < D_HALF, other=0.0).to(tl.float32)
            for tx in range(0, TX):
                x, m_x = _key_of_query(j, tx, W, KW, dil_w, PADDING == 2)
                m_in = m_p & m_y & m_x
                if PADDING == 0:  # zeros: out-of-image neighbours are zero keys, take mass
                    m_live = m_p
                else:
                    m_live = m_in
                m_kd = m_in[:, None] & m_d[None, :]
                o_k = b * sk_b + y.to(tl.int64) * sk_h + x.to(tl.int64) * sk_w + n64 * sk_n
                b_k = tl.load(k_ptr + o_k[:, None] + o_d[None, :] * sk_d, mask=m_kd,
                              other=0.0).to(tl.float32)
                o_v = b * sv_b + y.to(tl.int64) * sv_h + x.to(tl.int64) * sv_w + n64 * sv_n
                b_v = tl.load(v_ptr + o_v[:, None] + o_d[None, :] * sv_d, mask=m_kd,
                              other=0.0).to(tl.float32)
                if HAS_REL:
                    b_rw = tl.load(relw_ptr + n64 * srw_n + tx * srw_r + (o_d - D_HALF) * srw_d,
                                   mask=(o_d >= D_HALF) & m_d, other=0.0).to(tl.float32)
                    b_k = b_k + (b_rh + b_rw)[None, :]
                    if PADDING != 0:  # a dead tap adds no 0 * (an inf in a row it does not use)
                        b_k = tl.where(m_live[:, None], b_k, 0.0)
                b_s = tl.sum(b_q * b_k, axis=1) * scale2
                if HAS_RPB:
                    if PADDING == 2:
                        b_s += tl.load(rpb_ptr + n64 * srp_n + ty * srp_h + tx * srp_w).to(
                            tl.float32) * LOG2E
                    else:
                        b_s += tl.load(rpb_ptr + n64 * srp_n + (ty + KH // 2) * srp_h
                                       + (tx + KW // 2) * srp_w).to(tl.float32) * LOG2E
                b_p = tl.exp2(b_s - b_lse2)
                b_dp = tl.sum(b_do * b_v, axis=1)
                b_ds = tl.where(m_live, b_p * (b_dp - b_delta), 0.0)
                acc_dq += b_ds[:, None] * b_k
                if HAS_REL:  # nor 0 * (a NaN in q) to a table row the query does not use
                    b_g = tl.sum(tl.where(m_live[:, None], b_ds[:, None] * b_q, 0.0), axis=0)
                    acc_h += tl.where(o_ty[:, None] == ty, b_g[None, :], 0.0)
                    acc_w += tl.where(o_tx[:, None] == tx, b_g[None, :], 0.0)
                if HAS_RPB:
                    acc_b += tl.where((o_ty[:, None] == ty) & (o_tx[None, :] == tx),
                                      tl.sum(b_ds, axis=0), 0.0)
        o_dq = b * sdq_b + i64 * sdq_h + j64 * sdq_w + n64 * sdq_n
        tl.store(dq_ptr + o_dq[:, None] + o_d[None, :] * sdq_d,
                 (acc_dq * scale).to(dq_ptr.dtype.element_ty), mask=m_pd)
    if HAS_REL:
        tl.store(parth_ptr + (o_ty[:, None] * n_prog + prog) * D_HALF + o_d[None, :],
                 acc_h * scale,
                 mask=(o_ty[:, None] < TY) & (o_d < D_HALF)[None, :])
        tl.store(partw_ptr + (o_tx[:, None] * n_prog + prog) * (D - D_HALF)
                 + (o_d[None, :] - D_HALF),
                 acc_w * scale, mask=(o_tx[:, None] < TX) & ((o_d >= D_HALF) & m_d)[None, :])
    if HAS_RPB:
        tl.store(partb_ptr + (o_ty[:, None] * n_prog + prog) * TX + o_tx[None, :], acc_b,
                 mask=(o_ty[:, None] < TY) & (o_tx[None, :] < TX))


@triton.jit
def _query_grads_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr,
    relh_ptr, relw_ptr, rpb_ptr, sel_ptr,  # None when absent / not ROW_DOT (never read then)
    dq_ptr, delta_ptr, parth_ptr, partw_ptr, partb_ptr,  # partials: None without the table
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, D, D_HALF, then div_magic of HEADS, its column and row blocks)
    sq, sk, sv, so, sdo,  # (batch, row, column, head, channel) strides
    sl,  # lse's (batch, row, column, head) strides
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    qk_scale, scale,  # qk_scale = scale * log2(e)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    dil_h: tl.constexpr, dil_w: tl.constexpr,  # constexpr: no runtime integer division
    TY: tl.constexpr, TX: tl.constexpr, TY_PAD: tl.constexpr, TX_PAD: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, ROW_I64: tl.constexpr,
    HALF: tl.constexpr, TABLE_HALF: tl.constexpr, KV_I32: tl.constexpr,
    ROW_DOT: tl.constexpr, NS_PAD: tl.constexpr, TABLES_T: tl.constexpr,
    D_C: tl.constexpr, DQ_I32: tl.constexpr, XT_WRAP: tl.constexpr, COL_WRAP: tl.constexpr,
    PART_I32: tl.constexpr, ROW_F32: tl.constexpr = False,
):
    H, W, HEADS, D, D_HALF, m_h, s_h, m_c, s_c, m_r, s_r = sizes
    divs = (m_h, s_h, m_c, s_c, m_r, s_r)
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    sv_b, sv_h, sv_w, sv_n, sv_d = sv
    so_b, so_h, so_w, so_n, so_d = so
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d = sdo
    sl_b, sl_h, sl_w, sl_n = sl
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    # dq is the launcher's own contiguous allocation: its strides from the sizes
    sdq_n = D
    sdq_w = HEADS * D
    if DQ_I32:  # one batch image of dq has < 2**31 elements: 32-bit strides (as before)
        sdq_h = W * sdq_w
        sdq_b = H * sdq_h
    else:
        sdq_h = tl.cast(W, tl.int64) * sdq_w  # tl.cast: W or H may be the constant 1
        sdq_b = tl.cast(H, tl.int64) * sdq_h
    pid = tl.program_id(0)
    bad = _program(
        pid, divs,
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr,
        rpb_ptr, sel_ptr, dq_ptr, delta_ptr, parth_ptr, partw_ptr, partb_ptr, H, W,
        HEADS, D, D_HALF, qk_scale, scale, sq_b, sq_h, sq_w,
        sq_n, sq_d, sk_b, sk_h, sk_w, sk_n, sk_d, sv_b,
        sv_h, sv_w, sv_n, sv_d, so_b, so_h, so_w, so_n,
        so_d, sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h,
        sl_w, sl_n, srh_n, srh_r, srh_d, srw_n, srw_r, srw_d,
        srp_n, srp_h, srp_w, sdq_b, sdq_h, sdq_w, sdq_n, 1,
        KH, KW, PADDING, dil_h, dil_w, TY, TX, TY_PAD,
        TX_PAD, HAS_REL, HAS_RPB, BLOCK_H, BLOCK_W, BLOCK_K, BLOCK_D, DOT_F32,
        ROW_I64, HALF, TABLE_HALF, KV_I32, ROW_DOT, NS_PAD, TABLES_T, D_C, XT_WRAP,
        COL_WRAP, PART_I32, ROW_F32)
    if bad > 0:  # rare: redo this program's results tap by tap (see _safe_program)
        _safe_program(
            pid, divs, q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
            dq_ptr, parth_ptr, partw_ptr, partb_ptr, H, W, HEADS, D, D_HALF, scale,
            sq_b, sq_h, sq_w, sq_n, sq_d, sk_b, sk_h, sk_w, sk_n, sk_d,
            sv_b, sv_h, sv_w, sv_n, sv_d, so_b, so_h, so_w, so_n, so_d,
            sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h, sl_w, sl_n,
            srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
            sdq_b, sdq_h, sdq_w, sdq_n, 1,
            KH, KW, PADDING, dil_h, dil_w, TY, TX, TY_PAD, TX_PAD, HAS_REL, HAS_RPB,
            BLOCK_H, BLOCK_W, BLOCK_D, 16)


@triton.jit
def _sum_slots(p_part, count, GC: tl.constexpr, P: tl.constexpr, R: tl.constexpr,
               EVEN: tl.constexpr, LOOP: tl.constexpr, n_pos):
    """[P] sums of the P consecutive floats at p_part (the first n_pos of them valid) over
    `count` slot groups GC floats apart, in a fixed order: R groups per step (a mask-free
    loop, then one masked step for the rest; without LOOP, count <= R: that step only),
    then a tree over the R rows."""
    o_r = tl.arange(0, R)
    o_p = tl.arange(0, P)
    o_rp = o_r[:, None] * GC + o_p[None, :]  # int32: R * GC < 2**31 (reduce_plan)
    m_p = o_p < n_pos
    acc = tl.zeros([R, P], dtype=tl.float32)
    rest = count
    if LOOP:
        n_full = count // R
        for _ in range(0, n_full):
            if EVEN:
                acc += tl.load(p_part + o_rp)
            else:
                acc += tl.load(p_part + o_rp, mask=m_p[None, :], other=0.0)
            p_part += R * GC
        rest = count - n_full * R
    if rest > 0:
        acc += tl.load(p_part + o_rp, mask=(o_r < rest)[:, None] & m_p[None, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _reduce_tables_kernel(
    parth_ptr, partw_ptr, partb_ptr, dh_ptr, dw_ptr, db_ptr,  # absent tables: any / None
    n_prog_tiles,
    HEADS: tl.constexpr, D_HALF: tl.constexpr, D_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
    SHIFT: tl.constexpr, HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    GC_H: tl.constexpr, GC_W: tl.constexpr, GC_B: tl.constexpr,  # floats per slot group
    CH_H: tl.constexpr, CH_W: tl.constexpr, CH_B: tl.constexpr,  # chunks per row
    SLOTS_H: tl.constexpr, SLOTS_W: tl.constexpr,  # slot groups per tile: HEADS if shared
    P_REL: tl.constexpr, R_REL: tl.constexpr, P_RPB: tl.constexpr, R_RPB: tl.constexpr,
    LOOP_REL: tl.constexpr, LOOP_RPB: tl.constexpr,  # a walk longer than one step
    BORDER_R: tl.constexpr, BORDER_C: tl.constexpr,  # next_pow2(2KH - 1), (2KW - 1)
):
    """One program per (table row, chunk of P consecutive positions of a slot group): it
    sums those positions over every query-kernel program in a fixed order (scaled
    already) and stores them in the table's dtype. Partial buffers hold [row, slot,
    column], the slot being the query kernel's pid = tile * HEADS + head, so a row is
    a run of slot groups: one slot (C floats) for a shared table, HEADS slots (HEADS * C
    floats, position = head * C + column) for a per-head table or rpb. Programs, in
    order: rel_h rows x chunks, rel_w rows x chunks, rpb rows x chunks, then (zeros /
    mask with rpb) one program per head storing the zeros of rpb's border (only its
    middle KH x KW is reachable)."""
    pid = tl.program_id(0)
    # the gradients are the launcher's contiguous allocations shaped like the tables:
    # strides from the constexpr sizes (a shared rel table's head index is always 0)
    sdh_n: tl.constexpr = TY * D_HALF
    sdh_r: tl.constexpr = D_HALF
    sdw_n: tl.constexpr = TX * D_W
    sdw_r: tl.constexpr = D_W
    sdb_n: tl.constexpr = (2 * KH - 1) * (2 * KW - 1)
    sdb_h: tl.constexpr = 2 * KW - 1
    sdh_d: tl.constexpr = 1
    sdw_d: tl.constexpr = 1
    sdb_w: tl.constexpr = 1
    # (n_prog_tiles == 1 arrives as a constexpr: no .to on it)
    n_slots = (n_prog_tiles + tl.zeros([], dtype=tl.int64)) * HEADS
    U_H: tl.constexpr = TY * CH_H  # programs of each table (CH_ 0 without it)
    U_W: tl.constexpr = TX * CH_W
    U_B: tl.constexpr = TY * CH_B
    o_p = tl.arange(0, P_REL)
    if pid < U_H + U_W:
        if HAS_REL:
            if (GC_H == GC_W) and (SLOTS_H == SLOTS_W):  # d even, same sharing: one walk
                count = n_prog_tiles * SLOTS_H
                if pid < U_H:
                    row = pid // CH_H
                    chunk = pid % CH_H
                    p_part = parth_ptr + row * n_slots * D_HALF + chunk * P_REL
                else:
                    row = (pid - U_H) // CH_W
                    chunk = (pid - U_H) % CH_W
                    p_part = partw_ptr + row * n_slots * D_W + chunk * P_REL
                tot = _sum_slots(p_part, count, GC_H, P_REL, R_REL, GC_H % P_REL == 0,
                                 LOOP_REL, GC_H - chunk * P_REL)
            else:
                if pid < U_H:
                    row = pid // CH_H
                    chunk = pid % CH_H
                    tot = _sum_slots(parth_ptr + row * n_slots * D_HALF + chunk * P_REL,
                                     n_prog_tiles * SLOTS_H, GC_H,
                                     P_REL, R_REL, GC_H % P_REL == 0, LOOP_REL, GC_H - chunk * P_REL)
                else:
                    row = (pid - U_H) // CH_W
                    chunk = (pid - U_H) % CH_W
                    tot = _sum_slots(partw_ptr + row * n_slots * D_W + chunk * P_REL,
                                     n_prog_tiles * SLOTS_W, GC_W,
                                     P_REL, R_REL, GC_W % P_REL == 0, LOOP_REL, GC_W - chunk * P_REL)
            o_pos = chunk * P_REL + o_p  # position in the slot group: head * C + column
            if pid < U_H:
                tl.store(dh_ptr + (o_pos // D_HALF) * sdh_n + row * sdh_r
                         + (o_pos % D_HALF) * sdh_d,
                         tot.to(dh_ptr.dtype.element_ty), mask=o_pos < GC_H)
            else:
                tl.store(dw_ptr + (o_pos // D_W) * sdw_n + row * sdw_r + (o_pos % D_W) * sdw_d,
                         tot.to(dw_ptr.dtype.element_ty), mask=o_pos < GC_W)
    elif pid < U_H + U_W + U_B:  # rpb partial row tr, columns tx
        if HAS_RPB:
            u = pid - U_H - U_W
            tr = u // CH_B
            chunk = u % CH_B
            tot = _sum_slots(partb_ptr + tr * n_slots * TX + chunk * P_RPB, n_prog_tiles, GC_B,
                             P_RPB, R_RPB, GC_B % P_RPB == 0, LOOP_RPB, GC_B - chunk * P_RPB)
            o_pos = chunk * P_RPB + tl.arange(0, P_RPB)
            if SHIFT:
                rr = tr
                o_c = o_pos % TX
            else:  # zeros / mask: tap (tr, tx) is rpb[KH//2 + tr, KW//2 + tx]
                rr = tr + KH // 2
                o_c = o_pos % TX + KW // 2
            tl.store(db_ptr + (o_pos // TX) * sdb_n + rr * sdb_h + o_c * sdb_w,
                     tot.to(db_ptr.dtype.element_ty), mask=o_pos < GC_B)
    else:  # zeros / mask with rpb: head n's border of zeros
        if HAS_RPB:
            if not SHIFT:
                n = pid - U_H - U_W - U_B
                o_rr = tl.arange(0, BORDER_R)
                o_cc = tl.arange(0, BORDER_C)
                m_in = (o_rr < 2 * KH - 1)[:, None] & (o_cc < 2 * KW - 1)[None, :]
                m_mid = ((o_rr >= KH // 2) & (o_rr < KH // 2 + KH))[:, None] & (
                    (o_cc >= KW // 2) & (o_cc < KW // 2 + KW))[None, :]
                zero = tl.zeros([BORDER_R, BORDER_C], dtype=tl.float32)
                tl.store(db_ptr + n * sdb_n + o_rr[:, None] * sdb_h + o_cc[None, :] * sdb_w,
                         zero.to(db_ptr.dtype.element_ty), mask=m_in & ~m_mid)


# --- host side --------------------------------------------------------------------------

_WIDTHS = (8, 16, 32, 64, 128)
_HEIGHTS = (1, 2, 4, 8)
_WARPS = (1, 2, 4, 8)
_STAGES = (1, 2)
MAX_PER_THREAD = 160  # estimated live values per thread (_per_thread) that fit unspilled


def partials_fit_i32(q_shape, bh: int, bw: int, n_prog: int, ty_n: int, tx_n: int) -> bool:
    """Whether the offsets of delta and of the table partials (rows ty_n / tx_n, n_prog
    slots, up to BLOCK_D or TX_PAD columns) stay below 2**31 for every lane of the padded
    tiles, masked-off ones too: the query kernel then computes them in int32."""
    B, H, W, heads, d = q_shape
    cols = max(head_block(d), next_pow2(tx_n), 16)
    return (B * (H + bh) * (W + bw) * heads < 2**31
            and max(next_pow2(ty_n), next_pow2(tx_n), 16) * n_prog * cols < 2**31)


def div_magic(d: int) -> tuple[int, int]:
    """(m, s) with x // d == umulhi(2 x, m) >> s for every 0 <= x < 2**31 (d >= 1):
    s = ceil(log2 d), m = ceil(2**(31 + s) / d), so 2**31 <= m < 2**32 and
    m d - 2**(31 + s) < d <= 2**s (Granlund and Montgomery's condition for 31-bit x)."""
    s = (d - 1).bit_length()
    return -(-2 ** (31 + s) // d), s


def kv_offsets_fit_i32(strides, d: int, rows: int, cols: int) -> bool:
    """Whether offsets inside one (batch, head) image of (B, H, W, heads, d) tensors with
    these `strides` (k's and v's) -- `rows` rows and `cols` columns either way from the
    origin (halo rows and columns included), every channel -- stay below 2**31, so the
    key-row walk may compute them in int32."""
    for st in strides:
        s_h, s_w, s_d = (abs(x) for x in (st[1], st[2], st[4]))
        if rows * s_h + cols * s_w + d * s_d >= 2**31:
            return False
    return True


def _cfg(config: dict, key: str, default=None):
    return config.get(PREFIX + key, default)


def _block_k(q_shape, args: AttendArgs, block_w: int) -> int:
    """Halo columns of a row segment: next power of two (>= 16) of the widest window union
    of `block_w` adjacent queries (no wider than the image row)."""
    W = q_shape[2]
    span = halo_span(W, args.kw, args.dw, args.padding, max(1, min(block_w, W)))
    return max(16, next_pow2(span))


def _tables(args: AttendArgs) -> tuple[int, int]:
    """(TY, TX): rel-index range along each axis (k, or 2k - 1 in shift mode)."""
    if args.padding == "shift":
        return 2 * args.kh - 1, 2 * args.kw - 1
    return args.kh, args.kw


def search_space() -> list[dict]:
    """Tile shapes and launch settings the tuner may try (Q_-prefixed keys)."""
    return [{"Q_BLOCK_W": bw, "Q_BLOCK_H": bh, "Q_num_warps": nw, "Q_num_stages": ns}
            for bw in _WIDTHS for bh in _HEIGHTS for nw in _WARPS for ns in _STAGES
            if 16 <= bw * bh <= 128]


def _per_thread(q_shape, args: AttendArgs, config: dict, dtype=torch.bfloat16) -> float:
    """Estimated live fp32 values per thread: about five [M, BK] tiles (S/P/dP/dS, the
    dS running sum, the column bias) and three [M, D] ones (q, dout, the dq accumulator)
    plus k and v. Up to ~160 ptxas for sm_90 kept every suite shape under 200 registers
    without spills (s1: 68 -> 122 registers, s4: 152 -> 180; at 4 warps;
    tests/test_rows_bwd_query_compile_sm90.py)."""
    d = q_shape[4]
    bw, bh = _cfg(config, "BLOCK_W"), _cfg(config, "BLOCK_H")
    bk = _block_k(q_shape, args, bw)
    m = bw * bh
    fp32 = 3 if dtype == torch.float32 else 1  # "ieee" dots: operands held as fp32
    return fp32 * (5 * m * bk + (3 * m + 2 * bk) * head_block(d)) / (
        32 * _cfg(config, "num_warps", 4))


def _work(q_shape, args: AttendArgs, config: dict) -> float:
    """Score-tile elements computed per query pixel: the cost a tile shape pays for its
    padding (M past the image, BK past the halo) and for key rows shared by few queries."""
    B, H, W, heads, d = q_shape
    bw, bh = _cfg(config, "BLOCK_W"), _cfg(config, "BLOCK_H")
    bk = _block_k(q_shape, args, bw)
    rows = min(bh, H) + (args.kh - 1) * args.dh
    n_tiles = -(-H // bh) * -(-W // bw)
    return n_tiles * rows * bw * bh * bk / (H * W)


def prune(configs: list[dict], q_shape, args: AttendArgs) -> list[dict]:
    """Drops tiles much wider/taller than the image, halos over MAX_BLOCK_K, and tiles
    that would hold more than ~160 values per thread (spills; but for the tiles that
    ptxas holds unspilled all the same, _fits_unspilled) or leave threads idle."""
    B, H, W, heads, d = q_shape
    kept = []
    for cfg in configs:
        bw, bh = _cfg(cfg, "BLOCK_W"), _cfg(cfg, "BLOCK_H")
        if bw > max(8, next_pow2(W)) or bh > max(1, next_pow2(H)) or bw * bh < 16:
            continue
        if _block_k(q_shape, args, bw) > MAX_BLOCK_K:
            continue
        if not (4 <= _per_thread(q_shape, args, cfg) <= MAX_PER_THREAD
                or _fits_unspilled(q_shape, args, cfg)):
            continue
        kept.append(cfg)
    return kept or [default_config(q_shape, args)]


@per_call_key
def default_config(q_shape, args: AttendArgs, dtype=torch.bfloat16) -> dict:
    """A tile of M = 64 query pixels (fewer on tiny images) shaped to the window: among
    the row-segment x rows shapes, the one computing the fewest score elements per pixel
    (for k = 7 an 8 x 8 tile: 14 key rows of a 16-column halo, against 7 rows of 64
    columns for a whole 56-pixel row); M = 16 for d > 64 (but bf16 / fp16 at d = 128
    without rpb and with a halo of <= 32 columns: M = 64, PREDICTED h1 49.8 -> 27.1
    us), half as large for fp32. 4 warps (one
    warpgroup: M = 64 is one wgmma row block); for bf16/fp16 with d <= 32, M = 32 on one
    warp (4 x 8 for k = 7: 10 key rows per 4 query rows against 14 per 8; PREDICTED query
    kernel s1 417 -> 357 us, s2 119 -> 73, s3 31.1 -> 23.4; 2 warps read more instructions
    and spill at d = 8; at d = 32 only with a 16-column halo, see _fits_unspilled; not with
    shift or rpb, whose extra tiles spill one warp), more only while a thread would hold
    over MAX_PER_THREAD values (fp32 counts triple: query_grads passes q's dtype); one
    stage (the cost tool reads fewer instructions than with 2; a GPU tuner may still
    prefer 2)."""
    B, H, W, heads, d = q_shape
    half = dtype in (torch.float16, torch.bfloat16)
    # [M, D] tiles: 16 queries past d = 64 but at d = 128 without rpb (_fits_unspilled)
    m_cap = 64 if head_block(d) <= 64 or (half and d == 128 and args.rpb is None) else 16
    warps = 4
    if dtype == torch.float32:  # "ieee" dots hold fp32 operands: half the tile
        m_cap = max(16, m_cap // 2)
    elif d <= 32 and args.padding != "shift" and args.rpb is None:
        m_cap, warps = 32, 1  # 4 x 8 tiles on one warp (mma.sync): 10 key rows per 4 rows
    cfg = _fewest_scores(q_shape, args, m_cap, warps)
    if warps == 1 and d > 16 and not _fits_unspilled(q_shape, args, cfg, dtype):
        cfg = _fewest_scores(q_shape, args, 64, 4)  # d = 32, a wider halo: 4 warps
    if m_cap == 64 and d > 64 and not _fits_unspilled(q_shape, args, cfg, dtype):
        cfg = _fewest_scores(q_shape, args, 16, 4)  # d > 64, a halo over 32 columns
    if _fits_unspilled(q_shape, args, cfg, dtype):
        return cfg
    while cfg["Q_num_warps"] < 8 and _per_thread(q_shape, args, cfg, dtype) > MAX_PER_THREAD:
        cfg["Q_num_warps"] *= 2
    while cfg["Q_num_warps"] > 1 and _per_thread(q_shape, args, cfg, dtype) < 4:
        cfg["Q_num_warps"] //= 2
    return cfg


def _fewest_scores(q_shape, args: AttendArgs, m_cap: int, warps: int) -> dict:
    """The tile of M = m_cap queries (fewer on tiny images) computing the fewest score
    elements per pixel (the widest on ties), on `warps` warps."""
    B, H, W, heads, d = q_shape
    best = None
    m_target = max(16, min(m_cap, next_pow2(H) * next_pow2(W)))
    for bw in _WIDTHS:
        for bh in _HEIGHTS:
            if bw * bh != m_target or bw > max(8, next_pow2(W)) or bh > max(1, next_pow2(H)):
                continue
            if _block_k(q_shape, args, bw) > MAX_BLOCK_K:
                continue
            cfg = {"Q_BLOCK_W": bw, "Q_BLOCK_H": bh, "Q_num_warps": warps, "Q_num_stages": 1}
            key = (_work(q_shape, args, cfg), -bw)
            if best is None or key < best[0]:
                best = (key, cfg)
    if best is None:  # no tile passes the halo limit (supports() is False): any valid one
        return {"Q_BLOCK_W": 16, "Q_BLOCK_H": 1, "Q_num_warps": 4, "Q_num_stages": 1}
    return best[1]


def _fits_unspilled(q_shape, args: AttendArgs, config: dict, dtype=torch.bfloat16) -> bool:
    """Whether `config` is one of the two bf16 / fp16 tiles that _per_thread counts over
    MAX_PER_THREAD but ptxas for sm_90 holds unspilled (default_config picks them):
    * 16 < d <= 32, no shift or rpb, M = 32 on one warp, a 16-column halo (s3: 207
      registers; a 32-column halo spills 48 bytes at k = 11);
    * d = 128, no rpb, M = 64 on 4 warps, a halo of <= 32 columns (h1: 225 registers;
      222-254 for every padding, per-head tables, fp16, k = 13, dilation 4). With rpb it
      spills 32-64 bytes (as M = 32 does); so does d = 72-100 (a constexpr d under
      BLOCK_D = 128: 8-504 bytes with shift or a 32-column halo)."""
    d = q_shape[4]
    bw, bh = _cfg(config, "BLOCK_W"), _cfg(config, "BLOCK_H")
    if (dtype not in (torch.float16, torch.bfloat16) or args.rpb is not None
            or _cfg(config, "num_stages", 1) != 1):
        return False
    warps, bk = _cfg(config, "num_warps", 4), _block_k(q_shape, args, bw)
    if 16 < d <= 32:
        return args.padding != "shift" and bw * bh == 32 and warps == 1 and bk == 16
    return d == 128 and bw * bh == 64 and warps == 4 and bk <= 32


@per_call_key
def supports(q_shape, dtype, args: AttendArgs) -> bool:
    """fp16/bf16/fp32, d = 1..MAX_D, every padding and table, halos up to MAX_BLOCK_K
    columns for the narrowest tile (k <= 13 at dilation <= 16 on wide images). Larger d
    spills registers even at 16 queries x 8 warps (fp32 d = 256: 380 bytes): the
    offsets backward covers it. Also: heads <= 65535, programs < 2**31."""
    B, H, W, heads, d = q_shape
    if not (dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= d <= MAX_D
            and _block_k(q_shape, args, 16) <= MAX_BLOCK_K and heads <= MAX_GRID_Y):
        return False
    cfg = default_config(q_shape, args, dtype)  # grid: one program per (tile, head)
    tiles = B * -(-H // cfg["Q_BLOCK_H"]) * -(-W // cfg["Q_BLOCK_W"])
    return tiles * heads <= MAX_GRID


def _check(config: dict, q_shape, args: AttendArgs) -> None:
    keys = ("Q_BLOCK_W", "Q_BLOCK_H")
    if not isinstance(config, dict) or any(k not in config for k in keys):
        raise ValueError(f"rows_bwd_query config must be a dict with keys {list(keys)}, "
                         f"got {config!r}")
    bw, bh = config["Q_BLOCK_W"], config["Q_BLOCK_H"]
    if bw < 1 or bh < 1 or bw & (bw - 1) or bh & (bh - 1) or bw * bh < 16:
        raise ValueError(f"rows_bwd_query config: Q_BLOCK_W and Q_BLOCK_H must be powers of "
                         f"two with a product >= 16, got {config!r}")
    if _block_k(q_shape, args, bw) > MAX_BLOCK_K:
        raise ValueError(f"rows_bwd_query config {config!r}: halo wider than {MAX_BLOCK_K}")


def _launch_options(config: dict) -> dict:
    return launch_options({k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)})


class _Plan(NamedTuple):
    grads: LaunchPlan  # the query kernel
    reduce: Optional[LaunchPlan]  # the table reduction (None without tables)
    sizes: list  # float32 elements of delta, part_h, part_w, part_b in the one buffer
    delta_layout: tuple  # (shape, strides) of delta (contiguous), at the buffer's start


def _plan(q_shape, dtype, strides, args: AttendArgs, table_half: bool, config) -> _Plan:
    """Everything the launches of this call key need besides the tensors and the input
    table strides; raises for an unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    if not supports(q_shape, dtype, args):
        raise ValueError(
            f"rows_bwd_query does not support q {q_shape} {dtype} with kernel "
            f"({kh}, {kw}), dilation ({dh}, {dw}), padding {padding!r}")
    config = default_config(q_shape, args, dtype) if config is None else config
    _check(config, q_shape, args)
    delta_layout = (q_shape[:4], contiguous_strides(q_shape[:4]))
    if B * H * W * heads * d == 0:
        return _Plan(NO_LAUNCH, None, [0], delta_layout)
    has_rel, has_rpb = rel_h is not None, rpb is not None
    bw, bh = config["Q_BLOCK_W"], config["Q_BLOCK_H"]
    bk = _block_k(q_shape, args, bw)
    ty_n, tx_n = _tables(args)
    n_tiles = B * triton.cdiv(H, bh) * triton.cdiv(W, bw)
    n_prog = n_tiles * heads
    if n_prog > MAX_GRID:
        raise ValueError(f"rows_bwd_query: q {q_shape} needs more than {MAX_GRID} programs")
    d_half = d // 2
    dq_strides = contiguous_strides(q_shape)
    # tensor-core table products for half inputs (the interpreter's dot mishandles bf16)
    half = dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRETED)
    # the row term by a one-hot tensor-core product (16-bit inputs): one slot per key row
    # (mma.sync tiles of 32 rows per warp; at 16 rows per warp the selects cost less)
    wide = bw * bh >= 32 * config.get("Q_num_warps", 4)  # 32 queries per warp (mma.sync)
    row_dot = dtype in (torch.float16, torch.bfloat16) and wide
    # the table partials as q^T @ G (one transpose, not four): fewer instructions and no
    # spill at 16 queries per warp (PREDICTED s3 14692 -> 14296 warp instructions per
    # program); at 32 fewer for d = 16 (s2 -10, det -31; now -52), more for d = 8 (s1
    # +60) and d = 32 (s3 +96: q^T is the larger tile there)
    tables_t = not wide or d == 16
    # d as a constexpr also where it fills BLOCK_D on one warp (the rel tables' channel
    # masks fold away; PREDICTED s2 3816 -> 3748 warp instructions per program, 231 ->
    # 166 registers; at 2 and 4 warps k11 spills 16 bytes, h1 +108)
    one_warp = config.get("Q_num_warps", 4) == 1
    ns_pad = max(16, next_pow2(min(bh, H) + (kh - 1) * dh))
    tx_pad = max(16, next_pow2(tx_n))
    sizes = [B * H * W * heads]  # float32 elements of delta and the partials
    if has_rel:
        sizes += [ty_n * n_prog * d_half, tx_n * n_prog * (d - d_half)]
    if has_rpb:
        sizes.append(ty_n * n_prog * tx_n)
    grads = launch_plan(
        _QUERY_PARAMS,
        grid=(n_prog,),
        # sizes, then the strides of q, k, v, out, dout, lse (v's even when equal to k's:
        # the compiler then shares the k/v offsets, and ptxas spills at s1 / s2)
        head=((H, W, heads, d, d_half, *div_magic(heads), *div_magic(triton.cdiv(W, bw)),
               *div_magic(triton.cdiv(H, bh))), *strides),
        tail=(scale * LOG2E.value, scale),
        flags=dict(
            KH=kh, KW=kw, PADDING=PADDING_CODES[padding], dil_h=dh, dil_w=dw, TY=ty_n,
            TX=tx_n, TY_PAD=max(16, next_pow2(ty_n)), TX_PAD=tx_pad,
            HAS_REL=has_rel, HAS_RPB=has_rpb, BLOCK_H=bh, BLOCK_W=bw, BLOCK_K=bk,
            BLOCK_D=head_block(d), DOT_F32=INTERPRETED and dtype == torch.bfloat16,
            ROW_I64=not strides_fit_i32((*strides[:5], dq_strides), W + bk, d),
            HALF=half, TABLE_HALF=half and has_rel and table_half,
            KV_I32=kv_offsets_fit_i32(strides[1:3], d, H + kh * dh, W + bk),
            ROW_DOT=row_dot, NS_PAD=ns_pad, TABLES_T=tables_t,
            D_C=d if 1 < d < head_block(d) or (d == head_block(d) and one_warp) else 0,
            DQ_I32=H * W * heads * d < 2**31,
            PART_I32=partials_fit_i32(q_shape, bh, bw, n_prog, ty_n, tx_n),
            # (the interpreter: ROW_DOT's bf16 row table in float32 for fp16 inputs too)
            ROW_F32=INTERPRETED and row_dot,
            XT_WRAP=XT_WRAP_ON and padding != "shift" and dw == 1 and tx_pad <= bk,
            COL_WRAP=(XT_WRAP_ON and padding != "shift" and dw == 1 and tx_pad == bk
                      and has_rel and not has_rpb),
            **_launch_options(config),
        ),
    )
    reduce = reduce_plan(args, heads, d, n_tiles, ty_n, tx_n)
    return _Plan(grads, reduce, sizes, delta_layout)


def reduce_plan(args: AttendArgs, heads: int, d: int, n_tiles: int, ty_n: int,
                tx_n: int) -> Optional[LaunchPlan]:
    """The launch plan of `_reduce_tables_kernel` summing `n_tiles` programs' partials of
    rel_h (ty_n rows), rel_w (tx_n rows) and rpb into gradients shaped like the tables
    (None without tables); the CUDA-core backward (tile2d_bwd.py) shares it."""
    kh, kw, rel_h, rel_w, rpb = args.kh, args.kw, args.rel_h, args.rel_w, args.rpb
    has_rel, has_rpb = rel_h is not None, rpb is not None
    if not (has_rel or has_rpb):
        return None
    d_half = d // 2
    shared_h = has_rel and rel_h.dim() == 2
    shared_w = has_rel and rel_w.dim() == 2
    gc_h = d_half * (1 if shared_h else heads)  # floats per slot group (position chunks)
    gc_w = (d - d_half) * (1 if shared_w else heads)
    gc_b = heads * tx_n
    rel_rows = ty_n + tx_n if has_rel else 0
    rpb_rows = ty_n if has_rpb else 0
    p_rel, r_rel, warps = _reduce_tile(rel_rows, max(gc_h, gc_w), n_tiles * heads, None)
    p_rpb, r_rpb, warps = _reduce_tile(rpb_rows, gc_b, n_tiles, warps if has_rel else None)
    ch_h = -(-gc_h // p_rel) if has_rel else 0
    ch_w = -(-gc_w // p_rel) if has_rel else 0
    ch_b = -(-gc_b // p_rpb) if has_rpb else 0
    border = heads if has_rpb and args.padding != "shift" else 0
    # the gradients (common.new_table_grads: contiguous, shaped like the tables, whose
    # rows are ty_n / tx_n): the kernel derives their strides from its constexprs
    return launch_plan(
        _REDUCE_PARAMS,
        grid=(ty_n * ch_h + tx_n * ch_w + ty_n * ch_b + border,),
        head=(n_tiles,),
        tail=(),
        flags=dict(
            HEADS=heads, D_HALF=d_half, D_W=d - d_half, KH=kh, KW=kw, TY=ty_n, TX=tx_n,
            SHIFT=args.padding == "shift", HAS_REL=has_rel, HAS_RPB=has_rpb,
            GC_H=gc_h, GC_W=gc_w, GC_B=gc_b, CH_H=ch_h, CH_W=ch_w, CH_B=ch_b,
            SLOTS_H=heads if shared_h else 1, SLOTS_W=heads if shared_w else 1,
            P_REL=p_rel, R_REL=r_rel, P_RPB=p_rpb, R_RPB=r_rpb,
            LOOP_REL=n_tiles * heads > r_rel, LOOP_RPB=n_tiles > r_rpb,
            BORDER_R=next_pow2(2 * kh - 1), BORDER_C=next_pow2(2 * kw - 1),
            num_warps=warps,
        ),
    )


REDUCE_PROGRAMS = 132  # one wave on an H100 (SMs); more positions per program beyond it
REDUCE_LOADS = 32  # loads (of up to 16 bytes) per thread and step of the slot walk: fewer
# and LLVM unrolls the walk into a main loop and a remainder loop


def _reduce_tile(rows: int, gc: int, count: int, warps: Optional[int]) -> tuple[int, int, int]:
    """(P, R, num_warps) of one walk of the table reduction: P positions per program (a
    power of two, at most 16, the largest that still gives rows * ceil(gc / P) >= one
    wave of programs: the sum's order is fixed by program, so only positions and rows
    spread it), R slot groups per step (REDUCE_LOADS loads per thread;
    R * gc < 2**31 keeps the in-step offsets int32) and, unless given, enough warps for
    4 per SM when the programs' floats allow."""
    p = 16
    while p > 1 and rows * -(-gc // p) < REDUCE_PROGRAMS:
        p //= 2
    p = min(p, next_pow2(gc))
    programs = max(1, rows * -(-gc // p))
    if warps is None:
        per_sm = -(-programs // REDUCE_PROGRAMS)
        warps = max(1, min(4, 4 // per_sm, next_pow2(-(-count * p // (32 * 16)))))
    r = max(1, min(32 * warps * REDUCE_LOADS * min(p, 4) // p, next_pow2(count)))
    while r > 1 and r * gc >= 2**31:
        r //= 2
    return p, r, warps


_plans = plan_cache(_plan)
# read at import: a recorder may stand in for the kernels later
_QUERY_PARAMS, _REDUCE_PARAMS = _query_grads_kernel.arg_names, _reduce_tables_kernel.arg_names


QueryGrads = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                   Optional[torch.Tensor]]


def query_grads(q, k, v, out, lse, dout, args: AttendArgs, config: Optional[dict] = None,
                _poison: bool = False) -> QueryGrads:
    """(dq, delta, drel_h, drel_w, drpb): dq a new contiguous tensor in q.dtype, delta
    float32 contiguous (B, H, W, heads) = rowsum(float32(dout) * float32(out)), the table
    gradients shaped and typed like args.rel_h / rel_w / rpb (None if absent). Two
    launches: the query kernel and the table reduction (none without tables). `config`
    reads only its Q_ keys; `_poison` NaN-fills outputs and buffers first (tests).
    One float32 allocation holds delta and the per-program table partials."""
    strides = (q.stride(), k.stride(), v.stride(), out.stride(), dout.stride(), lse.stride())
    table_half = plan_table_half(q, args)
    plan = _plans((q.shape, q.dtype, strides, args_key(args), table_half, config_key(config)),
                  tuple(q.shape), q.dtype, strides, args, table_half, config)
    dq, delta, drel_h, drel_w, drpb = launch(plan, q, k, v, out, lse, dout, args, _poison)
    return dq, delta.as_strided(*plan.delta_layout), drel_h, drel_w, drpb


def plan_table_half(q, args: AttendArgs) -> bool:
    """The part of a plan's key that the tables' dtypes decide (TABLE_HALF)."""
    return args.rel_h is not None and args.rel_h.dtype == q.dtype == args.rel_w.dtype


def launch(plan: _Plan, q, k, v, out, lse, dout, args: AttendArgs,
           _poison: bool = False) -> QueryGrads:
    """`query_grads` with its plan (`_plan` of the call's key) made already, but delta
    flat (the first B*H*W*heads floats of the buffer; its strides: plan.delta_layout)."""
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    has_rel, has_rpb = rel_h is not None, rpb is not None
    dq = new_output_like(q, _poison)
    drel_h, drel_w, drpb = new_table_grads(args, _poison)
    buffer = new_output((sum(plan.sizes),), torch.float32, q.device, _poison)
    if plan.grads.grid is None:
        dq.zero_(), buffer.zero_()
        for g in (drel_h, drel_w, drpb):
            if g is not None:
                g.zero_()
        return dq, buffer, drel_h, drel_w, drpb
    delta, part_h, part_w, part_b = split_partials(buffer, plan.sizes, has_rel, has_rpb)
    if not has_rel:  # absent tables and their partials: None (never read, flag off)
        part_h = part_w = None
    if not has_rpb:
        part_b = None
    grads = plan.grads
    ns_pad = grads.flags["NS_PAD"]
    sel = identity_table(q.device, ns_pad, torch.bfloat16) if grads.flags["ROW_DOT"] else None
    launch_kernel(_query_grads_kernel, grads,
        q, k, v, out, dout, lse, rel_h, rel_w, rpb,
        sel, dq, delta, part_h, part_w, part_b,
        *grads.head, table_strides(rel_h, rel_w, rpb), *grads.tail, **grads.options,
    )
    reduce = plan.reduce
    if reduce is not None:
        launch_kernel(_reduce_tables_kernel, reduce,
            part_h, part_w, part_b, drel_h, drel_w, drpb,
            *reduce.head, *reduce.tail, **reduce.options,
        )
    return dq, delta, drel_h, drel_w, drpb
