"""Named implementations of `attend` and which of them run on this machine.

A backend is a name `attend(..., backend=name)` accepts, with the "module:function" of
its forward (sasa_triton.ops runs it; nothing is imported here, so `import sasa_triton`
stays cheap: no Triton import, no compilation). Kernel variants are Triton backends:
they run on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import torch


class Backend(NamedTuple):
    target: str  # "module:function"
    triton: bool  # needs Triton (a CUDA device, or the interpreter)


_REGISTRY: dict[str, Backend] = {
    "reference": Backend("sasa_triton.reference:reference_attend", triton=False),
    # forced forward kernel variants (their backward: the default backward kernel)
    "tiled": Backend("sasa_triton.kernels.tiled_fwd:forward", triton=True),
    "allheads": Backend("sasa_triton.kernels.allheads_fwd:forward", triton=True),
    "tile2d": Backend("sasa_triton.kernels.tile2d_fwd:forward", triton=True),
}


def register_backend(name: str, target: str, triton: bool = True) -> None:
    """Adds a backend under `name` (accepted by `attend(..., backend=name)`)."""
    _REGISTRY[name] = Backend(target, triton)


@functools.lru_cache(maxsize=None)
def triton_usable(device_type: str) -> bool:
    """Triton kernels can run on this device type in this process."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def backends(device: torch.device | str | None = None) -> list[str]:
    """Names `attend(..., backend=...)` accepts for tensors on `device` (default: CUDA
    when available, else CPU). "auto" is always first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    names = ["auto"]
    names += [n for n, b in _REGISTRY.items() if not b.triton or triton_usable(device_type)]
    return names


def check_backend(name, q: torch.Tensor) -> None:
    """Raises if `name` is unknown or cannot run on q (before anything is launched)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        return
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {['auto', *_REGISTRY]}, got {name!r}")
    if _REGISTRY[name].triton:
        if not triton_usable(q.device.type):
            raise ValueError(
                f"backend={name!r} is a Triton kernel: it needs CUDA tensors (or "
                f"TRITON_INTERPRET=1 for CPU tensors) and Triton installed; q is on {q.device}"
            )
        if q.dtype == torch.float64:
            raise TypeError(f"backend={name!r} supports float16, bfloat16 and float32, not float64")
