"""SASA-ResNets as the paper builds them, and their convolutional twins.

ResNet bottleneck blocks (1x1 reduce, spatial layer, 1x1 expand x4), stages of
[1, 2, 4, 1] (26 layers), [2, 3, 5, 2] (38) or [3, 4, 6, 3] (50) blocks at widths
64, 128, 256, 512. In the SASA models every 3x3 spatial convolution is a `SASA2d`
(k = 7, 8 heads, shared relative embeddings); a stride-2 block downsamples with the
layer's 2x2 average pool after the attention. `spatial="conv"` builds the same network
with 3x3 convolutions (torchvision's ResNet v1.5: stride on the 3x3), so that benchmarks
compare the layers and nothing else. Stems: "conv" (7x7 stride-2 conv, BN, ReLU, 3x3
stride-2 max pool) or "attention" (`AttentionStem2d`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .sasa2d import SASA2d
from .stem import AttentionStem2d

STEMS = ("conv", "attention")
SPATIALS = ("sasa", "conv")
LAYERS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int,
                 spatial: Callable[[int, int, int], nn.Module]) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = spatial(width, width, stride)  # 3x3 conv or SASA2d
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet whose spatial layers are `SASA2d` or 3x3 convolutions.

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3).
        num_classes: classifier outputs.
        stem: "conv" or "attention".
        spatial: "sasa" or "conv".
        kernel_size, heads: of every `SASA2d` (the paper: 7 and 8).
        in_channels: image channels.
        widths: stage widths (the bottleneck's inner channels).
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, stem: str = "conv",
                 spatial: str = "sasa", kernel_size: int = 7, heads: int = 8,
                 in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if spatial not in SPATIALS:
            raise ValueError(f"spatial must be one of {SPATIALS}, got {spatial!r}")
        if len(layers) != len(widths):
            raise ValueError(f"layers ({len(layers)} stages) and widths ({len(widths)}) differ")
        self.stem_kind, self.spatial_kind = stem, spatial
        stem_width = widths[0]
        if stem == "conv":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = AttentionStem2d(in_channels, stem_width)

        if spatial == "sasa":
            def make_spatial(cin: int, cout: int, stride: int) -> nn.Module:
                return SASA2d(cin, cout, kernel_size=kernel_size, heads=heads, stride=stride)
        else:
            def make_spatial(cin: int, cout: int, stride: int) -> nn.Module:
                return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

        channels, self.stage_names = stem_width, []
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(Bottleneck(channels, width, stride, make_spatial))
                channels = width * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))  # torchvision's names
            self.stage_names.append(f"layer{i + 1}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # each residual branch starts as the identity (zero-init of its last BN)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _resnet(depth: int, spatial: str, num_classes: int, stem: str, **kwargs) -> ResNet:
    return ResNet(LAYERS[depth], num_classes=num_classes, stem=stem, spatial=spatial, **kwargs)


def sasa_resnet26(num_classes: int = 1000, stem: str = "conv", **kwargs) -> ResNet:
    """SASA-ResNet-26: stages [1, 2, 4, 1], SASA2d(k=7, heads=8) as the spatial layer."""
    return _resnet(26, "sasa", num_classes, stem, **kwargs)


def sasa_resnet38(num_classes: int = 1000, stem: str = "conv", **kwargs) -> ResNet:
    """SASA-ResNet-38: stages [2, 3, 5, 2], SASA2d(k=7, heads=8) as the spatial layer."""
    return _resnet(38, "sasa", num_classes, stem, **kwargs)


def sasa_resnet50(num_classes: int = 1000, stem: str = "conv", **kwargs) -> ResNet:
    """SASA-ResNet-50: stages [3, 4, 6, 3], SASA2d(k=7, heads=8) as the spatial layer."""
    return _resnet(50, "sasa", num_classes, stem, **kwargs)


def conv_resnet26(num_classes: int = 1000, **kwargs) -> ResNet:
    """The convolutional baseline of SASA-ResNet-26 (3x3 convolutions, conv stem)."""
    return _resnet(26, "conv", num_classes, "conv", **kwargs)


def conv_resnet38(num_classes: int = 1000, **kwargs) -> ResNet:
    """The convolutional baseline of SASA-ResNet-38 (3x3 convolutions, conv stem)."""
    return _resnet(38, "conv", num_classes, "conv", **kwargs)


def conv_resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 (torchvision's v1.5 layout, same code as SASA-ResNet-50)."""
    return _resnet(50, "conv", num_classes, "conv", **kwargs)
