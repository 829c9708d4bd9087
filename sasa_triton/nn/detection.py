"""RetinaNet-style detectors whose backbone, FPN and heads are convolutional or SASA.

The paper's COCO experiment (Ramachandran et al. 2019, sec. 4.2): RetinaNet with a
ResNet-50 FPN backbone; first the backbone's spatial convolutions become attention
(FPN and heads stay convolutional), then also the spatial convolutions of the FPN and
of the detection heads. Here:

    ResNetFPN       body (our `ResNet`, C3-C5) + FPN (P3-P7, 256 channels), the interface
                    of torchvision's BackboneWithFPN: forward -> OrderedDict of feature
                    maps ("0", "1", "2", "p6", "p7"), attribute `out_channels`; so it drops
                    into torchvision's RetinaNet when torchvision is installed.
    FeaturePyramid  lateral 1x1 convs, nearest top-down, one spatial layer per level
                    (3x3 conv or SASA2d), and P6/P7 from P5 with stride 2
                    (torchvision's LastLevelP6P7(256, 256)).
    RetinaNetHead   class and box subnets: 4 x (spatial layer + ReLU) each, then the 3x3
                    conv predictors (these stay convolutions in both variants: they are
                    the classifiers, and A*4 = 36 outputs do not split into 8 heads).
                    Output as torchvision's head: {"cls_logits": (B, sum HWA, K),
                    "bbox_regression": (B, sum HWA, 4)}.
    RetinaNet       backbone + head; `retinanet(...)` builds one, DETECTORS names the three.

Attention layers are `SASA2d(256, 256, kernel_size=7, heads=8)`; a stride-2 one (P6,
P7) pools after the attention, as in the backbone. The anchors and the loss used by the
example are in `detection_loss.py`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import LAYERS, ResNet
from .sasa2d import SASA2d

KINDS = ("conv", "sasa")


def _check_kind(value: str, name: str) -> str:
    if value not in KINDS:
        raise ValueError(f"{name} must be one of {KINDS}, got {value!r}")
    return value


def spatial_layer(kind: str, channels: int, stride: int = 1, kernel_size: int = 7,
                  heads: int = 8) -> nn.Module:
    """The FPN's / head's spatial layer: a 3x3 conv (with bias, as torchvision's) or
    its SASA2d twin."""
    if _check_kind(kind, "kind") == "conv":
        return nn.Conv2d(channels, channels, 3, stride=stride, padding=1)
    return SASA2d(channels, channels, kernel_size=kernel_size, heads=heads, stride=stride)


class FeaturePyramid(nn.Module):
    """FPN over C3..C5 plus `extra_levels` stride-2 levels from the last output.

    forward(list of (B, C_i, H_i, W_i), finest first) -> list of (B, out_channels, ...),
    finest first: P3, P4, P5, P6, P7.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int = 256,
                 spatial: str = "conv", kernel_size: int = 7, heads: int = 8,
                 extra_levels: int = 2) -> None:
        super().__init__()
        self.spatial_kind = _check_kind(spatial, "fpn")
        layer = dict(kind=spatial, channels=out_channels, kernel_size=kernel_size, heads=heads)
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(spatial_layer(**layer) for _ in in_channels_list)
        self.extra_blocks = nn.ModuleList(spatial_layer(stride=2, **layer)
                                          for _ in range(extra_levels))
        for m in (*self.inner_blocks, *self.layer_blocks, *self.extra_blocks):
            if type(m) is nn.Conv2d:  # torchvision's FPN init; SASA2d keeps its own
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.inner_blocks):
            raise ValueError(f"FeaturePyramid expects {len(self.inner_blocks)} feature maps, "
                             f"got {len(features)}")
        inner = self.inner_blocks[-1](features[-1])
        outs = [self.layer_blocks[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.layer_blocks[i](inner))
        last = outs[-1]
        for j, block in enumerate(self.extra_blocks):
            last = block(last if j == 0 else F.relu(last))
            outs.append(last)
        return outs


class ResNetFPN(nn.Module):
    """A `ResNet` body and a `FeaturePyramid` on its stages `returned_stages` (1-based;
    2, 3, 4 = C3, C4, C5), with torchvision's BackboneWithFPN interface."""

    def __init__(self, body: ResNet, returned_stages: Sequence[int] = (2, 3, 4),
                 out_channels: int = 256, fpn: str = "conv", kernel_size: int = 7,
                 heads: int = 8, extra_levels: int = 2) -> None:
        super().__init__()
        body.fc, body.pool = nn.Identity(), nn.Identity()  # no classifier in a backbone
        self.body = body
        self.returned_stages = tuple(returned_stages)
        stage_channels = [body.get_submodule(n)[-1].conv3.out_channels for n in body.stage_names]
        in_list = [stage_channels[i - 1] for i in self.returned_stages]
        self.fpn = FeaturePyramid(in_list, out_channels, fpn, kernel_size, heads, extra_levels)
        self.out_channels = out_channels
        self.names = [str(i) for i in range(len(in_list))] + [
            f"p{len(in_list) + 3 + j}" for j in range(extra_levels)]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        stages = self.body.stage_outputs(x)
        pyramid = self.fpn([stages[i - 1] for i in self.returned_stages])
        return OrderedDict(zip(self.names, pyramid))


class _Subnet(nn.Module):
    def __init__(self, channels: int, outputs: int, spatial: str, kernel_size: int,
                 heads: int, num_convs: int) -> None:
        super().__init__()
        tower = []
        for _ in range(num_convs):
            tower += [spatial_layer(spatial, channels, 1, kernel_size, heads), nn.ReLU()]
        self.tower = nn.Sequential(*tower)
        self.predictor = nn.Conv2d(channels, outputs, 3, padding=1)
        for m in (*self.tower, self.predictor):
            if type(m) is nn.Conv2d:  # torchvision's RetinaNet head init; SASA2d keeps its own
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, per_anchor: int) -> torch.Tensor:
        y = self.predictor(self.tower(x))  # (B, A * per_anchor, H, W)
        B, _, H, W = y.shape
        return y.view(B, -1, per_anchor, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, per_anchor)


