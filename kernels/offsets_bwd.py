"""Backward of `attend`: one program = BLOCK_P pixels of one (batch, head), looping over
the window offsets on CUDA cores (no tl.dot, so no tensor-core precision question).

FlashAttention recipe, two kernels, nothing k^2-sized in HBM:

1. `_dq_kernel` (a program owns BLOCK_P query pixels): delta = rowsum(dout * out),
   written to a (B, H, W, heads) float32 buffer for kernel 2; then for every window
   offset it recomputes the logit, P = exp(logit - lse), dS = P * (dout . v - delta),
   and accumulates dq += scale * dS * (k + r). The same dS gives the per-program
   partial sums of drel_h / drel_w (sum over pixels of dS * q) and drpb (sum of dS).
2. `_dkv_kernel` (a program owns BLOCK_P key pixels): walks the inverse neighborhood,
   the queries whose window holds the key, recomputes P and dS for each such pair and
   accumulates dv += P * dout and dk += scale * dS * q.

Offsets are walked in "relative index" space t (the row of the rel/rpb tables), so the
table row is the same for every pixel of an iteration: t in [0, k) for zeros/mask
(centered windows: membership is "inside the image"), and t in [0, 2k-1) for shift,
where the window of pixel i is clamped inside the image and the pairs (i, t) that are
really in the window are picked by an exact membership mask (start <= i' + o < start + k).

Costs: kernel 1 reads q, out, dout, lse once and k, v once per offset (neighbouring
programs share them through L2; heads are the fastest grid axis so a tile's heads run
together); kernel 2 reads k, v once and q, dout, lse, delta once per offset. About 8 d
FMAs per (pixel, head, offset), twice the forward. Shift mode walks (2kh-1)(2kw-1)
candidate offsets of which kh*kw are live: ~4x the compute of zeros/mask. Extra memory:
delta (B, H, W, heads) float32 and the partial sums, B * ceil(HW/BLOCK_P) * heads *
(Ty + Tx_pad) * d_pad floats for rel (+ Ty * Tx for rpb), reduced by torch in a fixed
order: no float atomics, gradients are bit-identical on repeat. Registers: besides the
[BLOCK_P, d_pad] tiles, kernel 1 holds the drel_w partial as a [Tx_pad, d_pad] tile
(large only for big k and d together, e.g. shift k=13 with d=256). ptxas for sm_90
(tests/test_kernels_backward.py compiles both kernels without a GPU): the default configs
take 150-240 registers per thread for d = 8..256 and do not spill; prune() drops the
configs that do (see _fits).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sasa_triton.args import AttendArgs

# Fill outputs with NaN before the kernels write them (debugging/tests): an element a
# kernel forgets to write then fails loudly instead of holding stale memory.
POISON_OUTPUTS = os.environ.get("SASA_TRITON_POISON") == "1"

_PADDING_CODE = {"zeros": 0, "mask": 1, "shift": 2}
_MAX_GRID_Y = 65535  # CUDA limit on grid axis 1 (the batch axis here)


@triton.jit
def _key_of_query(i, t, size, k, dil, PADDING: tl.constexpr):
    """Position of query i's neighbor at relative index t along one axis, and whether
    that neighbor is an in-image member of i's window."""
    if PADDING == 2:
        o = t - (k - 1)
        group = i % dil
        members = (size - group + dil - 1) // dil
        start = tl.minimum(tl.maximum(i // dil - k // 2, 0), members - k)
        ok = (i // dil + o >= start) & (i // dil + o < start + k)
    else:
        o = t - k // 2
        ok = (i + o * dil >= 0) & (i + o * dil < size)
    return i + o * dil, ok


@triton.jit
def _query_of_key(y, t, size, k, dil, PADDING: tl.constexpr):
    """Position of the query whose neighbor at relative index t is key y, and whether
    that query exists (inside the image, and y really in its window)."""
    if PADDING == 2:
        o = t - (k - 1)
    else:
        o = t - k // 2
    i = y - o * dil
    ok = (i >= 0) & (i < size)
    if PADDING == 2:
        group = y % dil
        members = (size - group + dil - 1) // dil
        start = tl.minimum(tl.maximum(i // dil - k // 2, 0), members - k)
        ok = ok & (y // dil >= start) & (y // dil < start + k)
    return i, ok


@triton.jit
def _dq_kernel(
    p_q, p_k, p_v, p_o, p_do, p_lse, p_relh, p_relw, p_rpb,
    p_dq, p_delta, p_part_h, p_part_w, p_part_b,
    H, W, NH, D, D2, KH, KW, DH, DW, TY, TX, scale,
    s_qb, s_qh, s_qw, s_qn, s_qd,
    s_kb, s_kh, s_kw, s_kn, s_kd,
    s_vb, s_vh, s_vw, s_vn, s_vd,
    s_ob, s_oh, s_ow, s_on, s_od,
    s_dob, s_doh, s_dow, s_don, s_dod,
    s_lb, s_lh, s_lw, s_ln,
    s_rhn, s_rhr, s_rhd, s_rwn, s_rwr, s_rwd,
    s_bn, s_by, s_bx,
    s_dqb, s_dqh, s_dqw, s_dqn, s_dqd,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, PADDING: tl.constexpr,
    BLOCK_P: tl.constexpr, D_PAD: tl.constexpr, TX_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = (pid % NH).to(tl.int64)
    pb = pid // NH
    prog = (b * (tl.num_programs(0) // NH) + pb) * NH + n  # index into the partial buffers

    o_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < H * W
    i = o_p // W
    j = o_p % W
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    m_pd = m_p[:, None] & m_d[None, :]
    i64 = i.to(tl.int64)
    j64 = j.to(tl.int64)

    o_q = b * s_qb + i64 * s_qh + j64 * s_qw + n * s_qn
    b_q = tl.load(p_q + o_q[:, None] + o_d[None, :] * s_qd, mask=m_pd, other=0.0).to(tl.float32)
    o_o = b * s_ob + i64 * s_oh + j64 * s_ow + n * s_on
    b_o = tl.load(p_o + o_o[:, None] + o_d[None, :] * s_od, mask=m_pd, other=0.0).to(tl.float32)
    o_do = b * s_dob + i64 * s_doh + j64 * s_dow + n * s_don
    b_do = tl.load(p_do + o_do[:, None] + o_d[None, :] * s_dod, mask=m_pd, other=0.0).to(tl.float32)
    b_lse = tl.load(p_lse + b * s_lb + i64 * s_lh + j64 * s_lw + n * s_ln, mask=m_p, other=0.0)
    log2e = 1.4426950408889634  # P = exp2(logit * log2e - lse * log2e): scale folded in
    scale2 = scale * log2e
    b_lse2 = b_lse * log2e
    b_delta = tl.sum(b_do * b_o, axis=1)  # [BLOCK_P]
    tl.store(p_delta + ((b * H + i64) * W + j64) * NH + n, b_delta, mask=m_p)

    acc_dq = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    acc_w = tl.zeros([TX_PAD, D_PAD], dtype=tl.float32)  # drel_w partial, row tx
    o_tx = tl.arange(0, TX_PAD)
    for ty in range(0, TY):
        y, m_y = _key_of_query(i, ty, H, KH, DH, PADDING)
        acc_h = tl.zeros([D_PAD], dtype=tl.float32)  # drel_h partial, row ty
        if HAS_REL:
            b_rh = tl.load(p_relh + n * s_rhn + ty * s_rhr + o_d * s_rhd,
                           mask=o_d < D2, other=0.0).to(tl.float32)
        for tx in range(0, TX):
            x, m_x = _key_of_query(j, tx, W, KW, DW, PADDING)
            m_in = m_p & m_y & m_x  # an in-image member of the window
            if PADDING == 0:
                m_live = m_p  # zeros: out-of-image neighbors are zero keys that take mass
            else:
                m_live = m_in
            m_kd = m_in[:, None] & m_d[None, :]
            o_k = b * s_kb + y.to(tl.int64) * s_kh + x.to(tl.int64) * s_kw + n * s_kn
            b_k = tl.load(p_k + o_k[:, None] + o_d[None, :] * s_kd, mask=m_kd, other=0.0)
            b_k = b_k.to(tl.float32)
            o_v = b * s_vb + y.to(tl.int64) * s_vh + x.to(tl.int64) * s_vw + n * s_vn
            b_v = tl.load(p_v + o_v[:, None] + o_d[None, :] * s_vd, mask=m_kd, other=0.0)
            b_v = b_v.to(tl.float32)
            if HAS_REL:
                b_rw = tl.load(p_relw + n * s_rwn + tx * s_rwr + (o_d - D2) * s_rwd,
                               mask=(o_d >= D2) & m_d, other=0.0).to(tl.float32)
                b_k = b_k + (b_rh + b_rw)[None, :]  # k + [rel_h[ty], rel_w[tx]]
                if PADDING != 0:  # a dead tap adds no 0 * (an inf in a row it does not use)
                    b_k = tl.where(m_live[:, None], b_k, 0.0)
            b_s = tl.sum(b_q * b_k, axis=1) * scale2  # [BLOCK_P], log2 units
            if HAS_RPB:
                if PADDING == 2:
                    b_s += tl.load(p_rpb + n * s_bn + ty * s_by + tx * s_bx).to(tl.float32) * log2e
                else:
                    b_s += tl.load(p_rpb + n * s_bn + (ty + KH // 2) * s_by
                                   + (tx + KW // 2) * s_bx).to(tl.float32) * log2e
            b_p = tl.exp2(b_s - b_lse2)
            b_dp = tl.sum(b_do * b_v, axis=1)
            b_ds = tl.where(m_live, b_p * (b_dp - b_delta), 0.0)  # where: no NaN from dead taps
            acc_dq += b_ds[:, None] * b_k
            if HAS_REL:
                if PADDING == 0:  # zeros: every tap of an in-image query is live
                    b_g = tl.sum(b_ds[:, None] * b_q, axis=0)  # [D_PAD]
                else:  # nor 0 * (a NaN in q) to a table row the query does not use
                    b_g = tl.sum(tl.where(m_live[:, None], b_ds[:, None] * b_q, 0.0), axis=0)
                acc_h += b_g
                acc_w += tl.where(o_tx[:, None] == tx, b_g[None, :], 0.0)
            if HAS_RPB:
                tl.store(p_part_b + (prog * TY + ty) * TX + tx, tl.sum(b_ds, axis=0))
        if HAS_REL:
            tl.store(p_part_h + (prog * TY + ty) * D_PAD + o_d, acc_h)
    if HAS_REL:
        tl.store(p_part_w + (prog * TX_PAD + o_tx[:, None]) * D_PAD + o_d[None, :], acc_w)

    o_dq = b * s_dqb + i64 * s_dqh + j64 * s_dqw + n * s_dqn
    tl.store(p_dq + o_dq[:, None] + o_d[None, :] * s_dqd,
             (acc_dq * scale).to(p_dq.dtype.element_ty), mask=m_pd)


@triton.jit
def _dkv_kernel(
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_relh, p_relw, p_rpb,
    p_dk, p_dv,
    H, W, NH, D, D2, KH, KW, DH, DW, TY, TX, scale,
    s_qb, s_qh, s_qw, s_qn, s_qd,
    s_kb, s_kh, s_kw, s_kn, s_kd,
    s_vb, s_vh, s_vw, s_vn, s_vd,
    s_dob, s_doh, s_dow, s_don, s_dod,
    s_lb, s_lh, s_lw, s_ln,
    s_rhn, s_rhr, s_rhd, s_rwn, s_rwr, s_rwd,
    s_bn, s_by, s_bx,
    s_dkb, s_dkh, s_dkw, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvw, s_dvn, s_dvd,
    HAS_REL: tl.constexpr, HAS_RPB: tl.constexpr, PADDING: tl.constexpr,
    BLOCK_P: tl.constexpr, D_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = (pid % NH).to(tl.int64)
    pb = pid // NH

    o_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)  # key pixels
    m_p = o_p < H * W
    y = o_p // W
    x = o_p % W
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    m_pd = m_p[:, None] & m_d[None, :]
    y64 = y.to(tl.int64)
    x64 = x.to(tl.int64)

    o_k = b * s_kb + y64 * s_kh + x64 * s_kw + n * s_kn
    b_k = tl.load(p_k + o_k[:, None] + o_d[None, :] * s_kd, mask=m_pd, other=0.0).to(tl.float32)
    o_v = b * s_vb + y64 * s_vh + x64 * s_vw + n * s_vn
    b_v = tl.load(p_v + o_v[:, None] + o_d[None, :] * s_vd, mask=m_pd, other=0.0).to(tl.float32)

    log2e = 1.4426950408889634  # P = exp2(logit * log2e - lse * log2e): scale folded in
    scale2 = scale * log2e
    acc_dk = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_P, D_PAD], dtype=tl.float32)
    for ty in range(0, TY):
        i, m_i = _query_of_key(y, ty, H, KH, DH, PADDING)
        if HAS_REL:
            b_rh = tl.load(p_relh + n * s_rhn + ty * s_rhr + o_d * s_rhd,
                           mask=o_d < D2, other=0.0).to(tl.float32)
        for tx in range(0, TX):
            j, m_j = _query_of_key(x, tx, W, KW, DW, PADDING)
            m_live = m_p & m_i & m_j
            m_qd = m_live[:, None] & m_d[None, :]
            i64 = i.to(tl.int64)
            j64 = j.to(tl.int64)
            o_q = b * s_qb + i64 * s_qh + j64 * s_qw + n * s_qn
            b_q = tl.load(p_q + o_q[:, None] + o_d[None, :] * s_qd, mask=m_qd, other=0.0)
            b_q = b_q.to(tl.float32)
            o_do = b * s_dob + i64 * s_doh + j64 * s_dow + n * s_don
            b_do = tl.load(p_do + o_do[:, None] + o_d[None, :] * s_dod, mask=m_qd, other=0.0)
            b_do = b_do.to(tl.float32)
            b_lse = tl.load(p_lse + b * s_lb + i64 * s_lh + j64 * s_lw + n * s_ln,
                            mask=m_live, other=0.0)
            b_lse2 = b_lse * log2e
            b_delta = tl.load(p_delta + ((b * H + i64) * W + j64) * NH + n, mask=m_live, other=0.0)
            b_ke = b_k
            if HAS_REL:
                b_rw = tl.load(p_relw + n * s_rwn + tx * s_rwr + (o_d - D2) * s_rwd,
                               mask=(o_d >= D2) & m_d, other=0.0).to(tl.float32)
                b_ke = b_k + (b_rh + b_rw)[None, :]
            b_s = tl.sum(b_q * b_ke, axis=1) * scale2  # [BLOCK_P], log2 units
            if HAS_RPB:
                if PADDING == 2:
                    b_s += tl.load(p_rpb + n * s_bn + ty * s_by + tx * s_bx).to(tl.float32) * log2e
                else:
                    b_s += tl.load(p_rpb + n * s_bn + (ty + KH // 2) * s_by
                                   + (tx + KW // 2) * s_bx).to(tl.float32) * log2e
            b_p = tl.where(m_live, tl.exp2(b_s - b_lse2), 0.0)
            b_dp = tl.sum(b_do * b_v, axis=1)
            b_ds = tl.where(m_live, b_p * (b_dp - b_delta), 0.0)
            acc_dv += b_p[:, None] * b_do
            acc_dk += b_ds[:, None] * b_q

    o_dk = b * s_dkb + y64 * s_dkh + x64 * s_dkw + n * s_dkn
    tl.store(p_dk + o_dk[:, None] + o_d[None, :] * s_dkd,
             (acc_dk * scale).to(p_dk.dtype.element_ty), mask=m_pd)
    o_dv = b * s_dvb + y64 * s_dvh + x64 * s_dvw + n * s_dvn
    tl.store(p_dv + o_dv[:, None] + o_d[None, :] * s_dvd,
             acc_dv.to(p_dv.dtype.element_ty), mask=m_pd)


# ---------------------------------------------------------------- configs

_BLOCKS = (16, 32, 64, 128)
_WARPS = (2, 4, 8)
_STAGES = (1, 2)


def search_space() -> list[dict]:
    """Every config the tuner may try: pixels per program and launch settings."""
    return [{"BLOCK_P": bp, "num_warps": nw, "num_stages": ns}
            for bp in _BLOCKS for nw in _WARPS for ns in _STAGES]


def _per_thread(config: dict, d: int) -> int:
    """Values of one [BLOCK_P, d_pad] tile per thread."""
    return config["BLOCK_P"] * triton.next_power_of_2(max(d, 1)) // (32 * config.get("num_warps", 4))


def _fits(config: dict, q_shape, args: AttendArgs) -> bool:
    """ptxas -v for sm_90 (Triton 3.6 and 3.9, k = 7, bf16/fp32, every padding, rel + rpb):
    at <= 16 tile values per thread both kernels take 64-240 registers without spills;
    at 32 they sit at the 255 cap and spill in shift mode and at 2 warps (12-340 bytes);
    at 64 they spill 0.4-1.6 KB. At 2 warps, 16 values already spill in shift mode
    (12-20 bytes), so 2-warp configs keep <= 8. Blocks much larger than the image go too."""
    B, H, W, heads, d = q_shape
    limit = 8 if config.get("num_warps", 4) <= 2 else 16
    return (_per_thread(config, d) <= limit
            and config["BLOCK_P"] <= max(_BLOCKS[0], triton.next_power_of_2(H * W)))


def prune(configs: list[dict], q_shape, args: AttendArgs) -> list[dict]:
    kept = [c for c in configs if _fits(c, q_shape, args)]
    return kept or [default_config(q_shape, args)]


def default_config(q_shape, args: AttendArgs) -> dict:
    """The largest pixel block whose [BLOCK_P, d_pad] tile holds <= 2048 values, no larger
    than the image; warps so that a thread holds <= 16 of them (8 at 2 warps): no spills
    (see _fits), e.g. 150-240 registers per thread for d = 8..256 on sm_90."""
    B, H, W, heads, d = q_shape
    d_pad = triton.next_power_of_2(max(d, 1))
    cap = max(_BLOCKS[0], triton.next_power_of_2(max(H * W, 1)))
    bp = next((b for b in reversed(_BLOCKS) if b * d_pad <= 2048 and b <= cap), _BLOCKS[0])
    warps = 8 if bp * d_pad > 2048 else 4 if bp * d_pad >= 1024 else 2
    return {"BLOCK_P": bp, "num_warps": warps, "num_stages": 1}


def supports(q_shape, dtype, args: AttendArgs) -> bool:
    B, H, W, heads, d = q_shape
    return (dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 1 <= d <= 256 and B <= _MAX_GRID_Y)


# ---------------------------------------------------------------- launcher

def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _table_strides(t, ndim_rows: int = 2):
    """(head, row, col) strides of a shared (head stride 0) or per-head table."""
    if t is None:
        return (0, 0, 0)
    return (0, *t.stride()) if t.dim() == ndim_rows else tuple(t.stride())


def backward(q, k, v, out, lse, dout, args: AttendArgs, config=None):
    """(dq, dk, dv, drel_h, drel_w, drpb): dq/dk/dv new contiguous tensors in q.dtype,
    the table gradients shaped and typed like args.rel_h / rel_w / rpb (None if absent)."""
    B, H, W, NH, D = q.shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    if not supports(q.shape, q.dtype, args):
        raise ValueError(f"offsets backward does not support q of shape {tuple(q.shape)} "
                         f"and dtype {q.dtype}")
    cfg = dict(config or default_config(q.shape, args))
    launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
    block_p = cfg.pop("BLOCK_P")
    dev = q.device
    shift = padding == "shift"
    ty_n, tx_n = (2 * kh - 1, 2 * kw - 1) if shift else (kh, kw)
    d_pad = triton.next_power_of_2(D)
    tx_pad = triton.next_power_of_2(tx_n)
    has_rel, has_rpb = rel_h is not None, rpb is not None

    dq, dk, dv = (_new(q.shape, q.dtype, dev) for _ in range(3))
    drel_h = drel_w = drpb = None
    if q.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if has_rel:
            drel_h, drel_w = torch.zeros_like(rel_h), torch.zeros_like(rel_w)
        if has_rpb:
            drpb = torch.zeros_like(rpb)
        return dq, dk, dv, drel_h, drel_w, drpb

    n_blocks = triton.cdiv(H * W, block_p)
    grid = (n_blocks * NH, B)
    delta = _new((B, H, W, NH), torch.float32, dev)
    part_h = _new((B, n_blocks, NH, ty_n, d_pad), torch.float32, dev) if has_rel else delta
    part_w = _new((B, n_blocks, NH, tx_pad, d_pad), torch.float32, dev) if has_rel else delta
    part_b = _new((B, n_blocks, NH, ty_n, tx_n), torch.float32, dev) if has_rpb else delta
    # absent tables: any tensor stands in (the HAS_REL / HAS_RPB paths compile away)
    relh_t, relw_t = (rel_h, rel_w) if has_rel else (q, q)
    rpb_t = rpb if has_rpb else q
    table_strides = (*_table_strides(rel_h), *_table_strides(rel_w),
                     *(rpb.stride() if has_rpb else (0, 0, 0)))
    shape_args = (H, W, NH, D, D // 2, kh, kw, dh, dw, ty_n, tx_n, scale)
    flags = dict(HAS_REL=has_rel, HAS_RPB=has_rpb, PADDING=_PADDING_CODE[padding],
                 BLOCK_P=block_p, D_PAD=d_pad, **cfg, **launch)

    _dq_kernel[grid](
        q, k, v, out, dout, lse, relh_t, relw_t, rpb_t,
        dq, delta, part_h, part_w, part_b,
        *shape_args,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *lse.stride(),
        *table_strides, *dq.stride(),
        TX_PAD=tx_pad, **flags,
    )
    _dkv_kernel[grid](
        q, k, v, dout, lse, delta, relh_t, relw_t, rpb_t,
        dk, dv,
        *shape_args,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(),
        *table_strides, *dk.stride(), *dv.stride(),
        **flags,
    )

    if has_rel:  # fixed-order reductions over (batch, pixel block): deterministic
        d2 = D // 2
        g_h = part_h.sum((0, 1))[..., :d2] * scale  # (heads, Ty, d2)
        g_w = part_w.sum((0, 1))[:, :tx_n, d2:D] * scale  # (heads, Tx, d - d2)
        drel_h = (g_h.sum(0) if rel_h.dim() == 2 else g_h).to(rel_h.dtype)
        drel_w = (g_w.sum(0) if rel_w.dim() == 2 else g_w).to(rel_w.dtype)
    if has_rpb:
        g_b = part_b.sum((0, 1))  # (heads, Ty, Tx)
        if shift:
            drpb = g_b.to(rpb.dtype)
        else:  # only the middle kh x kw entries are reachable in zeros/mask mode
            drpb = torch.zeros(rpb.shape, dtype=torch.float32, device=dev)
            drpb[:, kh // 2:kh // 2 + kh, kw // 2:kw // 2 + kw] = g_b
            drpb = drpb.to(rpb.dtype)
    return dq, dk, dv, drel_h, drel_w, drpb
