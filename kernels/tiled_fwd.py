"""Forward kernel family "tiled": tensor-core halo tiles, one (batch, head) per program.

What a program owns: BLOCK_H image rows x BLOCK_W adjacent query pixels of one row
segment, of one batch b and one head n. The rows are processed one after the other; for
each query row the program walks the k/v halo in sub-tiles, one per window row a
(kh of them): sub-tile a is the image row `start_y + a*dh`, columns [x0, x0 + BLOCK_K)
where BLOCK_K = next_pow2(halo width), halo width = BLOCK_W + (kw-1)*dw (zeros/mask) or
the widest shifted-window union (shift). Per sub-tile:
    S = Q K^T                        tl.dot, [BLOCK_W, D] @ [D, BLOCK_K]
    S = S*scale*log2(e) + column bias + row bias (+ rpb),  masked to each query's window
    online softmax in base 2 (m, l), acc += P V       tl.dot, [BLOCK_W, BLOCK_K] @ [BLOCK_K, D]
and it saves lse = ln(sum exp(logit)) per query.

Supported: every padding mode, dilation, odd kh/kw with BLOCK_K <= 256 (e.g. k <= 13
at dilation <= 16), shared/per-head rel tables, rpb, fp16/bf16/fp32 (fp32 dots use
input_precision="ieee"), head dims d = 1..256, padded inside the kernel to
BLOCK_D = max(16, next_pow2(d)) with masks. Any strides; 64-bit base offsets.

Why it is built this way, and its register counts: docs/PERF.md ("Kernel notes").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRETED,
    LOG2E,
    PADDING_CODES,
    alloc_outputs,
    check_config,
    halo_span,
    head_block,
    launch_options,
    next_pow2,
    strides_fit_i32,
    table_strides,
    unravel_program,
    window_start,
)
from .fast_launch import launch_kernel
from .launch_cache import args_key, config_key, contiguous_strides, plan_cache

MAX_BLOCK_K = 256


@triton.jit
def _subtile_logits(a, b_q, b_qf, b_bias, m_win, m_kv_x, p_k0, o_kx, sk_h, start_y, off_y, H,
                    p_relh, srh_r, srh_d, p_rpb, srp_h, o_rpb_x, o_d, m_dh, dil_h, qk_scale,
                    KH: tl.constexpr, SHIFT: tl.constexpr, HAS_REL: tl.constexpr,
                    HAS_RPB: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """Base-2 logits [BLOCK_W, BLOCK_K] of one query row against k/v sub-tile a (image
    row start_y + a*dil_h), -inf outside each query's window; also that row's int64
    index and the k/v load mask."""
    y = start_y + a * dil_h
    y64 = y.to(tl.int64)
    # row check as a vector: the interpreter mishandles block & scalar masks
    o_y = y + tl.zeros([BLOCK_K], dtype=tl.int32)
    m_kv = m_kv_x & ((o_y >= 0) & (o_y < H))[:, None]
    b_k = tl.load(p_k0 + y64 * sk_h + o_kx, mask=m_kv, other=0.0)  # [BLOCK_K, BLOCK_D]
    if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
        b_k = b_k.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [BW, D] @ [D, BK] -> [BW, BK]
    b_s = b_s * qk_scale + b_bias
    if HAS_REL:  # row part: q[:d/2] . rel_h[row], one dot product per query
        if SHIFT:
            row = off_y + a + KH - 1
        else:
            row = a
        b_rh = tl.load(p_relh + row * srh_r + o_d * srh_d, mask=m_dh, other=0.0)  # [BLOCK_D]
        b_sr = tl.sum(b_qf * b_rh.to(tl.float32)[None, :], axis=1)  # [BLOCK_W]
        b_s += b_sr[:, None] * qk_scale
    if HAS_RPB:
        b_rpb = tl.load(p_rpb + (off_y + a + KH - 1) * srp_h + o_rpb_x, mask=m_win, other=0.0)
        b_s += b_rpb.to(tl.float32) * LOG2E
    return tl.where(m_win, b_s, float("-inf")), y64, m_kv


@triton.jit
def _tiled_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
    H, W, HEADS, D, D_HALF,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    dil_h, dil_w, qk_scale,  # qk_scale = scale * log2(e)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
    ROW_I64: tl.constexpr, KV_SAME_STRIDES: tl.constexpr, EVEN_D: tl.constexpr,
):
    # head fastest: the heads of one row segment run side by side (full cache sectors)
    n, jb, ib, b = unravel_program(tl.program_id(0), HEADS, tl.cdiv(W, BLOCK_W),
                                   tl.cdiv(H, BLOCK_H))

    o_j = jb * BLOCK_W + tl.arange(0, BLOCK_W)  # query columns
    m_j = o_j < W
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    # Offsets inside one (b, head, row) slice stay int32 (fewer registers) unless the
    # launcher found that they can pass 2**31 (ROW_I64); bases are always int64.
    if ROW_I64:
        o_dr = o_d.to(tl.int64)
    else:
        o_dr = o_d
    start_x, off_x = window_start(o_j, W, KW, dil_w, PADDING == 2)  # [BLOCK_W]
    if PADDING == 2:  # shift
        x0 = tl.min(tl.where(m_j, start_x, W), axis=0)
    else:
        x0 = jb * BLOCK_W - (KW // 2) * dil_w
    o_x = x0 + tl.arange(0, BLOCK_K)  # halo columns
    m_x = (o_x >= 0) & (o_x < W)

    # Column pattern, shared by every row and every window row of this program.
    o_diff = o_x[None, :] - start_x[:, None]  # [BLOCK_W, BLOCK_K]
    o_diffc = tl.maximum(o_diff, 0)
    o_tap = o_diffc // dil_w  # tap index c of halo column x for query j
    m_win = (o_diff >= 0) & (o_diffc - o_tap * dil_w == 0) & (o_tap < KW)
    if PADDING == 1:  # mask
        m_win = m_win & m_x[None, :]
    m_win = m_win & m_j[:, None]

    b64 = b.to(tl.int64)
    n64 = n.to(tl.int64)
    p_q0 = q_ptr + b64 * sq_b + n64 * sq_n
    p_k0 = k_ptr + b64 * sk_b + n64 * sk_n
    p_v0 = v_ptr + b64 * sv_b + n64 * sv_n
    p_o0 = o_ptr + b64 * so_b + n64 * so_n
    p_l0 = lse_ptr + b64 * sl_b + n64 * sl_n
    if ROW_I64:
        o_xr = o_x.to(tl.int64)
        o_jr = o_j.to(tl.int64)
    else:
        o_xr = o_x
        o_jr = o_j
    o_kx = o_xr[:, None] * sk_w + o_dr[None, :] * sk_d  # [BLOCK_K, BLOCK_D]
    if KV_SAME_STRIDES:  # one offset tile for k and v: fewer live registers
        o_vx = o_kx
    else:
        o_vx = o_xr[:, None] * sv_w + o_dr[None, :] * sv_d
    if EVEN_D:  # no channel mask: masks stay per pixel (fewer predicate registers)
        m_kv_x = m_x[:, None]
    else:
        m_kv_x = m_x[:, None] & m_d[None, :]
    o_rpb_x = o_tap  # rpb column offsets (unused without rpb)
    if HAS_RPB:
        o_rpb_x = (off_x[:, None] + o_tap + KW - 1) * srp_w  # [BLOCK_W, BLOCK_K]
    m_dh = o_d < D_HALF  # rel_h channels
    m_dw = (o_d >= D_HALF) & m_d  # rel_w channels

    for r in range(0, BLOCK_H):
        i = ib * BLOCK_H + r
        if i < H:
            i64 = i.to(tl.int64)
            p_q = p_q0 + i64 * sq_h + (o_jr[:, None] * sq_w + o_dr[None, :] * sq_d)
            b_q = tl.load(p_q, mask=m_j[:, None] & m_d[None, :], other=0.0)  # [BLOCK_W, BLOCK_D]
            if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
                b_q = b_q.to(tl.float32)
            start_y, off_y = window_start(i, H, KH, dil_h, PADDING == 2)

            # column bias in log2 units: q[d/2:] . rel_w[col] for each of the kw taps
            b_bias = tl.zeros([BLOCK_W, BLOCK_K], dtype=tl.float32)
            b_qf = b_q  # fp32 copy for the rel dot products (unused without rel)
            if HAS_REL:
                b_qf = b_q.to(tl.float32)
                for c in range(KW):
                    if PADDING == 2:  # shift
                        o_col = off_x + c + KW - 1  # [BLOCK_W]
                        p_rw = (relw_ptr + n * srw_n + o_col[:, None] * srw_r
                                + (o_d[None, :] - D_HALF) * srw_d)
                        b_rw = tl.load(p_rw, mask=m_j[:, None] & m_dw[None, :], other=0.0)
                        b_sc = tl.sum(b_qf * b_rw.to(tl.float32), axis=1)  # [BLOCK_W]
                    else:
                        p_rw = relw_ptr + n * srw_n + c * srw_r + (o_d - D_HALF) * srw_d
                        b_rw = tl.load(p_rw, mask=m_dw, other=0.0)  # [BLOCK_D]
                        b_sc = tl.sum(b_qf * b_rw.to(tl.float32)[None, :], axis=1)
                    b_bias = tl.where(o_tap == c, b_sc[:, None] * qk_scale, b_bias)

            # window rows to walk: in mask mode only those inside the image
            if PADDING == 1:  # mask
                a_lo = tl.maximum((dil_h - 1 - start_y) // dil_h, 0)
                a_hi = tl.minimum((H - 1 - start_y) // dil_h + 1, KH)
            else:
                a_lo = 0
                a_hi = KH
            b_m = tl.full([BLOCK_W], -1.0e30, dtype=tl.float32)
            b_l = tl.zeros([BLOCK_W], dtype=tl.float32)
            b_acc = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
            for a in range(a_lo, a_hi):
                b_s, y64, m_kv = _subtile_logits(
                    a, b_q, b_qf, b_bias, m_win, m_kv_x, p_k0, o_kx, sk_h, start_y, off_y, H,
                    relh_ptr + n * srh_n, srh_r, srh_d, rpb_ptr + n * srp_n, srp_h, o_rpb_x,
                    o_d, m_dh, dil_h, qk_scale, KH, PADDING == 2, HAS_REL, HAS_RPB, BLOCK_K,
                    DOT_F32)
                b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
                b_alpha = tl.exp2(b_m - b_m_new)
                b_p = tl.exp2(b_s - b_m_new[:, None])  # [BLOCK_W, BLOCK_K]
                b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
                b_v = tl.load(p_v0 + y64 * sv_h + o_vx, mask=m_kv, other=0.0)  # [BLOCK_K, BLOCK_D]
                b_pl = b_p.to(v_ptr.dtype.element_ty)
                if DOT_F32:
                    b_pl = b_pl.to(tl.float32)
                    b_v = b_v.to(tl.float32)
                b_pv = tl.dot(b_pl, b_v, input_precision="ieee")  # [BW, BK] @ [BK, D] -> [BW, D]
                b_acc = b_acc * b_alpha[:, None] + b_pv
                b_m = b_m_new
            b_o = b_acc / b_l[:, None]

            # Rare slow pass: a non-finite value reached acc. It may be a NaN/inf v outside
            # some query's window that 0 * NaN in P V spread over the tile; recompute P V
            # with non-finite v zeroed (m and l are final, so no rescaling) and set the
            # (query, channel) outputs whose window holds one to NaN.
            m_fin = tl.abs(b_acc) < float("inf")
            if tl.max(tl.max(tl.where(m_fin, 0, 1), axis=1), axis=0) > 0:
                b_acc = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
                b_bad = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
                for a in range(a_lo, a_hi):
                    b_s, y64, m_kv = _subtile_logits(
                        a, b_q, b_qf, b_bias, m_win, m_kv_x, p_k0, o_kx, sk_h, start_y, off_y,
                        H, relh_ptr + n * srh_n, srh_r, srh_d, rpb_ptr + n * srp_n, srp_h,
                        o_rpb_x, o_d, m_dh, dil_h, qk_scale, KH, PADDING == 2, HAS_REL,
                        HAS_RPB, BLOCK_K, DOT_F32)
                    b_p = tl.exp2(b_s - b_m[:, None])
                    b_v = tl.load(p_v0 + y64 * sv_h + o_vx, mask=m_kv, other=0.0)
                    m_vok = tl.abs(b_v.to(tl.float32)) < float("inf")
                    b_v = tl.where(m_vok, b_v, tl.zeros_like(b_v))
                    # 0/1 indicators in fp16: exact counts from a tensor-core dot
                    b_win = tl.where(m_win, 1.0, 0.0).to(tl.float16)
                    b_vnan = tl.where(m_vok, 0.0, 1.0).to(tl.float16)
                    b_bad += tl.dot(b_win, b_vnan)  # [BW, BK] @ [BK, D] -> [BW, D]
                    b_pl = b_p.to(v_ptr.dtype.element_ty)
                    if DOT_F32:
                        b_pl = b_pl.to(tl.float32)
                        b_v = b_v.to(tl.float32)
                    b_acc += tl.dot(b_pl, b_v, input_precision="ieee")  # [BW, BK] @ [BK, D]
                b_o = tl.where(b_bad > 0, float("nan"), b_acc / b_l[:, None])
            p_o = p_o0 + i64 * so_h + (o_jr[:, None] * so_w + o_dr[None, :] * so_d)
            tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_j[:, None] & m_d[None, :])
            b_lse = (b_m + tl.log2(b_l)) * 0.6931471805599453
            tl.store(p_l0 + i64 * sl_h + o_jr * sl_w, b_lse, mask=m_j)


# --- host side --------------------------------------------------------------------------

def search_space() -> list[dict]:
    """Tile shapes and launch settings the tuner may try."""
    return [
        dict(BLOCK_W=bw, BLOCK_H=bh, num_warps=nw, num_stages=ns)
        for bw in (16, 32, 64)
        for bh in (1, 2, 4)
        for nw in (1, 2, 4, 8)
        for ns in (1, 2, 3)
    ]


def _block_k(q_shape, args, block_w: int) -> int:
    W = q_shape[2]
    return max(16, next_pow2(halo_span(W, args.kw, args.dw, args.padding, block_w)))


def _per_thread(bw: int, bh: int, bk: int, bd: int, num_warps: int) -> float:
    """Estimated live tile values per thread: S/P [BW, BK], q/acc [BW, D], k/v [BK, D];
    a second row per program costs a quarter more (the shared column pattern stays
    live across rows). Fitted to ptxas for sm_90: below 64 no config spilled
    (docs/PERF.md)."""
    return (bw * bk + (bw + bk) * bd) * (1.6 if bh > 1 else 1.0) / (32 * num_warps)


def prune(configs, q_shape, args) -> list[dict]:
    """Drops tiles much wider than the image, row blocks taller than it, halos over
    MAX_BLOCK_K columns, and tiles that would spill registers (or leave threads idle)."""
    B, H, W, heads, d = q_shape
    bd = head_block(d)
    kept = []
    for cfg in configs:
        bw, bh, nw = cfg["BLOCK_W"], cfg["BLOCK_H"], cfg.get("num_warps", 4)
        if bw > max(16, next_pow2(W)) or bh > max(1, H):
            continue
        bk = _block_k(q_shape, args, bw)
        if bk > MAX_BLOCK_K or not 4 <= _per_thread(bw, bh, bk, bd, nw) < 64:
            continue
        if bd <= 16 and nw > bw // 16:  # Triton stacks the warps along M: replicated work
            continue
        kept.append(cfg)
    return kept


def default_config(q_shape, args) -> dict:
    """16-wide row segments, one row per program, 1 warp for d <= 16 (more warps would
    replicate the 16-row MMA tile), 4 up to d = 128 (warps split the head dim), 8 above,
    more while the tile would spill (docs/PERF.md). Tuned tables override this."""
    B, H, W, heads, d = q_shape
    bd = head_block(d)
    bk = _block_k(q_shape, args, 16)
    num_warps = 1 if bd <= 16 else 4 if bd <= 128 else 8
    while num_warps < 8 and _per_thread(16, 1, bk, bd, num_warps) >= 64:
        num_warps *= 2
    return dict(BLOCK_W=16, BLOCK_H=1, num_warps=num_warps, num_stages=2)


def supports(q_shape, dtype, args) -> bool:
    B, H, W, heads, d = q_shape
    return (dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= d <= 256
            and _block_k(q_shape, args, 16) <= MAX_BLOCK_K)


def _plan(q_shape, dtype, strides, args, config) -> tuple:
    """Everything a launch of this call key needs besides the tensors: (grid, scalar
    arguments, strides of out and lse, constexpr and launch keywords). Raises for an
    unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    if not supports(q_shape, dtype, args):
        raise ValueError(
            f"tiled forward does not support q {q_shape} {dtype} with kernel "
            f"({args.kh}, {args.kw}), dilation ({args.dh}, {args.dw}), padding {args.padding!r}"
        )
    config = default_config(q_shape, args) if config is None else config
    check_config(config, ("BLOCK_W", "BLOCK_H"), "tiled")
    bw, bh = config["BLOCK_W"], config["BLOCK_H"]
    bk = _block_k(q_shape, args, bw)
    grid = (B * triton.cdiv(H, bh) * triton.cdiv(W, bw) * heads,)
    out_strides = contiguous_strides(q_shape)
    scalars = (H, W, heads, d, d // 2)
    tail = (args.dh, args.dw, args.scale * LOG2E.value)
    row_strides = (*strides, out_strides)  # q, k, v, out
    flags = dict(
        KH=args.kh, KW=args.kw, PADDING=PADDING_CODES[args.padding],
        HAS_REL=args.rel_h is not None, HAS_RPB=args.rpb is not None,
        BLOCK_H=bh, BLOCK_W=bw, BLOCK_K=bk, BLOCK_D=head_block(d),
        DOT_F32=INTERPRETED and dtype == torch.bfloat16,
        ROW_I64=not strides_fit_i32(row_strides, W + bk, d),
        KV_SAME_STRIDES=strides[1] == strides[2], EVEN_D=d == head_block(d),
        **launch_options(config),
    )
    return grid, scalars, out_strides + contiguous_strides(q_shape[:4]), tail, flags


_plans = plan_cache(_plan)


def forward(q, k, v, args, config=None, _poison=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the forward; see kernels/__init__ and SASA's SPEC.md."""
    shape, strides = q.shape, (q.stride(), k.stride(), v.stride())
    grid, scalars, out_strides, tail, flags = _plans(
        (shape, q.dtype, strides, args_key(args), config_key(config)),
        tuple(shape), q.dtype, strides, args, config)
    out, lse = alloc_outputs(q, _poison)
    if out.numel() == 0:
        return out, lse
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    dummy = q  # never read when the flag is off
    launch_kernel(_tiled_fwd_kernel, grid,
        q, k, v, out, lse,
        dummy if rel_h is None else rel_h, dummy if rel_w is None else rel_w,
        dummy if rpb is None else rpb,
        *scalars, *strides[0], *strides[1], *strides[2], *out_strides,
        *table_strides(rel_h, rel_w, rpb), *tail, **flags,
    )
    return out, lse
