"""Named suites of keys to tune: the shapes of sasa_triton.perf_suite (docs/PERF.md) as
forward bf16 `TuneCase`s, before direction and dtype are chosen.

`suite_cases` crosses them with the requested directions and dtypes and drops cases
whose key another case already fills. A sweep leaves out its members that are s1..s4
(k7 and h8 are s2); "options" covers the other arguments of attend on s2.
"""
from __future__ import annotations

from sasa_triton import perf_suite

from .keys import TuneCase


def tune_case(shape: perf_suite.Shape, **options) -> TuneCase:
    """The forward bf16 case of a suite shape (zeros padding, shared rel unless given)."""
    return TuneCase("fwd", shape.B, shape.H, shape.W, shape.heads, shape.d, shape.k, shape.k,
                    **options)


def _sweep(shapes: list) -> list[TuneCase]:
    base = {s.key for s in perf_suite.RESNET50}
    return [tune_case(s) for s in shapes if s.key not in base]


S1, S2, S3, S4 = (tune_case(s) for s in perf_suite.RESNET50)

SUITES = {
    "resnet50": [S1, S2, S3, S4],
    "ksweep": _sweep(perf_suite.KSWEEP),
    "heads": _sweep(perf_suite.HEADS),
    "det": [tune_case(s) for s in perf_suite.DET],
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
