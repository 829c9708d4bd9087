"""Instruction classes of sm_90 SASS opcodes, and the access width of memory instructions.

Classes (the columns of the tool's loop tables):
    mma      tensor-core matrix multiply (HMMA, HGMMA, IMMA, DMMA)
    fp32     FP32 FMA/ADD/MUL and compare/select/min-max (FFMA, FADD, FMUL, FMNMX, FSEL, ...)
    fp16     packed half arithmetic (HFMA2, HADD2, HMUL2, HSETP2, HMNMX2)
    mufu     special-function unit (MUFU.EX2, MUFU.RCP, MUFU.LG2, ...)
    cvt      conversions (F2F, F2FP, I2F, F2I, I2FP, ...)
    ldg      global loads, LDGSTS (cp.async) included
    stg      global stores and reductions (STG, RED, ATOM)
    lds      shared loads (LDS, LDSM)
    sts      shared stores (STS, STSM)
    local    local-memory (spill) loads and stores (LDL, STL)
    shfl     warp shuffles and warp reductions (SHFL, REDUX, VOTE)
    bar      barriers and memory fences (BAR, DEPBAR, MEMBAR, SYNCS, LDGDEPBAR)
    int      integer, predicate and move, uniform datapath included (IMAD, IADD3, LOP3, ...)
    const    constant-bank loads and special registers (LDC, ULDC, S2R, S2UR, CS2R)
    control  branches and convergence (BRA, EXIT, BSSY, BSYNC, CALL, RET, NOP, WARPSYNC)
    other    anything not listed
"""
from __future__ import annotations

import re

CLASSES = ("mma", "fp32", "fp16", "mufu", "cvt", "ldg", "stg", "lds", "sts", "local", "shfl",
           "bar", "int", "const", "control", "other")

_BY_BASE = {
    "mma": "HMMA HGMMA IMMA DMMA QMMA",
    "fp32": "FFMA FADD FMUL FMNMX FSEL FSETP FSET FCHK FSWZADD FRND",
    "fp16": "HFMA2 HADD2 HMUL2 HSETP2 HSET2 HMNMX2",
    "mufu": "MUFU",
    "cvt": "F2F F2FP F2I I2F I2FP F2IP I2I",
    "ldg": "LDG LDGSTS",
    "stg": "STG RED ATOM ATOMG",
    "lds": "LDS LDSM",
    "sts": "STS STSM",
    "local": "LDL STL",
    "shfl": "SHFL REDUX VOTE VOTEU MATCH",
    "bar": "BAR DEPBAR MEMBAR SYNCS LDGDEPBAR ERRBAR CCTL",
    "int": ("IMAD IADD3 IADD LOP3 LOP ISETP SHF LEA SEL PRMT MOV P2R R2P IABS VIADD VIMNMX "
            "VIADDMNMX IMNMX SGXT PLOP3 FLO POPC BREV BMSK IDP IMUL UIADD3 UIMAD ULOP3 UISETP "
            "USHF ULEA UMOV USEL UPRMT UPLOP3 USGXT UFLO UPOPC UBMSK R2UR VOTE.ANY"),
    "const": "LDC ULDC S2R S2UR CS2R",
    "control": "BRA EXIT BSSY BSYNC CALL RET NOP WARPSYNC YIELD BPT JMP BRX KILL",
}
_CLASS_OF = {base: cls for cls, names in _BY_BASE.items() for base in names.split()}
_WIDTH = re.compile(r"\.(U8|S8|U16|S16|64|128)\b")


def instruction_class(opcode: str) -> str:
    """The class of an opcode with modifiers, e.g. 'LDG.E.128' -> 'ldg'."""
    return _CLASS_OF.get(opcode.split(".")[0], "other")


def access_bytes(opcode: str) -> int:
    """Bytes one lane moves in a memory instruction (LDG.E.128 -> 16, LDG.E -> 4,
    LDG.E.U16 -> 2, LDSM.16.M88.4 -> 16); 0 for non-memory opcodes."""
    if instruction_class(opcode) not in ("ldg", "stg", "lds", "sts", "local"):
        return 0
    if opcode.startswith("LDSM") or opcode.startswith("STSM"):  # 8x8 b16 matrices: 4 B/lane each
        return 4 * int(opcode.rsplit(".", 1)[1]) if opcode[-2:] in (".2", ".4") else 4
    m = _WIDTH.search(opcode)
    if m is None:
        return 4
    return {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}[m.group(1)]
