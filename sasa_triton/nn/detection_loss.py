"""Anchors, matching and the RetinaNet loss for `detection.RetinaNet` (Lin et al. 2017).

Enough to train the detectors of `detection.py` on CPU in the examples and tests, in
torchvision's conventions (so torchvision's RetinaNet computes the same thing): anchors
of sizes 32..512 (one per level P3..P7) x scales 2^(0, 1/3, 2/3) x aspect ratios
(0.5, 1, 2) = 9 per location, ordered (level, y, x, anchor) like the head's outputs;
IoU >= 0.5 foreground, < 0.4 background, in between ignored (each box also keeps its
best anchor); sigmoid focal loss (alpha 0.25, gamma 2) over the non-ignored anchors and
L1 on (dx, dy, dw, dh) box deltas of the foreground anchors, each divided by the number
of foreground anchors. Boxes are (x1, y1, x2, y2) in pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

SIZES = (32, 64, 128, 256, 512)
SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)


def base_anchors(size: float, scales=SCALES, ratios=RATIOS) -> torch.Tensor:
    """(len(ratios) * len(scales), 4) anchors centred on 0, torchvision's order."""
    rows = []
    for r in ratios:
        for s in scales:
            h, w = size * s * math.sqrt(r), size * s / math.sqrt(r)
            rows.append((-w / 2, -h / 2, w / 2, h / 2))
    return torch.tensor(rows)


def make_anchors(feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                 sizes: Sequence[float] = SIZES, device=None) -> torch.Tensor:
    """(sum_l H_l W_l A, 4) anchors of every level, ordered (level, y, x, anchor)."""
    if len(feature_sizes) != len(sizes):
        raise ValueError(f"{len(feature_sizes)} feature maps but {len(sizes)} anchor sizes")
    out = []
    for (h, w), size in zip(feature_sizes, sizes):
        sy, sx = image_size[0] / h, image_size[1] / w
        ys, xs = torch.meshgrid(torch.arange(h) * sy, torch.arange(w) * sx, indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
        out.append((shifts + base_anchors(size)[None]).reshape(-1, 4))
    return torch.cat(out).to(device)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) intersection over union of xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter)


def match(anchors: torch.Tensor, boxes: torch.Tensor, fg: float = 0.5,
          bg: float = 0.4) -> torch.Tensor:
    """Per anchor: the index of its box, -1 background, -2 ignored."""
    if len(boxes) == 0:
        return torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    iou = box_iou(boxes, anchors)  # (boxes, anchors)
    best, idx = iou.max(0)
    matched = idx.clone()
    matched[best < fg] = -2
    matched[best < bg] = -1
    # low-quality matches: each box keeps the anchors it overlaps most
    top = iou.max(1, keepdim=True).values
    box_i, anchor_i = torch.nonzero((iou == top) & (top > 0), as_tuple=True)
    matched[anchor_i] = idx[anchor_i]
    return matched


def encode(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(dx, dy, dw, dh) of boxes relative to anchors (weights 1, 1, 1, 1)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
    return torch.stack([(bx - ax) / aw, (by - ay) / ah, torch.log(bw / aw),
                        torch.log(bh / ah)], dim=1)


def retinanet_loss(outputs: dict, anchors: torch.Tensor, targets: Sequence[dict],
                   alpha: float = 0.25, gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """{"classification", "bbox_regression"} losses of a batch.

    outputs: the head's {"cls_logits": (B, N, K), "bbox_regression": (B, N, 4)};
    anchors: (N, 4); targets: per image {"boxes": (n, 4) xyxy, "labels": (n,) in [0, K)}.
    """
    logits, deltas = outputs["cls_logits"], outputs["bbox_regression"]
    if logits.shape[1] != len(anchors):
        raise ValueError(f"the head gives {logits.shape[1]} anchors, anchors has {len(anchors)}")
    cls_terms, box_terms, num_fg = [], [], 0
    for b, target in enumerate(targets):
        matched = match(anchors, target["boxes"])
        fg = matched >= 0
        num_fg += int(fg.sum())
        gt = torch.zeros_like(logits[b])
        gt[fg, target["labels"][matched[fg]]] = 1.0
        valid = matched != -2
        cls_terms.append(_sigmoid_focal(logits[b][valid], gt[valid], alpha, gamma).sum())
        wanted = encode(anchors[fg], target["boxes"][matched[fg]])
        box_terms.append(F.l1_loss(deltas[b][fg], wanted.to(deltas.dtype), reduction="sum"))
    norm = max(1, num_fg)
    return {"classification": sum(cls_terms) / norm, "bbox_regression": sum(box_terms) / norm}


def _sigmoid_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float,
                   gamma: float) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma
