"""End-to-end benchmark: SASA-ResNet-50 vs ResNet-50 (same bottleneck code, 3x3 convs).

Per model: training throughput (images/s of a full SGD step: forward, loss, backward,
update; autocast), inference throughput (eval mode, inference_mode, autocast), and the
peak GPU memory of each (torch.cuda.max_memory_allocated). Both models are built by
`sasa_triton.nn.ResNet`, so they differ only in the spatial layer; no torchvision.

    python examples/bench_resnet.py                                   # GPU: batch 32, 224 x 224, bf16
    python examples/bench_resnet.py --device cpu --batch 2 --size 64  # smoke mode (seconds)
    python examples/bench_resnet.py --csv reports/resnet_bench.csv    # also append rows to a CSV

Timing: `--warmup` untimed steps (compilation, autotuning, allocator warm-up), then
`--steps` timed steps between two device synchronisations; images/s = batch * steps /
seconds. Random inputs and labels. The output names the device, torch and Triton
versions and the `attend` backend in use.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sasa_triton import nn as snn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "sasa_resnet50": snn.sasa_resnet50,
    "conv_resnet50": snn.conv_resnet50,
    "sasa_resnet26": snn.sasa_resnet26,
    "conv_resnet26": snn.conv_resnet26,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None  # no allocator statistics on CPU


def bench_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
                warmup: int, dtype: Optional[torch.dtype]) -> tuple[float, Optional[float]]:
    """(images/s, peak MiB) of SGD training steps."""
    device = images.device
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    _reset_peak(device)
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return images.shape[0] * steps / seconds, _peak_mib(device)


def bench_infer(model: nn.Module, images: torch.Tensor, steps: int, warmup: int,
                dtype: Optional[torch.dtype]) -> tuple[float, Optional[float]]:
    """(images/s, peak MiB) of forward passes in eval mode."""
    device = images.device
    model.eval()
    _reset_peak(device)
    with torch.inference_mode(), _autocast(device, dtype):
        for _ in range(warmup):
            model(images)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(images)
        _sync(device)
        seconds = time.perf_counter() - start
    return images.shape[0] * steps / seconds, _peak_mib(device)


def describe_machine(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:  # what attend(backend="auto") picks for a stage-1 layer (s1 of PERF.md)
        from sasa_triton.args import check_attend_args
        from sasa_triton.dispatch import choose
        q = torch.empty(32, 56, 56, 8, 8, dtype=torch.bfloat16, device=device)
        backend = choose(q, check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None))[0]
    except Exception:  # noqa: BLE001 - only a label in the report
        backend = "auto"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "attend_backend": backend}


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    machine = describe_machine(device)
    print(f"device {machine['device']}, torch {machine['torch']}, triton {machine['triton']}, "
          f"attend backend {machine['attend_backend']}; batch {args.batch}, "
          f"{args.size}x{args.size}, {args.dtype}, channels_last={args.channels_last}, "
          f"compile={args.compile}")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = torch.randint(args.classes, (args.batch,), generator=gen).to(device)

    rows = []
    print(f"{'model':<16} {'train img/s':>12} {'train MiB':>10} {'infer img/s':>12} {'infer MiB':>10}")
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name](num_classes=args.classes, stem=args.stem) if name.startswith("sasa") \
            else MODELS[name](num_classes=args.classes)
        model = model.to(device, memory_format=memory_format)
        runner = torch.compile(model) if args.compile else model
        train_ips, train_mib = bench_train(runner, images, labels, args.steps, args.warmup, dtype)
        infer_ips, infer_mib = bench_infer(runner, images, args.steps, args.warmup, dtype)
        row = {"model": name, "train_images_per_s": round(train_ips, 2),
               "train_peak_mib": None if train_mib is None else round(train_mib, 1),
               "infer_images_per_s": round(infer_ips, 2),
               "infer_peak_mib": None if infer_mib is None else round(infer_mib, 1),
               "batch": args.batch, "size": args.size, "dtype": args.dtype,
               "channels_last": args.channels_last, "compile": args.compile,
               "stem": args.stem if name.startswith("sasa") else "conv", **machine}
        rows.append(row)
        fmt = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{name:<16} {train_ips:12.1f} {fmt(train_mib):>10} {infer_ips:12.1f} "
              f"{fmt(infer_mib):>10}")
        del model, runner
    if args.csv:
        _append_csv(args.csv, rows)
    return rows


def _append_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="autocast dtype")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["sasa_resnet50", "conv_resnet50"])
    parser.add_argument("--stem", choices=["conv", "attention"], default="conv",
                        help="stem of the SASA models (conv models always use conv); the attention "
                        "stem is plain PyTorch, see sasa_triton.nn.AttentionStem2d")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--csv", default=None, help="append the results to this CSV")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.batch * args.size ** 2 > 4 * 64 ** 2:
        print("note: a CPU run at this size is slow; smoke mode is --batch 2 --size 64")
    return args


def main(argv=None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
