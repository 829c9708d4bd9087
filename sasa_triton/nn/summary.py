"""Parameter and FLOP counts of the paper's networks: classifiers and RetinaNet detectors.

    python -m sasa_triton.nn.summary [--size 224] [--models NAME ...] [--study NAME]
    python -m sasa_triton.nn.summary --list          # every named network, by study
    python -m sasa_triton.nn.summary --detection     # the three RetinaNets at 640 x 640

How FLOPs are counted: see `sasa_triton.nn.flops` (analytic, per image, 2 per
multiply-add; models are built and run on the meta device, so nothing is computed).
The paper reports 25.6M params / 8.2 GFLOPs for ResNet-50 and 18.0M / 7.0 GFLOPs for
SASA-ResNet-50 (conv stem); for COCO detection, 34% fewer parameters and 39% fewer
FLOPs for the fully attentional RetinaNet than for the convolutional one.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .detection import DETECTOR_DESCRIPTIONS, DETECTORS, build_detector
from .flops import count_flops, count_parameters, summarize
from .studies import MODELS, STUDIES

CLASSIC = ["conv_resnet26", "sasa_resnet26", "sasa_resnet26_attention_stem",
           "conv_resnet38", "sasa_resnet38", "sasa_resnet38_attention_stem",
           "conv_resnet50", "sasa_resnet50", "sasa_resnet50_attention_stem"]
DETECTION_SIZE = 640  # the TPU RetinaNet training size; --size 800 for Detectron's


def _on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    with torch.device("meta"):
        return make()


def detection_rows(size: int = DETECTION_SIZE, num_classes: int = 80, num_anchors: int = 9,
                   names: Sequence[str] = tuple(DETECTORS), **overrides) -> list[dict]:
    """Params and FLOPs per image (size x size) of each detector, split into backbone
    body, FPN and heads, with the reductions against the first."""
    rows = []
    for name in names:
        model = _on_meta(lambda name=name: build_detector(name, num_classes=num_classes,
                                                          num_anchors=num_anchors, **overrides))
        shape = (1, 3, size, size)
        total, features = count_flops(model, shape), count_flops(model.backbone, shape)
        body = count_flops(model.backbone.body, shape)
        rows.append({
            "model": name, "params": count_parameters(model), "flops": total["total"],
            "attention_flops": total["attention"],
            "body_params": count_parameters(model.backbone.body),
            "fpn_params": count_parameters(model.backbone.fpn),
            "head_params": count_parameters(model.head),
            "body_flops": body["total"], "fpn_flops": features["total"] - body["total"],
            "head_flops": total["total"] - features["total"],
        })
    for row in rows:
        row["params_reduction"] = 1 - row["params"] / rows[0]["params"]
        row["flops_reduction"] = 1 - row["flops"] / rows[0]["flops"]
    return rows


def print_detection(rows: list[dict], size: int, num_classes: int, num_anchors: int) -> None:
    print(f"RetinaNet, ResNet-50 FPN (P3-P7, 256 ch), input 1x3x{size}x{size}, "
          f"{num_classes} classes, {num_anchors} anchors; GFLOPs per image, 2 per "
          f"multiply-add, analytic")
    print(f"{'model':<25} {'params':>8} {'GFLOPs':>8} {'-params':>8} {'-FLOPs':>8}   "
          f"{'body/FPN/heads params (M)':<26} body/FPN/heads GFLOPs")
    for r in rows:
        parts_p = "/".join(f"{r[k] / 1e6:.2f}" for k in ("body_params", "fpn_params",
                                                         "head_params"))
        parts_f = "/".join(f"{r[k] / 1e9:.1f}" for k in ("body_flops", "fpn_flops",
                                                         "head_flops"))
        print(f"{r['model']:<25} {r['params'] / 1e6:7.2f}M {r['flops'] / 1e9:8.1f} "
              f"{r['params_reduction']:8.1%} {r['flops_reduction']:8.1%}   {parts_p:<26} "
              f"{parts_f}")
    for name in (r["model"] for r in rows):
        print(f"  {name}: {DETECTOR_DESCRIPTIONS.get(name, '')}")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int,
                        help=f"image size (default 224; {DETECTION_SIZE} with --detection)")
    parser.add_argument("--models", nargs="*", choices=list(MODELS),
                        help="networks to count (default: the SASA-ResNets and twins)")
    parser.add_argument("--study", choices=list(STUDIES), help="count one study's networks")
    parser.add_argument("--list", action="store_true", help="print every named network")
    parser.add_argument("--detection", action="store_true",
                        help="the three RetinaNets: conv, SASA backbone, all SASA")
    parser.add_argument("--classes", type=int, default=80, help="detection classes (80)")
    parser.add_argument("--anchors", type=int, default=9, help="anchors per location (9)")
    args = parser.parse_args(argv)
    if args.list:
        for study, models in STUDIES.items():
            print(f"{study}: {' '.join(models)}")
        print(f"detection (--detection): {' '.join(DETECTORS)}")
        return []
    if args.detection:
        size = args.size or DETECTION_SIZE
        rows = detection_rows(size, args.classes, args.anchors)
        print_detection(rows, size, args.classes, args.anchors)
        return rows
    size = args.size or 224
    names = args.models or (list(STUDIES[args.study]) if args.study else CLASSIC)
    print(f"input 1x3x{size}x{size}; GFLOPs per image, 2 per multiply-add, analytic")
    print(f"{'model':<42} {'params':>9} {'GFLOPs':>8} {'conv':>8} {'attn':>8}")
    return [summarize(_on_meta(MODELS[name]), (1, 3, size, size), name=name)
            for name in names]


if __name__ == "__main__":
    main()
