"""The paper's networks: per-stage hybrids and the named studies, the RetinaNet detectors
(feature extractor, head, anchors and loss, parameter and FLOP counts at 640 x 640), the
summary CLI and the two examples (detector step, hybrid classifier training)."""
from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from sasa_triton.nn import SASA2d, count_parameters
from sasa_triton.nn.detection import (
    DETECTORS,
    RetinaNetHead,
    build_detector,
    resnet_fpn,
)
from sasa_triton.nn.detection_loss import box_iou, encode, make_anchors, match, retinanet_loss
from sasa_triton.nn.resnet import LAYERS, Bottleneck, ResNet
from sasa_triton.nn.studies import STUDIES, build, names

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY = dict(widths=(8, 16, 32, 64), heads=2, kernel_size=3)
TINY_DET = dict(depth=26, widths=(8, 16, 32, 64), out_channels=16, heads=2, kernel_size=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _unzero_residuals(model: nn.Module) -> None:
    """The residual branches start at zero (last BN's weight 0), which blocks the spatial
    layers' gradients on the first step; open them so a test sees those gradients."""
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.ones_(m.bn3.weight)


def _spatial_layers(model: ResNet) -> list[list[nn.Module]]:
    return [[block.conv2 for block in getattr(model, n)] for n in model.stage_names]


# --- hybrids -----------------------------------------------------------------------

def test_per_stage_spatial_and_kernel_size():
    torch.manual_seed(0)
    model = ResNet((1, 1, 2, 1), num_classes=5, spatial=("conv", "sasa", "conv", "sasa"),
                   kernel_size=(3, 5, 7, 3), widths=(8, 16, 32, 64), heads=2)
    kinds = [[type(m).__name__ for m in stage] for stage in _spatial_layers(model)]
    assert kinds == [["Conv2d"], ["SASA2d"], ["Conv2d", "Conv2d"], ["SASA2d"]]
    stages = _spatial_layers(model)
    assert stages[1][0].kernel_size == (5, 5) and stages[3][0].kernel_size == (3, 3)
    assert stages[0][0].kernel_size == (3, 3)  # conv stages stay 3x3
    assert model.spatial_kind == "hybrid" and model.stage_kernels == (3, 5, 7, 3)
    _unzero_residuals(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    for stage in stages:  # gradients reach conv and attention stages alike
        assert stage[0].weight.grad.abs().sum() > 0 if isinstance(stage[0], nn.Conv2d) \
            else stage[0].qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, word", [
    (dict(spatial=("conv", "sasa")), "spatial"),
    (dict(spatial=("conv", "sasa", "attn", "sasa")), "spatial"),
    (dict(kernel_size=(3, 5, 7)), "kernel_size"),
])
def test_bad_per_stage_choices_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ResNet(LAYERS[26], **kwargs)


def test_every_study_name_builds_what_it_says():
    assert set(STUDIES) == {"main", "where", "extent", "position", "logits", "stem"}
    assert len(names("where")) == 16
    for name in names():
        with torch.device("meta"):
            model = build(name)
        spatial = [[type(m).__name__ for m in s] for s in _spatial_layers(model)]
        if name.startswith("resnet50_"):  # resnet50_conv12_sasa34: stages 1-2 conv
            groups = name.split("_")[1:]
            for group in groups:
                kind = "Conv2d" if group.startswith("conv") else "SASA2d"
                for digit in group.removeprefix("conv").removeprefix("sasa"):
                    assert set(spatial[int(digit) - 1]) == {kind}, name
        sasa = [m for m in model.modules() if isinstance(m, SASA2d)]
        if "_k" in name:
            assert {m.kernel_size[0] for m in sasa} == {int(name.rsplit("_k", 1)[1])}
        if "_position_" in name:
            assert {m.position for m in sasa} == {name.rsplit("_", 1)[1]}
        if "_logits_" in name:
            want = {"qk": "content", "qr": "position", "qk_qr": "content+position"}
            assert {m.logits for m in sasa} == {want[name.split("_logits_")[1]]}
        if name.endswith("plain_values"):
            assert model.stem.attention.spatial_values is False
    with pytest.raises(ValueError, match="unknown model"):
        build("resnet50_conv5")


def test_where_study_parameters_match_the_paper():
    # the paper's "where is attention most useful" table (ResNet-50 groups, M params)
    for name, params in [("resnet50_conv1234", 25.6e6), ("resnet50_conv12_sasa34", 18.5e6),
                         ("resnet50_conv123_sasa4", 20.8e6), ("resnet50_conv4_sasa123", 22.7e6),
                         ("resnet50_sasa1234", 18.0e6)]:
        with torch.device("meta"):
            model = build(name)
        assert count_parameters(model) == pytest.approx(params, rel=0.01), name


