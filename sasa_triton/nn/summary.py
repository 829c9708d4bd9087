"""Parameter and FLOP counts of the SASA-ResNets and their convolutional twins.

    python -m sasa_triton.nn.summary [--size 224] [--models sasa_resnet50 conv_resnet50]

How FLOPs are counted: see `sasa_triton.nn.flops`. The paper reports 25.6M params /
8.2 GFLOPs for ResNet-50 and 18.0M / 7.0 GFLOPs for SASA-ResNet-50 (conv stem).
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .flops import summarize
from .resnet import (
    conv_resnet26,
    conv_resnet38,
    conv_resnet50,
    sasa_resnet26,
    sasa_resnet38,
    sasa_resnet50,
)

MODELS: dict[str, Callable[[], nn.Module]] = {
    "conv_resnet26": conv_resnet26,
    "sasa_resnet26": sasa_resnet26,
    "sasa_resnet26_attention_stem": lambda: sasa_resnet26(stem="attention"),
    "conv_resnet38": conv_resnet38,
    "sasa_resnet38": sasa_resnet38,
    "sasa_resnet38_attention_stem": lambda: sasa_resnet38(stem="attention"),
    "conv_resnet50": conv_resnet50,
    "sasa_resnet50": sasa_resnet50,
    "sasa_resnet50_attention_stem": lambda: sasa_resnet50(stem="attention"),
}


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="image size (default 224)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    print(f"input 1x3x{args.size}x{args.size}; GFLOPs per image, 2 per multiply-add, analytic")
    print(f"{'model':<30} {'params':>9} {'GFLOPs':>8} {'conv':>8} {'attn':>8}")
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        rows.append(summarize(MODELS[name](), (1, 3, args.size, args.size), name=name))
    return rows


if __name__ == "__main__":
    main()
