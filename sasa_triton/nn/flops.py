"""Parameter and analytic FLOP counts of a model (used by `python -m sasa_triton.nn.summary`).

FLOPs are counted per layer, 2 per multiply-add (the paper's convention: ResNet-50 =
8.2 GFLOPs): convolutions and linear layers from their shapes, the attention of `SASA2d`
and of the stem by their `attention_flops` (window dot products, value sums, the
separable relative term, softmax). Batch norm, ReLU and pooling outside SASA2d are not
counted (the paper and most counters leave them out). One forward pass on the meta
device (shapes only, no arithmetic: a detector at 800 x 800 costs nothing), with hooks,
supplies each layer's input size; torch.utils.flop_counter is not used because it would
count the reference `attend`'s einsums, which depend on the backend.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .sasa2d import SASA2d
from .stem import SpatialMixtureAttention2d


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> dict:
    """FLOPs per image of one forward pass: {"total", "conv", "linear", "attention"}.

    The pass runs on a meta-device copy of `model` (or on `model` itself when it was
    built on the meta device, e.g. under `with torch.device("meta"):`)."""
    if any(p.device.type != "meta" for p in model.parameters()):
        model = copy.deepcopy(model).to("meta")
    counts = {"conv": 0, "linear": 0, "attention": 0}

    def conv_hook(m: nn.Conv2d, inputs, out):
        kh, kw = m.kernel_size
        macs = out.numel() * (m.in_channels // m.groups) * kh * kw
        counts["conv"] += 2 * macs

    def linear_hook(m: nn.Linear, inputs, out):
        counts["linear"] += 2 * out.numel() * m.in_features

    def attention_hook(m, inputs, out):
        x = inputs[0]
        counts["attention"] += x.shape[0] * m.attention_flops(x.shape[2], x.shape[3])

    hooks, stubbed = [], []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, (SASA2d, SpatialMixtureAttention2d)):
            hooks.append(m.register_forward_hook(attention_hook))
            m.forward = _shape_only_forward(m)  # instance attribute, deleted below
            stubbed.append(m)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(*input_size, device="meta"))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
        for m in stubbed:
            del m.forward
    batch = input_size[0]
    counts = {k: v // batch for k, v in counts.items()}
    counts["total"] = sum(counts.values())
    return counts


def _shape_only_forward(m: nn.Module) -> Callable:
    """The attention layer's forward on meta tensors without its arithmetic (the meta
    rendering of the reference attention walks every window tap: seconds per layer).
    The projection still runs, so that the conv hook counts it."""
    stride = getattr(m, "stride", 1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        m.qkv(x)
        B, _, H, W = x.shape
        return x.new_empty(B, m.out_channels, -(-H // stride), -(-W // stride))

    return forward


def summarize(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224),
              name: Optional[str] = None, print_fn: Optional[Callable] = print) -> dict:
    """Parameter count and analytic FLOPs per image of `model` at `input_size`;
    prints one line (unless print_fn is None) and returns the numbers."""
    flops = count_flops(model, input_size)
    row = {"model": name or type(model).__name__, "params": count_parameters(model), **flops}
    if print_fn is not None:
        print_fn(_format_row(row))
    return row


def _format_row(row: dict) -> str:
    return (f"{row['model']:<42} {row['params'] / 1e6:8.2f}M {row['total'] / 1e9:8.2f} "
            f"{row['conv'] / 1e9:8.2f} {row['attention'] / 1e9:8.2f}")