def test_absolute_embeddings_are_sized_to_each_layer_input():
    torch.manual_seed(0)
    model = build("sasa_resnet26_position_absolute", image_size=64, **TINY)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(
        (m.abs_h.shape[1], m.abs_w.shape[2]) == tuple(a[0].shape[2:])))
        for m in model.modules() if isinstance(m, SASA2d)]
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    for h in hooks:
        h.remove()
    assert seen and all(seen)


def test_summary_lists_and_counts_studies(capsys):
    from sasa_triton.nn import summary
    summary.main(["--list"])
    out = capsys.readouterr().out
    for study in STUDIES:
        assert f"{study}:" in out
    assert "retinanet_sasa" in out and "resnet50_conv12_sasa34" in out
    rows = summary.main(["--study", "extent", "--size", "64"])
    flops = [r["attention"] for r in rows]
    assert flops == sorted(flops) and flops[0] > 0  # larger windows, more attention FLOPs


# --- detection ---------------------------------------------------------------------

@pytest.mark.parametrize("fpn", ["conv", "sasa"])
def test_resnet_fpn_has_torchvision_backbone_interface(fpn):
    torch.manual_seed(0)
    backbone = resnet_fpn(backbone="sasa", fpn=fpn, **TINY_DET)
    assert backbone.out_channels == 16
    feats = backbone(torch.randn(2, 3, 64, 48))
    assert isinstance(feats, OrderedDict) and list(feats) == ["0", "1", "2", "p6", "p7"]
    sizes = [tuple(f.shape) for f in feats.values()]
    assert sizes == [(2, 16, 8, 6), (2, 16, 4, 3), (2, 16, 2, 2), (2, 16, 1, 1), (2, 16, 1, 1)]
    kinds = {type(m).__name__ for m in backbone.fpn.layer_blocks}
    assert kinds == {"SASA2d" if fpn == "sasa" else "Conv2d"}
    sum(f.sum() for f in feats.values()).backward()
    assert backbone.fpn.extra_blocks[1].qkv.weight.grad.abs().sum() > 0 if fpn == "sasa" \
        else backbone.fpn.extra_blocks[1].weight.grad.abs().sum() > 0


def test_head_outputs_line_up_with_the_anchors():
    torch.manual_seed(0)
    head = RetinaNetHead(16, num_anchors=9, num_classes=3, spatial="sasa", heads=2,
                         kernel_size=3)
    feats = [torch.randn(2, 16, s, s) for s in (8, 4, 2, 1, 1)]
    out = head(feats)
    n = 9 * (64 + 16 + 4 + 1 + 1)
    assert out["cls_logits"].shape == (2, n, 3) and out["bbox_regression"].shape == (2, n, 4)
    assert len(make_anchors([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], (64, 64))) == n
    # the prior: every anchor starts near P(object) = 0.01
    assert torch.sigmoid(out["cls_logits"]).mean().item() == pytest.approx(0.01, abs=0.005)
    # anchor n of level 0 is (y, x, a) = divmod: the head's layout is (level, y, x, anchor)
    y = head.classification.predictor(head.classification.tower(feats[0]))
    assert torch.equal(out["cls_logits"][1, (2 * 8 + 5) * 9 + 4], y[1, 4 * 3:5 * 3, 2, 5])


def test_anchor_matching_and_box_coding():
    anchors = torch.tensor([[0., 0., 10., 10.], [5., 5., 15., 15.], [50., 50., 60., 60.]])
    boxes = torch.tensor([[0., 0., 10., 10.], [52., 52., 58., 58.]])
    iou = box_iou(boxes, anchors)
    assert iou[0, 0] == 1 and iou[0, 1] == pytest.approx(25 / 175)
    assert match(anchors, boxes).tolist() == [0, -1, 1]  # box 1 keeps its best anchor
    assert match(anchors, torch.zeros(0, 4)).tolist() == [-1, -1, -1]  # an empty image
    assert torch.allclose(encode(anchors[:1], boxes[:1]), torch.zeros(1, 4))
    deltas = encode(anchors[2:], boxes[1:])
    assert deltas[0, :2].abs().max() < 1e-6 and deltas[0, 2] == pytest.approx(math.log(0.6))


