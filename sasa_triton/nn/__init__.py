"""Modules built on `sasa_triton.attend`: the SASA layer, the attention stem, SASA-ResNets.

    SASA2d                      drop-in for a k x k nn.Conv2d (fused q/k/v projection + attend;
                                ablation knobs position= and logits=)
    AttentionStem2d             the paper's spatially-aware attention stem
    SpatialMixtureAttention2d   its attention layer (values mixed by window position)
    ResNet                      bottleneck ResNet, conv or SASA per stage (hybrids)
    sasa_resnet26/38/50         SASA-ResNets (conv or attention stem)
    conv_resnet26/38/50         the same networks with 3x3 convolutions (baselines)
    studies                     every network of the paper's studies, by name
    detection                   RetinaNet: ResNet-FPN backbone and heads, conv or SASA
    summarize                   parameter and FLOP counts (flops.py; CLI: python -m sasa_triton.nn.summary)
"""
from . import detection, studies
from .detection import ResNetFPN, RetinaNet, RetinaNetHead, resnet_fpn, retinanet
from .flops import count_flops, count_parameters, summarize
from .resnet import (
    Bottleneck,
    ResNet,
    conv_resnet26,
    conv_resnet38,
    conv_resnet50,
    sasa_resnet26,
    sasa_resnet38,
    sasa_resnet50,
)
from .sasa2d import SASA2d, split_qkv
from .stem import AttentionStem2d, SpatialMixtureAttention2d

__all__ = [
    "SASA2d", "split_qkv", "AttentionStem2d", "SpatialMixtureAttention2d",
    "Bottleneck", "ResNet", "sasa_resnet26", "sasa_resnet38", "sasa_resnet50",
    "conv_resnet26", "conv_resnet38", "conv_resnet50",
    "studies", "detection", "ResNetFPN", "RetinaNet", "RetinaNetHead", "resnet_fpn",
    "retinanet", "summarize", "count_flops", "count_parameters",
]