class RetinaNetHead(nn.Module):
    """Class and box subnets shared across levels (torchvision's RetinaNetHead layout).

    forward(list of (B, in_channels, H_l, W_l)) -> {"cls_logits": (B, sum_l H_l W_l A, K),
    "bbox_regression": (B, sum_l H_l W_l A, 4)}, anchors ordered (level, y, x, anchor).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 spatial: str = "conv", kernel_size: int = 7, heads: int = 8,
                 num_convs: int = 4, prior_probability: float = 0.01) -> None:
        super().__init__()
        self.spatial_kind = _check_kind(spatial, "head")
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.classification = _Subnet(in_channels, num_anchors * num_classes, spatial,
                                      kernel_size, heads, num_convs)
        self.regression = _Subnet(in_channels, num_anchors * 4, spatial, kernel_size, heads,
                                  num_convs)
        # focal loss prior: every anchor starts at P(object) = prior_probability
        nn.init.constant_(self.classification.predictor.bias,
                          -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "cls_logits": torch.cat([self.classification(f, self.num_classes)
                                     for f in features], dim=1),
            "bbox_regression": torch.cat([self.regression(f, 4) for f in features], dim=1),
        }


class RetinaNet(nn.Module):
    """backbone (a ResNetFPN) + RetinaNetHead; forward(images) -> the head's dict.
    Anchors, matching, the loss and box decoding: see `detection_loss.py`."""

    def __init__(self, backbone: ResNetFPN, head: RetinaNetHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> dict:
        features = list(self.backbone(images).values())
        out = self.head(features)
        out["feature_sizes"] = [tuple(f.shape[-2:]) for f in features]
        return out


def resnet_fpn(backbone: str = "conv", fpn: str = "conv", depth: int = 50,
               out_channels: int = 256, kernel_size: int = 7, heads: int = 8,
               **resnet_kwargs) -> ResNetFPN:
    """ResNet-`depth` (spatial layers `backbone`: "conv" or "sasa") + FPN (`fpn`).
    resnet_kwargs reach `ResNet` (stem, widths, sasa_kwargs, ...)."""
    _check_kind(backbone, "backbone")
    if depth not in LAYERS:
        raise ValueError(f"depth must be one of {sorted(LAYERS)}, got {depth!r}")
    resnet_kwargs.setdefault("kernel_size", kernel_size)
    resnet_kwargs.setdefault("heads", heads)
    body = ResNet(LAYERS[depth], spatial=backbone, **resnet_kwargs)
    return ResNetFPN(body, out_channels=out_channels, fpn=fpn, kernel_size=kernel_size,
                     heads=heads)


def retinanet(backbone: str = "conv", fpn: str = "conv", head: str | None = None,
              num_classes: int = 80, num_anchors: int = 9, depth: int = 50,
              out_channels: int = 256, kernel_size: int = 7, heads: int = 8,
              **resnet_kwargs) -> RetinaNet:
    """A RetinaNet: ResNet-`depth` FPN backbone and heads, each "conv" or "sasa" (the
    heads follow the FPN unless `head` says otherwise). COCO: 80 classes, 9 anchors."""
    features = resnet_fpn(backbone, fpn, depth, out_channels, kernel_size, heads,
                          **resnet_kwargs)
    subnets = RetinaNetHead(out_channels, num_anchors, num_classes, head or fpn,
                            kernel_size, heads)
    return RetinaNet(features, subnets)


# The paper's three detectors, in its order (conv-stem SASA backbone; the paper's table
# also has an attention-stem backbone: pass stem="attention").
DETECTORS: dict[str, dict] = {
    "retinanet_conv": dict(backbone="conv", fpn="conv"),
    "retinanet_sasa_backbone": dict(backbone="sasa", fpn="conv"),
    "retinanet_sasa": dict(backbone="sasa", fpn="sasa"),
}
DETECTOR_DESCRIPTIONS = {
    "retinanet_conv": "conv backbone + conv FPN and heads",
    "retinanet_sasa_backbone": "SASA backbone + conv FPN and heads",
    "retinanet_sasa": "SASA backbone + SASA FPN and heads",
}


def build_detector(name: str, **overrides) -> RetinaNet:
    """One of DETECTORS by name; keyword arguments override `retinanet`'s."""
    if name not in DETECTORS:
        raise ValueError(f"name must be one of {list(DETECTORS)}, got {name!r}")
    return retinanet(**{**DETECTORS[name], **overrides})
