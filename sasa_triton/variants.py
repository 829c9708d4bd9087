"""The one table of implementations of `attend`: a `Variant` record per implementation.

Every layer that needs to know which implementations exist reads this table: `attend`
checks a backend name against it (`check_backend`), `sasa_triton.dispatch` chooses
among its entries, `sasa_triton.ops` runs the chosen entry's `forward` / `backward`,
the tuner benchmarks the entries that have a `search_space`, and the report lists the
backends it times. Nothing here imports Triton or a kernel: a variant's functions are
`Lazy` references that import their module on first call, so `import sasa_triton`
stays cheap.

A variant with a `forward` is a backend: `attend(..., backend=name)` runs it (its
backward is its own `backward`, else the dispatcher's default backward kernel). A
variant with only a `backward` (the "offsets" kernel) serves the backward of "auto" and
of forced forward variants. The functions have the kernel signatures

    forward(q, k, v, args, config=None) -> (out, lse)
    backward(q, k, v, out, lse, dout, args, config=None) -> (dq, dk, dv, drel_h, drel_w, drpb)
    supports(q_shape, dtype, args) -> bool          (shapes and dtypes only)
    default_config(q_shape, args) -> dict | None
    search_space() -> list[dict]                    (None: not tuned, e.g. the reference)
    prune(configs, q_shape, args) -> list[dict]

Adding a kernel variant: write `kernels/<name>_fwd.py` (or `_bwd.py`) with those
module-level functions and add one `kernel_variant(...)` line to `VARIANTS` below.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import Any, Callable, Optional

import torch

from .types import DIRECTIONS, AttendArgs

REFERENCE = "reference"
CPU = "cpu"


class Lazy:
    """A "module:function" reference, imported on first call. The attribute is looked
    up on every call, so replacing the module's function (a test's monkeypatch) shows."""

    def __init__(self, target: str):
        self.target = target
        self._module_name, _, self._function = target.partition(":")
        self._module = None

    def module(self) -> Any:
        """The imported module (imported on the first call)."""
        if self._module is None:
            self._module = importlib.import_module(self._module_name)
        return self._module

    def __call__(self, *args, **kwargs) -> Any:
        return getattr(self.module(), self._function)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Lazy({self.target!r})"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One implementation of `attend` (see the module docstring for the signatures)."""

    name: str
    forward: Optional[Callable]  # None: no forward (a backward-only kernel)
    backward: Optional[Callable]  # None: the dispatcher's default backward runs it
    supports: Callable
    default_config: Callable
    search_space: Optional[Callable]  # None: not tuned
    prune: Callable
    needs_triton: bool  # runs on CUDA, or on CPU under TRITON_INTERPRET=1 only

    def function(self, direction: str) -> Optional[Callable]:
        """forward ("fwd") or backward ("bwd"), None when the variant has none."""
        return self.forward if direction == "fwd" else self.backward

    def load(self) -> None:
        """Imports the variant's modules now (ImportError if one is missing)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Lazy):
                value.module()


def kernel_variant(name: str, module: str, *, forward: bool = False,
                   backward: bool = False) -> Variant:
    """A Triton variant whose functions are the module-level functions of `module`."""
    at = functools.partial(_lazy, module)
    return Variant(name, at("forward") if forward else None,
                   at("backward") if backward else None, at("supports"),
                   at("default_config"), at("search_space"), at("prune"), needs_triton=True)


def _lazy(module: str, function: str) -> Lazy:
    return Lazy(f"{module}:{function}")


def _supports_all(q_shape, dtype, args: AttendArgs) -> bool:
    return True


def _no_config(q_shape, args: AttendArgs) -> None:
    return None


def _keep(configs: list, q_shape, args: AttendArgs) -> list:
    return configs


_KERNELS = "sasa_triton.kernels"

# The table. Order matters: `backends()` lists in this order, and the dispatcher's default
# backward is the first Triton entry whose backward supports the call (the reference is
# its fallback).
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    # plain PyTorch, any device and dtype (float64 included): the oracle and the fallback
    Variant(REFERENCE, Lazy("sasa_triton.reference:reference_forward"),
            Lazy("sasa_triton.reference_bwd:reference_backward"), _supports_all, _no_config,
            None, _keep, needs_triton=False),
    # plain PyTorch, every window tap at once in chunks of rows: the CPU path ("auto" on
    # CPU; sasa_triton/cpu.py), any device and dtype, its own backward; not tuned
    Variant(CPU, Lazy("sasa_triton.cpu:forward"), Lazy("sasa_triton.cpu:backward"),
            _supports_all, _no_config, None, _keep, needs_triton=False),
    # tensor-core row tiles: each k/v row loaded once per tile of query rows
    kernel_variant("rows", f"{_KERNELS}.rows_fwd", forward=True),
    # tensor-core halo tiles, one (batch, head) per program
    kernel_variant("tiled", f"{_KERNELS}.tiled_fwd", forward=True),
    # CUDA cores, a 2-D pixel tile x all heads: d <= 16
    kernel_variant("tile2d", f"{_KERNELS}.tile2d_fwd", forward=True),
    kernel_variant("image", f"{_KERNELS}.image_fwd", forward=True),
    # the backward on tensor cores: a query-owned kernel (dq, delta, table gradients) and a
    # key-owned one (dk, dv), row tiles
    kernel_variant("rowsbwd", f"{_KERNELS}.rows_bwd", backward=True),
    # the backward on CUDA cores in tile2d's style (pixel pairs, d in registers): small d
    kernel_variant("tile2dbwd", f"{_KERNELS}.tile2d_bwd", backward=True),
    kernel_variant("imagebwd", f"{_KERNELS}.image_bwd", backward=True),
    # the backward on CUDA cores, window offsets in a loop: covers what the others do not
    kernel_variant("offsets", f"{_KERNELS}.offsets_bwd", backward=True),
)}


def register(variant: Variant) -> None:
    """Adds (or replaces) an implementation at run time; `attend(..., backend=name)`
    accepts it when it has a forward. Choices "auto" already made stay cached until
    `sasa_triton.dispatch.clear_cache()`."""
    VARIANTS[variant.name] = variant
    _check_cache.clear()


def get(name: str) -> Variant:
    """The variant called `name`; ValueError naming the known ones otherwise."""
    variant = VARIANTS.get(name)
    if variant is None:
        raise ValueError(f"unknown implementation {name!r}; known: {sorted(VARIANTS)}")
    return variant


def with_direction(direction: str, tuned_only: bool = False) -> list[Variant]:
    """The variants that have a forward ("fwd") or backward ("bwd"), in table order;
    with tuned_only, those the tuner benchmarks (a search space)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return [v for v in VARIANTS.values() if v.function(direction) is not None
            and not (tuned_only and v.search_space is None)]


