"""Forward kernel family "rows": tensor-core row tiles that walk each k/v row once.

What a program owns: one batch b, one head n and a query tile of ROWS = BLOCK_M / BLOCK_W
image rows x BLOCK_W adjacent columns (BLOCK_W a power of two; next_pow2(W) is a whole
row), flattened into BLOCK_M query pixels (m -> row m // BLOCK_W, column m % BLOCK_W).
With dilation dh the rows are ROWS consecutive members of one dilation group
(g, g + dh, ...), so their windows share rows exactly as at dh = 1. Warps stack along M
(one warp x 32 rows is the default up to d = 32: mma.sync, no warpgroup fences).

What it loads: q once ([BLOCK_M, BLOCK_D]), the rel tables once, then each k/v image row
the tile's windows cover (ROWS + kh - 1 at most) ONCE, columns [x0, x0 + BLOCK_K) of it,
and uses that row for every query row whose window holds it:
    S = BIAS + Q K^T + Qrow E_u            tl.dot x 2 (BIAS the first one's accumulator):
                                           [M, D] @ [D, BK], [M, 2NS] @ [2NS, BK]
    online softmax in base 2 on S * scale*log2(e) (the scale inside the exp2's FMA);
    acc += P V                             tl.dot, [M, BK] @ [BK, D]
  (raw logits, "RAW": a nonzero scale and no rpb or PICK; q is negated for a negative
  scale and zeroed for scale 0, so the scale applied is positive. Otherwise the logits
  are scaled first and BIAS added in base-2 units.) The softmax sums stay per score-tile
  element during the walk (one row reduction after it). With PAIR (raw logits and room
  for a second score tile) the walk takes two key rows per step: one max, alpha and
  rescale for both.
* BIAS [M, BK] (built once): the column rel term q[d/2:] . rel_w[c] of each query's
  window taps (one tl.dot q @ rel_w^T, then one tl.gather from it with a -inf column
  that the taps outside the window read: no mask per element), -inf outside. It is
  the same for every key row: a query's column pattern is the same in each window row.
* Qrow [M, NS] (built once): the row term q[:d/2] . rel_h[row] of key row slot s for each
  query (one tl.dot q @ rel_h^T, then tl.gather), -1e30 where the query's window does not
  hold that key row. E_u is the one-hot [NS, BK] of the current slot (read from a small
  constant table, `common.identity_table`), so the second dot adds the row term and the
  window-row mask to the logits on the tensor cores. 16-bit inputs: Qrow is a bf16
  (hi, lo) pair of tables, one dot each with E_u (float32-exact sum).
* rpb (off in the standard suite): gathered per key row ([M, BK] loads, L1-resident).

Zeros padding: out-of-image taps are zero keys and values whose logit is the rel/rpb part
alone; none is loaded. Out-of-image columns lie in the key tile as zero keys (masked
loads, their bias kept) when the unclipped halo fits BLOCK_K; otherwise the tile is
clipped to the image and their log2 mass per window row (a log-sum-exp of column terms)
sits in a spare last column of the tile as a zero key with that bias (SPARE), or, with
rpb or no spare column, is added per key row beside the tile (PICK). Whole out-of-image
rows (tiles at the top or bottom) start the softmax state once, before the walk (their
mass: the sum over those rows of 2^row term times the sum over taps of 2^column term).

Non-finite inputs: the fast walk masks by -inf and -1e30 additions only, so a NaN/inf k
or v outside a query's window may reach its accumulator; then a slow pass (a loop of 0
or 1 trips) recomputes the tile with explicit masks and the row term picked per row,
zeroes non-finite v and marks the (query, channel) outputs whose window holds one NaN.
It also runs when a query's max stayed at the -1e30 marker (no finite in-window logit:
0 / 0, NaN) and, in zeros mode or at scale 0, when q is non-finite (the zero taps' logits
q . 0 are NaN, but their mass comes from the tables): with rel tables every column bias
or row term of such a query is NaN already (each table is q @ [rel half; zeros]), without
them a q @ 0 dot into the sums' start makes l NaN. The slow pass computes its own window
masks inside it (from its trip index, 0), so that the compiler cannot hoist them before
it, onto the fast path's code.

Grid: (head, column group + N_JB * row block, batch x dilation group) where the flat
index would need two integer divisions or more (one float32 quotient instead), else flat.
A column group is COLS adjacent column blocks (config key; default 1, straight code): with
COLS > 1 a program walks them one after the other in a runtime loop, the work that depends
on its rows and head alone (the rel tables' loads and staging, the row bounds, the index
arithmetic) done once before it.

Saves lse = ln(sum exp(logit)) per query (float32) for the backward.
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
    check_config,
    head_block,
    identity_table,
    launch_options,
    next_pow2,
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

MAX_BLOCK_K = 128  # key columns per sub-tile (a score tile [BLOCK_M, BLOCK_K] in registers)
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes
MAX_BLOCK_D = 128  # padded head dim: acc [BLOCK_M, BLOCK_D] fp32 must stay in registers


@triton.jit
def _rel_table(p_rel, srel_r, srel_d, o_d, d_lo, d_hi, rows,
               BLOCK_D: tl.constexpr, E_PAD: tl.constexpr):
    """[BLOCK_D, E_PAD] tile t[dd, e] = rel[e, dd - d_lo] for d_lo <= dd < d_hi, e < rows,
    else 0: a dot operand that picks its half of q's channels."""
    o_e = tl.arange(0, E_PAD)
    m = ((o_d >= d_lo) & (o_d < d_hi))[:, None] & (o_e < rows)[None, :]
    p = p_rel + o_e[None, :] * srel_r + (o_d - d_lo)[:, None] * srel_d
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _rel_operands(relh_ptr, relw_ptr, q_ptr, n, s_tab, o_d, D, D_HALF, n_rows_h, n_rows_w,
                  HAS_REL: tl.constexpr, EVEN_D: tl.constexpr, F32: tl.constexpr,
                  BLOCK_D: tl.constexpr, E_PAD: tl.constexpr):
    """(rel_h, rel_w) of head n as [BLOCK_D, E_PAD] dot operands (see _rel_table): rel_h
    on q's first half of channels, rel_w on the second; float32 (F32) or q's 16-bit
    type. Without rel tables: zeros (never read)."""
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    if HAS_REL:
        if EVEN_D:  # the halves' bounds as constants: no runtime masks along d
            d_half = BLOCK_D // 2
            d_end = BLOCK_D
        else:
            d_half = D_HALF
            d_end = D
        b_th = _rel_table(relh_ptr + n * srh_n, srh_r, srh_d, o_d, 0, d_half, n_rows_h,
                          BLOCK_D, E_PAD)
        b_tw = _rel_table(relw_ptr + n * srw_n, srw_r, srw_d, o_d, d_half, d_end, n_rows_w,
                          BLOCK_D, E_PAD)
        if F32:  # float32 tables (or inputs): exact products on CUDA cores
            b_th = b_th.to(tl.float32)
            b_tw = b_tw.to(tl.float32)
        else:  # q's 16-bit type
            b_th = b_th.to(q_ptr.dtype.element_ty)
            b_tw = b_tw.to(q_ptr.dtype.element_ty)
    else:
        b_th = tl.zeros([BLOCK_D, E_PAD], dtype=tl.float32)
        b_tw = b_th
    return b_th, b_tw


@triton.jit
def _log2(x, INTERP: tl.constexpr):
    """log2 of positive x by lg2.approx (abs. error ~2^-22), not libdevice's polynomial
    (the interpreter has no libdevice: tl.log2 there)."""
    if INTERP:
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def _rcp(x, INTERP: tl.constexpr):
    """1 / x by div.approx (2 ulp; the softmax sums are far from 2^126), not the
    denormal-safe division (the interpreter: 1 / x)."""
    if INTERP:
        return 1.0 / x
    else:
        return libdevice.fast_dividef(tl.full(x.shape, 1.0, tl.float32), x)


