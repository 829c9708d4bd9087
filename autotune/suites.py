"""Named suites of shapes to tune (shared/PERF.md), before direction and dtype are chosen.

Each suite is a list of forward bf16 `TuneCase`s; `suite_cases` crosses them with the
requested directions and dtypes and drops cases whose key another case already fills.
"""
from __future__ import annotations

from .keys import TuneCase


def _case(B, H, W, heads, d, k=7, **kw) -> TuneCase:
    return TuneCase("fwd", B, H, W, heads, d, k, k, **kw)


# The paper's SASA-ResNet-50 at 224 x 224, batch 32: k = 7, 8 heads, zeros padding,
# relative embeddings (shared by the heads, as SASA2d's default) on.
S1, S2, S3, S4 = (_case(32, 56, 56, 8, 8), _case(32, 28, 28, 8, 16),
                  _case(32, 14, 14, 8, 32), _case(32, 7, 7, 8, 64))

SUITES = {
    "resnet50": [S1, S2, S3, S4],
    "ksweep": [S2.with_(kh=k, kw=k) for k in (3, 5, 9, 11)],
    "heads": [S2.with_(heads=h, d=128 // h) for h in (1, 2, 4, 16)],
    "det": [_case(8, 128, 128, 4, 16)],
    # The other options of attend on s2, so they do not all fall to the heuristic.
    "options": [S2.with_(padding="mask"), S2.with_(padding="shift", rel="none"),
                S2.with_(rel="per_head"), S2.with_(rel="none"), S2.with_(rpb=True),
                S2.with_(dh=2, dw=2)],
}
SUITES["all"] = [c for name in ("resnet50", "ksweep", "heads", "det", "options")
                 for c in SUITES[name]]

SUITE_HELP = {
    "resnet50": "s1..s4 of PERF.md: B32, 56/28/14/7 px, 8 heads, d 8/16/32/64, k7",
    "ksweep": "s2 with k = 3, 5, 9, 11",
    "heads": "s2 with heads = 1, 2, 4, 16 (d = 128, 64, 32, 8)",
    "det": "B8, 128 x 128, 4 heads, d16, k7",
    "options": "s2 with padding mask / shift, per-head or no rel, rpb, dilation 2",
    "all": "every suite above",
}


def suite_cases(names, directions=("fwd",), dtypes=("bf16",)) -> list[TuneCase]:
    """The cases of the named suites for each direction and dtype, one per key."""
    out, seen = [], set()
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
        for base in SUITES[name]:
            for direction in directions:
                for dtype in dtypes:
                    case = base.with_(direction=direction, dtype=dtype)
                    if case.key not in seen:
                        seen.add(case.key)
                        out.append(case)
    return out
