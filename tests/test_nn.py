"""Tests of sasa_triton.nn: SASA2d against the float64 oracle, views without copies, shapes
and strides, gradients, torch.compile, the attention stem against a direct float64
computation, state dicts, model sizes, and the two examples (training, benchmark smoke)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sasa_triton.nn.sasa2d as sasa2d_module
from sasa_triton.nn import (
    AttentionStem2d,
    ResNet,
    SASA2d,
    SpatialMixtureAttention2d,
    conv_resnet50,
    count_flops,
    count_parameters,
    sasa_resnet26,
    sasa_resnet38,
    sasa_resnet50,
    split_qkv,
)

from cases import assert_close
from oracle import oracle_attend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Many tiny ops: with 2 cores shared by other processes, OpenMP threads spin and
    # slow these tests 10x; one thread is faster and steadier.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer(seed=0, dtype=torch.float64, **kwargs) -> SASA2d:
    torch.manual_seed(seed)
    layer = SASA2d(**{"in_channels": 6, "out_channels": 8, "kernel_size": 3, "heads": 2,
                      **kwargs}).to(dtype)
    with torch.no_grad():  # random biases so that rpb/qkv_bias paths are not zeros
        if layer.rpb is not None:
            layer.rpb.normal_(std=0.5)
        if layer.qkv.bias is not None:
            layer.qkv.bias.normal_()
    return layer


def _input(shape, dtype=torch.float64, channels_last=False, seed=1):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _expected(layer: SASA2d, x: torch.Tensor) -> torch.Tensor:
    """SASA2d from its definition: 1x1 projection, oracle attention, average pool."""
    w = layer.qkv.weight.double()[:, :, 0, 0]
    proj = torch.einsum("oc,bchw->bohw", w, x.double())
    if layer.qkv.bias is not None:
        proj = proj + layer.qkv.bias.double()[None, :, None, None]
    C, N = layer.out_channels, layer.heads
    q, k, v = (proj[:, i * C:(i + 1) * C].unflatten(1, (N, C // N)).permute(0, 3, 4, 1, 2)
               for i in range(3))
    out = oracle_attend(q, k, v, layer.kernel_size, layer.dilation, layer.padding,
                        layer.rel_h, layer.rel_w, layer.rpb)
    out = out.flatten(3).permute(0, 3, 1, 2)
    if layer.stride > 1:
        out = F.avg_pool2d(out, layer.stride, layer.stride, ceil_mode=True)
    return out


SASA_CONFIGS = [
    dict(),
    dict(padding="mask", rpb=True),
    dict(padding="shift", rel_per_head=True),
    dict(padding="shift", rpb=True, qkv_bias=True),
    dict(kernel_size=(3, 5), dilation=(2, 1), rel_per_head=True, rpb=True),
    dict(rel_pos=False, rpb=True),
    dict(stride=2, qkv_bias=True),
    dict(stride=2, padding="mask", kernel_size=5),
]


@pytest.mark.parametrize("config", SASA_CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_sasa2d_matches_oracle(config, channels_last):
    layer = _layer(**config)
    x = _input((2, 6, 7, 6), channels_last=channels_last)
    assert_close(layer(x), _expected(layer, x), torch.float64, "SASA2d vs oracle")


def test_sasa2d_float32_both_layouts():
    layer = _layer(dtype=torch.float32, rpb=True)
    x = _input((2, 6, 7, 6), dtype=torch.float32)
    expected = _expected(layer, x)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        assert_close(layer(xx), expected, torch.float32, "float32 SASA2d")


def test_sasa2d_under_bfloat16_autocast():
    layer = _layer(dtype=torch.float32, rpb=True)
    x = _input((2, 6, 7, 6), dtype=torch.float32, channels_last=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, _expected(layer, x), torch.bfloat16, "SASA2d under bf16 autocast")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_qkv_are_views_of_the_projection(monkeypatch, channels_last):
    layer = _layer(dtype=torch.float32)
    seen = {}
    layer.qkv.register_forward_hook(lambda m, i, out: seen.__setitem__("proj", out))

    real_attend = sasa2d_module.attend

    def spy(q, k, v, *args, **kwargs):
        seen["qkv"] = (q, k, v)
        return real_attend(q, k, v, *args, **kwargs)

    monkeypatch.setattr(sasa2d_module, "attend", spy)
    x = _input((1, 6, 5, 4), dtype=torch.float32, channels_last=channels_last)
    layer(x)
    proj = seen["proj"]
    base = proj.untyped_storage().data_ptr()
    for name, t in zip("qkv", seen["qkv"]):
        assert t.shape == (1, 5, 4, 2, 4), name
        assert t.untyped_storage().data_ptr() == base, f"{name} is a copy of the projection"
    if channels_last:  # the projection kept the input's layout: head channels are unit-stride
        assert seen["qkv"][0].stride(-1) == 1
    q, k, v = split_qkv(proj, 2)
    assert torch.equal(q, seen["qkv"][0]) and torch.equal(v, seen["qkv"][2])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)], ids=["8x8", "7x9"])
def test_shapes_and_strides_match_conv2d(stride, channels_last, size):
    layer = SASA2d(6, 8, kernel_size=3, heads=2, stride=stride)
    conv = nn.Conv2d(6, 8, 3, stride, padding=1)
    x = _input((2, 6, *size), dtype=torch.float32, channels_last=channels_last)
    out = layer(x)
    assert out.shape == conv(x).shape
    assert out.dtype == x.dtype
    # attend's (B, H, W, heads, d) output viewed as NCHW: channels-last strides, no copy
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter_of_sasa2d():
    layer = _layer(dtype=torch.float32, rpb=True, qkv_bias=True, rel_per_head=True)
    layer(_input((2, 6, 5, 5), dtype=torch.float32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _tiny_resnet(stem: str) -> ResNet:
    torch.manual_seed(0)
    model = ResNet((1, 1), num_classes=3, stem=stem, kernel_size=3, heads=2, widths=(8, 16))
    for m in model.modules():  # undo the zero-init of the last BNs: let gradients through
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    return model


@pytest.mark.parametrize("stem", ["conv", "attention"])
def test_gradients_reach_every_parameter_of_a_model(stem):
    model = _tiny_resnet(stem)
    x = _input((2, 3, 16, 16), dtype=torch.float32)
    F.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_compile_fullgraph():
    """attend is a custom op: SASA2d compiles without a graph break, forward and backward."""
    layer = _layer(dtype=torch.float32, rpb=True)
    x = _input((1, 6, 5, 5), dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    try:
        out = compiled(x)
        out.sum().backward()
    finally:
        torch._dynamo.reset()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    want = layer(x)
    want.sum().backward()
    assert_close(out, want, torch.float32, "compiled SASA2d")
    for got, p in zip(grads, layer.parameters()):
        assert_close(got, p.grad, torch.float32, "compiled SASA2d gradient")


def _stem_direct(layer: SpatialMixtureAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula, one pixel and one window offset at a time, in float64."""
    w = layer.qkv.weight.double()[:, :, 0, 0]
    proj = torch.einsum("oc,bchw->bohw", w, x.double())
    C, N, D, M = layer.out_channels, layer.heads, layer.head_dim, layer.mixtures
    kh, kw = layer.kernel_size
    q, k = proj[:, :C], proj[:, C:2 * C]
    values = [proj[:, (2 + m) * C:(3 + m) * C] for m in range(M)]
    row, col, mix = layer.emb_row.double(), layer.emb_col.double(), layer.emb_mix.double()
    B, _, H, W = x.shape
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            logits, vals = [], []
            for a in range(kh):
                for b in range(kw):
                    y, xx = i + a - kh // 2, j + b - kw // 2
                    inside = 0 <= y < H and 0 <= xx < W
                    key = k[:, :, y, xx] if inside else torch.zeros(B, C, dtype=torch.float64)
                    p = torch.softmax(mix @ (row[a] + col[b]), dim=0)  # (M,)
                    val = sum(p[m] * values[m][:, :, y, xx] for m in range(M)) if inside \
                        else torch.zeros(B, C, dtype=torch.float64)
                    qk = (q[:, :, i, j] * key).view(B, N, D).sum(-1) / math.sqrt(D)
                    logits.append(qk)
                    vals.append(val.view(B, N, D))
            attn = torch.softmax(torch.stack(logits, -1), -1)  # (B, N, taps)
            out[:, :, i, j] = (attn[..., None] * torch.stack(vals, 2)).sum(2).reshape(B, C)
    return out


