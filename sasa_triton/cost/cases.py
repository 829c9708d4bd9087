"""The cases the tool reads: the benchmark report's suites (one import, so a rename of
the suite module (sasa_triton/perf_suite.py) touches this file only)."""
from __future__ import annotations

from sasa_triton.perf_suite import SUITES, Shape

__all__ = ["SUITES", "Shape", "by_name", "shapes"]


def by_name() -> dict[str, Shape]:
    """Every named case of every suite."""
    return {s.name: s for suite in SUITES.values() for s in suite}


def shapes(spec: str) -> list[Shape]:
    """Cases of a comma-separated list of suite and case names, each case once."""
    named = by_name()
    out = []
    for part in (x.strip() for x in spec.split(",") if x.strip()):
        if part in SUITES:
            out += SUITES[part]
        elif part in named:
            out.append(named[part])
        else:
            raise ValueError(f"unknown suite or case {part!r}; suites: {sorted(SUITES)}")
    return list({s.name: s for s in out}.values())
