"""Backward family "offsets": one program = BLOCK_P pixels of one (batch, head), looping
over the window offsets on CUDA cores (no tl.dot, so no tensor-core precision question).

FlashAttention recipe, two kernels, nothing k^2-sized in HBM:

1. `_dq_kernel` (a program owns BLOCK_P query pixels): it loads their q, out, dout and
   lse once and writes delta = rowsum(dout * out) to a (B, H, W, heads) float32 buffer
   for kernel 2; then for every window offset it loads the neighbours' k and v,
   recomputes the logit, P = exp(logit - lse), dS = P * (dout . v - delta), and
   accumulates dq += scale * dS * (k + r). The same dS gives the program's partial sums
   of drel_h / drel_w (sum over its pixels of dS * q) and drpb (sum of dS), stored to
   per-program buffers that the launcher reduces in a fixed order (no float atomics:
   gradients are bit-identical on repeat).
2. `_dkv_kernel` (a program owns BLOCK_P key pixels): it loads their k and v once, walks
   the inverse neighbourhood (the queries whose window holds the key), loading those
   queries' q, dout, lse and delta, recomputes P and dS for each pair and accumulates
   dv += P * dout and dk += scale * dS * q.

Offsets are walked in "relative index" space t (the row of the rel/rpb tables), so the
table row is the same for every pixel of an iteration: t in [0, k) for zeros/mask (the
tap), and t in [0, 2k-1) for shift, where a pair (i, t) is live when it falls inside
the shifted window of `common.window_start` (an exact membership mask). Heads are the
fastest grid axis, so the programs of a tile's heads run together.
Costs and register counts: docs/PERF.md.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from sasa_triton.types import AttendArgs

from . import common
from .common import (
    LOG2E,
    PADDING_CODES,
    check_config,
    launch_options,
    new_output,
    next_pow2,
    table_strides,
    window_start,
)
from .fast_launch import launch_kernel
from .launch_cache import args_key, config_key, contiguous_strides, plan_cache

MAX_GRID_Y = 65535  # CUDA limit on grid axis 1 (the batch axis here)


@triton.jit
def _key_of_query(i, t, size, K: tl.constexpr, dil, SHIFT: tl.constexpr):
    """Position of query i's neighbour at relative index t along one axis, and whether
    that neighbour is an in-image member of i's window."""
    start, off = window_start(i, size, K, dil, SHIFT)
    if SHIFT:  # t - (K - 1) is the offset from i; the tap it lands on must be in [0, K)
        tap = t - (K - 1) - off
        return i + (t - (K - 1)) * dil, (tap >= 0) & (tap < K)
    else:  # t is the tap; off = -(K // 2)
        pos = i + (t + off) * dil
        return pos, (pos >= 0) & (pos < size)