@functools.cache
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
    return ["auto"] + [v.name for v in VARIANTS.values() if v.forward is not None
                       and (not v.needs_triton or triton_usable(device_type))]


_check_cache: dict = {}


def check_backend(name, q: torch.Tensor) -> None:
    """Raises if `name` is not a backend or cannot run on q's device and dtype (before
    anything is launched; shapes only, so the op's fake impl runs it while tracing)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        return
    variant = VARIANTS.get(name)
    if variant is None or variant.forward is None:
        names = ["auto", *(v.name for v in VARIANTS.values() if v.forward is not None)]
        raise ValueError(f"backend must be one of {names}, got {name!r}")
    if variant.needs_triton:
        if not triton_usable(q.device.type):
            raise ValueError(
                f"backend={name!r} is a Triton kernel: it needs CUDA tensors (or "
                f"TRITON_INTERPRET=1 for CPU tensors) and Triton installed; q is on {q.device}"
            )
        if q.dtype == torch.float64:
            raise TypeError(f"backend={name!r} supports float16, bfloat16 and float32, not float64")


def check_supported(name: str, q: torch.Tensor, args: AttendArgs) -> None:
    """A forced backend (checked by `check_backend`) that does not support this call
    raises before any launch. Cached per call key."""
    if name == "auto":
        return
    key = (name, *call_key(q, args))
    if key not in _check_cache:
        if not VARIANTS[name].supports(tuple(q.shape), q.dtype, args):
            raise ValueError(f"backend={name!r} does not support q of shape {tuple(q.shape)} "
                             f"and dtype {q.dtype} with these arguments; use backend='auto'")
        _check_cache[key] = True


def call_key(q: torch.Tensor, args: AttendArgs) -> tuple:
    """Everything about a call that a kernel choice may depend on (no tensor data)."""
    rel = None if args.rel_h is None else args.rel_h.dim()
    return (q.device, tuple(q.shape), q.dtype, args.kh, args.kw, args.dh, args.dw,
            args.padding, rel, args.rpb is not None)
