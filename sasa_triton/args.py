"""Argument checking for `attend`: every rule of the contract, once, before any launch.

`check_attend_args` turns the user's arguments into an `AttendArgs` (plain ints, a
float scale, rel tables and rpb as given) or raises a ValueError/TypeError that names
the argument. It runs on every call, so it uses plain Python on shapes and dtypes only.
`check_call` (what `attend` runs) caches the verdict per call key -- the types, shapes,
dtypes and devices of every tensor, the window arguments, the padding and the scale's
type, all that the checks read -- so a repeated call pays for building that key and one
dict lookup (about two thirds of the full checks' host time); an error is never cached.
"""
from __future__ import annotations

from typing import Optional

import torch

from .types import PADDINGS, AttendArgs

__all__ = ["AttendArgs", "PADDINGS", "Checked", "check_attend_args", "check_call", "check_window",
           "check_positive_int"]

# float64 is accepted for testing (gradcheck) and runs on the plain-PyTorch backends only.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The Triton kernels hold a whole head dimension (padded to a power of two) in registers.
MAX_HEAD_DIM = 256


def check_positive_int(value, name: str) -> int:
    """`value` if it is an int >= 1; TypeError/ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check_table(t, name: str, shape_2d: tuple, shape_3d: tuple, q: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape_2d and t.shape != shape_3d:
        raise ValueError(
            f"{name} must have shape {shape_2d} (shared by all heads) or {shape_3d} "
            f"(per head), got {tuple(t.shape)}"
        )
    _check_bias_dtype_device(t, name, q)


def _check_bias_dtype_device(t: torch.Tensor, name: str, q: torch.Tensor) -> None:
    if t.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{name} must have the dtype of q ({q.dtype}) or float32, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def check_window(kernel_size, dilation, padding) -> tuple[int, int, int, int]:
    """(kh, kw, dh, dw) of a valid window; raises naming the bad argument."""
    if (type(kernel_size) is int and type(dilation) is int and type(padding) is str
            and padding in _WINDOW_OK):
        # the common call (plain ints, bool excluded by `type is`): one cached lookup
        window = _WINDOW_OK[padding].get((kernel_size, dilation))
        if window is not None:
            return window
    kh, kw = _pair(kernel_size, "kernel_size")
    for kk in (kh, kw):
        if kk < 1 or kk % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size!r}")
    dh, dw = _pair(dilation, "dilation")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    if not isinstance(padding, str) or padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if type(kernel_size) is int and type(dilation) is int and len(_WINDOW_OK[padding]) < 256:
        _WINDOW_OK[padding][kernel_size, dilation] = (kh, kw, dh, dw)
    return kh, kw, dh, dw


# Windows of int kernel_size and dilation already checked, per padding mode.
_WINDOW_OK: dict[str, dict] = {padding: {} for padding in PADDINGS}


def check_attend_args(
    q, k, v, kernel_size, dilation, padding, rel_h, rel_w, rpb, scale
) -> AttendArgs:
    # the common call passes each test at once; the loops below name what failed
    # (one chained test per group: about a third of the host time of the loops)
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor) and q.dim() == k.dim() == v.dim() == 5):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 5:
                raise ValueError(f"{name} must be 5-D (B, H, W, heads, d), got {t.dim()}-D "
                                 f"shape {tuple(t.shape)}")
    dtype, shape, device = q.dtype, q.shape, q.device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"q has dtype {dtype}; supported: float16, bfloat16, float32 (float64 for testing)"
        )
    if not (k.shape == shape == v.shape and k.dtype == dtype == v.dtype
            and k.device == device == v.device):
        for name, t in (("k", k), ("v", v)):
            if t.shape != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {dtype}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}")
    B, H, W, heads, d = shape
    if d > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim d={d} (last dim of q) is larger than the kernels support (<= {MAX_HEAD_DIM})"
        )

    kh, kw, dh, dw = check_window(kernel_size, dilation, padding)
    if padding == "shift" and (kh * dh > H or kw * dw > W):
        raise ValueError(
            f"padding='shift' needs kernel_size * dilation <= image size: "
            f"({kh}*{dh}, {kw}*{dw}) vs (H, W) = ({H}, {W})"
        )

    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must be given together (both or neither)")
    if rel_h is not None:
        if d < 2:
            raise ValueError(f"rel_h/rel_w need a head dim d >= 2, got d={d}")
        rows = 2 * kh - 1 if padding == "shift" else kh
        cols = 2 * kw - 1 if padding == "shift" else kw
        dh2 = d // 2
        _check_table(rel_h, "rel_h", (rows, dh2), (heads, rows, dh2), q)
        _check_table(rel_w, "rel_w", (cols, d - dh2), (heads, cols, d - dh2), q)

    if rpb is not None:
        if not isinstance(rpb, torch.Tensor):
            raise TypeError(f"rpb must be a torch.Tensor, got {type(rpb).__name__}")
        want = (heads, 2 * kh - 1, 2 * kw - 1)
        if rpb.shape != want:
            raise ValueError(f"rpb must have shape {want}, got {tuple(rpb.shape)}")
        _check_bias_dtype_device(rpb, "rpb", q)

    if scale is None:
        scale = d ** -0.5 if d > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return AttendArgs(kh, kw, dh, dw, padding, rel_h, rel_w, rpb, float(scale))


class Checked:
    """The verdict of `check_call` for one call key: the window (kh, kw, dh, dw, padding)
    and the default scale, and `memo`, where later layers keep what follows from the same
    key (sasa_triton.ops: the dispatch result). Hashed by identity: a dict keyed by it costs
    no re-hash of the call key."""

    __slots__ = ("window", "default_scale", "empty", "plain", "memo")

    def __init__(self, args: AttendArgs, empty: bool):
        self.window = tuple(args[:5])
        self.default_scale = args.scale  # d ** -0.5: the call's scale was None
        self.empty = empty  # q has no elements
        self.plain: Optional[bool] = None  # sasa_triton.ops: the tensors' types and device
        self.memo: dict = {}


_VERDICTS: dict = {}
MAX_VERDICTS = 4096  # a full cache is emptied, not evicted entry by entry
_NOT_A_KEY: list = []  # unhashable: a window that is not plain ints is checked every call


def _window_key(value):
    """An int or a pair of ints as it is (bool is not int here: `type is`), else
    something unhashable, which sends the call through the full check."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    return _NOT_A_KEY


