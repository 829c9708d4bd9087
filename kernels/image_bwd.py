"""Backward "imagebwd": one whole-image tile per (batch, head), for small maps.

The backward of kernels/image_fwd.py (it reads the lse every forward saves; same range
of `supports`). A program owns batch b, head n and the whole padded image grid (pixel
p = y * BLOCK_X + x is query p and key p), so dq, dk and dv all come out of one program,
on tensor cores:
    S recomputed as in the forward, P = exp2(S - lse log2(e))
    delta = rowsum(dO * O)                  fused
    dV = P^T dO,  dP = dO V^T,  dS = P (dP - delta)
    dQ = scale (dS K + G_row rel_h + G_col rel_w),  dK = scale dS^T Q
G_row [N, E]: per query and rel row the sum of dS over that row's window taps.
Without rpb: dS summed per key row / key column by one-hot dots (bf16 hi/lo pairs), then
gathered per rel row ([N, E] from [N, YP]); zeros mode adds the zero keys'
dS = -delta 2^(Ra + Rc - lse2), separable like the forward's mass. With rpb: dS gathered
per tap slot ([N, T]), its column sums the rpb partial, one-hot dots its row / column
sums. Per-program partials scale G_row^T Q, scale G_col^T Q (and rpb's) go to a buffer
that rows_bwd_query's `_reduce_tables_kernel` sums in a fixed order (the second launch;
none without tables), after the slow pass below. No atomics: gradients are bit-identical run to run.

Non-finite inputs: the dots may spread a NaN / inf outside the windows that hold it
(0 * inf). Each program sums its results (a few reductions); when the sum is not finite
it recomputes its image's gradients exactly (kernels/image_bwd_exact.py, in a loop of 0
trips on finite inputs, after a barrier), overwriting what it stored, before the table
reduction's launch. Two launches with tables, one without.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from sasa_triton.types import AttendArgs

from . import image_fwd, rows_bwd_query
from .common import (
    INTERPRETED,
    LOG2E,
    PADDING_CODES,
    launch_options,
    new_output,
    new_output_like,
    new_table_grads,
    next_pow2,
    split_partials,
    table_strides,
)
from .fast_launch import launch_kernel
from .image_bwd_exact import exact_gradients
from .image_fwd import (
    contiguous_image_strides,
    dot_exact,
    fast_logits,
    grid_shape,
    image_base,
    image_logits,
    image_pixels,
    load_image,
    load_qkv,
    offsets_fit_i32,
    rel_in_f32,
    store_image,
    tap_geometry,
    tap_shape,
    window_start,
    zero_taps,
)
from .image_fwd import supports as forward_supports
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


@triton.jit
def _rel_sums(b_sy, y, H, dil_h, KH: tl.constexpr, SHIFT: tl.constexpr, E_PAD: tl.constexpr,
              YP: tl.constexpr):
    """Per query and rel row e [N, E]: the dS sum of the key row that row e stands for in
    the query's window (b_sy [N, YP]: dS summed per key row), 0 where none (outside the
    window or the image)."""
    sy, offy = window_start(y, H, KH, dil_h, SHIFT)
    o_e = tl.arange(0, E_PAD)
    if SHIFT:
        a = o_e[None, :] - (offy + KH - 1)[:, None]
    else:
        a = o_e[None, :] + 0 * y[:, None]
    yk = sy[:, None] + a * dil_h
    m = (a >= 0) & (a < KH) & (yk >= 0) & (yk < H)
    b_g = tl.gather(b_sy, tl.minimum(tl.maximum(yk, 0), YP - 1), axis=1)
    return tl.where(m, b_g, 0.0)


@triton.jit
def _store_rel_partials(parth_ptr, partw_ptr, b_grow, b_gcol, b_q, pid, n_slots, D, D_HALF,
                        scale, KH: tl.constexpr, KW: tl.constexpr, SHIFT: tl.constexpr,
                        E_PAD: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr):
    """This program's slot of the rel partials: scale G_row^T Q (first d/2 channels) and
    scale G_col^T Q (the rest), [row, slot, channel] buffers."""
    if SHIFT:
        TH: tl.constexpr = 2 * KH - 1
        TW: tl.constexpr = 2 * KW - 1
    else:
        TH: tl.constexpr = KH
        TW: tl.constexpr = KW
    o_e = tl.arange(0, E_PAD)
    o_d = tl.arange(0, BLOCK_D)
    b_ph = dot_exact(tl.trans(b_grow), b_q, INTERP) * scale  # [E, D]
    tl.store(parth_ptr + (o_e[:, None] * n_slots + pid) * D_HALF + o_d[None, :], b_ph,
             mask=(o_e < TH)[:, None] & (o_d < D_HALF)[None, :])
    b_pw = dot_exact(tl.trans(b_gcol), b_q, INTERP) * scale
    D_W = D - D_HALF
    tl.store(partw_ptr + (o_e[:, None] * n_slots + pid) * D_W + (o_d - D_HALF)[None, :], b_pw,
             mask=(o_e < TW)[:, None] & ((o_d >= D_HALF) & (o_d < D))[None, :])


@triton.jit
def _image_bwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,  # absent: None
    dq_ptr, dk_ptr, dv_ptr, parth_ptr, partw_ptr, partb_ptr,  # absent tables' parts: None
    # tuples: Triton binds ints in a tuple in half the host time of as many arguments
    sizes,  # (H, W, HEADS, D, D_HALF, n_slots)
    sq, sk, sv, so, sdo,  # (batch, row, column, head, channel) strides; sv None if
    sl,  # KV_SAME_STRIDES; lse's (batch, row, column, head)
    s_tab,  # (head, row, channel) strides of rel_h and rel_w, (head, row, column) of rpb
    dil,  # (dil_h, dil_w)
    qk_scale, scale,  # qk_scale = scale * log2(e)
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, REL_F32: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    E_PAD: tl.constexpr, TAP_X: tl.constexpr, TAP_N: tl.constexpr,
    YP: tl.constexpr, XP: tl.constexpr,
    EVEN_D: tl.constexpr, OFF_I64: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr,
    ZT_N: tl.constexpr, DC: tl.constexpr, KV_SAME_STRIDES: tl.constexpr,
):
    """Program (b, n) (head fastest): dq, dk, dv of the whole image of batch b, head n,
    and its slot `pid` of the table partials (module docstring); ZT_N, DC: the slow
    pass's (image_bwd_exact.exact_gradients). dq, dk and dv are the launcher's contiguous
    allocations: their strides come from the sizes."""
    H, W, HEADS, D, D_HALF, n_slots = sizes
    sq_b, sq_h, sq_w, sq_n, sq_d = sq
    sk_b, sk_h, sk_w, sk_n, sk_d = sk
    if KV_SAME_STRIDES:
        sv_b, sv_h, sv_w, sv_n, sv_d = sk
    else:
        sv_b, sv_h, sv_w, sv_n, sv_d = sv
    so_b, so_h, so_w, so_n, so_d = so
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d = sdo
    sl_b, sl_h, sl_w, sl_n = sl
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w = s_tab
    dil_h, dil_w = dil
    sg_b, sg_h, sg_w, sg_n = contiguous_image_strides(H, W, HEADS, D, OFF_I64)
    ZEROS: tl.constexpr = PADDING == 0
    SHIFT: tl.constexpr = PADDING == 2
    pid = tl.program_id(0)
    n = pid % HEADS
    b = pid // HEADS
    y, x, m_p = image_pixels(H, W, BLOCK_N, BLOCK_X)
    b_q, b_k, b_v = load_qkv(q_ptr, k_ptr, v_ptr, b, n, sq_b, sq_h, sq_w, sq_n, sq_d,
                             sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
                             y, x, m_p, D, BLOCK_D, EVEN_D, OFF_I64)
    b_o = load_image(image_base(o_ptr, b, n, so_b, so_n, OFF_I64), so_h, so_w, so_d, y, x,
                     m_p, D, BLOCK_D, EVEN_D, OFF_I64)
    b_do = load_image(image_base(do_ptr, b, n, sdo_b, sdo_n, OFF_I64), sdo_h, sdo_w, sdo_d,
                      y, x, m_p, D, BLOCK_D, EVEN_D, OFF_I64)
    p_l = image_base(lse_ptr, b, n, sl_b, sl_n, OFF_I64)
    b_lse2 = tl.load(p_l + y * sl_h + x * sl_w, mask=m_p, other=0.0) * LOG2E
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), axis=1)
    if DOT_F32:  # interpreter: its tl.dot mishandles bfloat16 (exact upcast)
        b_q = b_q.to(tl.float32)
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
        b_do = b_do.to(tl.float32)
    if HAS_RPB:
        b_s, b_z, m_win, b_rh, b_rw, b_th, b_tw, y, x, m_p, offy, offx = image_logits(
            b_q, b_k, relh_ptr, relw_ptr, rpb_ptr, n, H, W, D, D_HALF,
            srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w, dil_h, dil_w,
            qk_scale, KH, KW, PADDING, HAS_REL, HAS_RPB, REL_F32, BLOCK_X, BLOCK_N, BLOCK_D,
            E_PAD, TAP_X, TAP_N)
    else:
        b_s, b_rh, b_rw, b_th, b_tw = fast_logits(
            b_q, b_k, relh_ptr, relw_ptr, n, H, W, D, D_HALF,
            srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, dil_h, dil_w, qk_scale,
            KH, KW, SHIFT, HAS_REL, REL_F32, BLOCK_X, BLOCK_N, BLOCK_D, E_PAD, YP, XP, INTERP)
    b_p = tl.exp2(b_s - b_lse2[:, None])  # [N, N], 0 outside the windows
    # dv and dk stored as soon as they are made (fewer live tiles: no spills)
    b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision="ieee")  # [N, D]
    store_image(image_base(dv_ptr, b, n, sg_b, sg_n, OFF_I64), sg_h, sg_w, y, x, m_p, D,
                b_dv, BLOCK_D, OFF_I64)
    chk = tl.sum(tl.sum(b_dv, axis=1), axis=0)  # NaN / inf if a result is: the slow pass's flag
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [N, N]
    b_ds = b_p * (b_dp - b_delta[:, None])
    # the table gradients' sums of dS first (dS is then kept in q's dtype only: fewer
    # live registers)
    if REL_F32:
        sel_dtype: tl.constexpr = tl.float32
    else:
        sel_dtype: tl.constexpr = tl.bfloat16
    if HAS_RPB:  # dS per (query, tap slot), then its sums per slot, slot row, slot column
        if SHIFT:
            TH: tl.constexpr = 2 * KH - 1
            TW: tl.constexpr = 2 * KW - 1
        else:
            TH: tl.constexpr = KH
            TW: tl.constexpr = KW
        m_tap, m_in, key, r, s = tap_geometry(y, x, m_p, offy, offx, H, W, dil_h, dil_w, KH,
                                              KW, SHIFT, TAP_X, TAP_N, BLOCK_N, BLOCK_X)
        b_g = tl.where(m_tap & m_in, tl.gather(b_ds, key, axis=1), 0.0)  # [N, T]
        if ZEROS:  # zero keys: dS = P (0 - delta)
            b_g -= tl.exp2(b_z - b_lse2[:, None]) * b_delta[:, None]
        b_pb = tl.sum(b_g, axis=0)  # [T]
        chk += tl.sum(b_pb, axis=0)
        tl.store(partb_ptr + (r * n_slots + pid) * TW + s, b_pb, mask=(r < TH) & (s < TW))
        if HAS_REL:
            o_e = tl.arange(0, E_PAD)
            sel_r = tl.where(r[:, None] == o_e[None, :], 1.0, 0.0).to(sel_dtype)  # [T, E]
            sel_c = tl.where(s[:, None] == o_e[None, :], 1.0, 0.0).to(sel_dtype)
            b_grow = dot_exact(b_g, sel_r, INTERP)  # [N, E]
            b_gcol = dot_exact(b_g, sel_c, INTERP)
    elif HAS_REL:  # dS summed per key row / column
        sel_y = tl.where(y[:, None] == tl.arange(0, YP)[None, :], 1.0, 0.0).to(sel_dtype)
        sel_x = tl.where(x[:, None] == tl.arange(0, XP)[None, :], 1.0, 0.0).to(sel_dtype)
        b_sy = dot_exact(b_ds, sel_y, INTERP)  # [N, YP]
        b_sx = dot_exact(b_ds, sel_x, INTERP)  # [N, XP]
        # rel rows / columns: the key row / column each stands for in the window
        b_grow = _rel_sums(b_sy, y, H, dil_h, KH, SHIFT, E_PAD, YP)  # [N, E]
        b_gcol = _rel_sums(b_sx, x, W, dil_w, KW, SHIFT, E_PAD, XP)
        if ZEROS:  # zero keys: dS = -delta 2^(Ra + Rc - lse2), separable
            b_eh, m_oh, b_mh, b_sh, b_soh = zero_taps(b_rh, y, H, dil_h, qk_scale, KH,
                                                      HAS_REL, E_PAD)
            b_ew, m_ow, b_mw, b_sw, b_sow = zero_taps(b_rw, x, W, dil_w, qk_scale, KW,
                                                      HAS_REL, E_PAD)
            b_coef = (0.0 - b_delta) * tl.exp2(b_mh + b_mw - b_lse2)
            b_grow += b_coef[:, None] * b_eh * tl.where(m_oh, b_sw[:, None], b_sow[:, None])
            b_gcol += b_coef[:, None] * b_ew * tl.where(m_ow, b_sh[:, None], b_soh[:, None])
    b_dsl = b_ds.to(b_q.dtype)
    b_dk = tl.dot(tl.trans(b_dsl), b_q, input_precision="ieee")
    store_image(image_base(dk_ptr, b, n, sg_b, sg_n, OFF_I64), sg_h, sg_w, y, x, m_p, D,
                b_dk * scale, BLOCK_D, OFF_I64)
    chk += tl.sum(tl.sum(b_dk, axis=1), axis=0)
    b_dq = tl.dot(b_dsl, b_k, input_precision="ieee")  # [N, D]
    if HAS_REL:
        b_dq += dot_exact(b_grow, b_th, INTERP) + dot_exact(b_gcol, b_tw, INTERP)
        chk += tl.sum(tl.sum(b_grow, axis=1) + tl.sum(b_gcol, axis=1), axis=0)
        _store_rel_partials(parth_ptr, partw_ptr, b_grow, b_gcol, b_q, pid, n_slots, D, D_HALF,
                            scale, KH, KW, SHIFT, E_PAD, BLOCK_D, INTERP)
    store_image(image_base(dq_ptr, b, n, sg_b, sg_n, OFF_I64), sg_h, sg_w, y, x, m_p, D,
                b_dq * scale, BLOCK_D, OFF_I64)
    chk += tl.sum(tl.sum(b_dq, axis=1), axis=0)
    # a non-finite result, which the dots may have spread outside its windows: the exact
    # slow pass redoes this image (it does nothing on finite inputs), after every
    # thread's stores above
    tl.debug_barrier()
    exact_gradients(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
        dq_ptr, dk_ptr, dv_ptr, parth_ptr, partw_ptr, partb_ptr, pid, n, b,
        ~(tl.abs(chk) < float("inf")), H, W, D, D_HALF, n_slots,
        sq_b, sq_h, sq_w, sq_n, sq_d, sk_b, sk_h, sk_w, sk_n, sk_d,
        sv_b, sv_h, sv_w, sv_n, sv_d, so_b, so_h, so_w, so_n, so_d,
        sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h, sl_w, sl_n, sg_b, sg_h, sg_w, sg_n,
        srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
        dil_h, dil_w, scale, KH, KW, PADDING, HAS_REL, HAS_RPB,
        BLOCK_X, BLOCK_N, BLOCK_D, E_PAD, TAP_X, TAP_N, OFF_I64, ZT_N, DC)


# --- host side --------------------------------------------------------------------------

EXACT_DC = 32  # channels per chunk of the slow pass's key tiles (no spills at d 64, 4 warps)
MAX_D = 64  # the slow pass spills at d 128 (68-88 bytes, 8 warps, channel chunks of 32)
MAX_HEADS = 65535  # axis 1 of the table reduction's grid


def search_space() -> list[dict]:
    return image_fwd.search_space()


def prune(configs, q_shape, args) -> list[dict]:
    return image_fwd.prune(configs, q_shape, args)


@per_call_key
def default_config(q_shape, args) -> dict:
    """The forward's (4 warps, 8 for d > 64)."""
    return image_fwd.default_config(q_shape, args)


