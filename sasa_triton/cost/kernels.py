"""What the tool knows about each kernel: which loop of its SASS runs how many times.

This is the only coupling to kernel internals (kernel function names, the names of the
launch arguments that bound its loops). Each entry maps a kernel's launch arguments
(constexprs and runtime ints, by parameter name) to its loops as written in the source,
outermost first, in program order. The SASS loops (sass.find_loops) are matched to this
list by nesting; a loop the compiler may unroll completely is `optional` (a loop of at
most one trip always is; a loop of 0 trips is compiled like any other), and its code then counts as straight-line code of its parent.
When nothing matches, the output says so and every loop counts once (a lower bound).

Mapping per kernel (what the trip counts stand for):
* `_tiled_fwd_kernel`: [rel column parts, c < KW (only with HAS_REL; LLVM may unroll)],
  [window rows, a_lo <= a < a_hi: KH (zeros/shift; an upper bound in mask mode)],
  [NaN slow pass: 0 trips, it runs only when a non-finite value reached acc]; all inside
  [query rows, r < BLOCK_H] when BLOCK_H > 1.
* `_allheads_fwd_kernel`: [rel column parts, c < KW (HAS_REL; may be unrolled)],
  [window rows, a < KH [window columns, c < KW]].
* `_dq_kernel`, `_dkv_kernel`: [ty < TY [tx < TX]] (TY, TX = kh, kw; 2k-1 in shift mode).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional


@dataclasses.dataclass
class LoopSpec:
    name: str  # what the loop walks, and its bound in the source
    trips: int
    children: list["LoopSpec"] = dataclasses.field(default_factory=list)
    optional: bool = False  # the compiler may unroll it completely


def _tiled(c: dict) -> list[LoopSpec]:
    body = []
    if c["HAS_REL"]:
        body.append(LoopSpec("rel column parts c<KW", c["KW"], optional=True))
    body.append(LoopSpec("window rows a<KH", c["KH"]))
    body.append(LoopSpec("NaN slow pass (not taken)", 0))
    if c["BLOCK_H"] > 1:
        return [LoopSpec("query rows r<BLOCK_H", c["BLOCK_H"], body, optional=True)]
    return body


def _allheads(c: dict) -> list[LoopSpec]:
    loops = []
    if c["HAS_REL"]:
        loops.append(LoopSpec("rel column parts c<KW", c["KW"], optional=True))
    loops.append(LoopSpec("window rows a<KH", c["KH"], [LoopSpec("window cols c<KW", c["KW"])]))
    return loops


def _offsets(c: dict) -> list[LoopSpec]:
    return [LoopSpec("offset rows ty<TY", c["TY"], [LoopSpec("offset cols tx<TX", c["TX"])])]


# kernel function name -> loops from the launch arguments (by parameter name)
LOOPS: dict[str, Callable[[dict], list[LoopSpec]]] = {
    "_tiled_fwd_kernel": _tiled,
    "_allheads_fwd_kernel": _allheads,
    "_dq_kernel": _offsets,
    "_dkv_kernel": _offsets,
}


@dataclasses.dataclass
class MatchedLoop:
    name: str
    trips: int
    iterations: int  # per program: product of the trips of it and its enclosing loops


@dataclasses.dataclass
class LoopMatch:
    loops: list[MatchedLoop]  # one per SASS loop, in address order
    note: str = ""  # why the mapping is uncertain ("" when it is not)


def _flatten(specs: list[LoopSpec], removed: set, depth: int = 0, outer: int = 1):
    """Pre-order (spec, depth, iterations) of the loops left after `removed` are unrolled."""
    for spec in specs:
        iterations = outer * spec.trips
        if id(spec) in removed:
            yield from _flatten(spec.children, removed, depth, iterations)
        else:
            yield spec, depth, iterations
            yield from _flatten(spec.children, removed, depth + 1, iterations)


def _all(specs: list[LoopSpec]):
    for spec in specs:
        yield spec
        yield from _all(spec.children)


def match_loops(kernel: str, arguments: dict, depths: list[int]) -> LoopMatch:
    """Trip counts for the SASS loops of `kernel` (their nesting depths in address order)."""
    fallback = [MatchedLoop("?", 1, 1) for _ in depths]
    make: Optional[Callable] = LOOPS.get(kernel)
    if make is None:
        return LoopMatch(fallback, f"{kernel}: no trip-count entry in sasa_triton/cost/"
                                   "kernels.py; loops counted once")
    specs = make(arguments)
    optional = [s for s in _all(specs) if s.optional or s.trips == 1]
    matches = []
    for n in range(len(optional) + 1):
        for removed in itertools.combinations(optional, n):
            flat = list(_flatten(specs, {id(s) for s in removed}))
            if [depth for _, depth, _ in flat] == depths:
                matches.append(flat)
        if matches:
            break  # prefer the fewest unrolled loops
    if not matches:
        expected = [(s.name, d) for s, d, _ in _flatten(specs, set())]
        return LoopMatch(fallback, f"{kernel}: SASS loop depths {depths} do not match the "
                                   f"kernel table {expected}; loops counted once")
    chosen = [MatchedLoop(s.name, s.trips, it) for s, _, it in matches[0]]
    note = ""
    if any([m.iterations for m in chosen] != [it for _, _, it in other] for other in matches):
        note = f"{kernel}: nesting ambiguous ({len(matches)} readings); took the first"
    return LoopMatch(chosen, note)
