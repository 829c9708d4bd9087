"""Backward kernel 2 of the "rows" family (key-owned, tensor cores): dk and dv.

What a program owns: a tile of key pixels of one batch b and one head n -- ROWS image rows
x COLS adjacent columns (a whole row when the image is narrow enough, else a row segment),
flattened into BLOCK_M >= ROWS * COLS slots (a config value). It loads their k and v once
and walks the query rows whose windows can hold those keys (the inverse neighbourhood:
the mirrored window for zeros/mask; for shift, where windows move inward at the borders,
every row within (kh - 1) * dh, kept by the membership rule of `common.window_start`).
Per query row it loads that row's q, dout, lse and delta once, for the BLOCK_N query
columns that can see the tile's keys, and computes (all d-sized products on tensor cores):

    S^T  = K Q^T + bias              tl.dot, [M, D] @ [D, N] -> [M, N], log2 units
    P^T  = exp2(S^T - lse * log2 e)  zero outside each query's window
    dv  += P^T dO                    tl.dot, [M, N] @ [N, D]
    dP^T = V dO^T                    tl.dot, [M, D] @ [D, N]
    dS^T = P^T * (dP^T - delta)
    dk  += dS^T Q                    tl.dot, [M, N] @ [N, D]   (times scale at the end)

The relative term is built per query row with one small dot, T = RelT Q^T ([TP, N]: row t
of RelT is rel_h[t] in the first d/2 channels for t < TH, rel_w[t - TH] in the last ones
after), and put on the score tile by two more tensor-core dots with one-hot matrices that
are fixed per program: A_row [M, RP] (each key's row in the tile) @ Brow [RP, N] and A_col
[M, N] (each key's column) @ Band [N, N], where Brow and Band are small tl.gather of T
(the table row of each tile row's tap; the column tap of each (key column, query column)
pair). The one-hots are rows of an identity table loaded per key slot (built in registers
on 4+ warps). With 16 query columns and COLS + ROWS <= 16 (COMBINED) the two become one
dot: A [M, 16] with a key's column one at x - x0 and its row one at COLS + its tile row
(rows of a launcher table by tile slot, `combined_onehots`), against one gather B [16, N]
(the tile's COLS key columns' taps, then its ROWS rows').
rpb is a masked gather load. A non-finite value reaching the accumulators
sends the program through a slow second pass (see the kernel).

With HALVES (a launcher flag: 1-3 warps, d <= 16, 4+ tile rows) the tile is two parts
of BLOCK_M / 2 slots, its top ceil(ROWS / 2) rows and the rest, each with its own k, v,
one-hots and accumulators, and the query rows are walked in three loops: the rows whose
windows reach only the top part (above the tile), both parts, only the bottom part
(below it). A query row then runs the score tile of the parts it can reach, not always
the whole tile (det: 18 part-rows where 24 ran before, per interior program).

Keys outside the image never exist here (zeros-padding taps take softmax mass but have no
key pixel); keys no query attends (dilation gaps in shift mode) get zero gradients.
Deterministic: every dk/dv element is written by one program, no atomics.
Design notes, predicted costs and register counts: docs/rows_bwd_key.md.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from sasa_triton.types import AttendArgs

from .common import (
    INTERPRETED,
    LOG2E,
    PADDING_CODES,
    head_block,
    identity_table,
    new_output_like,
    next_pow2,
    pointer_alignment,
    stride_vector_width,
    strides_fit_i32,
    table_strides,
    unravel_program,
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

# p // COLS == (p * ceil(2^20 / COLS)) >> 20 for 0 <= p, COLS <= 256 (checked exhaustively
# by tests/test_rows_bwd_key.py): the slot -> (row, column) split without an integer division
_MAGIC_SHIFT: tl.constexpr = tl.constexpr(20)


def cols_magic(cols: int) -> int:
    """The multiplier of `_MAGIC_SHIFT`'s division by `cols` (1 <= cols <= 256)."""
    return -(-(1 << 20) // cols)


@triton.jit
def _row_taps(y, i, H, KH: tl.constexpr, dil_h, SHIFT: tl.constexpr):
    """For query row i (scalar) and key rows y ([M]): whether y is in i's window, the
    rel_h table row of that tap and the rpb row."""
    start, off = window_start(i, H, KH, dil_h, SHIFT)
    dy = y - start
    dyc = tl.maximum(dy, 0)
    a = dyc // dil_h
    m_row = (dy >= 0) & (dyc - a * dil_h == 0) & (a < KH)
    rpb_row = off + a + KH - 1
    if SHIFT:
        rel_row = rpb_row
    else:
        rel_row = a
    return m_row, tl.where(m_row, rel_row, 0), tl.where(m_row, rpb_row, 0)


@triton.jit
def _row_is_live(i, y0, rows, H, KH: tl.constexpr, dil_h, SHIFT: tl.constexpr,
                 ALL_LIVE: tl.constexpr = False):
    """Whether some key row y0 .. y0 + rows - 1 (inside the image) lies in the window of
    query row i (0 <= i < H; scalar arithmetic, no reduction over the tile). ALL_LIVE
    (the fast walks without row dilation or shift): every row of a walk is, by its
    bounds, so no test (a row that were not would only add zeros: the membership rule
    decides which pairs count)."""
    if ALL_LIVE:
        return True
    start, off = window_start(i, H, KH, dil_h, SHIFT)
    lo = tl.maximum(y0, start)
    hi = tl.minimum(tl.minimum(y0 + rows, H) - 1, start + (KH - 1) * dil_h)
    first = lo + (dil_h - (lo - start) % dil_h) % dil_h  # first y >= lo on i's tap grid
    return first <= hi


@triton.jit
def _col_taps(x, m_key, o_j, m_j, W, KW: tl.constexpr, dil_w, SHIFT: tl.constexpr):
    """For key columns x ([M]) and query columns o_j ([N]): whether each pair is in the
    query's window ([M, N]) and the rpb column of that tap (0 outside). Only the masked
    paths need them: the fast path with the mask in the rel dots never builds them."""
    start_x, off_x = window_start(o_j, W, KW, dil_w, SHIFT)  # [N]
    dx = x[:, None] - start_x[None, :]  # [M, N]
    dxc = tl.maximum(dx, 0)
    o_c = dxc // dil_w
    m_col = (dx >= 0) & (dxc - o_c * dil_w == 0) & (o_c < KW) & m_j[None, :] & m_key[:, None]
    return m_col, tl.where(m_col, off_x[None, :] + o_c + KW - 1, 0)


@triton.jit
def _band_index(o_u, start_x, off_x, KW: tl.constexpr, dil_w, SHIFT: tl.constexpr,
                TH: tl.constexpr, TMASK: tl.constexpr):
    """For key columns o_u ([U]) and the query columns' window starts: whether each pair
    is in the window ([U, N]) and the RelT row of its column tap (TMASK outside)."""
    du = o_u[:, None] - start_x[None, :]
    duc = tl.maximum(du, 0)
    o_cu = duc // dil_w
    m_band = (du >= 0) & (duc - o_cu * dil_w == 0) & (o_cu < KW)
    if SHIFT:
        return m_band, tl.where(m_band, off_x[None, :] + o_cu + KW - 1 + TH, TMASK)
    else:
        return m_band, tl.where(m_band, o_cu + TH, TMASK)


@triton.jit
def _lse_delta(lse_ptr, delta_ptr, o_l, o_dl, o_jl, o_jdl, m_j):
    """lse and delta of a query row's BLOCK_N columns (o_l, o_dl: the row's offsets; o_jl,
    o_jdl: the columns'): one [N, 2] load through a pointer tensor over both tensors, split
    after (two [N] loads in the score tile's column layout cost ~4x the instructions)."""
    m_lse = (tl.arange(0, 2) == 0)[None, :]
    p = tl.where(m_lse, lse_ptr + o_l + o_jl[:, None], delta_ptr + o_dl + o_jdl[:, None])
    return tl.split(tl.load(p, mask=m_j[:, None], other=0.0))


@triton.jit
def _part_keys(o_p, r0, nrows, y0, x0, H, W, COLS, COLS_MAGIC):
    """Key slots o_p of a part of the tile whose nrows rows start at tile row r0: slot p
    -> tile row r0 + p // COLS, column x0 + p % COLS. Returns (tile row, y, x, key mask)."""
    o_pr = (o_p * COLS_MAGIC) >> _MAGIC_SHIFT  # o_p // COLS without a division
    o_mr = r0 + o_pr
    y = y0 + o_mr
    x = x0 + o_p - o_pr * COLS
    return o_mr, y, x, (o_p < nrows * COLS) & (y < H) & (x < W)


@triton.jit
def _part_operands(k_ptr, v_ptr, eye_ptr, dtype_ptr, y, x, o_mr, m_key, o_d, m_d, o_kv0, o_vv0,
                   sk_h, sk_w, sk_d, sv_h, sv_w, sv_d, sdk_h, sdk_w, j0, o_u, o_r, r0, COLS_MAGIC,
                   x0, COLS, PART_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_P: tl.constexpr,
                   EYE: tl.constexpr, KV_I32: tl.constexpr, VEC: tl.constexpr,
                   DOT_F32: tl.constexpr, PAIR_ONEHOT: tl.constexpr, COMBINED: tl.constexpr,
                   o_s):
    """k, v [PART_M, D] of a part's keys (tile slots o_s), its one-hots A_col [PART_M, N] (each key's
    column among the query columns) and A_row [PART_M, RP] (each key's tile row), and
    the keys' pixel offsets in dk and dv."""
    m_kd = m_key[:, None] & m_d[None, :]
    if KV_I32:  # k, v, dk, dv share their row / column strides, offsets fit in int32
        o_kp = y * sk_h + x * sk_w  # [M]: one int32 vector instead of three int64 ones
        o_vp = o_kp
        o_dkp = o_kp
    else:
        y64 = y.to(tl.int64)
        x64 = x.to(tl.int64)
        o_kp = y64 * sk_h + x64 * sk_w
        o_vp = y64 * sv_h + x64 * sv_w
        o_dkp = y64 * sdk_h + x64 * sdk_w  # dk's and dv's
    # VEC: every pixel and head offset is a multiple of VEC elements, d contiguous
    o_km = tl.multiple_of(o_kv0 + o_kp, VEC)  # [M]
    b_k = tl.load(k_ptr + o_km[:, None] + o_d[None, :] * sk_d, mask=m_kd, other=0.0)
    o_vm = tl.multiple_of(o_vv0 + o_vp, VEC)
    b_v = tl.load(v_ptr + o_vm[:, None] + o_d[None, :] * sv_d, mask=m_kd, other=0.0)
    if PAIR_ONEHOT:  # on 4+ warps (wgmma): built in registers, A_row from (even, odd)
        # slot pairs side by side (tl.join), whose layout's operand reads cost less in
        # the loop than those of loaded one-hots (s4: 227 against 285 per row)
        # A_col built as [N, M] and transposed: the default layout spreads a row-major
        # [M, N] tile's rows over few threads, so each thread would split ~M/2 slots
        # into (row, column); the transposed build splits ~2 slots per thread
        dtype = dtype_ptr.dtype.element_ty
        b_acol = tl.trans(tl.where(o_u[:, None] == x[None, :], 1.0, 0.0).to(dtype))
        o_me = 2 * tl.arange(0, PART_M // 2)
        r_even = r0 + ((o_me * COLS_MAGIC) >> _MAGIC_SHIFT)  # tile rows of even slots
        r_odd = r0 + (((o_me + 1) * COLS_MAGIC) >> _MAGIC_SHIFT)
        b_arow = tl.join(tl.where(o_r[:, None] == r_even[None, :], 1.0, 0.0),
                         tl.where(o_r[:, None] == r_odd[None, :], 1.0, 0.0))
        b_arow = tl.trans(tl.reshape(b_arow, (ROWS_P, PART_M)).to(dtype))
    elif COMBINED:  # one matrix A [M, N] with two ones per key: at its column in the
        # tile (x - x0 < COLS) and at COLS + its tile row (COLS + ROWS <= N); eye_ptr is
        # then the launcher's table of these rows by tile slot (`combined_onehots`: a
        # function of COLS alone), loaded as PART_M contiguous rows (two masked identity
        # rows per slot and their sum cost s2 ~40 more instructions per program)
        b_acol = tl.load(eye_ptr + o_s[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :])
        b_arow = b_acol
    else:  # rows of an identity table loaded per key slot: BLOCK_N (ROWS_P) contiguous
        # elements move in 16-byte loads and stores to shared memory, where a compare and
        # select per element stored 2 bytes at a time (slots whose column or row falls
        # outside the table get a zero row)
        o_xu = x - j0
        b_acol = tl.load(eye_ptr + o_xu[:, None] * EYE + tl.arange(0, BLOCK_N)[None, :],
                         mask=((o_xu >= 0) & (o_xu < BLOCK_N))[:, None], other=0.0)
        b_arow = tl.load(eye_ptr + o_mr[:, None] * EYE + o_r[None, :],
                         mask=(o_mr < ROWS_P)[:, None], other=0.0)
    if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
        b_acol = b_acol.to(tl.float32)
        b_arow = b_arow.to(tl.float32)
    return b_k, b_v, b_acol, b_arow, o_dkp


@triton.jit
def _row_inputs(i, i_base, q_ptr, do_ptr, lse_ptr, delta_ptr, o_q0, sq_h, o_qjd, o_do0, sdo_h,
                o_dojd, m_jd, o_l0, sl_h, o_dl0, sdl_h, o_jl, o_jdl, m_j,
                VEC: tl.constexpr, DOT_F32: tl.constexpr, ROW32: tl.constexpr):
    """What every part of the tile reads of query row i: q, dout [N, D], lse and delta
    [N]. ROW32: row i's offsets within the (batch, head) fit in int32, added to the
    loop-invariant base pointers (a 64-bit row offset cost ~6 integer instructions per
    tensor and row)."""
    if ROW32:
        p_q = q_ptr + tl.multiple_of(o_q0, VEC) + tl.multiple_of(i * sq_h, VEC)
        p_do = do_ptr + tl.multiple_of(o_do0, VEC) + tl.multiple_of(i * sdo_h, VEC)
        p_l = lse_ptr + o_l0
        p_dl = delta_ptr + o_dl0
        o_l = i * sl_h
        o_dl = i * sdl_h
    else:
        i64 = i_base.to(tl.int64) + (i - i_base)  # (the interpreter iterates Python ints)
        p_q = q_ptr + tl.multiple_of(o_q0 + i64 * sq_h, VEC)
        p_do = do_ptr + tl.multiple_of(o_do0 + i64 * sdo_h, VEC)
        p_l = lse_ptr
        p_dl = delta_ptr
        o_l = o_l0 + i64 * sl_h
        o_dl = o_dl0 + i64 * sdl_h
    b_q = tl.load(p_q + o_qjd, mask=m_jd, other=0.0)  # [N, D]
    b_do = tl.load(p_do + o_dojd, mask=m_jd, other=0.0)  # [N, D]
    b_lse, b_delta = _lse_delta(p_l, p_dl, o_l, o_dl, o_jl, o_jdl, m_j)  # [N]
    if DOT_F32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    return b_q, b_do, b_lse, b_delta


@triton.jit
def _row_rel(i, b_q, b_relt, b_tacc, o_band, y0, o_r, COLS, ROWS, H, KH: tl.constexpr, dil_h,
             SHIFT: tl.constexpr, TMASK: tl.constexpr, ROWS_P: tl.constexpr,
             BLOCK_N: tl.constexpr, HAS_REL: tl.constexpr, COMBINED: tl.constexpr):
    """With rel tables, Band [N, N] and Brow [RP, N] of query row i: gathers of T = RelT
    Q^T (the column tap of each (key column, query column), the table row of each tile
    row); issued after the parts' K Q^T dots, as the one-part kernel always did (before
    them, s4 read +10 instructions per row). COMBINED: one gather B [N, N] instead: rows
    t < COLS the column taps of the tile's key column x0 + t (o_band, fixed per
    program), rows COLS + r the table row of tile row r (Band's rows of the halo
    columns and Brow's rows past the tile's were never read)."""
    if HAS_REL:
        # [TP, D] @ [D, N], rounded to q's dtype before the gathers (half the bytes)
        b_t = tl.dot(b_relt, tl.trans(b_q), b_tacc, input_precision="ieee")
        b_t = b_t.to(b_relt.dtype)
        if COMBINED:
            o_kc = tl.arange(0, BLOCK_N)
            m_rr, o_rr, o_unused = _row_taps(y0 + o_kc - COLS, i, H, KH, dil_h, SHIFT)  # [N]
            m_rr = m_rr & (o_kc >= COLS) & (o_kc < COLS + ROWS)
            o_bc = tl.where((o_kc < COLS)[:, None], o_band, tl.where(m_rr, o_rr, TMASK)[:, None])
            b_band = tl.gather(b_t, o_bc, 0)  # [N, N]
            b_brow = b_band
        else:
            b_band = tl.gather(b_t, o_band, 0)  # [N, N]
            m_rr, o_rr, o_unused = _row_taps(y0 + o_r, i, H, KH, dil_h, SHIFT)  # [RP]
            o_rr = tl.broadcast_to(tl.where(m_rr, o_rr, TMASK)[:, None], (ROWS_P, BLOCK_N))
            b_brow = tl.gather(b_t, o_rr, 0)  # [RP, N]
    else:
        b_band = o_r
        b_brow = o_r
    return b_band, b_brow


@triton.jit
def _part_step(acc_dk, acc_dv, b_s, b_v, b_acol, b_arow, y, m_col, o_rpbc, b_q, b_do, b_lse,
               b_delta, b_band, b_brow, i, H, KH: tl.constexpr, dil_h, SHIFT: tl.constexpr,
               p_rpb0, srp_h, srp_w, qk_scale, q_ptr, do_ptr, HAS_REL: tl.constexpr,
               HAS_RPB: tl.constexpr, MASK_IN_DOTS: tl.constexpr, DOT_F32: tl.constexpr,
               COMBINED: tl.constexpr, NEG_V: tl.constexpr):
    """One query row against a part's keys, given its K Q^T (b_s): the rel dots and the
    softmax backward on its [PART_M, N] score tile; returns the part's accumulators."""
    if HAS_REL:
        b_s = tl.dot(b_acol, b_band, b_s, input_precision="ieee")  # [M, N] @ [N, N]
        if not COMBINED:
            b_s = tl.dot(b_arow, b_brow, b_s, input_precision="ieee")  # [M, RP] @ [RP, N]
    b_s = b_s * qk_scale - (b_lse * LOG2E)[None, :]
    if HAS_RPB or not MASK_IN_DOTS:
        m_row, o_unused, o_rpbr = _row_taps(y, i, H, KH, dil_h, SHIFT)  # [M]
    if HAS_RPB:
        p_rpb = p_rpb0 + o_rpbr[:, None] * srp_h + o_rpbc * srp_w
        b_s += tl.load(p_rpb, mask=m_col & m_row[:, None], other=0.0).to(tl.float32) * LOG2E
    if MASK_IN_DOTS:
        b_p = tl.exp2(b_s)  # P^T [M, N]
    else:
        b_p = tl.where(m_col & m_row[:, None], tl.exp2(b_s), 0.0)

    b_pl = b_p.to(do_ptr.dtype.element_ty)
    if DOT_F32:
        b_pl = b_pl.to(tl.float32)
    acc_dv += tl.dot(b_pl, b_do, input_precision="ieee")  # [M, N] @ [N, D] -> [M, D]
    # dP^T - delta [M, N]: delta rides in the dot's accumulator (ptxas gives the
    # tensor-core op a shared C operand), not a subtraction per score element. NEG_V
    # (b_v is -v): delta - dP^T without negating delta per row; every value below is then
    # the exact negation of the one with v (rounding is symmetric), dk's sign is restored
    # at the store
    if NEG_V:
        b_dacc = tl.broadcast_to(b_delta[None, :], (b_v.shape[0], b_q.shape[0]))
    else:
        b_dacc = tl.zeros([b_v.shape[0], b_q.shape[0]], tl.float32) - b_delta[None, :]
    b_dp = tl.dot(b_v, tl.trans(b_do), b_dacc, input_precision="ieee")  # [M, D] @ [D, N]
    # dS^T [M, N]: zero outside the windows as P is (a NaN/inf there, 0 * inf,
    # reaches the accumulators and sends the program through the slow pass)
    b_dsl = (b_p * b_dp).to(q_ptr.dtype.element_ty)
    if DOT_F32:
        b_dsl = b_dsl.to(tl.float32)
    acc_dk += tl.dot(b_dsl, b_q, input_precision="ieee")  # [M, N] @ [N, D] -> [M, D]
    return acc_dk, acc_dv


@triton.jit
def _part_store(dk_ptr, dv_ptr, acc_dk, acc_dv, o_dkp, m_key, o_d, m_d, o_dk0, sdk_d, scale,
                VEC: tl.constexpr):
    """dk (times scale) and dv of a part's keys (dk and dv share one layout)."""
    o_dkm = tl.multiple_of(o_dk0 + o_dkp, VEC)
    p_d = o_dkm[:, None] + o_d[None, :] * sdk_d
    m_kd = m_key[:, None] & m_d[None, :]
    tl.store(dk_ptr + p_d, (acc_dk * scale).to(dk_ptr.dtype.element_ty), mask=m_kd)
    tl.store(dv_ptr + p_d, acc_dv.to(dv_ptr.dtype.element_ty), mask=m_kd)


@triton.jit
def _key_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    relh_ptr, relw_ptr, rpb_ptr,  # absent tables: None (their HAS_ flag is off)
    eye_ptr,  # [EYE, EYE] identity in q's dtype, the one-hots' rows (COMBINED: the
    # [BLOCK_M, BLOCK_N] combined_onehots table); None with PAIR_ONEHOT
    dk_ptr, dv_ptr,
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, ROWS, COLS, COLS_MAGIC, N_SEG, HALO_H, HALO_W)
    sq, sk, sv, sdo,  # (batch, row, column, head, channel) strides
    sl, sdl,  # (batch, row, column, head) strides of lse and delta
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    sdk,  # strides of dk and dv, the launcher's contiguous tensors (derived in-kernel they
    # cost ptxas registers across the query-row loop: s1 +21 instructions per row)
    dil,  # (dil_h, dil_w)
    scale, qk_scale,  # qk_scale = scale * log2(e)
    D: tl.constexpr,  # head dim: constexpr, so the channel masks keep 16-byte accesses
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, TP: tl.constexpr,  # rel_h / rel_w rows, padded sum
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS_P: tl.constexpr, MASK_IN_DOTS: tl.constexpr, DOT_F32: tl.constexpr,
    ROW_I64: tl.constexpr, ROW32: tl.constexpr, VEC: tl.constexpr, KV_I32: tl.constexpr,
    GRID3: tl.constexpr,
    SUB_M: tl.constexpr,  # key slots per sub-tile of the slow pass
    PAIR_ONEHOT: tl.constexpr,  # build A_row from (even, odd) slot pairs (4+ warps)
    EYE: tl.constexpr,  # rows (and row stride) of eye_ptr's identity: >= BLOCK_N, ROWS_P
    HALVES: tl.constexpr,  # the tile as two parts of BLOCK_M / 2 slots (top, bottom rows)
    COMBINED: tl.constexpr,  # one one-hot A (column, row) and one gather B per row
    QD_SHARED: tl.constexpr,  # dout has q's strides and delta lse's
    ALL_LIVE: tl.constexpr,  # no row dilation, no shift: every walked query row is live
    NEG_V: tl.constexpr,  # the walks hold -v (delta - dP^T, -dk), see _part_step
):
    H, W, HEADS, ROWS, COLS, COLS_MAGIC, N_SEG, HALO_H, HALO_W = sizes
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    sv_b, sv_h, sv_w, sv_n, sv_d = sv  # (k's in place of v's when equal: s1 spilled 24 B)
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d = sdo
    sl_b, sl_h, sl_w, sl_n = sl
    sdl_b, sdl_h, sdl_w, sdl_n = sdl
    if QD_SHARED:  # dout's strides are q's, delta's lse's: one set of offsets serves both
        sdo_b, sdo_h, sdo_w, sdo_n, sdo_d = sq
        sdl_b, sdl_h, sdl_w, sdl_n = sl
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    sdk_b, sdk_h, sdk_w, sdk_n, sdk_d = sdk
    dil_h, dil_w = dil
    SHIFT: tl.constexpr = PADDING == 2
    D_HALF: tl.constexpr = D // 2
    # head fastest: the heads of one key tile run side by side (full cache sectors)
    if GRID3:  # grid (heads, tiles, batch): one division (none when N_SEG is 1), not three
        n = tl.program_id(0)
        t = tl.program_id(1)
        seg = t % N_SEG
        rb = t // N_SEG
        b = tl.program_id(2)
    else:  # a 1-D grid where tiles or batch exceed the grid's y / z limit
        n, seg, rb, b = unravel_program(tl.program_id(0), HEADS, N_SEG, tl.cdiv(H, ROWS))
    y0 = rb * ROWS
    x0 = seg * COLS

    # HALVES: the tile's rows split into a top part (rows [0, RH)) and a bottom part (rows
    # [RH, ROWS)) of BLOCK_M / 2 slots each, so that the query rows whose windows meet
    # only one part (the first and last rows walked) run half the score tile
    if HALVES:
        PART_M: tl.constexpr = BLOCK_M // 2
        RH = (ROWS + 1) // 2
    else:
        PART_M: tl.constexpr = BLOCK_M
        RH = ROWS
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b64 = b.to(tl.int64)
    n64 = n.to(tl.int64)
    o_kv0 = b64 * sk_b + n64 * sk_n
    o_vv0 = b64 * sv_b + n64 * sv_n

    # query columns that can see the tile: [j0, j0 + BLOCK_N), the launcher makes it wide
    # enough; their column taps against the keys are the same for every query row
    j0 = tl.maximum(x0 - HALO_W, 0)
    o_j = j0 + tl.arange(0, BLOCK_N)
    m_j = o_j < W
    start_x, off_x = window_start(o_j, W, KW, dil_w, SHIFT)  # [N]
    # Column part of the rel bias: key columns of the tile lie in [j0, j0 + BLOCK_N) too,
    # so T[col tap(x, j), j] = A_col @ Band, A_col [M, N] the one-hot of each key's column
    # (fixed per program) and Band [N, N] (key column u, query column j) gathered from
    # T per query row: a gather on [N, N] instead of [M, N].
    o_u = j0 + tl.arange(0, BLOCK_N)  # key columns (rows of Band)
    # Row part likewise: A_row [M, RP] one-hot of each key's row in the tile (fixed per
    # program) @ Brow [RP, N] = T[rel row of tile row r for query row i, j] per query row.
    o_r = tl.arange(0, ROWS_P)

    # key pixels of the top part (the whole tile without HALVES), flattened
    o_p = tl.arange(0, PART_M)
    o_mr, y, x, m_key = _part_keys(o_p, 0, RH, y0, x0, H, W, COLS, COLS_MAGIC)
    b_k, b_v, b_acol, b_arow, o_dkp = _part_operands(
        k_ptr, v_ptr, eye_ptr, q_ptr, y, x, o_mr, m_key, o_d, m_d, o_kv0, o_vv0,
        sk_h, sk_w, sk_d, sv_h, sv_w, sv_d, sdk_h, sdk_w, j0, o_u, o_r, 0, COLS_MAGIC, x0,
        COLS, PART_M, BLOCK_N, ROWS_P, EYE, KV_I32, VEC, DOT_F32, PAIR_ONEHOT, COMBINED, o_p)
    if NEG_V:
        b_v = -b_v
    if HAS_RPB or not MASK_IN_DOTS:
        m_col, o_rpbc = _col_taps(x, m_key, o_j, m_j, W, KW, dil_w, SHIFT)  # [M, N]
    else:
        m_col = m_key
        o_rpbc = m_key
    if HALVES:  # the bottom part's keys
        o_mr2, y2, x2, m_key2 = _part_keys(o_p, RH, ROWS - RH, y0, x0, H, W, COLS, COLS_MAGIC)
        b_k2, b_v2, b_acol2, b_arow2, o_dkp2 = _part_operands(
            k_ptr, v_ptr, eye_ptr, q_ptr, y2, x2, o_mr2, m_key2, o_d, m_d, o_kv0, o_vv0,
            sk_h, sk_w, sk_d, sv_h, sv_w, sv_d, sdk_h, sdk_w, j0, o_u, o_r, RH, COLS_MAGIC,
            x0, COLS, PART_M, BLOCK_N, ROWS_P, EYE, KV_I32, VEC, DOT_F32, PAIR_ONEHOT,
            COMBINED, RH * COLS + o_p)
        if NEG_V:
            b_v2 = -b_v2
        if HAS_RPB or not MASK_IN_DOTS:
            m_col2, o_rpbc2 = _col_taps(x2, m_key2, o_j, m_j, W, KW, dil_w, SHIFT)
        else:
            m_col2 = m_key2
            o_rpbc2 = m_key2

    # RelT row of each Band entry; pairs outside the window read T's last row, TMASK
    TMASK: tl.constexpr = TP - 1
    if COMBINED:  # the first COLS rows of B [N, N]: the tile's key columns x0 + t
        m_bc, o_band = _band_index(x0 + tl.arange(0, BLOCK_N), start_x, off_x, KW, dil_w,
                                   SHIFT, TH, TMASK)
    else:  # Band [N, N]: key columns o_u
        m_band, o_band = _band_index(o_u, start_x, off_x, KW, dil_w, SHIFT, TH, TMASK)
    # MASK_IN_DOTS: the window mask rides in the rel dots: T's row TMASK (RelT has zeros
    # there) starts as -1e30 in the T dot's accumulator, so Band and Brow carry the mask
    # (exp2 then gives exactly 0; padding slots and columns see zero q, dout and keys, so
    # they add nothing), instead of a select on every score element or an add per entry
    o_tm = tl.arange(0, TP)
    if MASK_IN_DOTS:
        b_tacc = tl.where(o_tm == TMASK, -1.0e30, 0.0)[:, None] + tl.zeros([TP, BLOCK_N],
                                                                            tl.float32)
    else:
        b_tacc = tl.zeros([TP, BLOCK_N], tl.float32)
    if ROW_I64:
        o_jr = o_j.to(tl.int64)
        o_dr = o_d.to(tl.int64)
    else:
        o_jr = o_j
        o_dr = o_d
    m_jd = m_j[:, None] & m_d[None, :]
    o_qjd = tl.multiple_of(o_jr * sq_w, VEC)[:, None] + o_dr[None, :] * sq_d  # [N, D]
    o_dojd = tl.multiple_of(o_jr * sdo_w, VEC)[:, None] + o_dr[None, :] * sdo_d
    o_q0 = b64 * sq_b + n64 * sq_n
    o_do0 = b64 * sdo_b + n64 * sdo_n
    o_l0 = b64 * sl_b + n64 * sl_n
    o_dl0 = b64 * sdl_b + n64 * sdl_n
    o_jl = o_jr * sl_w
    o_jdl = o_jr * sdl_w

    # RelT [TP, D]: rel_h rows in the first D_HALF channels, then rel_w rows in the rest
    b_relt = tl.zeros([TP, BLOCK_D], dtype=q_ptr.dtype.element_ty)
    if HAS_REL:
        o_t = tl.arange(0, TP)
        m_th = (o_t < TH)[:, None] & (o_d < D_HALF)[None, :]
        p_rh = relh_ptr + n64 * srh_n + o_t[:, None] * srh_r + o_d[None, :] * srh_d
        o_tw = tl.maximum(o_t - TH, 0)
        m_tw = ((o_t >= TH) & (o_t < TH + TW))[:, None] & ((o_d >= D_HALF) & m_d)[None, :]
        p_rw = relw_ptr + n64 * srw_n + o_tw[:, None] * srw_r + (o_d[None, :] - D_HALF) * srw_d
        if relh_ptr.dtype == relw_ptr.dtype:  # one load through a pointer tensor over
            # both tables (the masks are disjoint)
            b_relt = tl.load(tl.where(m_th, p_rh, p_rw), mask=m_th | m_tw, other=0.0)
            b_relt = b_relt.to(q_ptr.dtype.element_ty)
        else:  # one float32 table, one in q's dtype
            b_rh = tl.load(p_rh, mask=m_th, other=0.0).to(tl.float32)
            b_rw = tl.load(p_rw, mask=m_tw, other=0.0).to(tl.float32)
            b_relt = (b_rh + b_rw).to(q_ptr.dtype.element_ty)
        if DOT_F32:
            b_relt = b_relt.to(tl.float32)
    if HAS_RPB:
        p_rpb0 = rpb_ptr + n64 * srp_n
    else:
        p_rpb0 = rpb_ptr

    acc_dk = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
    acc_dv = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
    if HALVES:
        acc_dk2 = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
        acc_dv2 = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
    # query rows whose windows may hold the tile's keys (the rows in between that only
    # dilation skips are tested by _row_is_live)
    i_lo = tl.maximum(y0 - HALO_H, 0)
    i_hi = tl.minimum(y0 + ROWS + HALO_H, H)
    if HALVES:
        # three walks: rows that can reach only the top part (above the tile), both parts,
        # only the bottom part (below it); a query reaches keys at most HALO_H rows away,
        # and a part outside a row's window adds nothing, so each walk's bounds only save
        # work (the membership rule decides which pairs count)
        i_mid = tl.minimum(tl.maximum(y0 + RH - HALO_H, i_lo), i_hi)
        i_bot = tl.minimum(tl.maximum(y0 + RH + HALO_H, i_mid), i_hi)
        for i in range(i_lo, i_mid):  # top part only
            if _row_is_live(i, y0, RH, H, KH, dil_h, SHIFT, ALL_LIVE):
                b_q, b_do, b_lse, b_delta = _row_inputs(
                    i, i_lo, q_ptr, do_ptr, lse_ptr, delta_ptr, o_q0, sq_h, o_qjd, o_do0,
                    sdo_h, o_dojd, m_jd, o_l0, sl_h, o_dl0, sdl_h, o_jl, o_jdl, m_j, VEC,
                    DOT_F32, ROW32)
                b_s = tl.dot(b_k, tl.trans(b_q), input_precision="ieee")  # [M, D] @ [D, N]
                b_band, b_brow = _row_rel(i, b_q, b_relt, b_tacc, o_band, y0, o_r, COLS, ROWS, H,
                                          KH, dil_h, SHIFT, TMASK, ROWS_P, BLOCK_N,
                                          HAS_REL, COMBINED)
                acc_dk, acc_dv = _part_step(
                    acc_dk, acc_dv, b_s, b_v, b_acol, b_arow, y, m_col, o_rpbc,
                    b_q, b_do, b_lse, b_delta, b_band, b_brow, i, H, KH, dil_h, SHIFT, p_rpb0,
                    srp_h, srp_w, qk_scale, q_ptr, do_ptr, HAS_REL, HAS_RPB, MASK_IN_DOTS,
                    DOT_F32, COMBINED, NEG_V)
        for i in range(i_mid, i_bot):  # both parts
            if _row_is_live(i, y0, ROWS, H, KH, dil_h, SHIFT, ALL_LIVE):
                b_q, b_do, b_lse, b_delta = _row_inputs(
                    i, i_mid, q_ptr, do_ptr, lse_ptr, delta_ptr, o_q0, sq_h, o_qjd, o_do0,
                    sdo_h, o_dojd, m_jd, o_l0, sl_h, o_dl0, sdl_h, o_jl, o_jdl, m_j, VEC,
                    DOT_F32, ROW32)
                b_s = tl.dot(b_k, tl.trans(b_q), input_precision="ieee")  # [M, D] @ [D, N]
                b_s2 = tl.dot(b_k2, tl.trans(b_q), input_precision="ieee")  # [M, D] @ [D, N]
                b_band, b_brow = _row_rel(i, b_q, b_relt, b_tacc, o_band, y0, o_r, COLS, ROWS, H,
                                          KH, dil_h, SHIFT, TMASK, ROWS_P, BLOCK_N,
                                          HAS_REL, COMBINED)
                acc_dk, acc_dv = _part_step(
                    acc_dk, acc_dv, b_s, b_v, b_acol, b_arow, y, m_col, o_rpbc,
                    b_q, b_do, b_lse, b_delta, b_band, b_brow, i, H, KH, dil_h, SHIFT, p_rpb0,
                    srp_h, srp_w, qk_scale, q_ptr, do_ptr, HAS_REL, HAS_RPB, MASK_IN_DOTS,
                    DOT_F32, COMBINED, NEG_V)
                acc_dk2, acc_dv2 = _part_step(
                    acc_dk2, acc_dv2, b_s2, b_v2, b_acol2, b_arow2, y2, m_col2, o_rpbc2,
                    b_q, b_do, b_lse, b_delta, b_band, b_brow, i, H, KH, dil_h, SHIFT, p_rpb0,
                    srp_h, srp_w, qk_scale, q_ptr, do_ptr, HAS_REL, HAS_RPB, MASK_IN_DOTS,
                    DOT_F32, COMBINED, NEG_V)
        for i in range(i_bot, i_hi):  # bottom part only
            if _row_is_live(i, y0 + RH, ROWS - RH, H, KH, dil_h, SHIFT, ALL_LIVE):
                b_q, b_do, b_lse, b_delta = _row_inputs(
                    i, i_bot, q_ptr, do_ptr, lse_ptr, delta_ptr, o_q0, sq_h, o_qjd, o_do0,
                    sdo_h, o_dojd, m_jd, o_l0, sl_h, o_dl0, sdl_h, o_jl, o_jdl, m_j, VEC,
                    DOT_F32, ROW32)
                b_s2 = tl.dot(b_k2, tl.trans(b_q), input_precision="ieee")  # [M, D] @ [D, N]
                b_band, b_brow = _row_rel(i, b_q, b_relt, b_tacc, o_band, y0, o_r, COLS, ROWS, H,
                                          KH, dil_h, SHIFT, TMASK, ROWS_P, BLOCK_N,
                                          HAS_REL, COMBINED)
                acc_dk2, acc_dv2 = _part_step(
                    acc_dk2, acc_dv2, b_s2, b_v2, b_acol2, b_arow2, y2, m_col2, o_rpbc2,
                    b_q, b_do, b_lse, b_delta, b_band, b_brow, i, H, KH, dil_h, SHIFT, p_rpb0,
                    srp_h, srp_w, qk_scale, q_ptr, do_ptr, HAS_REL, HAS_RPB, MASK_IN_DOTS,
                    DOT_F32, COMBINED, NEG_V)
        b_sum = tl.sum(acc_dk + acc_dk2)  # one reduction (the parts share a layout)
    else:
        for i in range(i_lo, i_hi):
            if _row_is_live(i, y0, ROWS, H, KH, dil_h, SHIFT, ALL_LIVE):
                b_q, b_do, b_lse, b_delta = _row_inputs(
                    i, i_lo, q_ptr, do_ptr, lse_ptr, delta_ptr, o_q0, sq_h, o_qjd, o_do0,
                    sdo_h, o_dojd, m_jd, o_l0, sl_h, o_dl0, sdl_h, o_jl, o_jdl, m_j, VEC,
                    DOT_F32, ROW32)
                b_s = tl.dot(b_k, tl.trans(b_q), input_precision="ieee")  # [M, D] @ [D, N]
                b_band, b_brow = _row_rel(i, b_q, b_relt, b_tacc, o_band, y0, o_r, COLS, ROWS, H,
                                          KH, dil_h, SHIFT, TMASK, ROWS_P, BLOCK_N,
                                          HAS_REL, COMBINED)
                acc_dk, acc_dv = _part_step(
                    acc_dk, acc_dv, b_s, b_v, b_acol, b_arow, y, m_col, o_rpbc,
                    b_q, b_do, b_lse, b_delta, b_band, b_brow, i, H, KH, dil_h, SHIFT, p_rpb0,
                    srp_h, srp_w, qk_scale, q_ptr, do_ptr, HAS_REL, HAS_RPB, MASK_IN_DOTS,
                    DOT_F32, COMBINED, NEG_V)
        b_sum = tl.sum(acc_dk)

    # Rare slow pass: a non-finite value reached the accumulators. It may be a NaN/inf
    # that a dot spread over the tile from outside some pair's window: 0 * inf in the
    # one-hot rel dots, P^T dO or dS^T Q. Per-pair products (K Q^T, T = RelT Q^T,
    # V dO^T) are exact, so recompute with the summed operands' non-finite entries
    # zeroed (rel terms' infinities carried as counts), and set the (key, channel)
    # gradients that a non-finite value reaches through a pair of some window to NaN,
    # counted with 0/1 indicator dots in fp16. It walks the tile in sub-tiles of SUB_M
    # key slots, reloading k and v and rebuilding their one-hots, and stores each one:
    # kept to few live registers, so a tile's size is set by the fast path alone (the
    # whole-tile slow pass made 64-key tiles spill).
    # x * 0 is NaN exactly when x is not finite; the sum keeps a NaN and an inf (a sum
    # of finite values that overflows takes the slow pass too: exact there as well)
    # (one reduction over both axes: each thread's sum, then the warp's, instead of an
    # axis-by-axis walk). dk alone is summed: a non-finite value that reaches dv (in P or
    # dout) reaches dk too, through dS = P * (dP - delta) with dP = V dout^T (0 * inf
    # and 0 * NaN are NaN, P being 0 outside the windows); only a finite dv that
    # overflows stays out, and the slow pass would store the same inf there
    if b_sum * 0.0 != 0.0:
        # the column window mask as a 0/1 count dot (exact): A_col @ [Band in window]; the
        # fast path with the mask in the rel dots has no m_col (padding key slots are
        # never stored)
        if COMBINED:  # the fast path built B's column rows instead
            m_band, o_band = _band_index(o_u, start_x, off_x, KW, dil_w, SHIFT, TH, TMASK)
        b_band01 = tl.where(m_band & m_j[None, :], 1.0, 0.0).to(tl.float16)  # [N, N]
        for m0 in range(0, BLOCK_M, SUB_M):
            s_h = m0 // PART_M  # the part (0 without HALVES) and its first tile row
            s_r0 = s_h * RH
            s_mr, s_y, s_x, s_key = _part_keys(m0 - s_h * PART_M + tl.arange(0, SUB_M), s_r0,
                                               RH + s_h * (ROWS - 2 * RH), y0, x0, H, W,
                                               COLS, COLS_MAGIC)
            s_kd = s_key[:, None] & m_d[None, :]
            s_y64 = s_y.to(tl.int64)
            s_x64 = s_x.to(tl.int64)
            o_sk = b64 * sk_b + n64 * sk_n + s_y64 * sk_h + s_x64 * sk_w
            sb_k = tl.load(k_ptr + o_sk[:, None] + o_d[None, :] * sk_d, mask=s_kd, other=0.0)
            o_sv = b64 * sv_b + n64 * sv_n + s_y64 * sv_h + s_x64 * sv_w
            sb_v = tl.load(v_ptr + o_sv[:, None] + o_d[None, :] * sv_d, mask=s_kd, other=0.0)
            sb_acol = tl.where(s_x[:, None] == o_u[None, :], 1.0, 0.0).to(q_ptr.dtype.element_ty)
            sb_arow = tl.where(s_mr[:, None] == o_r[None, :], 1.0, 0.0).to(q_ptr.dtype.element_ty)
            if DOT_F32:
                sb_k = sb_k.to(tl.float32)
                sb_v = sb_v.to(tl.float32)
                sb_acol = sb_acol.to(tl.float32)
                sb_arow = sb_arow.to(tl.float32)
            sb_acol16 = sb_acol.to(tl.float16)
            s_col = tl.dot(sb_acol16, b_band01) > 0.5  # [SUB_M, N]
            if HAS_RPB:
                m_unused, s_rpbc = _col_taps(s_x, s_key, o_j, m_j, W, KW, dil_w, SHIFT)
            sacc_dk = tl.zeros([SUB_M, BLOCK_D], dtype=tl.float32)
            sacc_dv = tl.zeros([SUB_M, BLOCK_D], dtype=tl.float32)
            for i in range(i_lo, i_hi):
                if _row_is_live(i, y0, ROWS, H, KH, dil_h, SHIFT):
                    i64 = i_lo.to(tl.int64) + (i - i_lo)
                    p_q = q_ptr + tl.multiple_of(o_q0 + i64 * sq_h, VEC)
                    b_q = tl.load(p_q + o_qjd, mask=m_jd, other=0.0)
                    p_do = do_ptr + tl.multiple_of(o_do0 + i64 * sdo_h, VEC)
                    b_do = tl.load(p_do + o_dojd, mask=m_jd, other=0.0)
                    b_lse, b_delta = _lse_delta(lse_ptr, delta_ptr, o_l0 + i64 * sl_h,
                                                o_dl0 + i64 * sdl_h, o_jl, o_jdl, m_j)
                    if DOT_F32:
                        b_q = b_q.to(tl.float32)
                        b_do = b_do.to(tl.float32)
                    m_qok = tl.abs(b_q.to(tl.float32)) < float("inf")  # [N, D]
                    m_dook = tl.abs(b_do.to(tl.float32)) < float("inf")
                    m_row, o_unused, o_rpbr = _row_taps(s_y, i, H, KH, dil_h, SHIFT)
                    m_win = s_col & m_row[:, None]
                    b_win = tl.where(m_win, 1.0, 0.0).to(tl.float16)

                    b_s = tl.dot(sb_k, tl.trans(b_q), input_precision="ieee")  # exact per pair
                    if HAS_REL:
                        b_t = tl.dot(b_relt, tl.trans(b_q), input_precision="ieee")  # per pair
                        # non-finite rel terms travel as counts: +inf 1, -inf 4, NaN 16 (a
                        # pair has two terms, so the counts stay apart), exact in fp16 dots
                        m_tok = tl.abs(b_t) < float("inf")
                        b_code = tl.where(b_t != b_t, 16.0,
                                          tl.where(m_tok, 0.0, tl.where(b_t > 0, 1.0, 4.0)))
                        b_code = b_code.to(tl.float16)
                        b_t = tl.where(m_tok, b_t, 0.0)
                        b_band = tl.gather(b_t, o_band, 0).to(b_relt.dtype)
                        b_s = tl.dot(sb_acol, b_band, b_s, input_precision="ieee")
                        m_rr, o_rr, o_unused = _row_taps(y0 + o_r, i, H, KH, dil_h, SHIFT)
                        o_rr = tl.broadcast_to(o_rr[:, None], (ROWS_P, BLOCK_N))
                        b_brow = tl.gather(b_t, o_rr, 0).to(b_relt.dtype)
                        b_s = tl.dot(sb_arow, b_brow, b_s, input_precision="ieee")
                        b_cnt = tl.dot(sb_arow.to(tl.float16), tl.gather(b_code, o_rr, 0))
                        b_cnt = tl.dot(sb_acol16, tl.gather(b_code, o_band, 0), b_cnt)
                        o_cnt = b_cnt.to(tl.int32)
                        b_s += tl.where(o_cnt % 4 > 0, float("inf"), 0.0)
                        b_s += tl.where(o_cnt % 16 >= 4, float("-inf"), 0.0)  # inf - inf: NaN
                        b_s = tl.where(o_cnt >= 16, float("nan"), b_s)
                    b_s = b_s * qk_scale - (b_lse * LOG2E)[None, :]
                    if HAS_RPB:
                        p_rpb = p_rpb0 + o_rpbr[:, None] * srp_h + s_rpbc * srp_w
                        b_s += tl.load(p_rpb, mask=m_win, other=0.0).to(tl.float32) * LOG2E
                    b_p = tl.where(m_win, tl.exp2(b_s), 0.0)
                    m_pbad = m_win & ~(tl.abs(b_p) < float("inf"))  # NaN or inf logit / lse
                    b_p = tl.where(m_pbad, 0.0, b_p)
                    b_dos = tl.where(m_dook, b_do, tl.zeros_like(b_do))
                    b_pl = b_p.to(do_ptr.dtype.element_ty)
                    if DOT_F32:
                        b_pl = b_pl.to(tl.float32)
                    sacc_dv += tl.dot(b_pl, b_dos, input_precision="ieee")
                    b_bad = tl.dot(b_win, tl.where(m_dook, 0.0, 1.0).to(tl.float16))
                    b_bad += tl.sum(tl.where(m_pbad, 1.0, 0.0), axis=1)[:, None]
                    sacc_dv += tl.where(b_bad > 0, float("nan"), 0.0)  # NaN stays
                    b_dp = tl.dot(sb_v, tl.trans(b_do), input_precision="ieee")  # exact per pair
                    b_ds = b_p * (b_dp - b_delta[None, :])
                    m_sbad = m_pbad | (m_win & ~(tl.abs(b_ds) < float("inf")))
                    b_dsl = tl.where(m_win & ~m_sbad, b_ds, 0.0).to(q_ptr.dtype.element_ty)
                    if DOT_F32:
                        b_dsl = b_dsl.to(tl.float32)
                    sacc_dk += tl.dot(b_dsl, tl.where(m_qok, b_q, tl.zeros_like(b_q)),
                                     input_precision="ieee")
                    b_bad = tl.dot(b_win, tl.where(m_qok, 0.0, 1.0).to(tl.float16))
                    b_bad += tl.sum(tl.where(m_sbad, 1.0, 0.0), axis=1)[:, None]
                    sacc_dk += tl.where(b_bad > 0, float("nan"), 0.0)

            o_sdk = b64 * sdk_b + n64 * sdk_n + s_y64 * sdk_h + s_x64 * sdk_w
            p_sd = o_sdk[:, None] + o_d[None, :] * sdk_d  # dk and dv: the same layout
            tl.store(dk_ptr + p_sd, (sacc_dk * scale).to(dk_ptr.dtype.element_ty), mask=s_kd)
            tl.store(dv_ptr + p_sd, sacc_dv.to(dv_ptr.dtype.element_ty), mask=s_kd)
    else:
        o_dk0 = b64 * sdk_b + n64 * sdk_n
        if NEG_V:  # the accumulators hold -dk / scale
            scale = -scale
        _part_store(dk_ptr, dv_ptr, acc_dk, acc_dv, o_dkp, m_key, o_d, m_d, o_dk0, sdk_d, scale,
                    VEC)
        if HALVES:
            _part_store(dk_ptr, dv_ptr, acc_dk2, acc_dv2, o_dkp2, m_key2, o_d, m_d, o_dk0, sdk_d,
                        scale, VEC)


