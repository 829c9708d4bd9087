"""Backward family "tile2dbwd": a CUDA-core backward for small head dims, composed.

Built like the tile2d forward (kernels/tile2d_fwd.py): a program owns a 2-D tile of
pixels with all heads, a thread the (pixel, head) rows of a group of adjacent pixels with
d in registers (the group shares its window columns' loads), window rows in a runtime
loop and columns unrolled, so it touches exactly the window (the tensor-core "rowsbwd"
computes ~4.6x the window's score elements, whatever d is). Three launches:

1. `tile2d_bwd_query._tile2d_bwd_query_kernel` (query-owned): dq, the (lse * log2(e),
   delta) pairs, per-program partials of the table gradients;
2. `rows_bwd_query._reduce_tables_kernel`: those partials summed in a fixed order (only
   with rel / rpb tables);
3. `tile2d_bwd_key._tile2d_bwd_key_kernel` (key-owned): dk, dv over the inverse window.

No atomics: gradients are bit-identical run to run. A config is one flat dict: the query
kernel's keys start with "Q_", the key kernel's with "K_". Zeros and mask padding only
(shift moves windows at the borders: `supports` says no and the next backward runs it).
Design notes and predicted costs: docs/tile2d_bwd.md.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from sasa_triton.types import AttendArgs

from . import rows_bwd_query, tile2d_bwd_key, tile2d_bwd_query
from .common import (
    LOG2E,
    new_output,
    new_output_like,
    new_table_grads,
    next_pow2,
    pointer_alignment,
    split_partials,
    stride_vector_width,
    table_strides,
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

MAX_ROW = 256  # next_pow2(heads) * next_pow2(d) per pixel
MAX_KW = 15  # window columns are unrolled
MAX_HEADS = 65535  # axis 1 of the table reduction's grid
_SIZES = (1, 2, 4, 8, 16)
_WARPS = (1, 2, 4, 8)
_PIXES = (1, 2, 4)  # pixels per group, either kernel
KEYS = ("Q_BLOCK_H", "Q_BLOCK_W", "Q_PIX", "Q_num_warps",
        "K_BLOCK_H", "K_BLOCK_W", "K_PIX", "K_num_warps")


def _lanes(q_shape, dtype=torch.bfloat16) -> int:
    """Lanes holding one (pixel, head) row: one per 16 bytes of channels."""
    size = 4 if dtype == torch.float32 else 2
    return max(1, next_pow2(q_shape[4]) * size // 16)


@per_call_key
def supports(q_shape, dtype, args: AttendArgs) -> bool:
    B, H, W, heads, d = q_shape
    return (dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= d
            and next_pow2(heads) * next_pow2(d) <= MAX_ROW and heads <= MAX_HEADS
            and args.kw <= MAX_KW and args.padding != "shift")


def _config(bh: int, tw: int, warps: int, q_pix: int, k_pix: int) -> dict:
    """Both kernels on the same tile of BLOCK_H x tw pixel groups and warps; PIX pixels
    per group in each (BLOCK_W = tw * PIX)."""
    return {"Q_BLOCK_H": bh, "Q_BLOCK_W": tw * q_pix, "Q_PIX": q_pix, "Q_num_warps": warps,
            "K_BLOCK_H": bh, "K_BLOCK_W": tw * k_pix, "K_PIX": k_pix, "K_num_warps": warps}


def search_space() -> list[dict]:
    """Group tiles, warps and each kernel's pixels per group (1, 2 or 4)."""
    return [_config(bh, tw, nw, qp, kp) for bh in _SIZES for tw in _SIZES for nw in _WARPS
            for qp in _PIXES for kp in _PIXES if 4 <= bh * tw * max(qp, kp) <= 128]


def _slots_per_thread(q_shape, bh: int, bw: int, warps: int, pix: int = 1) -> float:
    """(pixel group, head lane) slots per thread."""
    return bh * bw // pix * next_pow2(q_shape[3]) * _lanes(q_shape) / (32 * warps)


PRUNE_LIMIT = 8  # configs kept per shape: the default and an even spread of the rest


