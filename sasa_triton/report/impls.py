"""The implementations a report compares, each built for one case and direction.

An `Impl` turns a case's inputs into `(forward, leaves)`: forward() computes the output
from leaves (the tensors gradients flow to, for forward + backward). `build` raises
`Unsupported` / `Unavailable` with a reason when the implementation cannot run here;
any other exception is recorded as an error by the runner.

Families: "attention" (attend, its backends, the unfold port, FlexAttention), "conv"
(the cuDNN convolutions the layer replaces) and "layer" (SASA2d vs nn.Conv2d).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Optional

import torch

from ..perf_suite import Shape
from . import baselines, flex


class Unsupported(Exception):
    """This implementation does not run this case on this machine (the message says why)."""


class Unavailable(Exception):
    """This implementation is not installed / does not exist in this checkout."""


@dataclasses.dataclass
class CaseInputs:
    """Random inputs of one case, shared by all implementations (never zeros)."""

    shape: Shape
    device: torch.device
    dtype: torch.dtype
    q: torch.Tensor  # (B, H, W, heads, d) contiguous
    k: torch.Tensor
    v: torch.Tensor
    rel_h: torch.Tensor  # (k, d//2): SASA relative embeddings shared by all heads
    rel_w: torch.Tensor  # (k, d - d//2)
    x: torch.Tensor  # (B, C, H, W) channels_last: the convolutions' and layers' input

    @classmethod
    def make(cls, shape: Shape, dtype, device, seed: int = 0) -> CaseInputs:
        g = torch.Generator(device=device).manual_seed(seed)
        B, H, W, N, D, k = shape.B, shape.H, shape.W, shape.heads, shape.d, shape.k

        def rand(*size, scale=1.0):
            return torch.randn(*size, generator=g, device=device, dtype=dtype) * scale

        q, key, v = rand(B, H, W, N, D), rand(B, H, W, N, D), rand(B, H, W, N, D)
        rel_h, rel_w = rand(k, D // 2, scale=0.5), rand(k, D - D // 2, scale=0.5)
        x = baselines.conv_input(B, shape.C, H, W, dtype, device, generator=g)
        return cls(shape, torch.device(device), dtype, q, key, v, rel_h, rel_w, x)


def _leaves(tensors, grad: bool) -> list[torch.Tensor]:
    """The same storage as new autograd leaves (no copy) when gradients are wanted."""
    return [t.detach().requires_grad_() if grad else t for t in tensors]


Build = Callable[[CaseInputs, bool], tuple]  # (inputs, grad) -> (forward, leaves)


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    family: str  # "attention" | "conv" | "layer"
    build: Build
    desc: str = ""  # what it is, for the CSV and the summary


# --- attention --------------------------------------------------------------------

def _attend_build(backend: str) -> Build:
    def build(inp: CaseInputs, grad: bool):
        import sasa_triton

        leaves = _leaves((inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w), grad)
        q, k, v, rel_h, rel_w = leaves
        kernel = inp.shape.k

        def forward():
            return sasa_triton.attend(q, k, v, kernel, rel_h=rel_h, rel_w=rel_w, backend=backend)

        return forward, leaves

    return build


def _unfold_build(inp: CaseInputs, grad: bool):
    leaves = _leaves((inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w), grad)
    q, k, v, rel_h, rel_w = leaves
    kernel = inp.shape.k
    return (lambda: baselines.unfold_attend(q, k, v, kernel, rel_h=rel_h, rel_w=rel_w)), leaves


def _flex_build(with_rel: bool) -> Build:
    def build(inp: CaseInputs, grad: bool):
        reason = flex.unavailable_reason(inp.device.type)
        if reason is not None:
            raise Unsupported(reason)
        s = inp.shape
        run = flex.make_flex_neighborhood(s.H, s.W, s.heads, s.d, s.k, inp.device, with_rel)
        if with_rel:
            leaves = _leaves((inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w), grad)
        else:
            leaves = _leaves((inp.q, inp.k, inp.v), grad) + [None, None]
        q, k, v, rel_h, rel_w = leaves
        return (lambda: run(q, k, v, rel_h, rel_w)), [t for t in leaves if t is not None]

    return build


# --- convolutions (cuDNN on CUDA) ------------------------------------------------------

def _conv_build(kind: str) -> Build:
    def build(inp: CaseInputs, grad: bool):
        C, k = inp.shape.C, inp.shape.k
        size = 3 if kind == "3x3" else k
        groups = C if kind == "depthwise" else 1
        weight = baselines.conv_weight(C, C // groups, size, inp.dtype, inp.device)
        x, w = _leaves((inp.x, weight), grad)
        return (lambda: torch.nn.functional.conv2d(x, w, padding=size // 2, groups=groups)), [x, w]

    return build


# --- whole layers -------------------------------------------------------------------

def _module_build(make: Callable[[Shape], torch.nn.Module]) -> Build:
    def build(inp: CaseInputs, grad: bool):
        module = make(inp.shape).to(device=inp.device, dtype=inp.dtype,
                                    memory_format=torch.channels_last)
        module.requires_grad_(grad)
        (x,) = _leaves((inp.x,), grad)
        return (lambda: module(x)), [x, *module.parameters()] if grad else [x]

    return build


def _sasa2d(shape: Shape) -> torch.nn.Module:
    try:
        from sasa_triton.nn import SASA2d
    except ImportError as error:  # the nn module is written in parallel
        raise Unavailable(f"sasa_triton.nn.SASA2d cannot be imported ({error})") from error
    return SASA2d(shape.C, shape.C, kernel_size=shape.k, heads=shape.heads)


def _conv2d(shape: Shape) -> torch.nn.Module:
    return torch.nn.Conv2d(shape.C, shape.C, shape.k, padding=shape.k // 2)


# --- the list -----------------------------------------------------------------------

def _is_triton_backend(name: str) -> bool:
    from sasa_triton.variants import VARIANTS

    entry = VARIANTS.get(name)
    return entry is None or entry.needs_triton


def attend_backends(device_type: str) -> list[str]:
    """attend's backends timed here: all of them on CUDA; on CPU those that do not need
    Triton (the report never runs kernels through the slow interpreter)."""
    import sasa_triton

    names = [n for n in sasa_triton.backends(device_type) if n != "auto"]
    if device_type != "cuda":
        names = [n for n in names if not _is_triton_backend(n)]
    return names


DENSE_CONV = "conv_kxk"  # the ratio_to_dense_conv denominator


def default_impls(device_type: str) -> list[Impl]:
    impls = [Impl("attend", "attention", _attend_build("auto"), "attend(..., backend='auto')")]
    impls += [Impl(f"attend:{n}", "attention", _attend_build(n), f"attend(..., backend={n!r})")
              for n in attend_backends(device_type)]
    impls += [
        Impl("unfold", "attention", _unfold_build, "F.pad + unfold SASA port (zeros padding)"),
        Impl("flex_na", "attention", _flex_build(False),
             "FlexAttention, neighborhood block mask (padding='mask' semantics)"),
        Impl("flex_na_rel", "attention", _flex_build(True),
             "FlexAttention, neighborhood block mask + SASA rel logits via score_mod"),
        Impl(DENSE_CONV, "conv", _conv_build("dense"), "F.conv2d k x k, C->C, channels_last"),
        Impl("conv_3x3", "conv", _conv_build("3x3"), "F.conv2d 3x3, C->C, channels_last"),
        Impl("conv_depthwise_kxk", "conv", _conv_build("depthwise"),
             "F.conv2d k x k depthwise, channels_last"),
        Impl("layer:SASA2d", "layer", _module_build(_sasa2d),
             "sasa_triton.nn.SASA2d(C, C, kernel_size=k, heads=heads)"),
        Impl("layer:Conv2d", "layer", _module_build(_conv2d), "nn.Conv2d(C, C, k, padding=k//2)"),
    ]
    return impls


def select(impls: list[Impl], patterns: Optional[str]) -> list[Impl]:
    """Keeps the impls whose name matches one of the comma-separated glob patterns."""
    if not patterns:
        return impls
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [i for i in impls if any(fnmatch.fnmatchcase(i.name, p) for p in wanted)]
    if not chosen:
        raise ValueError(f"--impl {patterns!r} matches none of {[i.name for i in impls]}")
    return chosen
