"""Forward kernel family "tile2d": CUDA cores, a 2-D pixel tile with all its heads.

What a program owns: a BLOCK_H x BLOCK_W tile of pixels of one image with all heads
(P = BLOCK_H * BLOCK_W pixels, BLOCK_N = next_pow2(heads)); a thread holds whole
(pixel, head) pairs: q, the output accumulator, the running max and sum. Channels sit in
[DS, ..., DV] tiles (DV channels per vector load, DS vectors per head, DS * DV =
next_pow2(d)). The kw window columns are walked in NCHUNK static chunks of COLS columns
(pad columns past kw masked); for each chunk a runtime loop over the kh window rows loads
the chunk's k and v rows of every tile pixel as [DS, COLS, P, BLOCK_N, DV] tiles, computes
the COLS logits per (pixel, head) as fused multiply-add chains and updates the online
softmax once per (row, chunk). Logits are in log2 units: q is scaled by scale * log2(e)
once. The relative term is split: the column part q[d/2:] . rel_w[col] is computed once
per chunk ([COLS, P, BLOCK_N]) and seeds the logits, the row part q[:d/2] . rel_h[row]
once per (row, chunk) and goes into the row's max. Only in-window taps are loaded; when
k and v share strides the column offsets are the compile-time COL_STEP apart. It saves
lse = ln(sum exp(logit)) per (pixel, head).

Supported: every padding mode, dilation, any odd kh/kw (kw <= 64), shared/per-head rel
tables, rpb, fp16/bf16/fp32, head dims while next_pow2(heads) * next_pow2(d) <= 256
(e.g. 8 heads x d <= 32, 16 heads x d = 16). Any strides; 64-bit pixel offsets.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    PADDING_CODES,
    alloc_outputs,
    bias_strides,
    check_config,
    launch_options,
    next_pow2,
    row_offsets_fit_i32,
    to_f32,
    vector_width,
    window_start,
)

# Triton before 3.8 orders a load's non-contiguous dims upwards (see _load_kv)
_TIES_ASCENDING = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8)
MAX_ROW = 256  # next_pow2(heads) * next_pow2(d) held per pixel
MAX_KW = 64


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
def _load_kv(p, m, TIES_ASCENDING: tl.constexpr):
    """Masked load (0 elsewhere) of a [DS, COLS, P, N, DV] tile. The coalescer gives
    threads to the dims after the contiguous one in index order, ties broken downwards
    from Triton 3.8 on, upwards before: there the tile is loaded as [P, N, COLS, DS, DV],
    so that threads go to pixels and heads and a thread keeps its columns and vectors."""
    if TIES_ASCENDING:
        m = tl.broadcast_to(m, p.shape)
        b = tl.load(tl.permute(p, (2, 3, 1, 0, 4)), mask=tl.permute(m, (2, 3, 1, 0, 4)),
                    other=0.0)
        return tl.permute(b, (3, 2, 0, 1, 4))
    else:
        return tl.load(p, mask=m, other=0.0)


@triton.jit
def _tile2d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
    H, W, HEADS, D, D_HALF, TILES_W, TILES,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    dil_h, dil_w, qk_scale,  # qk_scale = scale * log2(e)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    DS: tl.constexpr, DV: tl.constexpr, COLS: tl.constexpr, NCHUNK: tl.constexpr,
    ROW_I64: tl.constexpr, KV_SAME_STRIDES: tl.constexpr, EVEN_ROW: tl.constexpr,
    VEC: tl.constexpr, COL_STEP: tl.constexpr, TIES_ASCENDING: tl.constexpr,
):
    # Channel c of a head sits at (c // DV, c % DV) of a [DS, ..., DV] tile: DV channels
    # are one vector load, the DS vectors of a head lie in the same thread.
    P: tl.constexpr = BLOCK_H * BLOCK_W
    BLOCK_D: tl.constexpr = DS * DV
    pid = tl.program_id(0)
    b = (pid // TILES).to(tl.int64)
    t = pid % TILES
    o_i = tl.arange(0, P)
    y = (t // TILES_W) * BLOCK_H + o_i // BLOCK_W  # [P]
    x = (t % TILES_W) * BLOCK_W + o_i % BLOCK_W
    m_p = (y < H) & (x < W)

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

    o_qp = tl.multiple_of(b * sq_b + y.to(tl.int64) * sq_h + x.to(tl.int64) * sq_w, VEC)
    b_q = tl.load(q_ptr + o_qp[None, :, None, None] + o_qnd[:, None, :, :],
                  mask=m_p[None, :, None, None] & m_nd[:, None, :, :], other=0.0)
    b_q = b_q.to(tl.float32) * qk_scale  # [DS, P, N, DV], logits come out in log2 units
    start_y, off_y = window_start(y, H, KH, dil_h, PADDING == 2)  # [P]
    start_x, off_x = window_start(x, W, KW, dil_w, PADDING == 2)
    o_kb = b * sk_b
    o_vb = b * sv_b
    if HAS_REL:  # q[:d/2] meets rel_h, q[d/2:] rel_w
        m_dh = (o_n[None, :, None] < n_heads) & (o_ch < d_half)  # [DS, N, DV]
        m_dw = m_nd & (o_ch >= d_half)
        o_rh_nd = o_n[None, :, None] * srh_n + o_ch * srh_d
        o_rw_nd = o_n[None, :, None] * srw_n + (o_ch - d_half) * srw_d

    b_m = tl.full([P, BLOCK_N], -1.0e30, dtype=tl.float32)  # finite: no inf - inf
    b_l = tl.zeros([P, BLOCK_N], dtype=tl.float32)
    b_acc = tl.zeros([DS, P, BLOCK_N, DV], dtype=tl.float32)
    for cc in tl.static_range(NCHUNK):
        # the chunk's columns, per pixel: position, mask, offsets and rel column part
        o_c = cc * COLS + tl.arange(0, COLS)  # [COLS] window column
        xk = start_x[None, :] + o_c[:, None] * dil_w  # [COLS, P]
        m_c = (o_c[:, None] < KW) & m_p[None, :]
        m_x = m_c & (xk >= 0) & (xk < W)
        if COL_STEP > 0:  # k and v share strides and dil_w * column stride is COL_STEP
            o_kx = ((start_x.to(tl.int64) * sk_w)[None, :]
                    + (o_c.to(tl.int64) * COL_STEP)[:, None])
            o_vx = o_kx
        else:
            o_kx = xk.to(tl.int64) * sk_w
            o_vx = xk.to(tl.int64) * sv_w
        o_rx = off_x[None, :] + o_c[:, None] + KW - 1  # [COLS, P] rpb (and shift rel) column
        b_sc = tl.zeros([COLS, P, BLOCK_N], dtype=tl.float32)
        if HAS_REL:
            if PADDING == 2:  # shift: the rel column follows the pixel's window
                p_rw = (relw_ptr + (o_rx * srw_r)[None, :, :, None, None]
                        + o_rw_nd[:, None, None, :, :])
                m_rw = m_c[None, :, :, None, None] & m_dw[:, None, None, :, :]
            else:
                p_rw = (relw_ptr + (o_c * srw_r)[None, :, None, None, None]
                        + o_rw_nd[:, None, None, :, :])
                m_rw = (o_c < KW)[None, :, None, None, None] & m_dw[:, None, None, :, :]
            b_rw = tl.load(p_rw, mask=m_rw, other=0.0).to(tl.float32)  # [DS, COLS, P|1, N, DV]
            b_sc = tl.sum(tl.sum(b_q[:, None, :, :, :] * b_rw, axis=4), axis=0)
        if PADDING == 1:  # mask: out-of-image taps drop out
            b_sc = tl.where(m_x[:, :, None], b_sc, float("-inf"))
        elif NCHUNK * COLS > KW:  # zeros / shift: only the pad columns past kw drop out
            b_sc = tl.where((o_c < KW)[:, None, None], b_sc, float("-inf"))

        for a in range(KH):
            yk = start_y + a * dil_h  # [P]
            m_y = (yk >= 0) & (yk < H)
            m_k = (m_x & m_y[None, :])[None, :, :, None, None] & m_nd[:, None, None, :, :]
            o_ky = tl.multiple_of(o_kb + yk.to(tl.int64) * sk_h + o_kx, [VEC, VEC])  # [COLS, P]
            b_k = _load_kv(k_ptr + o_ky[None, :, :, None, None] + o_knd[:, None, None, :, :],
                           m_k, TIES_ASCENDING)  # [DS, COLS, P, N, DV]
            b_qk = tl.broadcast_to(b_q[:, None, :, :, :], [DS, COLS, P, BLOCK_N, DV])
            if DS == 1:  # the column rel part seeds the chain
                b_s = tl.sum(_dot_chain(b_sc[None, :, :, :], b_qk, to_f32(b_k), DV), axis=0)
            else:
                b_s = tl.sum(_dot_chain(tl.zeros([DS, COLS, P, BLOCK_N], dtype=tl.float32),
                                        b_qk, to_f32(b_k), DV), axis=0) + b_sc  # [COLS, P, N]
            if HAS_RPB:
                o_ry = off_y + a + KH - 1  # [P]
                p_rpb = (rpb_ptr + (o_ry[None, :] * srp_h + o_rx * srp_w)[:, :, None]
                         + (o_n * srp_n)[None, None, :])
                b_rpb = tl.load(p_rpb, mask=m_c[:, :, None] & (o_n < HEADS)[None, None, :],
                                other=0.0)
                b_s += b_rpb.to(tl.float32) * LOG2E
            # the row part is the same for the whole chunk: it goes into the max
            b_srow = tl.zeros([P, BLOCK_N], dtype=tl.float32)
            if HAS_REL:
                if PADDING == 2:
                    o_row = off_y + a + KH - 1
                    p_rh = relh_ptr + (o_row * srh_r)[None, :, None, None] + o_rh_nd[:, None, :, :]
                    m_rh = m_p[None, :, None, None] & m_dh[:, None, :, :]
                else:
                    p_rh = relh_ptr + a * srh_r + o_rh_nd[:, None, :, :]
                    m_rh = m_dh[:, None, :, :]
                b_rh = tl.load(p_rh, mask=m_rh, other=0.0).to(tl.float32)  # [DS, P|1, N, DV]
                b_srow = tl.sum(tl.sum(b_q * b_rh, axis=3), axis=0)
            if PADDING == 1:  # mask: a row outside the image drops out as a whole
                b_srow = tl.where(m_y[:, None], b_srow, float("-inf"))
            b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0) + b_srow)  # [P, N]
            b_alpha = tl.exp2(b_m - b_m_new)
            b_p = tl.exp2(b_s - (b_m_new - b_srow)[None, :, :])  # [COLS, P, N]
            b_l = b_l * b_alpha + tl.sum(b_p, axis=0)
            if KV_SAME_STRIDES:
                o_vy = o_ky
            else:
                o_vy = tl.multiple_of(o_vb + yk.to(tl.int64) * sv_h + o_vx, [VEC, VEC])
            b_v = _load_kv(v_ptr + o_vy[None, :, :, None, None] + o_vnd[:, None, None, :, :],
                           m_k, TIES_ASCENDING)
            # acc * alpha + sum over the chunk's columns of p * v, as one chain per channel
            b_pc = tl.broadcast_to(tl.permute(b_p, (1, 2, 0))[None, :, :, None, :],
                                   [DS, P, BLOCK_N, DV, COLS])
            b_vc = tl.permute(to_f32(b_v), (0, 2, 3, 4, 1))  # [DS, P, N, DV, COLS]
            b_acc = _dot_chain(b_acc * b_alpha[None, :, :, None], b_pc, b_vc, COLS)
            b_m = b_m_new

    b_o = b_acc / b_l[None, :, :, None]
    o_o = tl.multiple_of(b * so_b + y.to(tl.int64) * so_h + x.to(tl.int64) * so_w, VEC)
    o_ond = tl.multiple_of(o_nr * so_n, VEC)[None, :, None] + o_chr * so_d
    tl.store(o_ptr + o_o[None, :, None, None] + o_ond[:, None, :, :],
             b_o.to(o_ptr.dtype.element_ty), mask=m_p[None, :, None, None] & m_nd[:, None, :, :])
    b_lse = (b_m + tl.log2(b_l)) * 0.6931471805599453
    o_l = (b * sl_b + y.to(tl.int64) * sl_h + x.to(tl.int64) * sl_w)[:, None] + o_n[None, :] * sl_n
    tl.store(lse_ptr + o_l, b_lse, mask=m_p[:, None] & (o_n[None, :] < HEADS))


# --- host side --------------------------------------------------------------------------

def column_chunk(kw: int, block_d: int, budget: int = 64) -> int:
    """Columns per chunk: the power of two that minimises a per-window-row cost of 36 per
    loaded column (dot, unpacking, exp) plus 18 per chunk (max, rescale, row part), pad
    columns of the last chunk counted as loaded, with at most `budget` channels of a
    chunk's k row per thread (registers)."""
    widths = [c for c in (1, 2, 4, 8) if c == 1 or c * block_d <= budget]
    return min(widths, key=lambda c: (-(-kw // c) * (36 * c + 18), -c))


def _row(q_shape) -> int:
    B, H, W, heads, d = q_shape
    return next_pow2(heads) * next_pow2(d)


def search_space() -> list[dict]:
    """Tile shapes and launch settings the tuner may try."""
    return [
        dict(BLOCK_H=bh, BLOCK_W=bw, num_warps=nw, num_stages=1)
        for bh in (1, 2, 4, 8, 16)
        for bw in (4, 8, 16)
        for nw in (1, 2, 4, 8)
    ]


def prune(configs, q_shape, args) -> list[dict]:
    """Keeps 1 to 4 (pixel, head) pairs per thread (a thread holds a head's channels) and
    tiles no larger than the image."""
    B, H, W, heads, d = q_shape
    kept = []
    for cfg in configs:
        bh, bw, nw = cfg["BLOCK_H"], cfg["BLOCK_W"], cfg.get("num_warps", 4)
        pairs = bh * bw * next_pow2(heads) / (32 * nw)
        if bh > max(1, next_pow2(H)) or bw > max(4, next_pow2(W)) or not 1 <= pairs <= 4:
            continue
        kept.append(cfg)
    return kept


def default_config(q_shape, args) -> dict:
    """About 256 (pixel, head) pairs per program, one per thread: the tile is BLOCK_W = 8
    columns wide (4 on images narrower than 8, or a multiple of 4 but not of 8 wide) and
    as tall as that leaves, at most the image."""
    B, H, W, heads, d = q_shape
    bw = 4 if W < 8 or (W % 8 and W % 4 == 0) else 8
    bh = max(1, min(256 // (next_pow2(heads) * bw), next_pow2(H)))
    threads = bh * bw * next_pow2(heads)
    return dict(BLOCK_H=bh, BLOCK_W=bw, num_warps=max(1, min(8, threads // 32)),
                num_stages=1)


def supports(q_shape, dtype, args) -> bool:
    B, H, W, heads, d = q_shape
    return (dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= d <= 256
            and _row(q_shape) <= MAX_ROW and args.kw <= MAX_KW)


def forward(q, k, v, args, config=None, _poison=False):
    """(out, lse) of the forward; see kernels/__init__ and SASA's SPEC.md."""
    B, H, W, heads, d = q.shape
    if not supports(tuple(q.shape), q.dtype, args):
        raise ValueError(
            f"tile2d forward does not support q {tuple(q.shape)} {q.dtype} (needs "
            f"next_pow2(heads) * next_pow2(d) <= {MAX_ROW}, kw <= {MAX_KW})"
        )
    config = default_config(tuple(q.shape), args) if config is None else config
    check_config(config, ("BLOCK_H", "BLOCK_W"), "tile2d")
    out, lse = alloc_outputs(q, _poison)
    if out.numel() == 0:
        return out, lse
    bh, bw = config["BLOCK_H"], config["BLOCK_W"]
    tiles_w = triton.cdiv(W, bw)
    tiles = triton.cdiv(H, bh) * tiles_w
    vec = vector_width((q, k, v, out), next_pow2(d))
    dv = min(next_pow2(d), 16 // q.element_size(), vec)  # channels per vector load
    # narrow loads need an address register pair per vector: smaller chunks
    cols = column_chunk(args.kw, next_pow2(d), 64 if dv * q.element_size() == 16 else 16)
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    dummy = q  # never read when the flag is off
    _tile2d_fwd_kernel[(B * tiles,)](
        q, k, v, out, lse,
        dummy if rel_h is None else rel_h, dummy if rel_w is None else rel_w,
        dummy if rpb is None else rpb,
        H, W, heads, d, d // 2, tiles_w, tiles,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *bias_strides(rel_h), *bias_strides(rel_w), *bias_strides(rpb),
        args.dh, args.dw, args.scale * LOG2E.value,
        KH=args.kh, KW=args.kw, PADDING=PADDING_CODES[args.padding],
        HAS_REL=rel_h is not None, HAS_RPB=rpb is not None,
        BLOCK_H=bh, BLOCK_W=bw, BLOCK_N=next_pow2(heads), DS=next_pow2(d) // dv, DV=dv,
        COLS=cols, NCHUNK=triton.cdiv(args.kw, cols),
        ROW_I64=not row_offsets_fit_i32((q, k, v, out), 1, d, heads),
        KV_SAME_STRIDES=k.stride() == v.stride(),
        EVEN_ROW=heads == next_pow2(heads) and d == next_pow2(d),
        VEC=vec,
        COL_STEP=args.dw * k.stride(2) if k.stride() == v.stride() else 0,
        TIES_ASCENDING=_TIES_ASCENDING,
        **launch_options(config),
    )
    return out, lse