def prune(configs: list[dict], q_shape, args: AttendArgs) -> list[dict]:
    """Tiles no larger than the image, 1 or 2 (pixel group, head lane) slots per thread,
    PIX > 1 only with column dilation 1; the default and an even spread of the rest, at
    most PRUNE_LIMIT (each is a compile on the GPU, and a slow interpreter run in tests)."""
    B, H, W, heads, d = q_shape
    kept = []
    for cfg in configs:
        ok = True
        for pre in ("Q_", "K_"):
            bh, bw, nw = cfg[pre + "BLOCK_H"], cfg[pre + "BLOCK_W"], cfg[pre + "num_warps"]
            pix = cfg[pre + "PIX"]
            if (bh > max(1, next_pow2(H)) or bw > max(2, next_pow2(W))
                    or (pix > 1 and args.dw != 1)
                    or not 1 <= _slots_per_thread(q_shape, bh, bw, nw, pix) <= 2):
                ok = False
        if ok:
            kept.append(cfg)
    default = default_config(q_shape, args)
    rest = [c for c in kept if c != default]
    step = max(1, len(rest) / (PRUNE_LIMIT - 1))
    spread = [rest[int(i * step)] for i in range(min(PRUNE_LIMIT - 1, len(rest)))]
    return [default] + spread


