"""SASA-ResNets as the paper builds them, and their convolutional twins.

ResNet bottleneck blocks (1x1 reduce, spatial layer, 1x1 expand x4), stages of
[1, 2, 4, 1] (26 layers), [2, 3, 5, 2] (38) or [3, 4, 6, 3] (50) blocks at widths
64, 128, 256, 512. In the SASA models every 3x3 spatial convolution is a `SASA2d`
(k = 7, 8 heads, shared relative embeddings); a stride-2 block downsamples with the
layer's 2x2 average pool after the attention. `spatial="conv"` builds the same network
with 3x3 convolutions (torchvision's ResNet v1.5: stride on the 3x3), so that benchmarks
compare the layers and nothing else. Stems: "conv" (7x7 stride-2 conv, BN, ReLU, 3x3
stride-2 max pool) or "attention" (`AttentionStem2d`).

Hybrids (the paper's "where is attention most useful" study): `spatial` and
`kernel_size` also take one value per stage, e.g. spatial=("conv", "conv", "sasa",
"sasa"); `sasa_kwargs` reach every `SASA2d` (the position / logits ablations) and
`stem_kwargs` the attention stem. The named configurations are in `studies.py`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

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
        spatial: "sasa" or "conv", or one of them per stage.
        kernel_size: the `SASA2d` window (the paper: 7), or one per stage; convolutional
            stages always use 3x3.
        heads: of every `SASA2d` (the paper: 8).
        in_channels: image channels.
        widths: stage widths (the bottleneck's inner channels).
        sasa_kwargs: more keyword arguments of every `SASA2d` (e.g. position, logits,
            padding). With position="absolute", each layer's abs_size is its input size
            at `image_size` unless sasa_kwargs gives one.
        stem_kwargs: keyword arguments of `AttentionStem2d` (e.g. spatial_values=False).
        image_size: the training image size (sizes the absolute embeddings only).
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, stem: str = "conv",
                 spatial: Union[str, Sequence[str]] = "sasa",
                 kernel_size: Union[int, Sequence[int]] = 7, heads: int = 8,
                 in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512),
                 sasa_kwargs: Optional[dict] = None, stem_kwargs: Optional[dict] = None,
                 image_size: int = 224) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if len(layers) != len(widths):
            raise ValueError(f"layers ({len(layers)} stages) and widths ({len(widths)}) differ")
        spatials = _per_stage(spatial, len(layers), "spatial")
        kernels = _per_stage(kernel_size, len(layers), "kernel_size")
        for s in spatials:
            if s not in SPATIALS:
                raise ValueError(f"spatial must be one of {SPATIALS} (or one per stage), "
                                 f"got {spatial!r}")
        self.stem_kind = stem
        self.stage_spatials, self.stage_kernels = spatials, kernels
        # one word when all stages agree (the classic networks), else "hybrid"
        self.spatial_kind = spatials[0] if len(set(spatials)) == 1 else "hybrid"
        sasa_kwargs = dict(sasa_kwargs or {})
        stem_width = widths[0]
        if stem == "conv":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = AttentionStem2d(in_channels, stem_width, **(stem_kwargs or {}))

        def make_spatial(kind: str, k: int, size: int) -> Callable[[int, int, int], nn.Module]:
            if kind == "conv":
                return lambda cin, cout, stride: nn.Conv2d(cin, cout, 3, stride=stride,
                                                           padding=1, bias=False)
            extra = dict(sasa_kwargs)
            if extra.get("position") == "absolute":
                extra.setdefault("abs_size", size)
            return lambda cin, cout, stride: SASA2d(cin, cout, kernel_size=k, heads=heads,
                                                    stride=stride, **extra)

        channels, self.stage_names = stem_width, []
        size = -(-image_size // 4)  # after the stem
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(Bottleneck(channels, width, stride,
                                        make_spatial(spatials[i], kernels[i], size)))
                channels = width * Bottleneck.expansion
                size = -(-size // stride)
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

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (C2, C3, C4, C5 for a 4-stage network)."""
        outs = []
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage_outputs(x)[-1]
        return self.fc(torch.flatten(self.pool(x), 1))


def _per_stage(value, stages: int, name: str) -> tuple:
    """One value per stage, from one value or a sequence of `stages` values."""
    if isinstance(value, (str, int)):
        return (value,) * stages
    values = tuple(value)
    if len(values) != stages:
        raise ValueError(f"{name} needs one value per stage ({stages}), got {value!r}")
    return values


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
