"""The launches `attend` makes for one case, recorded through the real host launchers.

A launcher (a kernel module's `forward` or `backward`, as sasa_triton.dispatch picks it)
runs on CPU tensors with every Triton kernel of its module swapped for a recorder, so
everything it does (configs, grids, arguments, specialisation flags) is what it would do
on a GPU, but nothing is launched. The torch operations it runs besides the kernels (the
backward's partial-sum reductions, for instance) are counted as glue kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import types
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sasa_triton import dispatch, variants
from sasa_triton.types import AttendArgs

from .cases import Shape

DIRECTIONS = {"fwd": 0, "bwd": 1}
AUTO = "auto"


@dataclasses.dataclass
class Launch:
    kernel: str  # kernel function name
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def arguments(self) -> dict:
        """Every launch argument by parameter name (runtime and constexpr)."""
        named = dict(zip(self.fn.arg_names, self.args))
        named.update(self.kwargs)
        return named


@dataclasses.dataclass
class Recorded:
    impl: str  # the implementation that ran ("tiled", "offsets", ...)
    config: Optional[dict]
    launches: list[Launch]
    glue_ops: list[str]  # torch kernels the launcher runs besides the Triton launches


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            g = tuple(g) + (1,) * (3 - len(tuple(g)))
            self.launches.append(Launch(self.fn.__name__, self.fn, args, kwargs, g))
        return launch

    def run(self, *args, grid, warmup=False, **kwargs):
        """`kernel.run(*args, grid=grid, warmup=False)`, what `kernel[grid](...)` calls:
        a launcher may call it directly (docs/host.md, "Launching without `[grid]`")."""
        if not warmup:
            self[grid](*args, **kwargs)


@contextlib.contextmanager
def _recording(module, launches: list):
    """Every JITFunction attribute of `module`, and of the kernel modules it imports (a
    launcher composed of other launchers, e.g. rows_bwd), replaced by a recorder."""
    from triton.runtime.jit import JITFunction

    modules = [module] + [m for m in vars(module).values() if isinstance(m, types.ModuleType)
                          and m.__name__.startswith(module.__name__.rpartition(".")[0] + ".")]
    originals = {(m, n): obj for m in modules for n, obj in vars(m).items()
                 if isinstance(obj, JITFunction)}
    try:
        for (m, name), fn in originals.items():
            setattr(m, name, _Recorder(fn, launches))
        yield
    finally:
        for (m, name), fn in originals.items():
            setattr(m, name, fn)


_NO_KERNEL = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided",
              "detach", "alias", "slice", "select", "t", "transpose", "permute", "expand",
              "unsqueeze", "squeeze", "lift_fresh", "_to_copy_noop", "split", "split_with_sizes",
              "unsafe_split_with_sizes", "unbind"}


class _GlueCounter(TorchDispatchMode):
    """Names the torch ops that would launch a GPU kernel (not allocations or views)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def case_inputs(shape: Shape, dtype: torch.dtype = torch.bfloat16):
    """q, k, v (B, H, W, heads, d) and the attend arguments of a report case: zeros
    padding, SASA relative embeddings shared by the heads (the report's inputs). The
    values are never read (nothing runs), so they stay uninitialised."""
    B, H, W, N, D, k = shape.B, shape.H, shape.W, shape.heads, shape.d, shape.k
    q, key, v = (torch.empty(B, H, W, N, D, dtype=dtype) for _ in range(3))
    rel_h, rel_w = torch.empty(k, D // 2, dtype=dtype), torch.empty(k, D - D // 2, dtype=dtype)
    args = AttendArgs(k, k, 1, 1, "zeros", rel_h, rel_w, None, D ** -0.5)
    return q, key, v, args


# The coupling to the dispatcher and the implementation table is these functions.

def implementations(direction: str) -> list[str]:
    """The names --impl accepts for a direction: auto (dispatched) and each Triton
    variant of the table with a function in that direction."""
    return [AUTO, *(v.name for v in variants.with_direction(direction) if v.needs_triton)]


def choose(name: str, direction: str, q, args) -> tuple[str, Optional[dict]]:
    """(variant, config) of implementation `name`: the dispatcher's choice for a CUDA call
    without a tuned table (auto), or the variant forced with its default config.
    Raises ValueError when a forced variant does not support the case; auto returns
    "reference" when the dispatcher would run it (no kernel supports the case)."""
    d = DIRECTIONS[direction]
    shape = tuple(q.shape)
    if name == AUTO:
        if d == 0:
            return dispatch.heuristic_forward(shape, q.dtype, args)
        return dispatch.default_backward(q, args)
    variant = variants.get(name)
    if not variant.needs_triton or variant.function(direction) is None:
        raise ValueError(f"{name} is not a Triton kernel with a {direction} launcher")
    if not variant.supports(shape, q.dtype, args):
        raise ValueError(f"{name} does not support this case")
    return name, variant.default_config(shape, args)


def _launcher(variant: str, direction: str):
    """(launcher, its kernel module) of a Triton variant in a direction."""
    function = variants.get(variant).function(direction)
    if isinstance(function, variants.Lazy):
        return function, function.module()
    return function, importlib.import_module(function.__module__)


def record(shape: Shape, direction: str, name: str, dtype=torch.bfloat16) -> Recorded:
    """The launches implementation `name` makes for `shape` in `direction`."""
    q, k, v, args = case_inputs(shape, dtype)
    variant, config = choose(name, direction, q, args)
    if variant == variants.REFERENCE:
        raise ValueError("no kernel supports this case (the dispatcher runs the reference)")
    d = DIRECTIONS[direction]
    launcher, module = _launcher(variant, direction)
    launches: list[Launch] = []
    counter = _GlueCounter()
    with _recording(module, launches), counter:
        if d == 0:
            launcher(q, k, v, args, None if config is None else dict(config))
        else:
            out, dout = torch.empty_like(q), torch.empty_like(q)
            lse = torch.empty(q.shape[:4], dtype=torch.float32)
            launcher(q, k, v, out, lse, dout, args, None if config is None else dict(config))
    return Recorded(variant, config, launches, counter.ops)
