"""Train a hybrid ResNet (convolution in the early stages, attention in the late ones,
the paper's best "where is attention most useful" trade-off) for a few steps on CPU.

The task: which quadrant of a 32 x 32 noisy image holds a bright 8 x 8 square. The
network is `studies.build("resnet50_conv12_sasa34")` with narrow stages (widths 8..64)
so that it runs in seconds; any name of `python -m sasa_triton.nn.summary --list` works.

    python examples/train_hybrid.py [--steps 20] [--model resnet50_conv12_sasa34]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sasa_triton.nn.studies import build, names

NARROW = dict(widths=(8, 16, 32, 64), heads=2, num_classes=4)


def make_batch(batch: int, generator: torch.Generator,
               size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(4, (batch,), generator=generator)
    images = 0.5 * torch.randn(batch, 3, size, size, generator=generator)
    half = size // 2
    for n, quadrant in enumerate(labels.tolist()):
        y = (quadrant // 2) * half + int(torch.randint(half - 8, (), generator=generator))
        x = (quadrant % 2) * half + int(torch.randint(half - 8, (), generator=generator))
        images[n, :, y:y + 8, x:x + 8] += 2.0
    return images, labels


def train(model_name: str = "resnet50_conv12_sasa34", steps: int = 20, batch: int = 8,
          lr: float = 0.05, seed: int = 0, print_fn=print):
    """Returns (model, losses per step)."""
    torch.manual_seed(seed)
    model = build(model_name, **NARROW)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        images, labels = make_batch(batch, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if print_fn is not None:
            print_fn(f"step {step}: loss {loss.item():.3f}")
    return model, losses


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="resnet50_conv12_sasa34", choices=names())
    args = parser.parse_args(argv)
    print(f"{args.model}: stages {build(args.model, **NARROW).stage_spatials}")
    return train(args.model, args.steps)[1]


if __name__ == "__main__":
    main()
