"""What the tool knows about each kernel: which loop of its SASS runs how many times.

This is the only coupling to kernel internals (kernel function names, the names of the
launch arguments that bound its loops). Each entry maps a kernel's launch arguments
(constexprs and runtime ints, by parameter name) to its loops as written in the source,
outermost first, in program order. The SASS loops (sass.find_loops) are matched to this
list by nesting and by one marker: whether the body (nested loops included) holds an
exp2 (MUFU.EX2), which tells the softmax loops from the rel-table loops. A loop with a
constexpr bound may be unrolled completely by the compiler (`unrollable`; innermost
first, and any loop of one trip), its code then counting as straight-line code of its
parent; a loop of 0 trips (a rarely taken path) is compiled like any other. Among the
readings that fit, the one unrolling the fewest loops, earliest in this list first, is
taken; when readings disagree on trip counts, or none fits, the output says so (with no
fit, every loop counts once: a lower bound). The non-finite slow passes are marked `cold`:
the straight-line code of a branch that guards only cold loops does not run either
(analyze.tally).

Mapping per kernel (what the trip counts stand for):
* `_tiled_fwd_kernel`: [rel column parts, c < KW (only with HAS_REL)],
  [window rows, a_lo <= a < a_hi: KH (zeros/shift; an upper bound in mask mode)],
  [NaN slow pass: 0 trips, it runs only when a non-finite value reached acc]; all inside
  [query rows, r < BLOCK_H] when BLOCK_H > 1.
* `_tile2d_fwd_kernel`: [window rows, a < KH] (the window columns are a tl.static_range,
  unrolled by the front end).
* `_rows_fwd_kernel`: [key rows walked, u_lo <= u < u_hi: the mean over the row blocks
  of the in-image rows the tile's windows cover (<= BLOCK_M / BLOCK_W + KH - 1)],
  [NaN slow pass: a loop of 0 trips (1 only when a non-finite value reached acc)
  [key rows walked again]]; with COLS > 1 both inside [column blocks, jb_lo <= jb <
  jb_hi: the row's column blocks / the column groups (N_JB), rounded].
* `_query_grads_kernel` (rows_bwd_query): [key rows: the union of the tile's windows,
  min(BLOCK_H, H) + (KH - 1) * dil_h (zeros; an upper bound for mask and shift)],
  [the non-finite slow pass, query blocks [ty < TY [tx < TX]]: 0 trips, it runs only
  for programs whose result came out non-finite; a tile of 16 queries is one block, and
  the compiler drops that loop]; its column loops are tl.static_range (unrolled).
* `_reduce_tables_kernel`: [rel rows' slot groups (one walk for rel_h and rel_w unless
  their slot groups differ: odd d, or one shared and the other per head)], [rpb slot
  groups] (slot groups // R_REL or R_RPB: the mask-free steps; the masked rest is
  straight-line code; no loop without LOOP_REL / LOOP_RPB; each program takes one
  branch, so counting all for every program is an upper bound).
* `_key_bwd_kernel` (rows_bwd_key): [query rows i_lo <= i < i_hi], runtime bounds: the
  key tile's ROWS rows plus HALO_H on each side, clipped to the image (the mean over the
  row blocks; rows that dilation skips count as full trips: an upper bound); with
  HALVES (the tile as a top and a bottom part) the same rows in three walks instead:
  [rows reaching the top part only], [both parts], [the bottom part only] (their
  rounded means add up to the one walk's); then [non-finite slow pass: key sub-tiles
  (0 trips, it runs only when a non-finite value reached the accumulators) [the same
  query rows]]; a tile of at most SUB_M keys is one sub-tile, and the compiler drops
  that loop.
* `_tile2d_bwd_query_kernel`, `_tile2d_bwd_key_kernel` (tile2d_bwd_query / _key):
  [window rows, a < KH] (columns are a tl.static_range, unrolled by the front end).
* `_dq_kernel`, `_dkv_kernel`: [ty < TY [tx < TX]] (TY, TX = kh, kw; 2k-1 in shift mode;
  runtime arguments: KH, KW are constexpr since issue 11 but bound no loop).
* `_image_fwd_kernel`: no loop (its non-finite v pass, a 0/1-trip loop in the source,
  compiles to a branch).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Optional


@dataclasses.dataclass
class LoopSpec:
    name: str  # what the loop walks, and its bound in the source
    trips: int
    children: list[LoopSpec] = dataclasses.field(default_factory=list)
    unrollable: bool = False  # constexpr bound: the compiler may unroll it completely
    exp2: Optional[bool] = None  # its body holds an exp2 (None: either)
    # a path that runs only on non-finite input (a slow pass, 0 trips), with its nested
    # loops: the straight-line code of a branch that guards nothing else is skipped too
    cold: bool = False


def _tiled(c: dict) -> list[LoopSpec]:
    body = []
    if c["HAS_REL"]:
        body.append(LoopSpec("rel column parts c<KW", c["KW"], unrollable=True, exp2=False))
    # zeros/shift: a_lo, a_hi = 0, KH (constexpr); mask: clipped at run time, KH at most
    unroll = c["PADDING"] != 1
    body.append(LoopSpec("window rows a<KH", c["KH"], unrollable=unroll, exp2=True))
    body.append(LoopSpec("NaN slow pass (not taken)", 0, unrollable=unroll, exp2=True,
                         cold=True))
    if c["BLOCK_H"] > 1:
        return [LoopSpec("query rows r<BLOCK_H", c["BLOCK_H"], body, unrollable=True)]
    return body


def _tile2d(c: dict) -> list[LoopSpec]:
    # the window columns are a tl.static_range (always unrolled)
    return [LoopSpec("window rows a<KH", c["KH"], unrollable=True, exp2=True)]


def _tile2d_bwd(c: dict) -> list[LoopSpec]:
    # the window columns are a tl.static_range (always unrolled)
    return [LoopSpec("window rows a<KH", c["KH"], unrollable=True, exp2=True)]


def _rows(c: dict) -> list[LoopSpec]:
    from sasa_triton.kernels.rows_fwd import key_rows_walked  # the launcher's own count

    (H, *_), (dh, _) = c["sizes"], c["dil"]  # packed launch arguments
    rows, kh = c["BLOCK_M"] // c["BLOCK_W"], c["KH"]
    pick = c["PADDING"] == 0 and c["CLIP"] and not c["SPARE"]
    pairs = c.get("PAIR", False) and not pick  # the fast walk's steps: two key rows each

    def mean_steps(step: int) -> int:
        per_group = [key_rows_walked(math.ceil((H - g) / dh), rows, kh, c["PADDING"] == 2,
                                     step) for g in range(dh)]
        blocks = dh * math.ceil(math.ceil(H / dh) / rows)  # programs along the rows
        return round(sum(walked for walked, _ in per_group) / max(1, blocks))

    trips = mean_steps(1)
    slow_rows = LoopSpec("key rows walked again", trips, exp2=True)
    body = [LoopSpec("key rows walked u_lo<=u<u_hi" + (" (pairs)" if pairs else ""),
                     mean_steps(2) if pairs else trips, exp2=True),
            LoopSpec("NaN slow pass (0 trips: not taken)", 0, [slow_rows], exp2=True,
                     cold=True)]
    cols = c.get("COLS", 1)
    if cols == 1:
        return body
    W, n_groups = c["sizes"][1], c["sizes"][5]  # N_JB: the column groups
    blocks = math.ceil(W / c["BLOCK_W"])
    return [LoopSpec("column blocks jb_lo<=jb<jb_hi", max(1, round(blocks / n_groups)), body,
                     exp2=True)]


def _offsets(c: dict) -> list[LoopSpec]:  # TY, TX are runtime arguments: never unrolled
    return [LoopSpec("offset rows ty<TY", c["TY"], [LoopSpec("offset cols tx<TX", c["TX"])])]


def _rows_bwd_query(c: dict) -> list[LoopSpec]:
    H = c["sizes"][0]  # (H, W, HEADS, D, D_HALF)
    rows = min(c["BLOCK_H"], H) + (c["KH"] - 1) * c["dil_h"]
    # At 1-2 warps ptxas may lay the slow pass out as two more top-level loops around its
    # query-block loop (not taken either); absent ("unrolled") at 4 warps.
    slow_rows = LoopSpec("slow pass: offset rows ty<TY", c["TY"],
                         [LoopSpec("slow pass: offset cols tx<TX", c["TX"], exp2=True)],
                         exp2=True)
    # 16 queries a block: the compiler drops the block loop of a 16-query tile (one trip)
    if c["BLOCK_H"] * c["BLOCK_W"] <= 16:
        slow = dataclasses.replace(slow_rows, trips=0, cold=True)
    else:
        slow = LoopSpec("slow pass: query blocks (not taken)", 0, [slow_rows], exp2=True,
                        cold=True)
    return [LoopSpec("key rows (window union)", rows, exp2=True),
            LoopSpec("slow pass: split-off loop (not taken)", 0, unrollable=True, cold=True),
            slow,
            LoopSpec("slow pass: split-off loop (not taken)", 0, unrollable=True, cold=True)]


def _reduce_tables(c: dict) -> list[LoopSpec]:
    def walk(name: str, slots: int, block_r: int) -> LoopSpec:  # mask-free steps
        return LoopSpec(f"{name} partial slots", slots // block_r, exp2=False)

    loops = []
    if c["HAS_REL"] and c["LOOP_REL"]:  # rel_h and rel_w rows share one walk when their slot groups match
        same = c["GC_H"] == c["GC_W"] and c["SLOTS_H"] == c["SLOTS_W"]
        loops.append(walk("rel rows", c["n_prog_tiles"] * c["SLOTS_H"], c["R_REL"]))
        if not same:
            loops.append(walk("rel_w rows", c["n_prog_tiles"] * c["SLOTS_W"], c["R_REL"]))
    if c["HAS_RPB"] and c["LOOP_RPB"]:
        loops.append(walk("rpb", c["n_prog_tiles"], c["R_RPB"]))
    return loops


def _key_bwd(c: dict) -> list[LoopSpec]:
    H, rows, halo = (c["sizes"][i] for i in (0, 3, 7))  # (H, W, HEADS, ROWS, ..., HALO_H, HALO_W)
    blocks = range(0, H, rows)
    spans = [(max(0, y0 - halo), min(H, y0 + rows + halo), y0) for y0 in blocks]
    trips = sum(hi - lo for lo, hi, _ in spans) / len(blocks)
    slow_rows = LoopSpec("slow pass: query rows", round(trips), exp2=True)
    if c["BLOCK_M"] <= c["SUB_M"]:  # one sub-tile: the compiler drops that loop (one trip)
        slow = dataclasses.replace(slow_rows, trips=0, cold=True)
    else:
        slow = LoopSpec("non-finite slow pass: key sub-tiles (not taken)", 0, [slow_rows],
                        exp2=True, cold=True)
    if not c.get("HALVES"):
        return [LoopSpec("query rows i_lo<=i<i_hi", round(trips), exp2=True), slow]
    # HALVES: the walks over the rows reaching the top part only, both parts, the bottom
    # part only (bounds as in the kernel: RH = ceil(rows / 2) rows on top)
    rh = (rows + 1) // 2
    walks = [0.0, 0.0, 0.0]
    for lo, hi, y0 in spans:
        mid = min(max(y0 + rh - halo, lo), hi)
        bot = min(max(y0 + rh + halo, mid), hi)
        for w, n in enumerate((mid - lo, bot - mid, hi - bot)):
            walks[w] += n / len(blocks)
    names = ("query rows, top part only", "query rows, both parts", "query rows, bottom part only")
    # the walks' rounded trips add up to the rounded total (that of the one-walk kernel)
    ends = [min(round(walks[0]), round(trips)), min(round(walks[0] + walks[1]), round(trips)),
            round(trips)]
    trips3 = [end - start for start, end in zip([0] + ends, ends)]
    return [LoopSpec(name, n, exp2=True) for name, n in zip(names, trips3)] + [slow]


def _image_bwd(c: dict) -> list[LoopSpec]:
    # imagebwd's gradient kernel: straight-line code, then its non-finite slow pass: a
    # loop of passes with 0 trips unless the program's results came out non-finite (then
    # 2, each over the H * W queries); the channel-chunk loops (1 trip at d <= 64) inside
    chunks = -(-c["BLOCK_D"] // c["DC"])
    H, W = c["sizes"][:2]
    return [LoopSpec("slow pass: passes (0 trips unless flagged)", 0, [
        LoopSpec("queries", H * W, [
            LoopSpec("logit channel chunks", chunks, unrollable=True),
            LoopSpec("dq channel chunks", chunks, unrollable=True)])], cold=True)]


def _image_fwd(c: dict) -> list[LoopSpec]:
    # the image forward is straight-line code: its non-finite v pass is a 0/1-trip loop
    # that the compiler turns into a branch (counted once, as straight-line code)
    return []


# kernel function name -> loops from the launch arguments (by parameter name)
LOOPS: dict[str, Callable[[dict], list[LoopSpec]]] = {
    "_tiled_fwd_kernel": _tiled,
    "_tile2d_fwd_kernel": _tile2d,
    "_rows_fwd_kernel": _rows,
    "_dq_kernel": _offsets,
    "_query_grads_kernel": _rows_bwd_query,
    "_reduce_tables_kernel": _reduce_tables,
    "_dkv_kernel": _offsets,
    "_key_bwd_kernel": _key_bwd,
    "_tile2d_bwd_query_kernel": _tile2d_bwd,
    "_tile2d_bwd_key_kernel": _tile2d_bwd,
    "_image_bwd_kernel": _image_bwd,
    "_image_fwd_kernel": _image_fwd,
}


@dataclasses.dataclass
class MatchedLoop:
    name: str
    trips: int
    iterations: int  # per program: product of the trips of it and its enclosing loops
    cold: bool = False  # a slow-pass loop or inside one (LoopSpec.cold)


@dataclasses.dataclass
class LoopMatch:
    loops: list[MatchedLoop]  # one per SASS loop, in address order
    note: str = ""  # why the mapping is uncertain ("" when it is not)


def _flatten(specs: list[LoopSpec], removed: set, depth: int = 0, outer: int = 1):
    """Pre-order (spec, depth, iterations) of the loops left after `removed` are unrolled
    (a removed loop's children, all removed too, are straight-line code of its parent)."""
    for spec in specs:
        iterations = outer * spec.trips
        if id(spec) not in removed:
            yield spec, depth, iterations
            yield from _flatten(spec.children, removed, depth + 1, iterations)


def _all(specs: list[LoopSpec]):
    for spec in specs:
        yield spec
        yield from _all(spec.children)


def _fits(flat, depths: list[int], exp2: list[bool]) -> bool:
    return ([d for _, d, _ in flat] == depths
            and all(s.exp2 is None or s.exp2 == e for (s, _, _), e in zip(flat, exp2)))


def _readings(specs: list[LoopSpec], depths: list[int], exp2: list[bool]) -> list:
    """Every fitting reading, fewest unrolled loops first, earliest in the table first."""
    candidates = [s for s in _all(specs) if s.unrollable or s.trips == 1]
    readings = []
    for n in range(len(candidates) + 1):
        for removed in itertools.combinations(candidates, n):
            ids = {id(s) for s in removed}
            # innermost first: an unrolled loop's nested loops are unrolled too
            if any(id(c) not in ids for s in removed for c in _all(s.children)):
                continue
            flat = list(_flatten(specs, ids))
            if _fits(flat, depths, exp2):
                readings.append(flat)
    return readings


def match_loops(kernel: str, arguments: dict, depths: list[int],
                exp2: Optional[list[bool]] = None) -> LoopMatch:
    """Trip counts for the SASS loops of `kernel`, given their nesting depths in address
    order and whether each body (nested loops included) holds an exp2."""
    exp2 = [True] * len(depths) if exp2 is None else exp2
    fallback = [MatchedLoop("?", 1, 1) for _ in depths]
    make: Optional[Callable] = LOOPS.get(kernel)
    if make is None:
        return LoopMatch(fallback, f"{kernel}: no trip-count entry in sasa_triton/cost/"
                                   "kernels.py; loops counted once")
    specs = make(arguments)
    readings = _readings(specs, depths, exp2)
    if not readings:
        expected = [(s.name, d) for s, d, _ in _flatten(specs, set())]
        return LoopMatch(fallback, f"{kernel}: SASS loops (depths {depths}, exp2 {exp2}) do "
                                   f"not match the kernel table {expected}; loops counted once")
    cold = {id(s) for top in _all(specs) if top.cold for s in _all([top])}
    chosen = [MatchedLoop(s.name, s.trips, it, id(s) in cold) for s, _, it in readings[0]]
    iterations = [m.iterations for m in chosen]
    others = [r for r in readings[1:] if [it for _, _, it in r] != iterations]
    note = ""
    if others:
        alt = [[(s.name, it) for s, _, it in r] for r in others]
        note = (f"{kernel}: loop nesting ambiguous; took {[(m.name, m.iterations) for m in chosen]}"
                f", also possible {alt}")
    return LoopMatch(chosen, note)
