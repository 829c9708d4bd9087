"""One recorded launch, compiled and read: resources, loops with instruction classes,
dynamic instruction totals and traffic.

Counting rules (per program; a SASS instruction issues once per warp):
* an instruction inside loops runs `iterations` times (kernels.match_loops: the product
  of the trip counts of its loop and the loops around it); code outside loops runs once,
  whichever branch of an if it is on (an upper bound for rarely taken paths), except the
  body of an if that holds only cold loops (a non-finite slow pass: kernels.LoopSpec.cold):
  that if is not entered on finite input, so its straight-line code runs 0 times too
  (`cold`; sass.guarded_regions finds the bodies);
* dynamic warp instructions of a launch = sum over instructions x warps x programs;
* L2 <-> SM bytes = dynamic global loads/stores x 32 lanes x access width (an upper bound:
  masked-off lanes and lanes sharing an address are counted);
* HBM bytes = unique bytes of the tensors passed to the launch (each storage once).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from . import classes, kernels, sass
from .compile import compile_cached
from .record import Launch


@dataclasses.dataclass
class LoopReport:
    index: int
    depth: int
    start: int
    end: int
    name: str  # from the kernel table ("?" when unmatched)
    trips: int
    iterations: int  # per program
    body: Counter  # static instructions of the body (nested loops' bodies excluded) by class
    mem: Counter  # static memory instructions of the body by class and lane width, "ldg.16B"


@dataclasses.dataclass
class LaunchReport:
    kernel: str
    grid: tuple
    programs: int
    num_warps: int
    num_stages: int
    regs: int
    spill_bytes: int  # local memory per thread (ptxas spills and stack)
    shared: int
    static_instructions: int
    loops: list[LoopReport]
    outside: Counter  # static instructions outside every loop, by class
    outside_mem: Counter  # their memory instructions by class and lane width
    per_program: Counter  # dynamic instructions per warp per program, by class
    ldg_bytes_per_program: float  # requested by all warps of a program
    stg_bytes_per_program: float
    hbm_bytes: int
    note: str
    # static straight-line instructions of cold ifs (run 0 times), by class
    cold: Counter = dataclasses.field(default_factory=Counter)

    @property
    def warp_instructions_per_program(self) -> float:
        return sum(self.per_program.values()) * self.num_warps

    @property
    def warp_instructions(self) -> float:
        return self.warp_instructions_per_program * self.programs

    @property
    def l2_bytes(self) -> float:
        return (self.ldg_bytes_per_program + self.stg_bytes_per_program) * self.programs


def unique_tensor_bytes(values) -> int:
    """Bytes of the distinct storages among `values` (tensors)."""
    seen, total = set(), 0
    for t in values:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@dataclasses.dataclass
class Tally:
    loops: list[LoopReport]
    outside: Counter
    outside_mem: Counter
    cold: Counter  # straight-line code of the bodies of cold ifs: not run on finite input
    per_program: Counter  # dynamic instructions per warp per program, by class
    ldg_bytes_per_warp: float
    stg_bytes_per_warp: float


def _cold_ifs(regions: list[sass.Guarded], matched: list[kernels.MatchedLoop]) -> list:
    """Per cold loop, the innermost if around it, where that if holds only cold loops: on
    finite input it is not entered. (Innermost, since an outer if may hold other code
    that runs; where a cold loop has a guard of its own, only that guard's body counts.)"""
    out = []
    for i, m in enumerate(matched):
        around = [g for g in regions if i in g.loops]
        if m.cold and around:
            g = min(around, key=lambda g: g.target - g.branch)
            if all(matched[j].cold for j in g.loops) and g not in out:
                out.append(g)
    return out


def tally(instructions: list[sass.Instruction], loops: list[sass.Loop],
          matched: list[kernels.MatchedLoop]) -> Tally:
    """Static counts per loop and dynamic counts per warp and program (the rules above)."""
    reports = [LoopReport(i, lp.depth, lp.start, lp.end, m.name, m.trips, m.iterations,
                          Counter(), Counter()) for i, (lp, m) in enumerate(zip(loops, matched))]
    result = Tally(reports, Counter(), Counter(), Counter(), Counter(), 0.0, 0.0)
    cold_ifs = _cold_ifs(sass.guarded_regions(instructions, loops), matched)
    for ins in instructions:
        cls = classes.instruction_class(ins.opcode)
        width = classes.access_bytes(ins.opcode)
        where = sass.innermost_loop(loops, ins.address)
        if (where is None or not matched[where].cold) and any(
                g.contains(ins.address) for g in cold_ifs):
            result.cold[cls] += 1  # the body of an if entered only on non-finite input
            continue
        if where is None:
            body, mem, times = result.outside, result.outside_mem, 1
        else:
            loop = reports[where]
            body, mem, times = loop.body, loop.mem, loop.iterations
        body[cls] += 1
        if width:
            mem[f"{cls}.{width}B"] += 1
        result.per_program[cls] += times
        if cls == "ldg":
            result.ldg_bytes_per_warp += times * 32 * width
        elif cls == "stg":
            result.stg_bytes_per_warp += times * 32 * width
    return result


def analyze(launch: Launch, arch: int = 90) -> LaunchReport:
    compiled = compile_cached(launch.fn, launch.args, launch.kwargs, arch)
    cubin = compiled.asm["cubin"]
    usage = sass.resource_usage(cubin)
    instructions, loops = sass.read_cubin(cubin)
    exp2 = [any(i.opcode == "MUFU.EX2" and lp.contains(i.address) for i in instructions)
            for lp in loops]
    match = kernels.match_loops(launch.kernel, launch.arguments(), [lp.depth for lp in loops],
                                exp2)
    t = tally(instructions, loops, match.loops)
    meta = compiled.metadata
    warps = meta.num_warps
    return LaunchReport(
        kernel=launch.kernel, grid=launch.grid, programs=launch.programs, num_warps=warps,
        num_stages=meta.num_stages, regs=usage["regs"],
        spill_bytes=usage["local"] + usage["stack"], shared=meta.shared,
        static_instructions=len(instructions), loops=t.loops, outside=t.outside,
        outside_mem=t.outside_mem, cold=t.cold, per_program=t.per_program,
        ldg_bytes_per_program=t.ldg_bytes_per_warp * warps,
        stg_bytes_per_program=t.stg_bytes_per_warp * warps,
        hbm_bytes=unique_tensor_bytes(list(launch.args) + list(launch.kwargs.values())),
        note=match.note)