@triton.jit
def _small_quotient(a, b, INTERP: tl.constexpr):
    """a // b for 0 <= a < 2**16 (a grid's y or z index) and b >= 1, in float32: (a + 1/2)
    / b lies at least 1 / (2b) from an integer, and div.approx's relative error (2 ulp,
    2**-22) moves it by under (a + 1) * 2**-22 / b, less than that for a < 2**20; a few
    instructions instead of an integer division's ~25."""
    if INTERP:
        return a // b
    else:
        return libdevice.fast_dividef(a.to(tl.float32) + 0.5, b.to(tl.float32)).to(tl.int32)


@triton.jit
def _pick(b_tab, o_e, e):
    """b_tab[m, e[m]] for each query m ([M, E] table, e out of range: -inf)."""
    return tl.max(tl.where(o_e[None, :] == e[:, None], b_tab, float("-inf")), axis=1)


@triton.jit
def _left_half(x):
    """x[:, :E // 2] of an [M, E] tile (E a power of two >= 2)."""
    y = tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1))
    left, right = tl.split(y)
    return left


@triton.jit
def _key_columns(x0, W, BLOCK_K: tl.constexpr, SPARE: tl.constexpr):
    """(columns x0 + [0, BLOCK_K), which of them are image columns loaded as keys: with
    SPARE not the last, a zero key for the out-of-image columns' mass)."""
    o_x = x0 + tl.arange(0, BLOCK_K)
    m_x = (o_x >= 0) & (o_x < W)
    if SPARE:
        m_x = m_x & (tl.arange(0, BLOCK_K) < BLOCK_K - 1)
    return o_x, m_x


@triton.jit
def _window(o_x, m_x, start_x, m_q, dil_w, KW: tl.constexpr, IN_IMAGE: tl.constexpr):
    """(tap [M, BK], in-window mask [M, BK]) of key column o_x for each query: its tap c
    (x = start_x + c * dil_w, 0 <= c < KW), and whether it is one (IN_IMAGE: and in the
    image)."""
    o_diff = o_x[None, :] - start_x[:, None]
    o_diffc = tl.maximum(o_diff, 0)
    o_tap = o_diffc // dil_w
    m_win = (o_diff >= 0) & (o_diffc - o_tap * dil_w == 0) & (o_tap < KW) & m_q[:, None]
    if IN_IMAGE:
        m_win = m_win & m_x[None, :]
    return o_tap, m_win


@triton.jit
def _halve(x):
    """x[:, :C // 2] + x[:, C // 2:] of an [M, C] tile (C a power of two >= 2)."""
    left, right = tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)),
                                      (0, 2, 1)))
    return left + right


@triton.jit
def _pv_step(b_acc, b_alpha, b_p, b_v, DOT_F32: tl.constexpr):
    """acc rescaled by alpha plus P V ([M, BK] @ [BK, BD] -> [M, BD]), P in v's dtype:
    one walk step's update, the fast walk's and the slow pass's."""
    b_pl = b_p.to(b_v.dtype)
    if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
        b_pl = b_pl.to(tl.float32)
        b_v = b_v.to(tl.float32)
    return b_acc * b_alpha[:, None] + tl.dot(b_pl, b_v, input_precision="ieee")


@triton.jit
def _nan_fold(b_lt, b_acc):
    """b_lt folded to [M, C] (C = the narrower of the two widths, by halving) plus 0 times
    b_acc folded the same way: a tile whose row sums are b_lt's, or NaN in the rows where
    b_acc holds a non-finite value (or, at |acc| near 3e38, overflows: a false alarm).
    Widths are powers of two between 16 and 128."""
    if b_lt.shape[1] > b_acc.shape[1]:
        b_lt = _halve(b_lt)
        if b_lt.shape[1] > b_acc.shape[1]:
            b_lt = _halve(b_lt)
            if b_lt.shape[1] > b_acc.shape[1]:
                b_lt = _halve(b_lt)
    if b_acc.shape[1] > b_lt.shape[1]:
        b_acc = _halve(b_acc)
        if b_acc.shape[1] > b_lt.shape[1]:
            b_acc = _halve(b_acc)
            if b_acc.shape[1] > b_lt.shape[1]:
                b_acc = _halve(b_acc)
    return b_lt + b_acc * 0.0


@triton.jit
def _logits(u, b_q, b_bias, b_rt, b_qrow, b_qlo, slot, p_sel, o_sel, b_zo, o_e, t, st, ebase, m_q,
            m_win, p_k0,
            o_kx, m_kv, y64, sk_h, p_rpb, srp_h, o_rpb_x, qk_scale, KH: tl.constexpr,
            HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, VIRT: tl.constexpr,
            PICK: tl.constexpr, SAFE: tl.constexpr, DOT_F32: tl.constexpr, NS_PAD: tl.constexpr,
            BLOCK_K: tl.constexpr, RAW: tl.constexpr, SPLIT: tl.constexpr):
    """Key row u (group member, `slot` rows after the first one walked) against the query
    tile: base-2 logits [M, BK] (-inf outside each query's column window), the row term
    rt [M] (separate with PICK or SAFE; else inside the logits, by the second dot: -1e30
    raw for queries whose window does not hold row u), in zeros mode with VIRT the log2
    mass vz [M] of the out-of-image column taps of that window row (row term included),
    and which queries' windows hold row u. RAW (the fast walk only): the logits stay in raw
    units (before qk_scale) with the raw column bias as the first dot's accumulator; the
    caller scales them inside the exp2's FMA."""
    b_k = tl.load(p_k0 + y64 * sk_h + o_kx, mask=m_kv, other=0.0)  # [BK, BD]
    if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
        b_k = b_k.to(tl.float32)
    if RAW:  # the raw column bias (-inf outside the window) as the accumulator: no FMA
        b_s = tl.dot(b_q, tl.trans(b_k), b_bias, input_precision="ieee")
    else:  # [M, BD] @ [BD, BK] -> [M, BK]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    a = u - st  # window row of key row u, per query
    m_live = (a >= 0) & (a < KH) & m_q
    if PICK or SAFE:  # (SAFE: an inf in b_qrow would spread NaN over the row by the dot)
        if RAW:
            b_s = b_s * qk_scale
        else:
            b_s = b_s * qk_scale + b_bias
        if HAS_REL:
            rt = _pick(b_rt, o_e, u + ebase)
        else:
            rt = tl.zeros_like(qk_scale + a.to(tl.float32))
        rt = tl.where(m_live, rt, float("-inf"))
    else:  # row term (raw units) of row u: column `slot` of b_qrow, by a one-hot dot
        # the one-hot of slot `slot` per key column, [BK, S]: row `slot` of a constant
        # table (every column reads the same row: vector loads and stores, no selects)
        b_sel = tl.load(p_sel + slot * b_qrow.shape[1] + o_sel).to(b_qrow.dtype)
        b_s = tl.dot(b_qrow, tl.trans(b_sel), b_s, input_precision="ieee")  # [M, S] @ [S, BK]
        if SPLIT:  # the lo half of the pair
            b_s = tl.dot(b_qlo, tl.trans(b_sel), b_s, input_precision="ieee")
        if not RAW:
            b_s = b_s * qk_scale + b_bias
        rt = tl.zeros_like(qk_scale + a.to(tl.float32))
    if HAS_RPB:  # rpb[n, (y - i)/dh + kh - 1, (x - j)/dw + kw - 1]
        m_rpb = m_win & m_live[:, None]
        b_rpb = tl.load(p_rpb + ((u - t + KH - 1) * srp_h)[:, None] + o_rpb_x, mask=m_rpb,
                        other=0.0)
        b_s += b_rpb.to(tl.float32) * LOG2E
    if SAFE:  # NaN/inf in k outside the window must not reach this query
        b_s = tl.where(m_win & m_live[:, None], b_s, float("-inf"))
    vz = rt
    if VIRT:
        if HAS_RPB:
            vz = rt + _pick(b_zo, o_e, a)
        else:
            vz = rt + b_zo
    return b_s, rt, vz, m_live