@per_call_key
def default_config(q_shape, args: AttendArgs) -> dict:
    """Two horizontally adjacent query pixels per thread (PIX = 2: they share KW + 1 of
    their 2 KW window columns' loads; 1 with column dilation or on one-column images),
    tiles of 4 groups per row (fewer on narrow images) and about 128 (pixel group, head
    lane) slots, one per thread over 4 warps (fewer warps on tiny images), then reshaped
    (`_fitted_tile`) to pad the image least. The key kernel runs the same group tile with
    `_key_pix` pixels per group. Two slots per thread issue fewer instructions but spill
    (s1: 254 registers)."""
    B, H, W, heads, d = q_shape
    pix = 2 if args.dw == 1 and W > 1 else 1
    tw = 4 if W > 4 else max(1, min(4, next_pow2(W)) // pix)
    per_group = next_pow2(heads) * _lanes(q_shape)
    bh = max(1, min(16, 128 // (per_group * tw), next_pow2(H)))
    while bh * tw * pix < 4:
        bh *= 2
    warps = 4
    while warps > 1 and _slots_per_thread(q_shape, bh, tw, warps) < 1:
        warps //= 2
    quads = pix == 2 and _lanes(q_shape) <= 2 and W >= 4 * tw
    q_pix, k_pix = 4 if quads and args.kw <= 3 else pix, _key_pix(q_shape, args, pix, quads)
    bh, tw, warps = _fitted_tile(H, W, bh, tw, warps, (q_pix, k_pix))
    return _config(bh, tw, warps, q_pix, k_pix)


def _fitted_tile(H: int, W: int, bh: int, tw: int, warps: int, pixes) -> tuple:
    """(BLOCK_H, groups per tile row, warps): of the group tiles with as many (group, head
    lane) slots per thread as (bh, tw, warps), with the same or half the warps, the one
    whose tiles (tw * pix pixels wide, for each kernel's pix) cover the image with the
    fewest padded pixels (s1's key quads: 8 x 8 tiles fit 56 columns where 4 x 16 padded
    them to 64); ties keep the warps, then the tile."""
    def padded(b: int, t: int) -> int:
        return sum(-(-H // b) * b * -(-W // (t * p)) * t * p for p in pixes)

    best = (padded(bh, tw), 0, 0, bh, tw, warps)
    for w in (warps, warps // 2):
        groups = bh * tw * w // warps
        if w < 1 or groups * warps != bh * tw * w:
            continue
        for b in _SIZES:
            t = groups // b
            if (t < 1 or b * t != groups or b > max(1, next_pow2(H))
                    or t * max(pixes) > max(2, next_pow2(W)) or b * t * min(pixes) < 4):
                continue
            best = min(best, (padded(b, t), w != warps, (b, t) != (bh, tw), b, t, w))
    return best[3:]


def _key_pix(q_shape, args: AttendArgs, pix: int, quads: bool) -> int:
    """Key pixels per group: quads (KW + 3 query columns per 4 pixels) where a head lies
    in one lane (16-bit d <= 8), or in two with kw <= 3, on images at least a tile of
    quads wide; else pairs where a head spans two lanes, single pixels where more (more
    pixels take 255 registers and spill there: PREDICTED in docs/tile2d_bwd.md)."""
    lanes = _lanes(q_shape)
    if pix == 1 or lanes > 2:
        return 1
    if quads and (lanes == 1 or args.kw <= 3):
        return 4
    return 2


def _check(config, dw: int) -> None:
    if not isinstance(config, dict) or any(k not in config for k in KEYS):
        raise ValueError(f"tile2dbwd config must be a dict with keys {list(KEYS)}, "
                         f"got {config!r}")
    for pre in ("Q_", "K_"):
        bh, bw, pix = config[pre + "BLOCK_H"], config[pre + "BLOCK_W"], config[pre + "PIX"]
        if bh < 1 or bw < 1 or bh & (bh - 1) or bw & (bw - 1):
            raise ValueError(f"tile2dbwd config {config!r}: {pre}BLOCK_H and {pre}BLOCK_W "
                             "must be powers of two")
        if pix not in _PIXES or bw % pix or (pix > 1 and dw != 1):
            raise ValueError(f"tile2dbwd config {config!r}: {pre}PIX must be one of {_PIXES} "
                             f"dividing {pre}BLOCK_W, and 1 with column dilation")


def _image_strides_fit_i32(q_shape, strides, args: AttendArgs) -> bool:
    """Offsets inside one image, the window's reach past its border included, stay below
    2**31 for every (B, H, W, heads, d) tensor of `strides` and the (lse2, delta) buffer:
    kernels then keep them int32."""
    _, H, W, heads, d = q_shape
    aux = (W * heads * 2, heads * 2, 2, 1)
    for st in (*(s[1:] for s in strides), aux):
        s_h, s_w, s_n, s_d = (abs(s) for s in st)
        reach = ((H + args.kh * args.dh) * s_h + (W + args.kw * args.dw) * s_w
                 + heads * s_n + d * s_d)
        if reach >= 2**31:
            return False
    return True


class _Plan(NamedTuple):
    query: LaunchPlan  # the query kernel (NO_LAUNCH: an empty call)
    reduce: Optional[LaunchPlan]  # the table reduction (None without tables)
    key: LaunchPlan  # the key kernel
    sizes: list  # float32 elements of aux, part_h, part_w, part_b in the one buffer
    # (each rounded up to 16 bytes)


def _plan(q_shape, dtype, strides, args: AttendArgs, config: Optional[dict],
          align: int) -> _Plan:
    """The three launches of one call key (q, k, v, out, dout and lse strides; `align`:
    common.pointer_alignment of q, k, v, out, dout, dq, dk and dv); raises for an
    unsupported call or a bad config."""
    B, H, W, heads, d = q_shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    if not supports(q_shape, dtype, args):
        raise ValueError(f"tile2dbwd backward does not support q of shape {q_shape} "
                         f"and dtype {dtype} with padding {padding!r}")
    config = default_config(q_shape, args) if config is None else config
    _check(config, dw)
    if B * H * W * heads * d == 0:
        return _Plan(NO_LAUNCH, None, NO_LAUNCH, [0])
    has_rel, has_rpb = rel_h is not None, rpb is not None
    block_n, block_d = next_pow2(heads), next_pow2(d)
    grad_strides = contiguous_strides(q_shape)  # dq, dk, dv
    sq, sk, sv, so, sdo, sl = strides
    i64 = not _image_strides_fit_i32(q_shape, (sq, sk, sv, so, sdo) + (grad_strides,) * 3,
                                     args)
    d_half = d // 2
    vec = min(align, stride_vector_width([(d, st) for st in (sq, sk, sv, so, sdo)]
                                         + [(d, grad_strides)] * 3, block_d))
    # a head's channels in one thread (one vector of at most 16 bytes): chained dots
    chain = vec == block_d and block_d * dtype.itemsize <= 16
    common = dict(D=d, D_HALF=d_half, KH=kh, KW=kw, HAS_REL=has_rel, HAS_RPB=has_rpb,
                  BLOCK_N=block_n, BLOCK_D=block_d, IMG_I64=i64, VEC=vec, CHAIN=chain)
    qk_scale = scale * LOG2E.value

    kv_same = sk == sv  # the key kernel reads k's strides for v's (None)
    dil = (dh, dw)
    # 1. query kernel (dq's strides derived in-kernel: the launcher's contiguous output)
    qbh, qbw = config["Q_BLOCK_H"], config["Q_BLOCK_W"]
    q_tiles_w = triton.cdiv(W, qbw)
    q_tiles = triton.cdiv(H, qbh) * q_tiles_w
    n_prog = B * q_tiles
    n_slots = n_prog * heads
    query = launch_plan(
        _QUERY_PARAMS,
        grid=(n_prog,),
        head=((H, W, heads, q_tiles_w, q_tiles, n_slots), sq, sk, sv, so, sdo, sl),
        tail=(dil, qk_scale, scale),
        flags=dict(
            MASK=padding == "mask", K_COL=dw * sk[2], V_COL=dw * sv[2],
            BLOCK_H=qbh, TW=qbw // config["Q_PIX"], PIX=config["Q_PIX"],
            num_warps=config["Q_num_warps"], num_stages=1, **common,
        ),
    )
    # 2. table reduction (rows_bwd_query's, same partial layout)
    reduce = rows_bwd_query.reduce_plan(args, heads, d, n_prog, kh, kw)  # no shift mode here
    # 3. key kernel (dk's and dv's strides derived in-kernel)
    kbh, kbw = config["K_BLOCK_H"], config["K_BLOCK_W"]
    k_tiles_w = triton.cdiv(W, kbw)
    k_tiles = triton.cdiv(H, kbh) * k_tiles_w
    key = launch_plan(
        _KEY_PARAMS,
        grid=(B * k_tiles,),
        head=((H, W, heads, k_tiles_w, k_tiles), sq, sk, None if kv_same else sv, sdo),
        tail=(dil, qk_scale, scale),
        flags=dict(
            Q_COL=dw * sq[2], DO_COL=dw * sdo[2], AUX_COL=dw * heads * 2,
            BLOCK_H=kbh, TW=kbw // config["K_PIX"], PIX=config["K_PIX"],
            num_warps=config["K_num_warps"], num_stages=1, KV_SAME=kv_same, **common,
        ),
    )
    sizes = [B * H * W * heads * 2]
    if has_rel:
        sizes += [kh * n_slots * d_half, kw * n_slots * (d - d_half)]
    if has_rpb:
        sizes.append(kh * n_slots * kw)
    # each part starts 16 bytes aligned, as a separate allocation would (Triton
    # specializes pointers on it)
    return _Plan(query, reduce, key, [-(-n // 4) * 4 for n in sizes])


_plans = plan_cache(_plan)
# read at import: a recorder may stand in for the kernels later
_QUERY_PARAMS = tile2d_bwd_query._tile2d_bwd_query_kernel.arg_names
_KEY_PARAMS = tile2d_bwd_key._tile2d_bwd_key_kernel.arg_names


def backward(q, k, v, out, lse, dout, args: AttendArgs, config: Optional[dict] = None,
             _poison: bool = False):
    """(dq, dk, dv, drel_h, drel_w, drpb); see the module docstring. One plan lookup per
    call covers the three launches; one float32 buffer holds the (lse2, delta) pairs and
    the table partials."""
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb
    dq = new_output_like(q, _poison)
    dk = new_output_like(q, _poison)
    dv = new_output_like(q, _poison)
    strides = (q.stride(), k.stride(), v.stride(), out.stride(), dout.stride(), lse.stride())
    align = pointer_alignment((q, k, v, out, dout, dq, dk, dv))
    plan = _plans((q.shape, q.dtype, strides, args_key(args), config_key(config), align),
                  tuple(q.shape), q.dtype, strides, args, config, align)
    has_rel, has_rpb = rel_h is not None, rpb is not None
    drel_h, drel_w, drpb = new_table_grads(args, _poison)
    if plan.query.grid is None:
        for g in (dq, dk, dv, drel_h, drel_w, drpb):
            if g is not None:
                g.zero_()
        return dq, dk, dv, drel_h, drel_w, drpb
    buffer = new_output((sum(plan.sizes),), torch.float32, q.device, _poison)
    aux, part_h, part_w, part_b = split_partials(buffer, plan.sizes, has_rel, has_rpb)
    if not has_rel:  # absent tables and their partials: None (never read: flags off)
        part_h = part_w = None
    if not has_rpb:
        part_b = None
    s_tab = table_strides(rel_h, rel_w, rpb)
    p = plan.query
    launch_kernel(tile2d_bwd_query._tile2d_bwd_query_kernel, p,
        q, k, v, out, dout, lse, rel_h, rel_w, rpb, dq, aux, part_h, part_w, part_b,
        *p.head, s_tab, *p.tail, **p.options,
    )
    p = plan.reduce
    if p is not None:
        launch_kernel(rows_bwd_query._reduce_tables_kernel, p,
            part_h if has_rel else aux, part_w if has_rel else aux,
            part_b if has_rpb else aux,
            drel_h if has_rel else aux, drel_w if has_rel else aux, drpb if has_rpb else aux,
            *p.head, *p.tail, **p.options,
        )
    p = plan.key
    launch_kernel(tile2d_bwd_key._tile2d_bwd_key_kernel, p,
        q, k, v, dout, aux, rel_h, rel_w, rpb, dk, dv, *p.head, s_tab, *p.tail, **p.options,
    )
    return dq, dk, dv, drel_h, drel_w, drpb
