"""Every network of the paper's ImageNet studies, by name (Ramachandran et al. 2019, sec. 4).

    main      SASA-ResNet-26/38/50 (conv or attention stem) and their conv twins
    where     "where is attention most useful": ResNet-50 whose four stages (the paper's
              groups) are each convolutional or attentional, e.g. resnet50_conv12_sasa34
    extent    spatial extent k of every SASA2d (ResNet-26): sasa_resnet26_k3 ... _k11
    position  positional encoding (ResNet-26): none / absolute / relative
    logits    logit terms (ResNet-26): q.k only / q.r only / both
    stem      conv stem vs attention stem with and without spatially-aware values

`build(name)` makes one; `names(study)` lists them; `python -m sasa_triton.nn.summary
--list` prints them all and `--study NAME` counts one study's parameters and FLOPs.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

from torch import nn

from .resnet import LAYERS, ResNet

STAGES = (1, 2, 3, 4)


def _resnet(depth: int, **kwargs) -> Callable[..., ResNet]:
    def make(**overrides) -> ResNet:
        return ResNet(LAYERS[depth], **{**kwargs, **overrides})
    return make


def _groups_name(depth: int, spatials: tuple) -> str:
    conv = "".join(str(i) for i, s in zip(STAGES, spatials) if s == "conv")
    sasa = "".join(str(i) for i, s in zip(STAGES, spatials) if s == "sasa")
    return f"resnet{depth}" + (f"_conv{conv}" if conv else "") + (f"_sasa{sasa}" if sasa else "")


def _main() -> dict:
    models = {}
    for depth in LAYERS:
        models[f"conv_resnet{depth}"] = _resnet(depth, spatial="conv")
        models[f"sasa_resnet{depth}"] = _resnet(depth, spatial="sasa")
        models[f"sasa_resnet{depth}_attention_stem"] = _resnet(depth, spatial="sasa",
                                                               stem="attention")
    return models


def _where() -> dict:
    """All 16 conv/attention choices of ResNet-50's four groups (conv stem); the paper's
    table shows conv-early/attention-late and the reverse, the rest are here too."""
    return {_groups_name(50, spatials): _resnet(50, spatial=spatials)
            for spatials in itertools.product(("conv", "sasa"), repeat=len(STAGES))}


def _extent() -> dict:
    return {f"sasa_resnet26_k{k}": _resnet(26, kernel_size=k) for k in (3, 5, 7, 9, 11)}


def _position() -> dict:
    return {f"sasa_resnet26_position_{p}": _resnet(26, sasa_kwargs={"position": p})
            for p in ("none", "absolute", "relative")}


def _logits() -> dict:
    names = {"content": "qk", "position": "qr", "content+position": "qk_qr"}
    return {f"sasa_resnet26_logits_{short}": _resnet(26, sasa_kwargs={"logits": logits})
            for logits, short in names.items()}


def _stem() -> dict:
    return {
        "sasa_resnet26_conv_stem": _resnet(26),
        "sasa_resnet26_attention_stem": _resnet(26, stem="attention"),
        "sasa_resnet26_attention_stem_plain_values": _resnet(
            26, stem="attention", stem_kwargs={"spatial_values": False}),
    }


STUDIES: dict[str, dict[str, Callable[..., nn.Module]]] = {
    "main": _main(), "where": _where(), "extent": _extent(), "position": _position(),
    "logits": _logits(), "stem": _stem(),
}
MODELS: dict[str, Callable[..., nn.Module]] = {
    name: make for study in STUDIES.values() for name, make in study.items()}


def names(study: Optional[str] = None) -> list[str]:
    """The model names of one study, or of all of them."""
    if study is None:
        return list(MODELS)
    if study not in STUDIES:
        raise ValueError(f"study must be one of {sorted(STUDIES)}, got {study!r}")
    return list(STUDIES[study])


def build(name: str, **overrides) -> nn.Module:
    """The named network; keyword arguments override its `ResNet` arguments (e.g.
    num_classes=10, widths=(8, 16, 32, 64) for a small test twin)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; see sasa_triton.nn.studies.names()")
    return MODELS[name](**overrides)