@triton.jit
def _query_of_key(y, t, size, K: tl.constexpr, dil, SHIFT: tl.constexpr):
    """Position of the query whose neighbour at relative index t is key y, and whether
    that query exists (inside the image, and y really in its window)."""
    if SHIFT:
        i = y - (t - (K - 1)) * dil
        start, off = window_start(i, size, K, dil, SHIFT)  # y and start: one dilation group
        return i, (i >= 0) & (i < size) & (y >= start) & (y < start + K * dil)
    else:
        start, off = window_start(y, size, K, dil, SHIFT)  # off = -(K // 2): centred
        i = y - (t + off) * dil
        return i, (i >= 0) & (i < size)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, relh_ptr, relw_ptr, rpb_ptr,
    dq_ptr, delta_ptr, parth_ptr, partw_ptr, partb_ptr,
    H, W, HEADS, D, D_HALF, dil_h, dil_w, TY, TX, scale,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    sdq_b, sdq_h, sdq_w, sdq_n, sdq_d,
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, TX_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = (pid % HEADS).to(tl.int64)
    pb = pid // HEADS
    prog = (b * (tl.num_programs(0) // HEADS) + pb) * HEADS + n  # index into the partials

    o_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < H * W
    i = o_p // W
    j = o_p % W
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_pd = m_p[:, None] & m_d[None, :]
    i64 = i.to(tl.int64)
    j64 = j.to(tl.int64)

    o_q = b * sq_b + i64 * sq_h + j64 * sq_w + n * sq_n
    b_q = tl.load(q_ptr + o_q[:, None] + o_d[None, :] * sq_d, mask=m_pd, other=0.0).to(tl.float32)
    o_o = b * so_b + i64 * so_h + j64 * so_w + n * so_n
    b_o = tl.load(o_ptr + o_o[:, None] + o_d[None, :] * so_d, mask=m_pd, other=0.0).to(tl.float32)
    o_do = b * sdo_b + i64 * sdo_h + j64 * sdo_w + n * sdo_n
    b_do = tl.load(do_ptr + o_do[:, None] + o_d[None, :] * sdo_d, mask=m_pd,
                   other=0.0).to(tl.float32)
    b_lse = tl.load(lse_ptr + b * sl_b + i64 * sl_h + j64 * sl_w + n * sl_n, mask=m_p, other=0.0)
    scale2 = scale * LOG2E  # P = exp2(logit * log2e - lse * log2e): scale folded in
    b_lse2 = b_lse * LOG2E
    b_delta = tl.sum(b_do * b_o, axis=1)  # [BLOCK_P]
    tl.store(delta_ptr + ((b * H + i64) * W + j64) * HEADS + n, b_delta, mask=m_p)

    acc_dq = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    acc_w = tl.zeros([TX_PAD, BLOCK_D], dtype=tl.float32)  # drel_w partial, row tx
    o_tx = tl.arange(0, TX_PAD)
    for ty in range(0, TY):
        y, m_y = _key_of_query(i, ty, H, KH, dil_h, PADDING == 2)
        acc_h = tl.zeros([BLOCK_D], dtype=tl.float32)  # drel_h partial, row ty
        if HAS_REL:
            b_rh = tl.load(relh_ptr + n * srh_n + ty * srh_r + o_d * srh_d,
                           mask=o_d < D_HALF, other=0.0).to(tl.float32)
        for tx in range(0, TX):
            x, m_x = _key_of_query(j, tx, W, KW, dil_w, PADDING == 2)
            m_in = m_p & m_y & m_x  # an in-image member of the window
            if PADDING == 0:
                m_live = m_p  # zeros: out-of-image neighbours are zero keys that take mass
            else:
                m_live = m_in
            m_kd = m_in[:, None] & m_d[None, :]
            o_k = b * sk_b + y.to(tl.int64) * sk_h + x.to(tl.int64) * sk_w + n * sk_n
            b_k = tl.load(k_ptr + o_k[:, None] + o_d[None, :] * sk_d, mask=m_kd, other=0.0)
            b_k = b_k.to(tl.float32)
            o_v = b * sv_b + y.to(tl.int64) * sv_h + x.to(tl.int64) * sv_w + n * sv_n
            b_v = tl.load(v_ptr + o_v[:, None] + o_d[None, :] * sv_d, mask=m_kd, other=0.0)
            b_v = b_v.to(tl.float32)
            if HAS_REL:
                b_rw = tl.load(relw_ptr + n * srw_n + tx * srw_r + (o_d - D_HALF) * srw_d,
                               mask=(o_d >= D_HALF) & m_d, other=0.0).to(tl.float32)
                b_k = b_k + (b_rh + b_rw)[None, :]  # k + [rel_h[ty], rel_w[tx]]
                if PADDING != 0:  # a dead tap adds no 0 * (an inf in a row it does not use)
                    b_k = tl.where(m_live[:, None], b_k, 0.0)
            b_s = tl.sum(b_q * b_k, axis=1) * scale2  # [BLOCK_P], log2 units
            if HAS_RPB:
                if PADDING == 2:
                    b_s += tl.load(rpb_ptr + n * srp_n + ty * srp_h + tx * srp_w).to(
                        tl.float32) * LOG2E
                else:
                    b_s += tl.load(rpb_ptr + n * srp_n + (ty + KH // 2) * srp_h
                                   + (tx + KW // 2) * srp_w).to(tl.float32) * LOG2E
            b_p = tl.exp2(b_s - b_lse2)
            b_dp = tl.sum(b_do * b_v, axis=1)
            b_ds = tl.where(m_live, b_p * (b_dp - b_delta), 0.0)  # where: no NaN from dead taps
            acc_dq += b_ds[:, None] * b_k
            if HAS_REL:
                if PADDING == 0:  # zeros: every tap of an in-image query is live
                    b_g = tl.sum(b_ds[:, None] * b_q, axis=0)  # [BLOCK_D]
                else:  # nor 0 * (a NaN in q) to a table row the query does not use
                    b_g = tl.sum(tl.where(m_live[:, None], b_ds[:, None] * b_q, 0.0), axis=0)
                acc_h += b_g
                acc_w += tl.where(o_tx[:, None] == tx, b_g[None, :], 0.0)
            if HAS_RPB:
                tl.store(partb_ptr + (prog * TY + ty) * TX + tx, tl.sum(b_ds, axis=0))
        if HAS_REL:
            tl.store(parth_ptr + (prog * TY + ty) * BLOCK_D + o_d, acc_h)
    if HAS_REL:
        tl.store(partw_ptr + (prog * TX_PAD + o_tx[:, None]) * BLOCK_D + o_d[None, :], acc_w)

    o_dq = b * sdq_b + i64 * sdq_h + j64 * sdq_w + n * sdq_n
    tl.store(dq_ptr + o_dq[:, None] + o_d[None, :] * sdq_d,
             (acc_dq * scale).to(dq_ptr.dtype.element_ty), mask=m_pd)


@triton.jit
def _dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, relh_ptr, relw_ptr, rpb_ptr,
    dk_ptr, dv_ptr,
    H, W, HEADS, D, D_HALF, dil_h, dil_w, TY, TX, scale,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sl_b, sl_h, sl_w, sl_n,
    srh_n, srh_r, srh_d, srw_n, srw_r, srw_d, srp_n, srp_h, srp_w,
    sdk_b, sdk_h, sdk_w, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_w, sdv_n, sdv_d,
    KH: tl.constexpr, KW: tl.constexpr, PADDING: tl.constexpr,  # 0 zeros, 1 mask, 2 shift
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = (pid % HEADS).to(tl.int64)
    pb = pid // HEADS

    o_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)  # key pixels
    m_p = o_p < H * W
    y = o_p // W
    x = o_p % W
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_pd = m_p[:, None] & m_d[None, :]
    y64 = y.to(tl.int64)
    x64 = x.to(tl.int64)

    o_k = b * sk_b + y64 * sk_h + x64 * sk_w + n * sk_n
    b_k = tl.load(k_ptr + o_k[:, None] + o_d[None, :] * sk_d, mask=m_pd, other=0.0).to(tl.float32)
    o_v = b * sv_b + y64 * sv_h + x64 * sv_w + n * sv_n
    b_v = tl.load(v_ptr + o_v[:, None] + o_d[None, :] * sv_d, mask=m_pd, other=0.0).to(tl.float32)

    scale2 = scale * LOG2E  # P = exp2(logit * log2e - lse * log2e): scale folded in
    acc_dk = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for ty in range(0, TY):
        i, m_i = _query_of_key(y, ty, H, KH, dil_h, PADDING == 2)
        if HAS_REL:
            b_rh = tl.load(relh_ptr + n * srh_n + ty * srh_r + o_d * srh_d,
                           mask=o_d < D_HALF, other=0.0).to(tl.float32)
        for tx in range(0, TX):
            j, m_j = _query_of_key(x, tx, W, KW, dil_w, PADDING == 2)
            m_live = m_p & m_i & m_j
            m_qd = m_live[:, None] & m_d[None, :]
            i64 = i.to(tl.int64)
            j64 = j.to(tl.int64)
            o_q = b * sq_b + i64 * sq_h + j64 * sq_w + n * sq_n
            b_q = tl.load(q_ptr + o_q[:, None] + o_d[None, :] * sq_d, mask=m_qd, other=0.0)
            b_q = b_q.to(tl.float32)
            o_do = b * sdo_b + i64 * sdo_h + j64 * sdo_w + n * sdo_n
            b_do = tl.load(do_ptr + o_do[:, None] + o_d[None, :] * sdo_d, mask=m_qd, other=0.0)
            b_do = b_do.to(tl.float32)
            b_lse = tl.load(lse_ptr + b * sl_b + i64 * sl_h + j64 * sl_w + n * sl_n,
                            mask=m_live, other=0.0)
            b_lse2 = b_lse * LOG2E
            b_delta = tl.load(delta_ptr + ((b * H + i64) * W + j64) * HEADS + n, mask=m_live,
                              other=0.0)
            b_ke = b_k
            if HAS_REL:
                b_rw = tl.load(relw_ptr + n * srw_n + tx * srw_r + (o_d - D_HALF) * srw_d,
                               mask=(o_d >= D_HALF) & m_d, other=0.0).to(tl.float32)
                b_ke = b_k + (b_rh + b_rw)[None, :]
            b_s = tl.sum(b_q * b_ke, axis=1) * scale2  # [BLOCK_P], log2 units
            if HAS_RPB:
                if PADDING == 2:
                    b_s += tl.load(rpb_ptr + n * srp_n + ty * srp_h + tx * srp_w).to(
                        tl.float32) * LOG2E
                else:
                    b_s += tl.load(rpb_ptr + n * srp_n + (ty + KH // 2) * srp_h
                                   + (tx + KW // 2) * srp_w).to(tl.float32) * LOG2E
            b_p = tl.where(m_live, tl.exp2(b_s - b_lse2), 0.0)
            b_dp = tl.sum(b_do * b_v, axis=1)
            b_ds = tl.where(m_live, b_p * (b_dp - b_delta), 0.0)
            acc_dv += b_p[:, None] * b_do
            acc_dk += b_ds[:, None] * b_q

    o_dk = b * sdk_b + y64 * sdk_h + x64 * sdk_w + n * sdk_n
    tl.store(dk_ptr + o_dk[:, None] + o_d[None, :] * sdk_d,
             (acc_dk * scale).to(dk_ptr.dtype.element_ty), mask=m_pd)
    o_dv = b * sdv_b + y64 * sdv_h + x64 * sdv_w + n * sdv_n
    tl.store(dv_ptr + o_dv[:, None] + o_d[None, :] * sdv_d,
             acc_dv.to(dv_ptr.dtype.element_ty), mask=m_pd)


# ---------------------------------------------------------------- configs

_BLOCKS = (16, 32, 64, 128)
_WARPS = (2, 4, 8)
_STAGES = (1, 2)


def search_space() -> list[dict]:
    """Every config the tuner may try: pixels per program and launch settings."""
    return [{"BLOCK_P": bp, "num_warps": nw, "num_stages": ns}
            for bp in _BLOCKS for nw in _WARPS for ns in _STAGES]


def _per_thread(config: dict, d: int) -> int:
    """Values of one [BLOCK_P, BLOCK_D] tile per thread."""
    return config["BLOCK_P"] * next_pow2(d) // (32 * config.get("num_warps", 4))


def _fits(config: dict, q_shape, args: AttendArgs) -> bool:
    """At most 16 tile values per thread (8 at 2 warps): the configs that ptxas for sm_90
    compiles without spilling (measurements: docs/PERF.md); blocks much larger than the
    image go too."""
    B, H, W, heads, d = q_shape
    limit = 8 if config.get("num_warps", 4) <= 2 else 16
    return (_per_thread(config, d) <= limit
            and config["BLOCK_P"] <= max(_BLOCKS[0], next_pow2(H * W)))


def prune(configs: list[dict], q_shape, args: AttendArgs) -> list[dict]:
    """The configs of `configs` that fit (see _fits); the default when none does."""
    kept = [c for c in configs if _fits(c, q_shape, args)]
    return kept or [default_config(q_shape, args)]


def default_config(q_shape, args: AttendArgs) -> dict:
    """The largest pixel block whose [BLOCK_P, BLOCK_D] tile holds <= 2048 values, no
    larger than the image; warps so that a thread holds <= 16 of them (8 at 2 warps), so
    it passes _fits."""
    B, H, W, heads, d = q_shape
    block_d = next_pow2(d)
    cap = max(_BLOCKS[0], next_pow2(H * W))
    bp = next((b for b in reversed(_BLOCKS) if b * block_d <= 2048 and b <= cap), _BLOCKS[0])
    warps = 8 if bp * block_d > 2048 else 4 if bp * block_d >= 1024 else 2
    return {"BLOCK_P": bp, "num_warps": warps, "num_stages": 1}


def supports(q_shape, dtype, args: AttendArgs) -> bool:
    """fp16/bf16/fp32, d = 1..256, every padding, kernel size and table; B <= 65535."""
    B, H, W, heads, d = q_shape
    return (dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 1 <= d <= 256 and B <= MAX_GRID_Y)


# ---------------------------------------------------------------- launcher

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor],
              Optional[torch.Tensor], Optional[torch.Tensor]]


class _Plan(NamedTuple):
    """What a backward launch of one call key needs besides the tensors."""

    grid: tuple
    delta_shape: tuple
    part_h_shape: Optional[tuple]  # None: no rel tables
    part_w_shape: Optional[tuple]
    part_b_shape: Optional[tuple]  # None: no rpb
    shape_args: tuple  # H, W, heads, d, d // 2, dh, dw, ty_n, tx_n, scale
    grad_strides: tuple  # of the fresh contiguous dq, dk, dv
    flags: dict  # constexprs and launch options of both kernels
    rel_h_dims: tuple  # partial-sum axes of drel_h (heads too for a shared table)
    rel_w_dims: tuple  # the same for drel_w (the tables' layouts may differ)
    d_half: int
    tx_n: int
    tx_pad: int  # the dq kernel's TX_PAD
    rpb_pad: Optional[tuple]  # F.pad widths placing drpb's reachable middle (zeros/mask)


def _plan(q_shape, dtype, args: AttendArgs, config: Optional[dict]) -> _Plan:
    """The launch plan of a call key; raises for an unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    if not supports(q_shape, dtype, args):
        raise ValueError(f"offsets backward does not support q of shape {q_shape} "
                         f"and dtype {dtype}")
    config = config or default_config(q_shape, args)
    check_config(config, ("BLOCK_P",), "offsets")
    block_p = config["BLOCK_P"]
    shift = padding == "shift"
    ty_n, tx_n = (2 * kh - 1, 2 * kw - 1) if shift else (kh, kw)
    block_d = next_pow2(d)
    tx_pad = next_pow2(tx_n)
    has_rel, has_rpb = rel_h is not None, rpb is not None
    n_blocks = triton.cdiv(H * W, block_p)
    return _Plan(
        grid=(n_blocks * heads, B),
        delta_shape=(B, H, W, heads),
        part_h_shape=(B, n_blocks, heads, ty_n, block_d) if has_rel else None,
        part_w_shape=(B, n_blocks, heads, tx_pad, block_d) if has_rel else None,
        part_b_shape=(B, n_blocks, heads, ty_n, tx_n) if has_rpb else None,
        shape_args=(H, W, heads, d, d // 2, dh, dw, ty_n, tx_n, scale),
        grad_strides=contiguous_strides(q_shape),
        flags=dict(KH=kh, KW=kw, PADDING=PADDING_CODES[padding], HAS_REL=has_rel,
                   HAS_RPB=has_rpb, BLOCK_P=block_p, BLOCK_D=block_d,
                   **launch_options(config)),
        rel_h_dims=(0, 1, 2) if has_rel and rel_h.dim() == 2 else (0, 1),
        rel_w_dims=(0, 1, 2) if has_rel and rel_w.dim() == 2 else (0, 1),
        d_half=d // 2, tx_n=tx_n, tx_pad=tx_pad,
        rpb_pad=None if shift else (kw // 2, kw // 2, kh // 2, kh // 2),
    )


_plans = plan_cache(_plan)


def backward(q, k, v, out, lse, dout, args: AttendArgs, config: Optional[dict] = None,
             _poison: bool = False) -> Grads:
    """(dq, dk, dv, drel_h, drel_w, drpb): dq/dk/dv new contiguous tensors in q.dtype,
    the table gradients shaped and typed like args.rel_h / rel_w / rpb (None if absent).
    `_poison` fills the outputs and buffers with NaN first (tests: an element a kernel
    fails to write then shows)."""
    plan = _plans((q.shape, q.dtype, args_key(args), config_key(config)),
                  tuple(q.shape), q.dtype, args, config)
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    dev = q.device
    poison = _poison or common.POISON_OUTPUTS
    if poison:
        dq, dk, dv = (new_output(q.shape, q.dtype, dev, True) for _ in range(3))
    else:  # empty_like: half the host time of empty(shape, ...)
        dq, dk, dv = (torch.empty_like(q, memory_format=torch.contiguous_format)
                      for _ in range(3))
    if q.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        drel_h = drel_w = drpb = None
        if rel_h is not None:
            drel_h, drel_w = torch.zeros_like(rel_h), torch.zeros_like(rel_w)
        if rpb is not None:
            drpb = torch.zeros_like(rpb)
        return dq, dk, dv, drel_h, drel_w, drpb

    def buffer(shape) -> torch.Tensor:
        return new_output(shape, torch.float32, dev, poison)

    delta = buffer(plan.delta_shape)
    part_h = delta if plan.part_h_shape is None else buffer(plan.part_h_shape)
    part_w = delta if plan.part_w_shape is None else buffer(plan.part_w_shape)
    part_b = delta if plan.part_b_shape is None else buffer(plan.part_b_shape)
    # absent tables: any tensor stands in (the HAS_REL / HAS_RPB paths compile away)
    relh_t = q if rel_h is None else rel_h
    relw_t = q if rel_w is None else rel_w
    rpb_t = q if rpb is None else rpb
    tables = table_strides(rel_h, rel_w, rpb)
    s_q, s_k, s_v, s_do, s_l = q.stride(), k.stride(), v.stride(), dout.stride(), lse.stride()
    s_g, flags = plan.grad_strides, plan.flags

    launch_kernel(_dq_kernel, plan.grid,
        q, k, v, out, dout, lse, relh_t, relw_t, rpb_t,
        dq, delta, part_h, part_w, part_b,
        *plan.shape_args,
        *s_q, *s_k, *s_v, *out.stride(), *s_do, *s_l,
        *tables, *s_g,
        TX_PAD=plan.tx_pad, **flags,
    )
    launch_kernel(_dkv_kernel, plan.grid,
        q, k, v, dout, lse, delta, relh_t, relw_t, rpb_t,
        dk, dv,
        *plan.shape_args,
        *s_q, *s_k, *s_v, *s_do, *s_l,
        *tables, *s_g, *s_g,
        **flags,
    )

    drel_h = drel_w = drpb = None
    scale = args.scale
    if rel_h is not None:  # fixed-order reductions over (batch, pixel block): deterministic
        d2 = plan.d_half
        drel_h = part_h.sum(plan.rel_h_dims)[..., :d2].mul(scale).to(rel_h.dtype)
        drel_w = part_w.sum(plan.rel_w_dims)[..., :plan.tx_n, d2:q.shape[4]].mul(scale).to(
            rel_w.dtype)
    if rpb is not None:
        g_b = part_b.sum((0, 1))  # (heads, Ty, Tx)
        if plan.rpb_pad is not None:  # only the middle kh x kw entries are reachable
            g_b = torch.nn.functional.pad(g_b, plan.rpb_pad)
        drpb = g_b.to(rpb.dtype)
    return dq, dk, dv, drel_h, drel_w, drpb