@pytest.mark.parametrize("heads,kernel_size", [(1, 3), (2, 5), (2, (3, 5))])
def test_stem_attention_matches_direct_float64(heads, kernel_size):
    torch.manual_seed(0)
    layer = SpatialMixtureAttention2d(3, 8, kernel_size=kernel_size, heads=heads).double()
    x = _input((2, 3, 6, 5))
    assert_close(layer(x), _stem_direct(layer, x), torch.float64, "attention stem")


def test_attention_stem_shape_and_gradients():
    stem = AttentionStem2d(3, 8, kernel_size=3, pool=4)
    out = stem(_input((2, 3, 16, 12), dtype=torch.float32, channels_last=True))
    assert out.shape == (2, 8, 4, 3)
    out.sum().backward()
    for name, p in stem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip():
    layer = _layer(dtype=torch.float32, rpb=True, rel_per_head=True, qkv_bias=True)
    x = _input((1, 6, 5, 5), dtype=torch.float32)
    other = SASA2d(6, 8, kernel_size=3, heads=2, rpb=True, rel_per_head=True, qkv_bias=True)
    assert set(other.state_dict()) == {"qkv.weight", "qkv.bias", "rel_h", "rel_w", "rpb"}
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))

    model, twin = _tiny_resnet("attention").eval(), ResNet(
        (1, 1), num_classes=3, stem="attention", kernel_size=3, heads=2, widths=(8, 16)).eval()
    twin.load_state_dict(model.state_dict())
    x = _input((1, 3, 16, 16), dtype=torch.float32)
    assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(out_channels=10, heads=4), "out_channels"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(padding="reflect"), "padding"),
    (dict(dilation=0), "dilation"),
    (dict(stride=0), "stride"),
    (dict(out_channels=8, heads=8), "rel_pos"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SASA2d(**{"in_channels": 4, "out_channels": 8, "heads": 2, **kwargs})


def test_bad_input_raises():
    with pytest.raises(ValueError, match="in_channels|expects"):
        SASA2d(4, 8, heads=2)(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="out_channels"):
        SpatialMixtureAttention2d(3, 10, heads=4)
    with pytest.raises(ValueError, match="stem"):
        sasa_resnet26(stem="patchify")


def test_extra_repr():
    text = repr(SASA2d(16, 32, kernel_size=5, heads=4, stride=2, rpb=True))
    assert "16, 32, kernel_size=(5, 5), heads=4, stride=2" in text and "rpb=True" in text


def test_parameter_counts_match_the_paper():
    # the paper (Table 1): ResNet-50 25.6M, SASA-ResNet-26/38/50 10.3M / 14.1M / 18.0M
    assert count_parameters(conv_resnet50()) == pytest.approx(25.6e6, rel=0.01)
    assert count_parameters(sasa_resnet50()) == pytest.approx(18.0e6, rel=0.02)
    assert count_parameters(sasa_resnet38()) == pytest.approx(14.1e6, rel=0.02)
    assert count_parameters(sasa_resnet26()) == pytest.approx(10.3e6, rel=0.02)
    stem = sasa_resnet50(stem="attention")
    assert count_parameters(stem) == pytest.approx(18.0e6, rel=0.02)


def test_flop_counts_match_the_paper():
    # the paper: ResNet-50 8.2 GFLOPs, SASA-ResNet-50 (conv stem) 7.0 GFLOPs at 224 x 224
    conv = count_flops(conv_resnet50())
    assert conv["total"] == pytest.approx(8.2e9, rel=0.02) and conv["attention"] == 0
    sasa = count_flops(sasa_resnet50())
    assert sasa["total"] == pytest.approx(7.0e9, rel=0.05)
    assert 0 < sasa["attention"] < sasa["conv"]


def test_summary_cli(capsys):
    from sasa_triton.nn import summary
    rows = summary.main(["--size", "32", "--models", "sasa_resnet26", "conv_resnet26"])
    assert [r["model"] for r in rows] == ["sasa_resnet26", "conv_resnet26"]
    assert rows[0]["attention"] > 0 and rows[1]["attention"] == 0
    assert "sasa_resnet26" in capsys.readouterr().out


def test_import_sasa_triton_does_not_load_nn():
    code = ("import sys, sasa_triton; assert 'sasa_triton.nn' not in sys.modules; "
            "assert sasa_triton.nn.SASA2d is not None")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _import_example(name: str):
    sys.path.insert(0, EXAMPLES)
    try:
        return __import__(name)
    finally:
        sys.path.remove(EXAMPLES)


def test_train_tiny_loss_falls():
    train_tiny = _import_example("train_tiny")
    losses = train_tiny.train(steps=100, print_fn=None)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first == pytest.approx(math.log(4), abs=0.15)  # chance level at the start
    assert last < 0.65 * first, f"loss fell only from {first:.3f} to {last:.3f}"


def test_bench_resnet_smoke_mode(tmp_path):
    bench = _import_example("bench_resnet")
    csv_path = tmp_path / "bench.csv"
    rows = bench.main(["--device", "cpu", "--batch", "2", "--size", "64", "--steps", "1",
                       "--warmup", "0", "--csv", str(csv_path)])
    assert [r["model"] for r in rows] == ["sasa_resnet50", "conv_resnet50"]
    for r in rows:
        assert r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0
    assert len(csv_path.read_text().splitlines()) == 3
