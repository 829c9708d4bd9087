"""Forward kernel family "allheads": one program serves all heads of a block of pixels.

What a program owns: BLOCK_P consecutive pixels of the flattened (B, H, W) grid with
all their heads, held as [BLOCK_P, BLOCK_N, BLOCK_D] tiles (BLOCK_N = next_pow2(heads),
BLOCK_D = next_pow2(d), no padding to 16). It loops over the kh x kw window offsets
(runtime loops, not unrolled) and for each offset loads the neighbour's whole row of
heads x d values, computes the per-head logits with CUDA-core dot products and updates
a per-(pixel, head) online softmax. It saves lse = ln(sum exp(logit)). When heads and d
are powers of two (EVEN_ROW) its masks are per pixel only, and when every pixel and head
offset is a multiple of VEC channels (d contiguous) a thread loads VEC channels of a
head as one vector.

Supported: every padding mode, dilation, any odd kh/kw (kw <= 64), shared/per-head rel
tables, rpb, fp16/bf16/fp32, head dims d = 1..256 while next_pow2(heads) *
next_pow2(d) <= 1024 (e.g. 8 heads x d <= 128); larger rows go to "tiled". Any
strides; 64-bit pixel offsets.

Why it is built this way, and its register counts: docs/PERF.md ("Kernel notes").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    PADDING_CODES,
    alloc_outputs,
    check_config,
    launch_options,
    next_pow2,
    pointer_vector_width,
    stride_vector_width,
    strides_fit_i32,
    table_strides,
    to_f32,
    window_start,
)
from .launch_cache import args_key, config_key, contiguous_strides, plan_cache

MAX_ROW = 1024  # next_pow2(heads) * next_pow2(d) held per pixel
MAX_KW = 64


@triton.jit
def _allheads_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
    NPIX, H, W, HEADS, D, D_HALF,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    dil_h, dil_w, qk_scale,  # qk_scale = scale * log2(e)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_KW: tl.constexpr, ROW_I64: tl.constexpr, KV_SAME_STRIDES: tl.constexpr,
    EVEN_ROW: tl.constexpr, VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    o_p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat pixel index
    m_p = o_p < NPIX
    x = (o_p % W).to(tl.int32)
    t = o_p // W
    y = (t % H).to(tl.int32)
    b = t // H  # int64

    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    if EVEN_ROW:  # heads == BLOCK_N and d == BLOCK_D: masks stay per pixel
        m_nd = tl.full([BLOCK_N, BLOCK_D], 1, dtype=tl.int1)
    else:
        m_nd = (o_n[:, None] < HEADS) & (o_d[None, :] < D)  # [BLOCK_N, BLOCK_D]
    m_pnd = m_p[:, None, None] & m_nd[None, :, :]
    # Offsets inside one pixel's row of heads x d stay int32 (fewer registers) unless the
    # launcher found that they can pass 2**31 (ROW_I64: NCHW views of giant images);
    # per-pixel offsets are always int64.
    if ROW_I64:
        o_nr = o_n.to(tl.int64)
        o_dr = o_d.to(tl.int64)
    else:
        o_nr = o_n
        o_dr = o_d
    # VEC > 1: the launcher found d contiguous (stride 1, specialised away) and every
    # pixel and head offset (and each base address) a multiple of VEC elements, so a
    # thread loads VEC channels of a head with one vector load
    o_qnd = tl.multiple_of(o_nr * sq_n, VEC)[:, None] + o_dr[None, :] * sq_d
    o_knd = tl.multiple_of(o_nr * sk_n, VEC)[:, None] + o_dr[None, :] * sk_d
    if KV_SAME_STRIDES:  # one offset tile for k and v
        o_vnd = o_knd
    else:
        o_vnd = tl.multiple_of(o_nr * sv_n, VEC)[:, None] + o_dr[None, :] * sv_d

    o_qp = tl.multiple_of(b * sq_b + y.to(tl.int64) * sq_h + x.to(tl.int64) * sq_w, VEC)
    p_q = q_ptr + o_qp[:, None, None]
    b_q = tl.load(p_q + o_qnd[None, :, :], mask=m_pnd, other=0.0).to(tl.float32)  # [P, N, D]
    start_y, off_y = window_start(y, H, KH, dil_h, PADDING == 2)  # [BLOCK_P]
    start_x, off_x = window_start(x, W, KW, dil_w, PADDING == 2)
    o_kb = b * sk_b  # [BLOCK_P] int64
    o_vb = b * sv_b

    if HAS_REL:
        m_dh = (o_n[:, None] < HEADS) & (o_d[None, :] < D_HALF)
        m_dw = m_nd & (o_d[None, :] >= D_HALF)
        o_rh_nd = o_n[:, None] * srh_n + o_d[None, :] * srh_d
        o_rw_nd = o_n[:, None] * srw_n + (o_d[None, :] - D_HALF) * srw_d
        # the kw column parts q[d/2:] . rel_w[col], once per (pixel, head)
        o_c = tl.arange(0, BLOCK_KW)
        b_relw = tl.zeros([BLOCK_P, BLOCK_N, BLOCK_KW], dtype=tl.float32)
        for c in range(KW):
            if PADDING == 2:  # shift
                o_col = off_x + c + KW - 1  # [BLOCK_P]
                p_rw = relw_ptr + (o_col * srw_r)[:, None, None] + o_rw_nd[None, :, :]
                b_rw = tl.load(p_rw, mask=m_p[:, None, None] & m_dw[None, :, :], other=0.0)
                b_sc = tl.sum(b_q * b_rw.to(tl.float32), axis=2)  # [P, N]
            else:
                b_rw = tl.load(relw_ptr + c * srw_r + o_rw_nd, mask=m_dw, other=0.0)  # [N, D]
                b_sc = tl.sum(b_q * b_rw.to(tl.float32)[None, :, :], axis=2)
            b_relw = tl.where(o_c[None, None, :] == c, (b_sc * qk_scale)[:, :, None], b_relw)

    b_m = tl.full([BLOCK_P, BLOCK_N], -1.0e30, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_P, BLOCK_N, BLOCK_D], dtype=tl.float32)
    for a in range(KH):
        yk = start_y + a * dil_h  # [BLOCK_P]
        m_y = (yk >= 0) & (yk < H) & m_p
        o_ky = yk.to(tl.int64)
        # the row part q[:d/2] . rel_h[row], once per window row
        b_srow = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        if HAS_REL:
            if PADDING == 2:  # shift
                o_row = off_y + a + KH - 1
                p_rh = relh_ptr + (o_row * srh_r)[:, None, None] + o_rh_nd[None, :, :]
                b_rh = tl.load(p_rh, mask=m_p[:, None, None] & m_dh[None, :, :], other=0.0)
                b_srow = tl.sum(b_q * b_rh.to(tl.float32), axis=2) * qk_scale
            else:
                b_rh = tl.load(relh_ptr + a * srh_r + o_rh_nd, mask=m_dh, other=0.0)  # [N, D]
                b_srow = tl.sum(b_q * b_rh.to(tl.float32)[None, :, :], axis=2) * qk_scale
        if HAS_RPB:
            o_rpb_y = (off_y + a + KH - 1) * srp_h  # [BLOCK_P]
        for c in range(KW):
            xk = start_x + c * dil_w
            m_k = m_y & (xk >= 0) & (xk < W)  # [BLOCK_P]
            o_pix = tl.multiple_of(o_kb + o_ky * sk_h + xk.to(tl.int64) * sk_w, VEC)
            m_knd = m_k[:, None, None] & m_nd[None, :, :]
            b_k = to_f32(tl.load(k_ptr + o_pix[:, None, None] + o_knd[None, :, :], mask=m_knd,
                                 other=0.0))  # [P, N, D]
            b_s = tl.sum(b_q * b_k, axis=2) * qk_scale + b_srow  # [P, N]
            if HAS_REL:
                b_s += tl.sum(tl.where(o_c[None, None, :] == c, b_relw, 0.0), axis=2)
            if HAS_RPB:
                o_rpb = o_rpb_y + (off_x + c + KW - 1) * srp_w  # [BLOCK_P]
                p_rpb = rpb_ptr + o_rpb[:, None] + o_n[None, :] * srp_n
                b_rpb = tl.load(p_rpb, mask=m_p[:, None] & (o_n[None, :] < HEADS), other=0.0)
                b_s += b_rpb.to(tl.float32) * LOG2E
            if PADDING == 1:  # mask
                b_s = tl.where(m_k[:, None], b_s, float("-inf"))
            b_m_new = tl.maximum(b_m, b_s)
            b_alpha = tl.exp2(b_m - b_m_new)
            b_p = tl.exp2(b_s - b_m_new)
            b_l = b_l * b_alpha + b_p
            if KV_SAME_STRIDES:
                o_vpix = o_pix
            else:
                o_vpix = tl.multiple_of(o_vb + o_ky * sv_h + xk.to(tl.int64) * sv_w, VEC)
            b_v = to_f32(tl.load(v_ptr + o_vpix[:, None, None] + o_vnd[None, :, :], mask=m_knd,
                                 other=0.0))
            b_acc = b_acc * b_alpha[:, :, None] + b_p[:, :, None] * b_v
            b_m = b_m_new

    b_o = b_acc / b_l[:, :, None]
    o_o = tl.multiple_of(b * so_b + y.to(tl.int64) * so_h + x.to(tl.int64) * so_w, VEC)
    o_ond = tl.multiple_of(o_nr * so_n, VEC)[:, None] + o_dr[None, :] * so_d
    o_o = o_o[:, None, None]
    tl.store(o_ptr + o_o + o_ond[None, :, :], b_o.to(o_ptr.dtype.element_ty), mask=m_pnd)
    b_lse = (b_m + tl.log2(b_l)) * 0.6931471805599453
    o_l = (b * sl_b + y.to(tl.int64) * sl_h + x.to(tl.int64) * sl_w)[:, None] + o_n[None, :] * sl_n
    tl.store(lse_ptr + o_l, b_lse, mask=m_p[:, None] & (o_n[None, :] < HEADS))


# --- host side --------------------------------------------------------------------------

def search_space() -> list[dict]:
    """Pixel-block sizes and launch settings the tuner may try."""
    return [
        dict(BLOCK_P=bp, num_warps=nw, num_stages=ns)
        for bp in (4, 8, 16, 32, 64, 128)
        for nw in (1, 2, 4, 8)
        for ns in (1, 2)
    ]


def _row(q_shape) -> int:
    B, H, W, heads, d = q_shape
    return next_pow2(heads) * next_pow2(d)


def prune(configs, q_shape, args) -> list[dict]:
    """Keeps blocks of 4 to 64 fp32 values per thread for q + acc, and no block
    larger than the whole pixel grid."""
    B, H, W, heads, d = q_shape
    npix = max(1, B * H * W)
    kept = []
    for cfg in configs:
        bp, nw = cfg["BLOCK_P"], cfg.get("num_warps", 4)
        per_thread = bp * _row(q_shape) / (32 * nw)
        if bp > max(4, next_pow2(npix)) or not 4 <= per_thread <= 64:
            continue
        kept.append(cfg)
    return kept


def default_config(q_shape, args) -> dict:
    """About 2048 (pixel, head, channel) values per program, 8 per thread: q, acc, the
    kw column parts and the loaded neighbour rows stay in registers, with room for
    several programs per SM."""
    row = _row(q_shape)
    bp = max(4, min(128, 2048 // row))
    num_warps = max(1, min(8, bp * row // (32 * 8)))
    return dict(BLOCK_P=bp, num_warps=num_warps, num_stages=1)


def supports(q_shape, dtype, args) -> bool:
    B, H, W, heads, d = q_shape
    return (dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= d <= 256
            and _row(q_shape) <= MAX_ROW and args.kw <= MAX_KW)


def _plan(q_shape, dtype, strides, args, config) -> tuple:
    """Everything a launch of this call key needs besides the tensors: (grid, scalar
    arguments, strides of out and lse, trailing scalars, constexpr and launch keywords,
    the vector width the strides allow). Raises for an unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    if not supports(q_shape, dtype, args):
        raise ValueError(
            f"allheads forward does not support q {q_shape} {dtype} (needs "
            f"next_pow2(heads) * next_pow2(d) <= {MAX_ROW}, kw <= {MAX_KW})"
        )
    config = default_config(q_shape, args) if config is None else config
    check_config(config, ("BLOCK_P",), "allheads")
    bp = config["BLOCK_P"]
    npix = B * H * W
    out_strides = contiguous_strides(q_shape)
    row_strides = (*strides, out_strides)  # q, k, v, out
    flags = dict(
        KH=args.kh, KW=args.kw, PADDING=PADDING_CODES[args.padding],
        HAS_REL=args.rel_h is not None, HAS_RPB=args.rpb is not None,
        BLOCK_P=bp, BLOCK_N=next_pow2(heads), BLOCK_D=next_pow2(d),
        BLOCK_KW=next_pow2(args.kw),
        ROW_I64=not strides_fit_i32(row_strides, 1, d, heads),
        KV_SAME_STRIDES=strides[1] == strides[2],
        EVEN_ROW=heads == next_pow2(heads) and d == next_pow2(d),
        **launch_options(config),
    )
    vec = stride_vector_width([(d, s) for s in row_strides], next_pow2(d))
    return ((triton.cdiv(npix, bp),), (npix, H, W, heads, d, d // 2),
            out_strides + contiguous_strides(q_shape[:4]),
            (args.dh, args.dw, args.scale * LOG2E.value), flags, vec)


_plans = plan_cache(_plan)


def forward(q, k, v, args, config=None, _poison=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the forward; see kernels/__init__ and SASA's SPEC.md."""
    shape, strides = q.shape, (q.stride(), k.stride(), v.stride())
    grid, scalars, out_strides, tail, flags, vec = _plans(
        (shape, q.dtype, strides, args_key(args), config_key(config)),
        tuple(shape), q.dtype, strides, args, config)
    out, lse = alloc_outputs(q, _poison)
    if out.numel() == 0:
        return out, lse
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    dummy = q  # never read when the flag is off
    _allheads_fwd_kernel[grid](
        q, k, v, out, lse,
        dummy if rel_h is None else rel_h, dummy if rel_w is None else rel_w,
        dummy if rpb is None else rpb,
        *scalars, *strides[0], *strides[1], *strides[2], *out_strides,
        *table_strides(rel_h, rel_w, rpb), *tail, **flags, VEC=pointer_vector_width((q, k, v, out), vec),
    )
    return out, lse