def check_call(q, k, v, kernel_size, dilation, padding, rel_h, rel_w, rpb,
               scale) -> tuple[AttendArgs, Optional[Checked]]:
    """`check_attend_args` with its verdict cached per call key: (args, the key's Checked),
    Checked None when the call has no key (a window given as a list, say, or symbolic
    shapes). The scale's value and the tables come from the call, the rest from the cache."""
    try:
        key = (type(q), type(k), type(v), q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
               q.device, k.device, v.device,
               kernel_size if type(kernel_size) is int else _window_key(kernel_size),
               dilation if type(dilation) is int else _window_key(dilation),
               padding, type(scale),
               None if rel_h is None else (type(rel_h), rel_h.shape, rel_h.dtype, rel_h.device),
               None if rel_w is None else (type(rel_w), rel_w.shape, rel_w.dtype, rel_w.device),
               None if rpb is None else (type(rpb), rpb.shape, rpb.dtype, rpb.device))
        hit = _VERDICTS.get(key)
    except Exception:  # not tensors, unhashable parts, symbolic sizes: the full check says
        key = hit = None
    if hit is None:
        args = check_attend_args(q, k, v, kernel_size, dilation, padding, rel_h, rel_w, rpb,
                                 scale)
        if key is None:
            return args, None
        if scale is not None:  # keep the default scale, whatever this call's scale is
            d = q.shape[4]
            args_default = args._replace(scale=float(d ** -0.5 if d > 0 else 1.0))
        else:
            args_default = args
        if len(_VERDICTS) >= MAX_VERDICTS:
            _VERDICTS.clear()
        hit = _VERDICTS[key] = Checked(args_default, q.numel() == 0)
        return args, hit
    return _new_args((*hit.window, rel_h, rel_w, rpb,
                      hit.default_scale if scale is None else float(scale))), hit


_new_args = AttendArgs._make  # tuple.__new__: a third of the time of AttendArgs(...)


def clear_cache() -> None:
    """Forget every cached verdict (tests)."""
    _VERDICTS.clear()