# ---------------------------------------------------------------- configs
# One flat config dict is shared with the query kernel (rows_bwd_query): this kernel
# reads only its "K_" keys. K_BLOCK_M: key slots per program; K_BLOCK_N: query columns
# per query row (a power of two; the key tile's column segment is sized to fit it).

_BLOCK_M = (16, 32, 64, 128, 256)
_BLOCK_N = (16, 32, 64, 128, 256)  # the last is the widest query-row sub-tile
_WARPS = (1, 2, 4, 8)
_STAGES = (1, 2)
_MAX_PER_THREAD = 190  # _per_thread bound of the configs kept (no spills at sm_90)
_MAX_PER_THREAD_N16 = 250  # the same with 16 query columns (see _per_thread)
KEYS = ("K_BLOCK_M", "K_BLOCK_N", "K_num_warps", "K_num_stages")


def _halos(args: AttendArgs) -> tuple[int, int]:
    """(rows, columns) a query may sit from a key of its window: (k // 2) * dil centred,
    (k - 1) * dil in shift mode (windows move inward at the borders)."""
    if args.padding == "shift":
        return (args.kh - 1) * args.dh, (args.kw - 1) * args.dw
    return (args.kh // 2) * args.dh, (args.kw // 2) * args.dw


def _tile(q_shape, args: AttendArgs, block_m: int, block_n: int) -> Optional[tuple]:
    """(rows, cols, n_seg, qrows) of the key tile a config gives, None if it cannot fit:
    whole rows when the image is at most BLOCK_N wide, else balanced column segments
    whose query columns (segment plus halo on both sides) fit BLOCK_N; as many rows as
    BLOCK_M holds, balanced over the image height."""
    B, H, W, heads, d = q_shape
    halo_h, halo_w = _halos(args)
    if W <= block_n:
        cols = W
    else:
        cols = block_n - 2 * halo_w
        if cols < 1:
            return None
        cols = triton.cdiv(W, triton.cdiv(W, cols))
    if cols > block_m:
        return None
    rows = max(1, min(H, block_m // cols))
    rows = triton.cdiv(H, triton.cdiv(H, rows))
    return rows, cols, triton.cdiv(W, cols), rows + 2 * halo_h


def _per_thread(block_m: int, block_n: int, block_d: int, num_warps: int) -> float:
    """Rough live values per thread: k, v and the two fp32 accumulators [M, D], q and
    dout [N, D] with their transposes, the [M, N] score tiles. Against ptxas for sm_90
    (Triton 3.9, 16-bit inputs): 136 -> 177 registers, 176 -> 228, 208 -> 242, none
    spilling; 224 spills (d = 80 at 4 warps). With 16 query columns and the slow pass
    in sub-tiles (issue 14, third round): 208 -> 255 and 248 -> 250 registers (32 keys
    at d = 32, 64 keys at d = 16, 1 warp), no spills; 304 spills (64 keys, d = 64, 2
    warps)."""
    return (3 * block_m * block_d + 3 * block_n * block_d + 4 * block_m * block_n) / (
        32 * num_warps)


def _bound(block_n: int) -> int:
    """The _per_thread bound of a config: higher for 16 query columns, where the slow
    pass's sub-tiles leave the fast path's tiles as the register peak."""
    return _MAX_PER_THREAD_N16 if block_n == _BLOCK_N[0] else _MAX_PER_THREAD


def search_space() -> list[dict]:
    """Every config the tuner may try (K_ keys only)."""
    return [{"K_BLOCK_M": bm, "K_BLOCK_N": bn, "K_num_warps": nw, "K_num_stages": ns}
            for bm in _BLOCK_M for bn in _BLOCK_N for nw in _WARPS for ns in _STAGES]


def _fits(config: dict, q_shape, args: AttendArgs) -> bool:
    B, H, W, heads, d = q_shape
    bm, bn, nw = config["K_BLOCK_M"], config["K_BLOCK_N"], config.get("K_num_warps", 4)
    if bn > max(16, next_pow2(W)) or bm > max(16, next_pow2(H * W)):
        return False  # tiles much larger than the image
    if _tile(q_shape, args, bm, bn) is None:
        return False
    bd = head_block(d)
    return _per_thread(bm, bn, bd, nw) <= _bound(bn) and nw * 16 <= max(bm, bn, bd)


def prune(configs: list[dict], q_shape, args: AttendArgs) -> list[dict]:
    """The configs of `configs` that fit the image and registers; the default when none."""
    kept = [c for c in configs if _fits(c, q_shape, args)]
    return kept or [default_config(q_shape, args)]


@per_call_key
def default_config(q_shape, args: AttendArgs) -> dict:
    """The narrowest query sub-tile (16, 32, ... 256) that holds the whole row or a
    segment of min(half its width, 16) keys plus the halo: a query row meets only kw
    columns of each key row, so narrow score tiles waste least. With 16 query columns,
    the fewest instructions per key that do not spill: 64 key slots on 4 warps for
    32 < d <= 64; 64 on 1 warp up to d = 16 and 32 on 1 warp up to d = 32 unless both
    rel tables and rpb are given (those spill 20-28 bytes). Else 32 key slots (16 for
    d > 64), 1 warp up to d = 16, 2 up to 64, 4 above, more while the tile would spill.
    More slots when a whole row needs them. Cost-tool readings: docs/rows_bwd_key.md."""
    B, H, W, heads, d = q_shape
    halo_w = _halos(args)[1]
    bn = next((n for n in _BLOCK_N if W <= n or n - 2 * halo_w >= min(n // 2, 16)),
              _BLOCK_N[-1])
    bd = head_block(d)
    both_biases = args.rel_h is not None and args.rpb is not None  # more live values
    if bn == _BLOCK_N[0] and (bd == 64 or bd <= 32 and not both_biases):
        bm, nw = {16: (64, 1), 32: (32, 1), 64: (64, 4)}[bd]
    else:
        bm = 32 if bd <= 64 else 16
        nw = 1 if bd <= 16 else 2 if bd <= 64 else 4
    tile = _tile(q_shape, args, 256, bn)
    if tile is not None:
        bm = max(bm, next_pow2(tile[1]))  # a tile holds at least one segment
    bm = min(bm, max(16, next_pow2(H * W)))
    while nw < 8 and _per_thread(bm, bn, bd, nw) > _bound(bn):
        nw *= 2
    return {"K_BLOCK_M": bm, "K_BLOCK_N": bn, "K_num_warps": nw, "K_num_stages": 1}


def pixel_offsets_shared(strides, H: int, W: int) -> bool:
    """Whether (B, H, W, heads, d) tensors of these `strides` share their row and column
    strides and every pixel offset within a batch fits in int32 (one offset vector
    serves them all)."""
    s_h, s_w = strides[0][1:3]
    return (all(tuple(st[1:3]) == (s_h, s_w) for st in strides)
            and (H - 1) * abs(s_h) + (W - 1) * abs(s_w) < 2**31)


def halves_fit(block_m: int, block_d: int, rows: int, cols: int) -> bool:
    """Whether a tile of `rows` x `cols` keys runs as two parts of block_m / 2 slots (the
    top ceil(rows / 2) rows, the bottom rest; each at least 16 slots, a tl.dot). Read
    with the cost tool: the three query-row walks' extra set-up pays from 4 rows on
    (2 rows: s3 +0.5 us); at d = 32 the parts spilled (s3: 24 bytes)."""
    return (block_m >= 32 and block_d <= 16 and rows >= 4
            and -(-rows // 2) * cols <= block_m // 2)


# Triton before 3.8 fails to compile the float32 kernel for sm_90 (its layout-conversion
# pass: "operand #0 does not dominate this use", seen with Triton 3.6 on the fp32 spec of
# tests/test_rows_bwd_key_sm90.py); rows_bwd.supports then sends float32 to the "offsets"
# backward (the interpreter runs this kernel's float32 path on any version).
FP32_COMPILES = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8)


@per_call_key
def supports(q_shape, dtype, args: AttendArgs) -> bool:
    """fp16/bf16/fp32, d = 1..256, every padding, kernel size, dilation and table, as long
    as a segment of the image width plus its halo fits a 256-column query sub-tile."""
    B, H, W, heads, d = q_shape
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or not 1 <= d <= 256:
        return False
    cfg = default_config(q_shape, args)
    return _tile(q_shape, args, cfg["K_BLOCK_M"], cfg["K_BLOCK_N"]) is not None


# ---------------------------------------------------------------- launcher

def _plan(q_shape, dtype, strides, args: AttendArgs, config: Optional[dict],
          align: int) -> LaunchPlan:
    """Everything a launch of this call key needs besides the tensors and the table
    strides (`align`: common.pointer_alignment of q, k, v and dout); raises for an
    unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    if not supports(q_shape, dtype, args):
        raise ValueError(f"rows key backward does not support q of shape {q_shape}, "
                         f"dtype {dtype}, kernel ({kh}, {kw}), dilation ({dh}, {dw}), "
                         f"padding {padding!r}")
    if config is None:
        config = default_config(q_shape, args)
    if not isinstance(config, dict) or any(key not in config for key in KEYS[:2]):
        raise ValueError(f"rows key backward config must be a dict with keys "
                         f"{list(KEYS[:2])}, got {config!r}")
    bm, bn = config["K_BLOCK_M"], config["K_BLOCK_N"]
    tile = _tile(q_shape, args, bm, bn)
    if tile is None:
        raise ValueError(f"rows key backward config {config!r} does not fit q of shape "
                         f"{q_shape} with kernel ({kh}, {kw})")
    if B * H * W * heads * d == 0:
        return NO_LAUNCH
    rows, cols, n_seg, qrows = tile
    th, tw = (2 * kh - 1, 2 * kw - 1) if padding == "shift" else (kh, kw)
    halo_h, halo_w = _halos(args)
    launch = {key[2:]: config[key] for key in ("K_num_warps", "K_num_stages") if key in config}
    if dtype == torch.float32:  # fp32 dots run on CUDA cores: 2-4x the registers
        launch["num_warps"] = min(8, max(4, 2 * launch.get("num_warps", 4)))
    grad_strides = contiguous_strides(q_shape)  # dk and dv
    tiles = triton.cdiv(H, rows) * n_seg
    # read with the cost tool on 16-bit tensor-core launches (default: 4 warps)
    pair_onehot = dtype != torch.float32 and launch.get("num_warps", 4) >= 4
    grid3 = tiles <= _GRID_YZ and B <= _GRID_YZ
    halves = not pair_onehot and halves_fit(bm, head_block(d), rows, cols)
    combined = not pair_onehot and bn == 16 and cols + rows <= bn
    return launch_plan(
        _PARAMS,
        grid=(heads, tiles, B) if grid3 else (B * tiles * heads,),
        head=((H, W, heads, rows, cols, cols_magic(cols), n_seg, halo_h, halo_w),
              *strides),  # q, k, v, dout, lse, delta
        tail=(grad_strides, (dh, dw), scale, scale * LOG2E.value),
        flags=dict(
            KH=kh, KW=kw, PADDING=PADDING_CODES[padding],
            HAS_REL=rel_h is not None, HAS_RPB=rpb is not None,
            D=d, TH=th, TW=tw, TP=max(16, next_pow2(th + tw + 1)),  # + the mask row
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=head_block(d), ROWS_P=max(16, next_pow2(rows)),
            # fp16 cannot hold the -1e30 mask bias, a tiny or negative scale would undo
            # it; rpb needs the mask for its loads anyway
            MASK_IN_DOTS=(rel_h is not None and rpb is None and dtype != torch.float16
                          and scale >= 1e-20),
            DOT_F32=INTERPRETED and dtype == torch.bfloat16,
            ROW_I64=not strides_fit_i32((strides[0], strides[3]), W + bn, d),
            # query row offsets within a (batch, head) of q, dout, lse, delta fit in int32;
            # read with the cost tool: taken where it pays (two parts, 8 < d <= 16: s2 -121,
            # det -126 instructions per program; 32+ query columns on 1-2 warps: k11 -94);
            # elsewhere ptxas allocated worse around it (s1 +276, s4 +460, h1 +208, s3
            # +21, fpn-p3 +25)
            ROW32=((halves and 8 < d <= 16 or bn > 16 and not pair_onehot)
                   and H * max(abs(st[1]) for st in (strides[0], strides[3], strides[4],
                                                     strides[5])) < _ROW32_LIMIT),
            VEC=min(align, stride_vector_width(
                [(d, st) for st in (*strides[:4], grad_strides)], head_block(d))),
            KV_I32=pixel_offsets_shared((strides[1], strides[2], grad_strides), H, W),
            GRID3=grid3,
            SUB_M=min(bm, _SUB_M),
            PAIR_ONEHOT=pair_onehot,
            EYE=max(bn, 16, next_pow2(rows)),
            HALVES=halves,
            # read with the cost tool: s2 -64, det -85 instructions per program; with 32
            # query columns (k11) the per-row index selects cost more than they save
            COMBINED=combined,
            # read with the cost tool: s2 -153, det -178, fpn-p3 -139, s1 -230 per
            # program; with PAIR_ONEHOT (4 warps) s4 +244 and h1 spilled 8 bytes
            # read with the cost tool: s2 -62, det -72, fpn-p3 -71, k11 -90 per program;
            # at d = 128 (h1, 4 warps) ptxas spilled 8 bytes
            # read with the cost tool: s4 -312, k11 -32, h1 -52 per program; with COMBINED
            # ptxas allocated worse around it (s2 +105, det +117, s1 +175, fpn-p3 +61)
            NEG_V=not combined,
            ALL_LIVE=dh == 1 and padding != "shift" and d <= 64,
            QD_SHARED=(not pair_onehot and strides[3] == strides[0]
                       and strides[5] == strides[4]),
            **launch,
        ),
    )


_SUB_M = 16  # the slow pass's sub-tile (key slots)

_COMBINED_ONEHOTS: dict = {}


def combined_onehots(device, cols: int, block_m: int, block_n: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The [block_m, block_n] one-hots of COMBINED by tile slot s (key row s // cols, key
    column s % cols of the tile): ones at column s % cols and at cols + s // cols (when
    below block_n). Made on the host once per (device, cols, block_m, block_n, dtype) and
    copied on first use, as `common.identity_table` (no kernel launch per call)."""
    key = (device, cols, block_m, block_n, dtype)
    table = _COMBINED_ONEHOTS.get(key)
    if table is None:
        slot = np.arange(block_m)[:, None]
        col = np.arange(block_n)[None, :]
        ones = (col == slot % cols) | (col == cols + slot // cols)
        if dtype == torch.bfloat16:  # 1.0 is 0x3f80; numpy has no bfloat16: view the bits
            host = torch.from_numpy(ones.astype(np.int16) * 0x3F80).view(torch.bfloat16)
        else:
            host = torch.from_numpy(ones.astype({torch.float16: np.float16,
                                                 torch.float32: np.float32}[dtype]))
        table = _COMBINED_ONEHOTS[key] = host.to(device)
    return table

_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes
_ROW32_LIMIT = 2**31  # int32 row offsets below this (a test lowers it to force int64)
_plans = plan_cache(_plan)
_PARAMS = _key_bwd_kernel.arg_names  # read at import: a recorder may stand in later


def key_grads(q, k, v, dout, lse, delta, args: AttendArgs, config: Optional[dict] = None,
              _poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dv): new contiguous tensors in q.dtype. lse: float32 (B, H, W, heads) natural
    log-sum-exp of each query's logits; delta: float32 (B, H, W, heads) = rowsum(dout *
    out). `config`: the shared flat dict (reads its K_ keys), None for the default.
    `_poison` fills the outputs with NaN first (an unwritten element then shows)."""
    strides = (q.stride(), k.stride(), v.stride(), dout.stride(), lse.stride(), delta.stride())
    align = pointer_alignment((q, k, v, dout))
    plan = _plans((q.shape, q.dtype, strides, args_key(args), config_key(config), align),
                  tuple(q.shape), q.dtype, strides, args, config, align)
    return launch(plan, q, k, v, dout, lse, delta, args, _poison)


def launch(plan: LaunchPlan, q, k, v, dout, lse, delta, args: AttendArgs,
           _poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`key_grads` with its plan (`_plan` of the call's key) made already."""
    dk, dv = new_output_like(q, _poison), new_output_like(q, _poison)
    if plan.grid is None:
        return dk.zero_(), dv.zero_()
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    flags = plan.flags
    launch_kernel(_key_bwd_kernel, plan,
        q, k, v, dout, lse, delta, rel_h, rel_w, rpb,  # None when absent (never read then)
        None if flags["PAIR_ONEHOT"] else combined_onehots(
            q.device, plan.head[0][4], flags["BLOCK_M"], flags["BLOCK_N"], q.dtype)
        if flags["COMBINED"] else identity_table(q.device, flags["EYE"], q.dtype),
        dk, dv,
        *plan.head, table_strides(rel_h, rel_w, rpb), *plan.tail, **plan.options,
    )
    return dk, dv
