"""SASS of a cubin as instructions and loops (generic: knows nothing about the kernels).

The disassembler is the nvdisasm that ships with Triton's NVIDIA backend. A loop is a
backward branch (a BRA whose target lies at or before it): its body is [target, branch].
Loops nest by address range. A guarded region is the body of an if: the code a forward
conditional branch jumps over, entered only through that branch. Only the kernel's main
region is kept: code after the first subroutine label (`$__internal_...`, e.g. 64-bit
division slow paths reached by CALL) and the trailing `BRA self` / NOP padding are left
out.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*([.$][\w.$]+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str
    predicated: bool
    target: int | None = None  # branch target address (BRA only)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclasses.dataclass
class Loop:
    start: int  # address of the first body instruction (the branch target)
    end: int  # address of the backward branch
    depth: int = 0  # 0 = outermost
    parent: int | None = None  # index of the enclosing loop in the loop list

    def contains(self, address: int) -> bool:
        return self.start <= address <= self.end


def tool(name: str) -> str:
    """Path of a CUDA binary tool (nvdisasm, cuobjdump) shipped with Triton's backend,
    else from PATH."""
    try:
        import triton.backends.nvidia as nvidia

        path = Path(nvidia.__file__).parent / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return name


def disassemble(cubin: bytes) -> str:
    """nvdisasm's text of a cubin (code sections only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool("nvdisasm"), "-c", path], check=True,
                              capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """{'regs', 'stack', 'local'} from `cuobjdump -res-usage` (ptxas's allocation)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool("cuobjdump"), "-res-usage", path], check=True,
                              capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower() if key != "REG" else "regs"] = int(m.group(1)) if m else 0
    return usage


def parse(text: str) -> list[Instruction]:
    """The main region's instructions, branch targets resolved to addresses."""
    labels: dict[str, int] = {}
    pending: list[str] = []
    raw = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _LINE.search(line)
        if not m:
            continue
        address = int(m.group(1), 16)
        for name in pending:
            labels[name] = address
        if any(name.startswith("$") for name in pending):
            raw.append(None)  # a subroutine starts: the main region ends here
        pending = []
        raw.append((address, m.group(3), m.group(4).strip(), bool(m.group(2))))
    out = []
    for item in raw:
        if item is None:
            break
        address, opcode, operands, predicated = item
        target = None
        if opcode.split(".")[0] == "BRA":
            t = _TARGET.search(operands)
            if t and t.group(1) in labels:
                target = labels[t.group(1)]
            elif re.fullmatch(r"0x[0-9a-f]+", operands.split()[-1] if operands else ""):
                target = int(operands.split()[-1], 16)
        if opcode == "BRA" and target == address:  # the trailing spin after EXIT
            break
        out.append(Instruction(address, opcode, operands, predicated, target))
    return out


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Loops in address order (pre-order of the nesting), with depth and parent set.
    Several backward branches to one target form one loop ending at the last of them."""
    ends: dict[int, int] = {}
    for ins in instructions:
        if ins.target is not None and ins.target <= ins.address:
            ends[ins.target] = max(ins.address, ends.get(ins.target, -1))
    loops = [Loop(start, end) for start, end in sorted(ends.items())]
    for i, loop in enumerate(loops):
        enclosing = [j for j in range(i) if loops[j].contains(loop.start)
                     and loops[j].end >= loop.end]
        if enclosing:
            loop.parent = enclosing[-1]  # the innermost: the latest start before ours
            loop.depth = loops[loop.parent].depth + 1
    return loops


@dataclasses.dataclass(frozen=True)
class Guarded:
    """The code a forward conditional branch jumps over: addresses strictly between the
    branch and its target, entered only by falling through the branch."""
    branch: int
    target: int
    loops: tuple[int, ...]  # indices of the loops wholly inside

    def contains(self, address: int) -> bool:
        return self.branch < address < self.target


def guarded_regions(instructions: list[Instruction], loops: list[Loop]) -> list[Guarded]:
    """Every region skipped by a predicated forward BRA that no other branch enters and no
    loop crosses (an if's body), with the loops inside it."""
    regions = []
    branches = [(i.address, i.target) for i in instructions if i.target is not None]
    for ins in instructions:
        if not (ins.base == "BRA" and ins.predicated and ins.target is not None
                and ins.target > ins.address):
            continue
        lo, hi = ins.address, ins.target
        if any((lo < lp.start < hi) != (lo < lp.end < hi) for lp in loops):
            continue  # a loop crosses the region's edge
        if any(lo < target < hi and not lo <= address < hi for address, target in branches):
            continue  # entered from elsewhere
        held = tuple(i for i, lp in enumerate(loops) if lo < lp.start < hi)
        regions.append(Guarded(lo, hi, held))
    return regions


def innermost_loop(loops: list[Loop], address: int) -> int | None:
    """Index of the innermost loop whose body holds `address`, or None."""
    best = None
    for i, loop in enumerate(loops):
        if loop.contains(address) and (best is None or loop.depth > loops[best].depth):
            best = i
    return best


@functools.cache
def _cached_parse(cubin: bytes) -> tuple:
    instructions = parse(disassemble(cubin))
    return tuple(instructions), tuple(find_loops(instructions))


def read_cubin(cubin: bytes) -> tuple[list[Instruction], list[Loop]]:
    """(main-region instructions, loops) of a cubin; cached per cubin."""
    instructions, loops = _cached_parse(cubin)
    return list(instructions), [dataclasses.replace(loop) for loop in loops]
