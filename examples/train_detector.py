"""Build the paper's three RetinaNets and take training steps on synthetic boxes, on CPU.

    conv                 ResNet-50 FPN RetinaNet (conv backbone, FPN and heads)
    sasa_backbone        SASA-ResNet-50 backbone, conv FPN and heads
    sasa                 SASA backbone, SASA FPN and SASA heads (fully attentional)

Each image holds one to three filled rectangles, one colour per class, in noise; the
targets are their boxes and classes. The loss is RetinaNet's (focal + L1, see
sasa_triton.nn.detection_loss).

    python examples/train_detector.py [--size 128] [--steps 1] [--tiny]

--tiny builds narrow ResNet-26 twins (widths 8..64, 16-channel FPN, k = 3) that take
a step in about a second each on CPU; without it the full ResNet-50 detectors run
(far slower on the CPU reference path; on a GPU: --device cuda).
"""
from __future__ import annotations

import argparse
import time

import torch

from sasa_triton.nn.detection import DETECTORS, build_detector
from sasa_triton.nn.detection_loss import make_anchors, retinanet_loss

TINY = dict(depth=26, widths=(8, 16, 32, 64), out_channels=16, heads=2, kernel_size=3)


def synthetic_batch(batch: int, size: int, classes: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
    """(images (batch, 3, size, size), targets [{"boxes", "labels"}] per image)."""
    colours = torch.rand(classes, 3, generator=generator)
    images = 0.2 * torch.randn(batch, 3, size, size, generator=generator)
    targets = []
    for n in range(batch):
        count = int(torch.randint(1, 4, (), generator=generator))
        wh = torch.randint(size // 8, size // 2, (count, 2), generator=generator)
        xy = (torch.rand(count, 2, generator=generator) * (size - wh)).long()
        labels = torch.randint(classes, (count,), generator=generator)
        for (x, y), (w, h), c in zip(xy.tolist(), wh.tolist(), labels.tolist()):
            images[n, :, y:y + h, x:x + w] += colours[c, :, None, None]
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).float(), "labels": labels})
    return images, targets


def train(name: str, size: int = 128, steps: int = 1, batch: int = 2, classes: int = 3,
          tiny: bool = False, lr: float = 0.01, seed: int = 0, device: str = "cpu",
          print_fn=print):
    """Builds detector `name` (a key of DETECTORS) and takes `steps` SGD steps; returns
    (model, the total loss of each step)."""
    torch.manual_seed(seed)
    model = build_detector(name, num_classes=classes, **(TINY if tiny else {})).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        images, targets = synthetic_batch(batch, size, classes, generator)
        images = images.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        start = time.perf_counter()
        outputs = model(images)
        anchors = make_anchors(outputs["feature_sizes"], (size, size), device=device)
        parts = retinanet_loss(outputs, anchors, targets)
        loss = parts["classification"] + parts["bbox_regression"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if print_fn is not None:
            print_fn(f"{name:<22} step {step}: loss {loss.item():.3f} "
                     f"(cls {parts['classification'].item():.3f}, "
                     f"box {parts['bbox_regression'].item():.3f}) "
                     f"{time.perf_counter() - start:.1f}s")
    return model, losses


def main(argv=None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image size (default 128)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="narrow ResNet-26 twins")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="*", default=list(DETECTORS),
                        choices=list(DETECTORS))
    args = parser.parse_args(argv)
    return {name: train(name, args.size, args.steps, args.batch, tiny=args.tiny,
                        device=args.device)[1]
            for name in args.variants}


if __name__ == "__main__":
    main()