@triton.jit
def _rows_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,  # absent: None
    sel_ptr,
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, D, D_HALF, N_JB, N_TB)
    sq, sk, sv,  # (batch, row, column, head, channel) strides; sv None if KV_SAME_STRIDES
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    dil,  # (dil_h, dil_w)
    qk_scale,  # |scale| * log2(e) (log2(e) for scale 0)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, REL_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, CLIP: tl.constexpr, SPARE: tl.constexpr, NS_PAD: tl.constexpr, SPLIT: tl.constexpr,
    INTERP: tl.constexpr,
    E_PAD: tl.constexpr, DOT_F32: tl.constexpr, ROW_I64: tl.constexpr, OFF_I64: tl.constexpr,
    KV_SAME_STRIDES: tl.constexpr, EVEN_D: tl.constexpr, RAW: tl.constexpr,
    Q_SIGN: tl.constexpr, PAIR: tl.constexpr, GRID_3D: tl.constexpr, COLS: tl.constexpr,
):
    # 16-bit dots are exact; a float32 q @ 0 needs no more than tf32 (non-finite stays so)
    DOT_PRECISION: tl.constexpr = "ieee" if SPLIT else "tf32"
    H, W, HEADS, D, D_HALF, N_JB, N_TB = sizes
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    if KV_SAME_STRIDES:
        sv_b, sv_h, sv_w, sv_n, sv_d = sk
    else:
        sv_b, sv_h, sv_w, sv_n, sv_d = sv
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    dil_h, dil_w = dil
    ZEROS: tl.constexpr = PADDING == 0
    SHIFT: tl.constexpr = PADDING == 2
    VIRT: tl.constexpr = ZEROS and CLIP  # out-of-image column taps outside the key tile
    # their mass per window row: in the spare last column of the tile (SPARE: a zero key
    # whose bias is that mass, the row term added by the dot like any column), else
    # picked per key row beside the tile (PICK)
    PICK: tl.constexpr = VIRT and not SPARE
    PAIRS: tl.constexpr = PAIR and RAW  # the fast walk's two key rows per step
    ROWS: tl.constexpr = BLOCK_M // BLOCK_W
    # Whether a non-finite q needs its own test (a q @ 0 dot): zeros padding takes its
    # zero taps' mass from the tables, and scale 0 zeroes q. Not with rel tables (and
    # q as given, up to sign): each table is q @ [rel half; zeros], so an inf or NaN in
    # any channel of q makes every column bias or every row term NaN (inf * 0), and
    # with them every logit, start mass and zero-tap mass of its query.
    Q_CHECK: tl.constexpr = (ZEROS and not HAS_REL) or Q_SIGN == 0
    # head blocks up to 64 channels: room for the slow pass's own masks and for folding
    # acc into the sums' tile (at 128 channels, 8 warps: a spill, shared-memory shuffles)
    NARROW_D: tl.constexpr = BLOCK_D <= 64
    # head fastest: the heads of one tile run side by side (full cache sectors)
    if GRID_3D:  # (head, column group + N_JB * row block, rest)
        n = tl.program_id(0)
        tb = _small_quotient(tl.program_id(1), N_JB, INTERP)
        jg = tl.program_id(1) - tb * N_JB
        rest = tl.program_id(2)
    else:
        n, jg, tb, rest = unravel_program(tl.program_id(0), HEADS, N_JB, N_TB)
    g = rest % dil_h  # dilation group of the rows: g, g + dil_h, ...
    b = rest // dil_h
    L = (H - g + dil_h - 1) // dil_h  # members of group g
    t0 = tb * ROWS
    # the program's column blocks: COLS of them from jg * COLS (one: no loop), sharing
    # everything that depends on the rows and the head alone
    jb_lo = jg * COLS
    if COLS == 1:
        jb_hi = jb_lo + 1
    else:
        jb_hi = tl.minimum(jb_lo + COLS, (W + BLOCK_W - 1) // BLOCK_W)

    # the query tile, flattened: member t (row g + t*dil_h), column j0 + jj
    o_m = tl.arange(0, BLOCK_M)
    t = t0 + o_m // BLOCK_W
    jj = o_m % BLOCK_W
    m_t = t < L
    o_d = tl.arange(0, BLOCK_D)
    if EVEN_D:  # d = BLOCK_D: no channel mask (vector loads and stores per row)
        m_d = o_d < BLOCK_D
    else:
        m_d = o_d < D
    st, off_y = window_start(t, L, KH, 1, SHIFT)  # first window member, per query
    # rel_h row of key member u for query m: u + ebase (zeros/mask: u - st = a)
    if SHIFT:
        ebase = off_y + KH - 1 - st
    else:
        ebase = -st
    if OFF_I64:  # some tensor has elements past 2**31: 64-bit offsets
        b64 = b.to(tl.int64)
        n64 = n.to(tl.int64)
        i64 = (g + t * dil_h).to(tl.int64)
    else:
        b64 = b
        n64 = n
        i64 = g + t * dil_h
    p_k0 = k_ptr + b64 * sk_b + n64 * sk_n
    p_v0 = v_ptr + b64 * sv_b + n64 * sv_n

    # key members walked: the union of the tile's window rows (in the image)
    t_last = tl.minimum(t0 + ROWS, L) - 1
    if SHIFT:
        u_lo = tl.minimum(tl.maximum(t0 - KH // 2, 0), L - KH)
        u_hi = tl.minimum(tl.maximum(t_last - KH // 2, 0), L - KH) + KH
    else:
        u_lo = tl.maximum(t0 - KH // 2, 0)
        u_hi = tl.minimum(t_last + KH // 2 + 1, L)

    # The rel tables as dot operands, once per program.
    o_e = tl.arange(0, E_PAD)
    if SHIFT:  # rel rows of a window: 2k - 1 (shift), else k
        n_rows_h = 2 * KH - 1
        n_rows_w = 2 * KW - 1
    else:
        n_rows_h = KH
        n_rows_w = KW
    if COLS > 1:  # loaded once, shared by the column blocks
        b_th, b_tw = _rel_operands(relh_ptr, relw_ptr, q_ptr, n, s_tab, o_d, D, D_HALF,
                                   n_rows_h, n_rows_w, HAS_REL, EVEN_D, REL_F32 or DOT_F32,
                                   BLOCK_D, E_PAD)

    # offsets of the one-hot rows (sel_ptr: [NS_PAD, NS_PAD] table, row s = slot s of b_qrow's
    # columns), the same row for each key column
    o_sel = (tl.arange(0, BLOCK_K) * 0)[:, None] + tl.arange(0, NS_PAD)[None, :]

    # one column block: straight code (a loop, even of one trip, changes the compiler's
    # layout choices: s3 +54 instructions per program, 255 registers); else a loop
    for jbi in (tl.static_range if COLS == 1 else tl.range)(0 if COLS == 1 else jb_lo,
                                                            1 if COLS == 1 else jb_hi):
        jb = jbi + (jb_lo if COLS == 1 else 0)
        j0 = jb * BLOCK_W
        j = j0 + jj
        m_q = m_t & (j < W)
        start_x, off_x = window_start(j, W, KW, dil_w, SHIFT)
        if OFF_I64:
            j64 = j.to(tl.int64)
        else:
            j64 = j
        # key columns [x0, x0 + BLOCK_K): the union of the tile's windows; clipped to the
        # image (CLIP) when the unclipped halo would need a wider tile. Zeros mode, unclipped:
        # out-of-image columns are in the tile as zero keys (masked loads) with their bias.
        if SHIFT:
            x0 = tl.min(tl.where(m_q, start_x, W), axis=0)
        elif CLIP:
            x0 = tl.maximum(j0 - (KW // 2) * dil_w, 0)
        else:
            x0 = j0 - (KW // 2) * dil_w
        o_x, m_x = _key_columns(x0, W, BLOCK_K, SPARE)
        o_diff = o_x[None, :] - start_x[:, None]  # [M, BK]
        o_tap, m_win = _window(o_x, m_x, start_x, m_q, dil_w, KW, CLIP or not ZEROS)

        p_q = (q_ptr + b64 * sq_b + n64 * sq_n + i64[:, None] * sq_h
               + (j64 * sq_w)[:, None] + o_d[None, :] * sq_d)
        b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [M, BD]
        b_q_in = b_q  # as loaded (scale 0 zeroes b_q below)
        # scale * q . (k + r) with qk_scale = |scale| * log2(e): q negated for a negative
        # scale, zeroed for scale 0 (qk_scale = log2(e) then), so that qk_scale > 0 and the
        # -1e30 row-term marker stays the most negative logit
        if Q_SIGN < 0:  # through float32 (exact): the interpreter negates bfloat16 wrongly
            b_q = (0.0 - b_q.to(tl.float32)).to(b_q.dtype)
        elif Q_SIGN == 0:
            b_q = tl.zeros_like(b_q)
        if DOT_F32:
            b_q = b_q.to(tl.float32)
        if Q_SIGN != 0:  # non-finite exactly where q is
            b_q_in = b_q
        elif DOT_F32:
            b_q_in = b_q_in.to(tl.float32)
        if ROW_I64:
            o_xr = o_x.to(tl.int64)
            o_dr = o_d.to(tl.int64)
        else:
            o_xr = o_x
            o_dr = o_d
        o_kx = o_xr[:, None] * sk_w + o_dr[None, :] * sk_d  # [BK, BD]
        if KV_SAME_STRIDES:
            o_vx = o_kx
        else:
            o_vx = o_xr[:, None] * sv_w + o_dr[None, :] * sv_d
        if EVEN_D:
            m_kv = m_x[:, None]
        else:
            m_kv = m_x[:, None] & m_d[None, :]

        # Relative terms, base 2, per column block: q @ the rel tables.
        b_rt = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)  # row term per rel_h row
        b_rtraw = b_rt
        b_cf = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)  # column term per rel_w row
        b_cfraw = b_cf
        if COLS == 1:  # one column block: loaded here (fewer live registers in the walk)
            b_th, b_tw = _rel_operands(relh_ptr, relw_ptr, q_ptr, n, s_tab, o_d, D, D_HALF,
                                       n_rows_h, n_rows_w, HAS_REL, EVEN_D, REL_F32 or DOT_F32,
                                       BLOCK_D, E_PAD)
        if HAS_REL:
            if REL_F32:
                b_qr = b_q.to(tl.float32)
            else:
                b_qr = b_q
            b_rtraw = tl.dot(b_qr, b_th, input_precision="ieee")  # [M, BD] @ [BD, E]
            b_rt = b_rtraw * qk_scale
            b_cfraw = tl.dot(b_qr, b_tw, input_precision="ieee")  # [M, BD] @ [BD, E]
            b_cf = b_cfraw * qk_scale

        # Row term and liveness of each key row walked, raw units (before qk_scale): column
        # s of b_qrow is for key member u_lo + s; -1e30 where the query's window misses it.
        # 16-bit inputs: a bf16 hi/lo pair (columns 2s and 2s + 1) for a float32-exact sum.
        # One gather from the row-term table with -1e30 past its rows: a slot outside the
        # query's window reads column E_PAD - 1 (never a rel row: KH, 2 KH - 1 < E_PAD), so
        # no mask per slot. (Idle queries read finite terms; nothing of theirs is stored.)
        o_s = tl.arange(0, NS_PAD)
        a_s = (u_lo + o_s)[None, :] - st[:, None]  # [M, NS]: window row of slot s
        if SHIFT:  # rel_h row a + off_y + KH - 1 (idle queries' off_y may take it below 0:
            # clamped like a < 0, to the sentinel)
            o_g = tl.where(a_s.to(tl.uint32) < KH, a_s + (off_y + KH - 1)[:, None], E_PAD - 1)
            o_g = tl.minimum(o_g.to(tl.uint32), E_PAD - 1).to(tl.int32)
        else:  # rel_h row a; a < 0 wraps past E_PAD - 1
            o_g = tl.minimum(a_s.to(tl.uint32), E_PAD - 1).to(tl.int32)
        b_g = tl.gather(tl.where((o_e < n_rows_h)[None, :], b_rtraw, -1.0e30), o_g, axis=1)
        if SPLIT:  # a bf16 (hi, lo) pair: two dots with the same one-hot
            b_qrow = b_g.to(tl.bfloat16)
            b_qlo = (b_g - b_qrow.to(tl.float32)).to(tl.bfloat16)
            if INTERP:  # the interpreter's bf16 tl.dot is wrong: the bf16 values, in float32
                b_qrow = b_qrow.to(tl.float32)
                b_qlo = b_qlo.to(tl.float32)
        else:
            b_qrow = b_g
            b_qlo = b_g  # unused
        # BIAS [M, BK]: column term of each window tap, -inf outside the window (RAW: in raw
        # units, before qk_scale).
        # One gather from the column-term table with -inf past its rows: a key column
        # outside the query's window (or between its dilation steps, or clipped) reads column
        # E_PAD - 1 (never a rel row), so no mask per element. (dil_w = 1, specialised: the
        # index is one unsigned minimum.)
        o_c = o_diff // dil_w
        o_c = tl.where(o_diff - o_c * dil_w == 0, o_c, -1)  # tap c, or -1 between steps
        if SHIFT:  # rel_w row c + off_x + KW - 1 (idle queries: clamped as for the rows)
            o_col = tl.where(o_c.to(tl.uint32) < KW, o_c + (off_x + KW - 1)[:, None], E_PAD - 1)
            o_col = tl.minimum(o_col.to(tl.uint32), E_PAD - 1).to(tl.int32)
        else:  # rel_w row c; c < 0 wraps past E_PAD - 1
            o_col = tl.minimum(o_c.to(tl.uint32), E_PAD - 1).to(tl.int32)
        if CLIP or not ZEROS:  # columns outside the image: no tap (zeros mode: SPARE / PICK)
            o_col = tl.where(m_x[None, :], o_col, E_PAD - 1)
        if RAW:
            b_cft = b_cfraw
        else:
            b_cft = b_cf
        b_bias = tl.gather(tl.where((o_e < n_rows_w)[None, :], b_cft, float("-inf")), o_col,
                           axis=1)
        # Zeros mode: log2 mass of a window row's out-of-image column taps (b_zo) and of all
        # its taps (b_za), per query: [M] vectors from the column terms (zeros/mask: rel_w
        # row c = tap c), or [M, E] tables over the window row a with rpb.
        b_zo = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_zo_t = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
        b_za = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
        if ZEROS:
            xe = start_x[:, None] + o_e[None, :] * dil_w  # column of tap e
            m_tap = (o_e < KW)[None, :]
            m_xout = ((xe < 0) | (xe >= W)) & m_tap
            if HAS_RPB:  # column c of the rpb window, every window row a
                tzo_m = tl.full([BLOCK_M, E_PAD], -1.0e30, tl.float32)
                tzo_s = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
                tza_m = tl.full([BLOCK_M, E_PAD], -1.0e30, tl.float32)
                tza_s = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
                for c in tl.static_range(KW):
                    b_cc = _pick(b_cf, o_e, c + 0 * off_x)
                    xc = start_x + c * dil_w
                    m_out = (xc < 0) | (xc >= W)
                    b_pc = tl.load(rpb_ptr + n * srp_n + (o_e - KH // 2 + KH - 1) * srp_h
                                   + (c - KW // 2 + KW - 1) * srp_w, mask=o_e < KH, other=0.0)
                    b_lg = b_cc[:, None] + b_pc.to(tl.float32)[None, :] * LOG2E  # [M, E]
                    b_lo = tl.where(m_out[:, None], b_lg, float("-inf"))
                    new = tl.maximum(tzo_m, b_lo)
                    tzo_s = tzo_s * tl.exp2(tzo_m - new) + tl.exp2(b_lo - new)
                    tzo_m = new
                    new = tl.maximum(tza_m, b_lg)
                    tza_s = tza_s * tl.exp2(tza_m - new) + tl.exp2(b_lg - new)
                    tza_m = new
                b_zo_t = tzo_m + tl.log2(tzo_s)  # [M, E]: column a = window row a
                b_za = tza_m + tl.log2(tza_s)
            else:
                if VIRT:
                    b_co = tl.where(m_xout, b_cf, float("-inf"))
                    zo_m = tl.maximum(tl.max(b_co, axis=1), -1.0e30)
                    b_zo = zo_m + _log2(tl.sum(tl.exp2(b_co - zo_m[:, None]), axis=1), INTERP)
        if SPARE:
            m_spare = (tl.arange(0, BLOCK_K) == BLOCK_K - 1)[None, :] & m_q[:, None]
            if RAW:
                b_bias = tl.where(m_spare, (b_zo * (1.0 / qk_scale))[:, None], b_bias)
            else:
                b_bias = tl.where(m_spare, b_zo[:, None], b_bias)
        if HAS_RPB:
            b_zot = b_zo_t
        else:
            b_zot = b_zo
        if HAS_RPB:
            p_rpb = rpb_ptr + n * srp_n
        else:  # never read
            p_rpb = q_ptr
        o_rpb_x = o_tap  # rpb column offsets (unused without rpb)
        if HAS_RPB:
            o_rpb_x = (off_x[:, None] + o_tap + KW - 1) * srp_w

        # Zeros mode: whole out-of-image window rows hold zero keys only; their mass (row
        # term + every column's term) starts the softmax state.
        # Only tiles at the top or bottom of the image have such rows (a uniform branch).
        b_m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
        if ZEROS:
            if (t0 - KH // 2 < 0) | (t_last + KH // 2 >= L):
                if HAS_RPB:
                    u_a = t[:, None] + o_e[None, :] - KH // 2  # member of window row a
                    m_rowout = ((u_a < 0) | (u_a >= L)) & (o_e < KH)[None, :] & m_q[:, None]
                    b_vo = tl.where(m_rowout, b_rt + b_za, float("-inf"))  # [M, E]
                    b_m = tl.maximum(tl.max(b_vo, axis=1), -1.0e30)
                    b_l = tl.sum(tl.exp2(b_vo - b_m[:, None]), axis=1)
                else:  # mass = (sum over rows of 2^row term) x (sum over taps of 2^column
                    # term): two max-shifted sums, no log2; on the tables' left halves
                    # when the window fits them (half the work)
                    if 2 * KH <= E_PAD and 2 * KW <= E_PAD:
                        b_rth = _left_half(b_rt)
                        b_cfh = _left_half(b_cf)
                        o_h = tl.arange(0, E_PAD // 2)
                    else:
                        b_rth = b_rt
                        b_cfh = b_cf
                        o_h = o_e
                    # member of window row a, out of the image: < 0 wraps past L (idle
                    # queries' start state is never stored)
                    u_a = t[:, None] + o_h[None, :] - KH // 2
                    m_rowout = (u_a.to(tl.uint32) >= L) & (o_h < KH)[None, :]
                    b_ca = tl.where((o_h < KW)[None, :], b_cfh, float("-inf"))
                    za_m = tl.max(b_ca, axis=1)
                    b_vo = tl.where(m_rowout, b_rth, float("-inf"))  # [M, E]
                    b_rm = tl.maximum(tl.max(b_vo, axis=1), -1.0e30)
                    b_m = b_rm + za_m
                    b_l = (tl.sum(tl.exp2(b_vo - b_rm[:, None]), axis=1)
                           * tl.sum(tl.exp2(b_ca - za_m[:, None]), axis=1))
        b_m0 = b_m
        b_l0 = b_l
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # The softmax sums of the fast walk per score-tile element (no row reduction per key
        # row; one after the walk); the start mass sits in column 0. (PICK: per query.)
        b_lt = tl.where((tl.arange(0, BLOCK_K) == 0)[None, :], b_l[:, None], 0.0)
        if Q_CHECK:  # a non-finite q must reach the slow pass: its zero taps'
            # logits q . 0 (start mass, SPARE, PICK) are NaN, yet come from the tables here,
            # and scale 0 zeroed q. q @ 0 is NaN on exactly its rows: one small dot per
            # program into the sums' start (no cost in the walk)
            b_lt = tl.dot(b_q_in, tl.zeros([BLOCK_D, BLOCK_K], b_q_in.dtype), b_lt,
                          input_precision=DOT_PRECISION)
            if PICK:
                b_l = tl.sum(b_lt, axis=1)
        # PAIRS: two key rows per step, one max / rescale for both (their shuffles, the acc
        # and sums' rescale and the alpha exp2 halved); an odd count's last step reads its
        # row twice, the copy's P zeroed by an infinite offset in the exp2's operand.
        for u in range(u_lo, u_hi, 2 if PAIRS else 1):
            y64 = g + u * dil_h
            if OFF_I64:
                y64 = y64.to(tl.int64)
            if PAIRS:
                u2 = tl.minimum(u + 1, u_hi - 1)
                y2 = g + u2 * dil_h
                if OFF_I64:
                    y2 = y2.to(tl.int64)
                dead = tl.where(u + 1 < u_hi, 0.0, float("inf"))  # the copy's offset
                b_s, _, _, _ = _logits(
                    u, b_q, b_bias, b_rt, b_qrow, b_qlo, u - u_lo, sel_ptr, o_sel, b_zot, o_e, t,
                    st, ebase, m_q, m_win, p_k0, o_kx, m_kv, y64, sk_h, p_rpb, srp_h, o_rpb_x,
                    qk_scale, KH, HAS_REL, HAS_RPB, VIRT, PICK, False, DOT_F32, NS_PAD, BLOCK_K,
                    RAW, SPLIT)
                b_s2, _, _, _ = _logits(
                    u2, b_q, b_bias, b_rt, b_qrow, b_qlo, u2 - u_lo, sel_ptr, o_sel, b_zot, o_e, t,
                    st, ebase, m_q, m_win, p_k0, o_kx, m_kv, y2, sk_h, p_rpb, srp_h, o_rpb_x,
                    qk_scale, KH, HAS_REL, HAS_RPB, VIRT, PICK, False, DOT_F32, NS_PAD, BLOCK_K,
                    RAW, SPLIT)
                # raw logits (PAIRS needs RAW): scaled by the exp2's FMA
                b_m_new = tl.maximum(b_m, tl.max(tl.maximum(b_s, b_s2), axis=1) * qk_scale)
                b_alpha = tl.exp2(b_m - b_m_new)
                b_p = tl.exp2(b_s * qk_scale - b_m_new[:, None])
                b_p2 = tl.exp2(b_s2 * qk_scale - (b_m_new + dead)[:, None])
                b_lt = b_lt * b_alpha[:, None] + b_p + b_p2
                b_v = tl.load(p_v0 + y64 * sv_h + o_vx, mask=m_kv, other=0.0)  # [BK, BD]
                b_v2 = tl.load(p_v0 + y2 * sv_h + o_vx, mask=m_kv, other=0.0)
                b_pl = b_p.to(v_ptr.dtype.element_ty)
                b_pl2 = b_p2.to(v_ptr.dtype.element_ty)
                if DOT_F32:
                    b_pl = b_pl.to(tl.float32)
                    b_v = b_v.to(tl.float32)
                    b_pl2 = b_pl2.to(tl.float32)
                    b_v2 = b_v2.to(tl.float32)
                b_acc = tl.dot(b_pl, b_v, b_acc * b_alpha[:, None], input_precision="ieee")
                b_acc = tl.dot(b_pl2, b_v2, b_acc, input_precision="ieee")
                b_m = b_m_new
            else:
                b_s, rt, vz, m_live = _logits(
                    u, b_q, b_bias, b_rt, b_qrow, b_qlo, u - u_lo, sel_ptr, o_sel, b_zot, o_e, t, st, ebase,
                    m_q, m_win, p_k0,
                    o_kx, m_kv, y64, sk_h, p_rpb, srp_h, o_rpb_x, qk_scale, KH, HAS_REL, HAS_RPB, VIRT,
                    PICK, False, DOT_F32, NS_PAD, BLOCK_K, RAW, SPLIT)
                if RAW:  # raw logits: scaled by the exp2's FMA (qk_scale > 0)
                    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1) * qk_scale)
                    b_alpha = tl.exp2(b_m - b_m_new)
                    b_p = tl.exp2(b_s * qk_scale - b_m_new[:, None])
                else:
                    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1) + rt)
                    if PICK:
                        b_m_new = tl.maximum(b_m_new, vz)
                    b_alpha = tl.exp2(b_m - b_m_new)
                    b_p = tl.exp2(b_s - (b_m_new - rt)[:, None])  # [M, BK]; 0 where rt = -inf
                if PICK:
                    b_l = b_l * b_alpha + tl.sum(b_p, axis=1) + tl.exp2(vz - b_m_new)
                else:
                    b_lt = b_lt * b_alpha[:, None] + b_p
                b_v = tl.load(p_v0 + y64 * sv_h + o_vx, mask=m_kv, other=0.0)  # [BK, BD]
                b_acc = _pv_step(b_acc, b_alpha, b_p, b_v, DOT_F32)
                b_m = b_m_new
        if PICK or not NARROW_D:
            if not PICK:
                b_l = tl.sum(b_lt, axis=1)
            b_chk = b_l + tl.sum(b_acc, axis=1)
        else:  # one row sum for l and the non-finite test of acc: 0 * acc is 0, or NaN
            b_l = tl.sum(_nan_fold(b_lt, b_acc), axis=1)
            b_chk = b_l

        # Rare slow pass: a non-finite value reached acc or l (a NaN/inf k or v possibly
        # outside the window, spread by the -inf additions or by 0 * NaN in P V): recompute
        # with explicit window masks, non-finite v zeroed, and mark the (query, channel)
        # outputs whose window holds one as NaN.
        # A loop of 0 or 1 trips (not an if), so that static readers of the machine code
        # count it as the rarely run code it is. Any non-finite element makes its row's sum
        # non-finite.
        # Also a query whose max stayed at the -1e30 row-term marker (raw units, scaled):
        # no in-window logit was finite (e.g. all -inf: the exact result is 0 / 0 = NaN),
        # its sums hold the marked rows' mass.
        m_bad = (~(tl.abs(b_chk) < float("inf")) | (b_m < -5.0e29 * qk_scale)) & m_q
        for once in range(tl.max(tl.where(m_bad, 1, 0), axis=0)):
            # once = 0, but not a constant to the compiler: what depends on it stays in the
            # slow pass (not hoisted before it, where the fast path would pass through it)
            if NARROW_D:
                o_xs, m_xs = _key_columns(x0 + once, W, BLOCK_K, SPARE)
                _, m_win = _window(o_xs, m_xs, start_x, m_q, dil_w, KW, CLIP or not ZEROS)
            b_m = b_m0
            b_l = b_l0
            if Q_CHECK:  # a non-finite q: every logit is non-finite, out and
                # lse NaN (by l). Mask and shift get there by the logits unless scale 0
                # zeroed q; zeros mode's zero taps take their mass from the tables.
                b_l += tl.sum(tl.dot(b_q_in, tl.zeros([BLOCK_D, BLOCK_K], b_q_in.dtype),
                                     input_precision=DOT_PRECISION), axis=1)  # 0, or NaN
            b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            b_bad = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for u in tl.range(u_lo, u_hi, num_stages=1):  # rare: no software pipeline
                y64 = g + u * dil_h
                if OFF_I64:
                    y64 = y64.to(tl.int64)
                b_s, rt, vz, m_live = _logits(
                    u, b_q, b_bias, b_rt, b_qrow, b_qlo, u - u_lo, sel_ptr, o_sel, b_zot, o_e, t, st,
                    ebase, m_q, m_win,
                    p_k0, o_kx, m_kv, y64, sk_h, p_rpb, srp_h, o_rpb_x, qk_scale, KH, HAS_REL,
                    HAS_RPB, VIRT, PICK, True, DOT_F32, NS_PAD, BLOCK_K, RAW, SPLIT)
                b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1) + rt)
                if VIRT:
                    b_m_new = tl.maximum(b_m_new, vz)
                b_alpha = tl.exp2(b_m - b_m_new)
                b_p = tl.exp2(b_s - (b_m_new - rt)[:, None])
                b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
                if VIRT:
                    b_l += tl.exp2(vz - b_m_new)
                b_v = tl.load(p_v0 + y64 * sv_h + o_vx, mask=m_kv, other=0.0)
                m_vok = tl.abs(b_v.to(tl.float32)) < float("inf")
                b_v = tl.where(m_vok, b_v, tl.zeros_like(b_v))
                # 0/1 indicators in fp16: exact counts from a tensor-core dot
                b_win = tl.where(m_win & m_live[:, None], 1.0, 0.0).to(tl.float16)
                b_vnan = tl.where(m_vok, 0.0, 1.0).to(tl.float16)
                b_bad += tl.dot(b_win, b_vnan)  # [M, BK] @ [BK, BD] -> [M, BD]
                b_acc = _pv_step(b_acc, b_alpha, b_p, b_v, DOT_F32)
                b_m = b_m_new
            b_acc = tl.where(b_bad > 0, float("nan"), b_acc)
        b_o = b_acc * _rcp(b_l, INTERP)[:, None]

        # out and lse are the launcher's fresh contiguous tensors: their strides follow from
        # the shape (64-bit from the row stride up with OFF_I64)
        so_n = D
        so_w = HEADS * D
        sl_w = HEADS
        if OFF_I64:
            so_h = tl.cast(W, tl.int64) * so_w  # tl.cast: W may be the constant 1
            sl_h = tl.cast(W, tl.int64) * sl_w
        else:
            so_h = W * so_w
            sl_h = W * sl_w
        so_b = H * so_h
        sl_b = H * sl_h
        p_o = (o_ptr + b64 * so_b + n64 * so_n + (i64 * so_h + j64 * so_w)[:, None]
               + o_d[None, :])
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
        b_lse = (b_m + _log2(b_l, INTERP)) * 0.6931471805599453
        p_l = lse_ptr + b64 * sl_b + n64 + i64 * sl_h + j64 * sl_w
        tl.store(p_l, b_lse, mask=m_q)


# --- host side --------------------------------------------------------------------------

COLS_CHOICES = (2, 4, 8, 16, 32)  # column blocks per program besides 1 (COLS_TILE only)


def search_space() -> list[dict]:
    """Tile shapes the tuner may try: BLOCK_M query pixels, BLOCK_W columns per row
    (>= W: whole rows), warps stacked along M (16 rows of the MMA tile each); for the
    one-warp 32-query tile also COLS column blocks per program."""
    space = []
    for bm in (32, 64, 128):
        for bw in (8, 16, 32, 64, 128):
            for nw in (1, 2, 4, 8):
                for ns in (1, 2):
                    space.append(dict(BLOCK_M=bm, BLOCK_W=bw, num_warps=nw, num_stages=ns))
                    if (bm, nw) == COLS_TILE:
                        space += [dict(BLOCK_M=bm, BLOCK_W=bw, num_warps=nw, num_stages=ns,
                                       COLS=cols) for cols in COLS_CHOICES]
    return space


def tile_shape(q_shape, block_w: int) -> int:
    """The query tile's column count: BLOCK_W, at most next_pow2(W) (a whole row)."""
    return max(1, min(block_w, next_pow2(q_shape[2])))


def key_tile(q_shape, args, block_w: int) -> tuple[int, bool]:
    """(BLOCK_K, clipped): key columns per sub-tile, the union of the windows of BLOCK_W
    adjacent queries (16 at least, for tl.dot). Zeros mode keeps the out-of-image columns
    of that union in the tile (zero keys, no extra work) unless clipping them to the image
    makes the tile narrower; mask mode always clips; shift windows lie inside."""
    W = q_shape[2]
    bw = min(tile_shape(q_shape, block_w), W)
    if args.padding == "shift":
        from .common import halo_span

        return max(16, next_pow2(halo_span(W, args.kw, args.dw, "shift", bw))), True
    span = bw + (args.kw - 1) * args.dw
    clipped = max(16, next_pow2(min(W, span)))
    if args.padding == "mask":
        return clipped, True
    full = max(16, next_pow2(span))
    return (clipped, True) if clipped < full else (full, False)


def clipped_span(q_shape, args, bw: int) -> int:
    """Key columns the widest column block needs, clipped to the image (zeros/mask)."""
    W = q_shape[2]
    return min(W, min(bw, W) + (args.kw - 1) * args.dw)


def _e_pad(args) -> int:
    """Width of the rel/row tables: rel rows (kh or 2kh - 1 in shift mode), >= 16."""
    rows = max(args.kh, args.kw) if args.padding != "shift" else 2 * max(args.kh, args.kw) - 1
    return max(16, next_pow2(rows))


def _ns_pad(bm: int, bw: int, kh: int, members: int) -> int:
    """Key-row slots of the row-term table: the in-image rows a tile's windows cover
    (at most the dilation group's length), >= 16."""
    return max(16, next_pow2(min(bm // bw + kh - 1, members)))


def _per_thread(bm: int, bk: int, bd: int, e: int, ns: int, num_warps: int,
                rpb: bool = False) -> float:
    """Estimated live 32-bit tile values per thread: S/P and BIAS [M, BK], acc [M, D],
    q [M, D] (16-bit: half), the row table [M, E], the row-term table [M, 2 NS] (16-bit);
    with rpb its offsets [M, BK] and the zero taps' [M, E] tables. Fitted to ptxas for
    sm_90 (Triton 3.9): at most 112 compiled without spills, 120 and above spilled."""
    extra = bm * bk + 2 * bm * e if rpb else 0
    return (2 * bm * bk + 1.5 * bm * bd + bm * e + bm * ns + extra) / (32 * num_warps)


SPILL_LIMIT = 112


PAIR_LIMIT = 128  # the spill model's bound with the second score tile (see walks_pairs)


def walks_pairs(bm: int, bk: int, bd: int, e: int, ns: int, num_warps: int, raw: bool) -> bool:
    """Whether the fast walk takes two key rows per step (PAIR): raw logits (no rpb, no
    per-row zero-tap mass; the kernel pairs only then) and room for the second score
    tile: the spill model's count with it at most PAIR_LIMIT (every default tile of the
    suite but h1's d = 128; s3's and fpn-p3's d = 32 one-warp tile sits at exactly 128:
    248 registers with pairs, no spill, since round 6 freed its setup), and a head
    block of at most 64 channels: at d = 128 (8 warps) the spill model passed it and
    ptxas spilled 200 bytes."""
    extra = bm * bk / (32 * num_warps)
    return (raw and bd <= 64
            and _per_thread(bm, bk, bd, e, ns, num_warps) + extra <= PAIR_LIMIT)


def _fits(q_shape, args, cfg, strict: bool = True) -> bool:
    """Whether a config fits: BLOCK_K <= MAX_BLOCK_K, warps <= 8-row slices, no spill
    expected; strict also drops tiles with over twice the image's rows (idle queries)."""
    B, H, W, heads, d = q_shape
    bm, nw = cfg["BLOCK_M"], cfg.get("num_warps", 4)
    bw = tile_shape(q_shape, cfg["BLOCK_W"])
    bk, _ = key_tile(q_shape, args, bw)
    rows = bm // bw if bw <= bm else 0
    members = triton.cdiv(max(H, 1), args.dh)
    if rows < 1 or (strict and rows > 1 and rows > 2 * members):
        return False
    ns = _ns_pad(bm, bw, args.kh, members)
    per_thread = _per_thread(bm, bk, head_block(d), _e_pad(args), ns, nw, args.rpb is not None)
    return bk <= MAX_BLOCK_K and nw * 8 <= bm and per_thread <= SPILL_LIMIT


def prune(configs, q_shape, args) -> list[dict]:
    """Drops column blocks wider than needed (one per distinct clipped width), tiles whose
    key rows exceed MAX_BLOCK_K, more warps than 8-row slices, and tiles that would
    spill registers."""
    B, H, W, heads, d = q_shape
    kept, seen = [], set()
    for cfg in configs:
        key = (cfg["BLOCK_M"], tile_shape(q_shape, cfg["BLOCK_W"]), cfg.get("num_warps"),
               cfg.get("num_stages"), cfg.get("COLS", 1))
        if key in seen or not _fits(q_shape, args, cfg):
            continue
        if cfg.get("COLS", 1) > 1 and not _shares_columns(q_shape, cfg):
            continue
        seen.add(key)
        kept.append(cfg)
    return kept


def key_rows_walked(members: int, rows: int, kh: int, shift: bool,
                    step: int = 1) -> tuple[int, int]:
    """(key rows walked in all, row blocks) for one dilation group of `members` rows cut
    into blocks of `rows`: each block walks the in-image rows its windows cover (with
    step 2: the walk's steps, two rows each, an odd count's last one counted whole)."""
    walked, blocks = 0, triton.cdiv(members, rows)
    for tb in range(blocks):
        t0, t1 = tb * rows, min(tb * rows + rows, members) - 1
        if shift:
            lo = min(max(t0 - kh // 2, 0), members - kh)
            hi = min(max(t1 - kh // 2, 0), members - kh) + kh
        else:
            lo, hi = max(t0 - kh // 2, 0), min(t1 + kh // 2 + 1, members)
        walked += triton.cdiv(hi - lo, step)
    return walked, blocks


def _work(q_shape, args, bm: int, block_w: int) -> float:
    """Score-tile elements a launch processes (key rows walked x BLOCK_M x BLOCK_K, plus
    a per-program share for the rel tables and the column pattern): the default
    config's cost estimate."""
    B, H, W, heads, d = q_shape
    bw = tile_shape(q_shape, block_w)
    bk, _ = key_tile(q_shape, args, bw)
    members = triton.cdiv(max(H, 1), args.dh)
    walked, n_tb = key_rows_walked(members, bm // bw, args.kh, args.padding == "shift")
    per_program = bm * (_e_pad(args) * 4 + head_block(d)) * 4
    per_row = bm * (bk + 40)  # row reductions, the row term, loads and barriers
    return triton.cdiv(W, bw) * (walked * per_row + n_tb * per_program)


def _candidates(q_shape, args, strict: bool) -> list[dict]:
    """Default-config candidates, most preferred shape first: one warp owning 32 query
    rows (mma.sync: no warpgroup fences or one-hot staging per key row; the cost tool
    reads it 1.3-2x cheaper than 4 warps at d <= 32), else 4 warps on 64 rows; 1 stage."""
    shapes = ((32, 1), (64, 2), (64, 4), (128, 4), (128, 8), (64, 8))
    return [cfg for cfg in (dict(BLOCK_M=bm, BLOCK_W=bw, num_warps=nw, num_stages=1)
                            for bm, nw in shapes for bw in (8, 16, 32, 64, 128))
            if _fits(q_shape, args, cfg, strict)]


@per_call_key
def default_config(q_shape, args) -> dict:
    """Of the first tile shape (BLOCK_M, num_warps) with a fitting config, the BLOCK_W
    with the least estimated work (`_work`); on images too small for any tile without
    idle rows, the same among tiles with idle rows; then its column blocks per program
    (`columns_per_program`). Tuned tables override this."""
    configs = _candidates(q_shape, args, True) or _candidates(q_shape, args, False)
    first = [c for c in configs if (c["BLOCK_M"], c["num_warps"])
             == (configs[0]["BLOCK_M"], configs[0]["num_warps"])]
    config = min(first, key=lambda c: _work(q_shape, args, c["BLOCK_M"], c["BLOCK_W"]))
    cols = columns_per_program(q_shape, args, config)
    return config if cols == 1 else dict(config, COLS=cols)


COLS_MIN_PROGRAMS = 132 * 8  # a wave of one-warp programs on an H100 (8 resident per SM)
COLS_TILE = (32, 1)  # (BLOCK_M, num_warps) of the tile whose programs may share columns


def _shares_columns(q_shape, config) -> bool:
    """Whether COLS > 1 may pay for this config: the one-warp 32-query tile with head
    blocks of at most 16 channels (at d = 32: 255 registers, a spill at COLS 2; no
    saving at fpn-p3), and COLS at most the row's column blocks (rounded up to a power
    of two: larger ones only repeat it)."""
    bw = tile_shape(q_shape, config["BLOCK_W"])
    return ((config["BLOCK_M"], config.get("num_warps", 4)) == COLS_TILE
            and head_block(q_shape[4]) <= 16
            and config.get("COLS", 1) <= next_pow2(triton.cdiv(q_shape[2], bw)))


def columns_per_program(q_shape, args, config) -> int:
    """COLS: the column blocks a program walks one after the other, sharing what depends
    on its rows and head alone (the rel tables' loads and shared-memory staging, the row
    bounds, the program's index arithmetic: ~290 of s2's ~990 setup instructions).
    Where `_shares_columns`: the row's blocks (a power of two, at most 32), halved while
    fewer than COLS_MIN_PROGRAMS programs would remain; else 1."""
    B, H, W, heads, d = q_shape
    bw = tile_shape(q_shape, config["BLOCK_W"])
    if not _shares_columns(q_shape, dict(config, COLS=1)):
        return 1
    n_jb = triton.cdiv(W, bw)
    rows = B * args.dh * heads * triton.cdiv(triton.cdiv(H, args.dh), config["BLOCK_M"] // bw)
    cols = min(next_pow2(n_jb), COLS_CHOICES[-1])
    while cols > 1 and rows * triton.cdiv(n_jb, cols) < COLS_MIN_PROGRAMS:
        cols //= 2
    return cols


@per_call_key
def supports(q_shape, dtype, args) -> bool:
    B, H, W, heads, d = q_shape
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or not 1 <= d <= 256:
        return False
    if head_block(d) > MAX_BLOCK_D or _e_pad(args) > 32:
        return False
    return bool(_candidates(q_shape, args, False))


def raw_logits(args, pick: bool) -> bool:
    """Whether the fast walk keeps its logits in raw units (the column bias as the dot's
    accumulator, qk_scale = |scale| log2(e) applied by the exp2's FMA, q negated for a
    negative scale): needs 1e-30 < |scale| < 1e30, no rpb and no per-row zero-tap mass
    (PICK)."""
    return args.rpb is None and not pick and 1e-30 < abs(args.scale) < 1e30


def _offsets_fit_i32(layouts, halo: int) -> bool:
    """Whether every element offset the kernel forms (halo columns, which may lie left of
    or past the image, included) stays below 2**31 in every tensor, given as (shape,
    strides): then all offset arithmetic may be int32."""
    for shape, strides in layouts:
        reach = sum((size - 1) * abs(st) for size, st in zip(shape, strides))
        if len(shape) >= 3:
            reach += halo * abs(strides[2])
        if reach + 1 >= 2**31:
            return False
    return True


def _plan(q_shape, dtype, strides, args, rel_f32: bool, config) -> LaunchPlan:
    """Everything a launch of this call key needs besides the tensors and the table
    strides; raises for an unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    if not supports(q_shape, dtype, args):
        raise ValueError(
            f"rows forward does not support q {q_shape} {dtype} with kernel "
            f"({args.kh}, {args.kw}), dilation ({args.dh}, {args.dw}), padding {args.padding!r}"
        )
    config = default_config(q_shape, args) if config is None else config
    check_config(config, ("BLOCK_M", "BLOCK_W"), "rows")
    if B * H * W * heads * d == 0:
        return NO_LAUNCH._replace(layouts=((q_shape[:4], contiguous_strides(q_shape[:4])),))
    bm = config["BLOCK_M"]
    bw = tile_shape(q_shape, config["BLOCK_W"])
    bk, clip = key_tile(q_shape, args, bw)
    if bm % bw or bm < bw:
        raise ValueError(f"rows config: BLOCK_M {bm} must be a multiple of the tile width {bw}")
    cols = config.get("COLS", 1)  # column blocks per program
    if not isinstance(cols, int) or cols < 1:
        raise ValueError(f"rows config: COLS must be a positive int, got {cols!r}")
    # n_jb: the column groups of `cols` column blocks each (the grid's column index)
    n_jb, n_tb = triton.cdiv(triton.cdiv(W, bw), cols), triton.cdiv(triton.cdiv(H, args.dh), bm // bw)
    out_strides, lse_strides = contiguous_strides(q_shape), contiguous_strides(q_shape[:4])
    spare = (clip and args.padding == "zeros" and args.rpb is None
             and clipped_span(q_shape, args, bw) < bk)
    pick = clip and args.padding == "zeros" and not spare
    ns, raw = _ns_pad(bm, bw, args.kh, triton.cdiv(H, args.dh)), raw_logits(args, pick)
    kv_same = strides[1] == strides[2]
    # a 3-D grid where the flat one's index needs two divisions or more (the compiler
    # drops those by sizes of 1); elsewhere it reads no cheaper
    grid_3d = (sum(size > 1 for size in (heads, n_jb, n_tb)) >= 2
               and n_jb * n_tb <= MAX_GRID_YZ and B * args.dh <= MAX_GRID_YZ)
    return launch_plan(
        _PARAMS,
        grid=(heads, n_jb * n_tb, B * args.dh) if grid_3d else (B * args.dh * n_tb * n_jb * heads,),
        head=((H, W, heads, d, d // 2, n_jb, n_tb), *strides[:2],
              None if kv_same else strides[2]),
        tail=((args.dh, args.dw), (abs(args.scale) if args.scale != 0 else 1.0) * LOG2E.value),
        flags=dict(
            KH=args.kh, KW=args.kw, PADDING=PADDING_CODES[args.padding],
            HAS_REL=args.rel_h is not None, HAS_RPB=args.rpb is not None, REL_F32=rel_f32,
            BLOCK_M=bm, BLOCK_W=bw, BLOCK_K=bk, BLOCK_D=head_block(d), CLIP=clip,
            SPARE=spare,
            NS_PAD=ns,
            SPLIT=dtype != torch.float32, INTERP=INTERPRETED,
            E_PAD=_e_pad(args),
            DOT_F32=INTERPRETED and dtype == torch.bfloat16,
            ROW_I64=not strides_fit_i32((*strides, out_strides), W + bk, d),
            OFF_I64=not _offsets_fit_i32(
                [(q_shape, st) for st in (*strides, out_strides)]
                + [(q_shape[:4], lse_strides)], bk),
            KV_SAME_STRIDES=kv_same, EVEN_D=d == head_block(d),
            RAW=raw, Q_SIGN=(args.scale > 0) - (args.scale < 0),
            GRID_3D=grid_3d, COLS=cols,
            PAIR=walks_pairs(bm, bk, head_block(d), _e_pad(args), ns,
                             config.get("num_warps", 4), raw),
            **launch_options(config),
        ),
        layouts=((q_shape[:4], lse_strides),),
    )


_plans = plan_cache(_plan)
_PARAMS = _rows_fwd_kernel.arg_names  # read at import: a recorder may stand in later


def forward(q, k, v, args, config=None, _poison=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the forward; see kernels/__init__ and SASA's SPEC.md."""
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    rel_f32 = rel_h is not None and (q.dtype == torch.float32 or rel_h.dtype == torch.float32
                                     or rel_w.dtype == torch.float32)
    shape, strides = q.shape, (q.stride(), k.stride(), v.stride())
    plan = _plans((shape, q.dtype, strides, args_key(args), rel_f32, config_key(config)),
                  tuple(shape), q.dtype, strides, args, rel_f32, config)
    out, lse = alloc_outputs(q, _poison, plan.layouts[0])
    if plan.grid is None:
        return out, lse
    launch_kernel(_rows_fwd_kernel, plan,
        q, k, v, out, lse, rel_h, rel_w, rpb,  # None when absent (never read then)
        identity_table(q.device, plan.flags["NS_PAD"],
                       torch.bfloat16 if plan.flags["SPLIT"] else torch.float32),
        *plan.head, table_strides(rel_h, rel_w, rpb), *plan.tail, **plan.options,
    )
    return out, lse
