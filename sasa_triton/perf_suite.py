"""The benchmark suite of docs/PERF.md, defined once: the report times these shapes and
the tuner (sasa_triton.autotune.tune_suites) tunes them.

The GPU suites are the paper's SASA-ResNet-50 at 224 x 224, batch 32 (k = 7, 8 heads,
s1..s4) and sweeps around s2; `quick` is a tiny CPU suite that still feeds every chart
of the report (three kernel sizes, three head counts). Plain data: no package imports.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark case: an NCHW feature map (B, C, H, W) split into `heads` heads."""

    name: str
    B: int
    H: int
    W: int
    C: int
    heads: int
    k: int = 7

    @property
    def d(self) -> int:
        return self.C // self.heads

    @property
    def key(self) -> tuple:
        return (self.B, self.H, self.W, self.C, self.heads, self.k)


RESNET50 = [
    Shape("s1", 32, 56, 56, 64, 8),
    Shape("s2", 32, 28, 28, 128, 8),
    Shape("s3", 32, 14, 14, 256, 8),
    Shape("s4", 32, 7, 7, 512, 8),
]
_S2 = RESNET50[1]
KSWEEP = [dataclasses.replace(_S2, name=f"k{k}", k=k) for k in (3, 5, 7, 9, 11)]
HEADS = [dataclasses.replace(_S2, name=f"h{h}", heads=h) for h in (1, 2, 4, 8, 16)]
DET = [Shape("det", 8, 128, 128, 64, 4)]
# RetinaNet's finest FPN level at 640 x 640 (P3: 80 x 80 x 256, sasa_triton.nn.detection):
# layer:SASA2d is the attention FPN layer, conv_3x3 its convolutional twin
FPN = [Shape("fpn-p3", 8, 80, 80, 256, 8)]
QUICK = [
    Shape("q-k3", 1, 16, 16, 32, 4, k=3),
    Shape("q-k5", 1, 16, 16, 32, 4, k=5),
    Shape("q-k7", 1, 16, 16, 32, 4, k=7),
    Shape("q-h2", 1, 16, 16, 32, 2, k=5),
    Shape("q-h8", 1, 16, 16, 32, 8, k=5),
]


def unique(shapes: list[Shape]) -> list[Shape]:
    """Drops repeated shapes (k7 and h8 are s2), keeping the first name."""
    seen, out = set(), []
    for s in shapes:
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


SUITES: dict[str, list[Shape]] = {
    "resnet50": RESNET50,
    "ksweep": KSWEEP,
    "heads": HEADS,
    "det": DET,
    "fpn": FPN,
    "all": unique(RESNET50 + KSWEEP + HEADS + DET + FPN),
    "quick": QUICK,
}


def default_suite(device_type: str) -> str:
    """The suite `python -m sasa_triton.report` runs by default on a device type."""
    return "resnet50" if device_type == "cuda" else "quick"


def get_suite(name: str) -> list[Shape]:
    """The shapes of suite `name`; ValueError naming the suites otherwise."""
    if name not in SUITES:
        raise ValueError(f"--suite must be one of {sorted(SUITES)}, got {name!r}")
    return SUITES[name]