@per_call_key
def supports(q_shape, dtype, args: AttendArgs) -> bool:
    """The forward's range (image_fwd.supports) up to d = MAX_D (the slow pass spills
    at d 128), heads within the reduction's grid."""
    return (forward_supports(q_shape, dtype, args) and q_shape[3] <= MAX_HEADS
            and q_shape[4] <= MAX_D)


class _Plan(NamedTuple):
    grads: LaunchPlan  # the gradient kernel (NO_LAUNCH: an empty call)
    reduce: Optional[LaunchPlan]  # the table reduction (None without tables)
    sizes: list  # float32 elements of part_h, part_w, part_b in one buffer


def _plan(q_shape, dtype, strides, args: AttendArgs, rel_f32: bool, config) -> _Plan:
    B, H, W, heads, d = q_shape
    if not supports(q_shape, dtype, args):
        raise ValueError(f"imagebwd backward does not support q of shape {q_shape} "
                         f"and dtype {dtype} with these arguments")
    config = default_config(q_shape, args) if config is None else config
    if not isinstance(config, dict) or "num_warps" not in config:
        raise ValueError(f"imagebwd config must be a dict with key 'num_warps', got {config!r}")
    if B * H * W * heads * d == 0:
        return _Plan(NO_LAUNCH, None, [])
    _, bx, bn = grid_shape(H, W)
    e_pad, tap_x, tap_n = tap_shape(args)
    block_d = max(16, next_pow2(d))
    grad_strides = contiguous_strides(q_shape)
    shift = args.padding == "shift"
    th = 2 * args.kh - 1 if shift else args.kh
    tw = 2 * args.kw - 1 if shift else args.kw
    n_slots = B * heads
    has_rel, has_rpb = args.rel_h is not None, args.rpb is not None
    kv_same = strides[1] == strides[2]
    grads = launch_plan(
        _PARAMS,
        grid=(n_slots,),
        head=((H, W, heads, d, d // 2, n_slots), *strides[:2],
              None if kv_same else strides[2], *strides[3:]),
        tail=((args.dh, args.dw), args.scale * LOG2E.value, args.scale),
        flags=dict(
            KH=args.kh, KW=args.kw, PADDING=PADDING_CODES[args.padding],
            HAS_REL=has_rel, HAS_RPB=has_rpb, REL_F32=rel_f32,
            BLOCK_X=bx, BLOCK_N=bn, BLOCK_D=block_d, E_PAD=e_pad, TAP_X=tap_x, TAP_N=tap_n,
            YP=max(16, bn // bx), XP=max(16, bx), EVEN_D=d == block_d,
            OFF_I64=not offsets_fit_i32([(q_shape, st) for st in (*strides[:5], grad_strides)]),
            DOT_F32=INTERPRETED and dtype == torch.bfloat16, INTERP=INTERPRETED,
            ZT_N=next_pow2(args.kh * args.kw), DC=min(block_d, EXACT_DC),
            KV_SAME_STRIDES=kv_same,
            **launch_options(config),
        ),
    )
    reduce = rows_bwd_query.reduce_plan(args, heads, d, B, th, tw)
    sizes = [0]  # no part of its own: the rel and rpb partials only
    if has_rel:
        sizes += [th * n_slots * (d // 2), tw * n_slots * (d - d // 2)]
    if has_rpb:
        sizes.append(th * n_slots * tw)
    # each part 16-byte aligned, as a separate allocation would be
    return _Plan(grads, reduce, [-(-m // 4) * 4 for m in sizes])


_plans = plan_cache(_plan)
_PARAMS = _image_bwd_kernel.arg_names  # read at import: a recorder may stand in later


def backward(q, k, v, out, lse, dout, args: AttendArgs, config: Optional[dict] = None,
             _poison: bool = False):
    """(dq, dk, dv, drel_h, drel_w, drpb); see the module docstring. Two launches with
    rel / rpb tables, one without."""
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    rel_f32 = rel_in_f32(q, args)
    strides = (q.stride(), k.stride(), v.stride(), out.stride(), dout.stride(), lse.stride())
    plan = _plans((q.shape, q.dtype, strides, args_key(args), rel_f32, config_key(config)),
                  tuple(q.shape), q.dtype, strides, args, rel_f32, config)
    dq, dk, dv = (new_output_like(q, _poison) for _ in range(3))
    has_rel, has_rpb = rel_h is not None, rpb is not None
    drel_h, drel_w, drpb = new_table_grads(args, _poison)
    if plan.grads.grid is None:
        for g in (dq, dk, dv, drel_h, drel_w, drpb):
            if g is not None:
                g.zero_()
        return dq, dk, dv, drel_h, drel_w, drpb
    part_h = part_w = part_b = None  # absent tables: never read
    if has_rel or has_rpb:
        buffer = new_output((sum(plan.sizes),), torch.float32, q.device, _poison)
        _, part_h, part_w, part_b = split_partials(buffer, plan.sizes, has_rel, has_rpb)
    p = plan.grads  # the non-finite slow pass inside it
    launch_kernel(_image_bwd_kernel, p,
        q, k, v, out, dout, lse, rel_h, rel_w, rpb, dq, dk, dv,
        part_h if has_rel else None, part_w if has_rel else None, part_b if has_rpb else None,
        *p.head, table_strides(rel_h, rel_w, rpb), *p.tail, **p.options,
    )
    p = plan.reduce
    if p is not None:
        launch_kernel(rows_bwd_query._reduce_tables_kernel, p,
            part_h, part_w, part_b,
            drel_h if has_rel else dq, drel_w if has_rel else dq, drpb if has_rpb else dq,
            *p.head, *p.tail, **p.options,
        )
    return dq, dk, dv, drel_h, drel_w, drpb
