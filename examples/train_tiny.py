"""Train a tiny all-attention SASA network on CPU in about a minute.

The task needs locality: each 12 x 12 image holds one 3 x 3 glyph (plus, x, T or
corner, five lit pixels each, so brightness says nothing) at a random place, in noise;
the network says which glyph. Only the arrangement of neighboring pixels tells them
apart, which is what SASA's relative-position logits see. The network has no spatial
convolution: a 1x1 stem, three SASA2d layers (k = 3, one with stride 2), global average
pooling and a linear classifier.

    python examples/train_tiny.py [--steps 200] [--seed 0]

Prints the loss and accuracy as it goes; the loss falls from ln 4 = 1.39 to well below.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from sasa_triton.nn import SASA2d

GLYPHS = torch.tensor([
    [[0, 1, 0], [1, 1, 1], [0, 1, 0]],  # plus
    [[1, 0, 1], [0, 1, 0], [1, 0, 1]],  # x
    [[1, 1, 1], [0, 1, 0], [0, 1, 0]],  # T
    [[1, 1, 1], [1, 0, 0], [1, 0, 0]],  # corner
], dtype=torch.float32)


def make_batch(batch: int, size: int = 12, noise: float = 0.3,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (batch, 1, size, size), labels (batch,)): one glyph per image, in noise."""
    labels = torch.randint(len(GLYPHS), (batch,), generator=generator)
    images = noise * torch.randn(batch, 1, size, size, generator=generator)
    ys = torch.randint(size - 2, (batch,), generator=generator)
    xs = torch.randint(size - 2, (batch,), generator=generator)
    for n in range(batch):
        y, x = int(ys[n]), int(xs[n])
        images[n, 0, y:y + 3, x:x + 3] += GLYPHS[labels[n]]
    return images, labels


class TinySASANet(nn.Module):
    """1x1 stem, three SASA2d blocks (BN + ReLU after each), average pool, linear."""

    def __init__(self, classes: int = len(GLYPHS), width: int = 16, heads: int = 2) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(SASA2d(cin, cout, kernel_size=3, heads=heads, stride=stride),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = nn.Sequential(nn.Conv2d(1, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(block(width, width, 1), block(width, 2 * width, 2),
                                    block(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(x.mean((2, 3)))


def train(steps: int = 200, batch: int = 64, lr: float = 1e-2, seed: int = 0,
          log_every: int = 25, print_fn=print) -> list[float]:
    """Trains a TinySASANet; returns the loss of every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinySASANet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        images, labels = make_batch(batch, generator=gen)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if print_fn is not None and (step % log_every == 0 or step == 1):
            acc = (logits.argmax(1) == labels).float().mean().item()
            print_fn(f"step {step:4d}  loss {loss.item():.3f}  batch acc {acc:.2f}  "
                     f"{time.perf_counter() - start:5.1f}s")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    losses = train(args.steps, args.batch, args.lr, args.seed)
    head, tail = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss: first 10 steps {head:.3f} (chance ln 4 = {math.log(4):.3f}), "
          f"last 10 steps {tail:.3f}")


if __name__ == "__main__":
    main()