def test_detection_counts_at_640_against_the_paper():
    from sasa_triton.nn.summary import detection_rows
    rows = {r["model"]: r for r in detection_rows(640)}
    conv, backbone, full = (rows[n] for n in DETECTORS)
    # the conv detector is torchvision's retinanet_resnet50_fpn: 34,014,999 parameters
    # with 91 classes; here 80 classes (11 * 9 fewer outputs of the 3x3 class predictor)
    # and BatchNorm's affine parameters, which torchvision's FrozenBatchNorm2d lacks
    with torch.device("meta"):
        bn = sum(p.numel() for m in build_detector("retinanet_conv").modules()
                 if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert conv["params"] - bn == 34_014_999 - 11 * 9 * (256 * 9 + 1)
    assert conv["flops"] == pytest.approx(190e9, rel=0.01) and conv["attention_flops"] == 0
    # the paper: the fully attentional detector has 34% fewer parameters and 39% fewer
    # FLOPs than the convolutional one; the SASA backbone alone saves parameters
    assert backbone["fpn_params"] == conv["fpn_params"]
    assert backbone["head_flops"] == conv["head_flops"]
    assert backbone["body_params"] < 0.7 * conv["body_params"]
    assert 0.30 < full["params_reduction"] < 0.40 and 0.30 < full["flops_reduction"] < 0.45
    assert full["body_flops"] == backbone["body_flops"]
    # one conv FPN output layer at P3 (80 x 80): 2 * 80 * 80 * 256 * 256 * 9 FLOPs
    p3 = 2 * 80 * 80 * 256 * 256 * 9
    assert conv["fpn_flops"] > p3


def test_detection_summary_cli(capsys):
    from sasa_triton.nn import summary
    rows = summary.main(["--detection", "--size", "320"])
    assert [r["model"] for r in rows] == list(DETECTORS)
    out = capsys.readouterr().out
    assert "1x3x320x320" in out and "80 classes" in out and "9 anchors" in out


def test_retinanet_loss_trains_the_box_branch():
    torch.manual_seed(0)
    model = build_detector("retinanet_sasa", num_classes=3, **TINY_DET)
    _unzero_residuals(model)
    out = model(torch.randn(1, 3, 64, 64))
    anchors = make_anchors(out["feature_sizes"], (64, 64))
    targets = [{"boxes": torch.tensor([[8., 8., 40., 40.]]), "labels": torch.tensor([2])}]
    loss = retinanet_loss(out, anchors, targets)
    assert loss["classification"] > 0 and loss["bbox_regression"] > 0
    (loss["classification"] + loss["bbox_regression"]).backward()
    assert model.head.regression.tower[0].qkv.weight.grad.abs().sum() > 0
    assert model.backbone.body.layer4[0].conv2.qkv.weight.grad.abs().sum() > 0


# --- the examples --------------------------------------------------------------------

def _import_example(name: str):
    sys.path.insert(0, EXAMPLES)
    try:
        return __import__(name)
    finally:
        sys.path.remove(EXAMPLES)


@pytest.mark.parametrize("variant", list(DETECTORS))
def test_train_detector_example_takes_a_step(variant):
    example = _import_example("train_detector")
    torch.manual_seed(0)
    before = example.build_detector(variant, num_classes=3, **example.TINY).state_dict()
    model, losses = example.train(variant, size=64, steps=1, tiny=True, print_fn=None)
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.body.layer4") for k in changed)
    assert any(k.startswith("head.regression.tower") for k in changed)


def test_train_hybrid_example_trains_both_kinds_of_stage():
    example = _import_example("train_hybrid")
    torch.manual_seed(0)
    before = build("resnet50_conv12_sasa34", **example.NARROW).state_dict()
    model, losses = example.train(steps=2, batch=4, print_fn=None)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    after = model.state_dict()
    assert not torch.equal(before["layer1.0.conv2.weight"], after["layer1.0.conv2.weight"])
    assert not torch.equal(before["layer4.0.conv2.qkv.weight"],
                           after["layer4.0.conv2.qkv.weight"])
    assert model.stage_spatials == ("conv", "conv", "sasa", "sasa")


def test_report_fpn_case_is_the_detectors_p3_level():
    from sasa_triton import perf_suite as suites
    (case,) = suites.SUITES["fpn"]
    assert case.name in [s.name for s in suites.SUITES["all"]]
    with torch.device("meta"):
        model = build_detector("retinanet_sasa")
    p3 = model.backbone(torch.empty(1, 3, 640, 640, device="meta"))["0"]
    layer = model.backbone.fpn.layer_blocks[0]
    assert (case.C, case.H, case.W) == tuple(p3.shape[1:])
    assert (case.heads, case.k) == (layer.heads, layer.kernel_size[0])


def test_train_detector_example_cli(capsys):
    example = _import_example("train_detector")
    losses = example.main(["--tiny", "--size", "64", "--variants", "retinanet_sasa"])
    assert list(losses) == ["retinanet_sasa"] and math.isfinite(losses["retinanet_sasa"][0])
    assert "retinanet_sasa" in capsys.readouterr().out
