"""Pieces shared by the kernel families: window geometry in-kernel, constants, host helpers.

Geometry follows SPEC.md (and sasa_triton/window.py) along one axis: pixel i's window
starts at `start` and its taps sit at `start + t * dil`, t in [0, K). `window_start`
also returns `(start - i) // dil`, from which the rel-table and rpb indices of tap t
follow without any negative division:

* rpb index            = off + t + K - 1                      (every padding mode)
* rel table index      = t (zeros/mask) or off + t + K - 1    (shift)

Triton's integer `//` and `%` truncate toward zero, so every division here has a
non-negative dividend.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from sasa_triton.types import PADDINGS

# The kernels' PADDING constexpr: 0 zeros, 1 mask, 2 shift.
PADDING_CODES = {name: code for code, name in enumerate(PADDINGS)}
# log2(e): the kernels work in base 2 (exp2), logits scaled by scale * LOG2E. A constexpr,
# so kernels may read it; host code multiplies by LOG2E.value.
LOG2E = tl.constexpr(1.4426950408889634)

# Debug flag: fill kernel outputs with NaN before the launch so an unwritten element shows.
POISON_OUTPUTS = os.environ.get("SASA_TRITON_POISON") == "1"
# Kernels run through Triton's interpreter (read when triton.jit decorates them).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def window_start(i, size, K: tl.constexpr, dil, SHIFT: tl.constexpr):
    """(start position, (start - i) // dil) of the window of pixel(s) i along one axis."""
    if SHIFT:
        g = i % dil  # dilation group; its members are g, g + dil, ... < size
        member = i // dil
        count = (size - g + dil - 1) // dil
        first = tl.minimum(tl.maximum(member - K // 2, 0), count - K)
        return g + first * dil, first - member
    else:
        return i - (K // 2) * dil, i * 0 - K // 2


@triton.jit
def unravel_program(pid, HEADS, N_COL, N_ROW):
    """(head, column block, row block, rest) of a program id laid out head fastest, then
    column blocks, then row blocks (rest: the batch, or what a kernel splits further):
    the programs of a tile's heads run side by side and share its cache sectors."""
    n = pid % HEADS
    t = pid // HEADS
    col = t % N_COL
    t = t // N_COL
    return n, col, t % N_ROW, t // N_ROW


@triton.jit
def to_f32(x):
    """float32 of a loaded tile; bf16 by moving its bits into the high half: one integer
    op per value (a shift, or a mask for the upper value of a packed pair)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def head_block(d: int, minimum: int = 16) -> int:
    """The padded head dim a kernel holds: a power of two >= max(d, minimum)."""
    return max(minimum, next_pow2(d))


@functools.lru_cache(maxsize=4096)
def halo_span(size: int, k: int, dil: int, padding: str, tile: int) -> int:
    """Largest number of consecutive positions covering the windows of `tile` adjacent
    pixels (any tile start) along an axis: the halo width a tile of queries reads."""
    if padding != "shift":
        return tile + (k - 1) * dil
    from sasa_triton.window import window_positions  # the Python geometry (torch only)

    starts = window_positions(size, k, dil, padding)[0][:, 0].tolist()
    span = 0
    for t0 in range(0, size, tile):  # tiles start at multiples of the tile width
        block = starts[t0:t0 + tile]
        span = max(span, max(block) - min(block) + (k - 1) * dil + 1)
    return span


def bias_strides(t, heads_dim: bool = True) -> tuple[int, int, int]:
    """(head, row, col) strides of a rel table (2-D shared -> head stride 0) or rpb."""
    if t is None:
        return 0, 0, 0
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def table_strides(rel_h, rel_w, rpb) -> tuple[int, ...]:
    """`bias_strides` of rel_h, rel_w and rpb, in one 9-tuple (one call per launch; written
    out, one stride() per table: a third of the host time of a loop over the three)."""
    if rel_h is None:
        sh = (0, 0, 0)
    else:
        sh = rel_h.stride()
        if len(sh) == 2:
            sh = (0, *sh)
    if rel_w is None:
        sw = (0, 0, 0)
    else:
        sw = rel_w.stride()
        if len(sw) == 2:
            sw = (0, *sw)
    return (*sh, *sw, *((0, 0, 0) if rpb is None else rpb.stride()))


def row_offsets_fit_i32(tensors, cols: int, d: int, heads: int = 1) -> bool:
    """Whether offsets inside one (batch, row) slice -- `cols` pixels (halo columns
    included, which may lie left of the image), `heads` heads and `d` channels -- stay
    below 2**31 for every (B, H, W, heads, d) tensor, so a kernel may keep them int32."""
    return strides_fit_i32([t.stride() for t in tensors], cols, d, heads)


def strides_fit_i32(strides, cols: int, d: int, heads: int = 1) -> bool:
    """`row_offsets_fit_i32` from the tensors' strides (launch plans cache it by them)."""
    for stride in strides:
        s_w, s_n, s_d = (abs(x) for x in stride[2:5])
        if cols * s_w + heads * s_n + d * s_d >= 2**31:
            return False
    return True


def vector_width(tensors, block_d: int) -> int:
    """The largest power of two <= block_d dividing every base address (in elements) and
    every batch, row, column and head stride of the (B, H, W, heads, d) `tensors`, when d
    is contiguous in all of them (else 1): a kernel may then load that many channels of a
    head as one vector (tl.multiple_of hints on the pixel and head offsets)."""
    vec = stride_vector_width([(t.shape[4], t.stride()) for t in tensors], block_d)
    return min(vec, pointer_alignment(tensors))


def stride_vector_width(layouts, block_d: int) -> int:
    """`vector_width`'s stride part, from (d, strides) of each tensor (launch plans cache
    it): the largest power of two <= block_d dividing the first four strides."""
    if any(d > 1 and stride[4] != 1 for d, stride in layouts):
        return 1
    vec = block_d
    for _, stride in layouts:
        for n in stride[:4]:
            while vec > 1 and n % vec:
                vec //= 2
    return vec


def pointer_alignment(tensors, cap: int = 256) -> int:
    """The largest power of two (at most `cap`) dividing every tensor's base address in
    elements: `vector_width`'s per-call part (launch plans key on it)."""
    offsets = 0
    for t in tensors:
        offsets |= t.data_ptr() // t.element_size()
    return min(offsets & -offsets, cap) if offsets else cap


_IDENTITY: dict = {}


def identity_table(device, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The [n, n] identity in `dtype` on `device`, made once per (device, n, dtype): the
    row one-hots the rows kernels select with a tensor-core dot. Built on the host and
    copied on first use (a CUDA graph is captured after a warm-up call, as usual), so a
    call never launches a kernel to make it."""
    key = (device, n, dtype)
    table = _IDENTITY.get(key)
    if table is None:  # numpy, not torch.eye: no torch op to record or trace
        eye = np.eye(n, dtype=bool)
        if dtype == torch.bfloat16:  # 1.0 is 0x3f80; numpy has no bfloat16: view the bits
            host = torch.from_numpy(eye.astype(np.int16) * 0x3F80).view(torch.bfloat16)
        else:
            host = torch.from_numpy(eye.astype(_NUMPY_DTYPES[dtype]))
        table = _IDENTITY[key] = host.to(device)
    return table


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def new_output(shape, dtype, device, poison: bool = False) -> torch.Tensor:
    """An uninitialised contiguous tensor for a kernel to write; NaN-filled when poisoned
    (the argument or SASA_TRITON_POISON=1) so that a test sees any element the kernel
    failed to write."""
    if poison or POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if len(shape) == 1:  # empty_strided: a third less host time than empty(shape, ...)
        return torch.empty_strided(shape, (1,), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(t: torch.Tensor, poison: bool = False) -> torch.Tensor:
    """`new_output(t.shape, t.dtype, t.device, poison)` in a quarter of the host time."""
    if poison or POISON_OUTPUTS:
        return torch.full_like(t, float("nan"), memory_format=torch.contiguous_format)
    if t.is_contiguous():  # t's own layout then is contiguous: no memory_format keyword to
        return torch.empty_like(t)  # parse (about 0.1 us of the call's 1)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def new_lse(layout: tuple, device, poison: bool = False) -> torch.Tensor:
    """A float32 lse of `layout` ((shape, strides) from a launch plan): `empty_strided`
    from ready tuples costs half what `torch.empty(shape, ...)` does."""
    if poison or POISON_OUTPUTS:
        return new_output(layout[0], torch.float32, device, True)
    return torch.empty_strided(*layout, dtype=torch.float32, device=device)


def new_table_grads(args, poison: bool = False) -> tuple:
    """(drel_h, drel_w, drpb) shaped like the call's tables, None where a table is absent."""
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb  # written out: no generator
    return (None if rel_h is None else new_output_like(rel_h, poison),
            None if rel_w is None else new_output_like(rel_w, poison),
            None if rpb is None else new_output_like(rpb, poison))


def split_partials(buffer: torch.Tensor, sizes, has_rel: bool, has_rpb: bool) -> tuple:
    """(head, part_h, part_w, part_b): a backward's float32 buffer cut by its plan's sizes
    (its own first part, then the rel and rpb partials where the call has those tables);
    a missing part is the whole buffer, which the kernel never reads with its flag off."""
    head = part_h = part_w = part_b = buffer
    if has_rel or has_rpb:  # else the buffer is the first part alone: no split to pay for
        # unsafe_: views autograd does not track (a quarter less host time); the parts are
        # the launchers' own scratch, never seen by autograd
        parts = buffer.unsafe_split_with_sizes(sizes)
        head = parts[0]
        if has_rel:
            part_h, part_w = parts[1], parts[2]
        if has_rpb:
            part_b = parts[-1]
    return head, part_h, part_w, part_b


def tables_or(args, dummy: torch.Tensor) -> tuple:
    """(rel_h, rel_w, rpb) for a launch, `dummy` standing in for an absent table (never
    read: the kernel's HAS_REL / HAS_RPB flag is off)."""
    rel_h, rel_w, rpb = args.rel_h, args.rel_w, args.rpb  # written out: no generator
    return (dummy if rel_h is None else rel_h, dummy if rel_w is None else rel_w,
            dummy if rpb is None else rpb)


def alloc_outputs(q: torch.Tensor, poison: bool = False,
                  lse_layout: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (contiguous, q's dtype) and lse (float32, contiguous: `lse_layout`, its (shape,
    strides) from a launch plan, saves computing them) for a forward launch."""
    if poison or POISON_OUTPUTS:
        return (new_output(q.shape, q.dtype, q.device, True),
                new_output(q.shape[:4], torch.float32, q.device, True))
    if lse_layout is None:
        B, H, W, heads, _ = q.shape
        row = max(W, 1) * max(heads, 1)
        lse_layout = (q.shape[:4], (max(H, 1) * row, row, max(heads, 1), 1))
    # empty_like and empty_strided: half the host time of empty(shape, ...), whose
    # overloads torch tries one by one
    return (new_output_like(q),
            torch.empty_strided(*lse_layout, dtype=torch.float32, device=q.device))


def launch_options(config: dict) -> dict:
    """The launch keywords (num_warps, num_stages) of a config dict."""
    return {k: config[k] for k in ("num_warps", "num_stages") if k in config}


def check_config(config, keys, name: str) -> None:
    """A config must be a dict naming every meta-parameter `keys` of its variant."""
    if not isinstance(config, dict) or any(k not in config for k in keys):
        raise ValueError(f"{name} config must be a dict with keys {list(keys)}, got {config!r}")
