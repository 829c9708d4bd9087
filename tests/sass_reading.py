"""Static reading of a forward kernel's sm_90 machine code, no GPU: registers, spills and
the SASS instruction count of each loop (from a backward branch's target to the branch).

    python tests/sass_reading.py tile2d s1      # variant, suite case (bf16, k = 7, zeros,
    python tests/sass_reading.py tile2d s2      # shared rel tables, the default config)

The launcher runs on CPU tensors with its kernel swapped for a recorder; the recorded
launch is compiled as a GPU launch would be (aot_sm90.py) and disassembled with the
cuobjdump that ships with Triton. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

CASES = {  # name: (B, H, W, heads, d), as in the standard suite
    "s1": (32, 56, 56, 8, 8),
    "s2": (32, 28, 28, 8, 16),
    "det": (8, 128, 128, 4, 16),
    "h16": (32, 28, 28, 16, 8),
}


def sass(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def loops(text: str) -> list[tuple[int, int, int]]:
    """(start address, end address, instructions) of each backward branch's loop."""
    instrs = {}
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            instrs[int(m.group(1), 16)] = m.group(2)
    found = []
    for addr, ins in instrs.items():
        m = re.search(r"BRA\s+(0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            found.append((start, addr, sum(start <= a <= addr for a in instrs)))
    return found


def main(variant: str, case: str, k: int = 7) -> None:
    import importlib

    import torch

    from sasa_triton.args import check_attend_args

    from aot_sm90 import compile_launch, record_launches

    mod = importlib.import_module(f"sasa_triton.kernels.{variant}_fwd")
    name = f"_{variant}_fwd_kernel"
    B, H, W, N, D = CASES[case]
    q = torch.randn(B, H, W, N, D, dtype=torch.bfloat16)
    rel_h = torch.randn(k, D // 2, dtype=torch.bfloat16)
    rel_w = torch.randn(k, D - D // 2, dtype=torch.bfloat16)
    args = check_attend_args(q, q, q, k, 1, "zeros", rel_h, rel_w, None, None)
    with record_launches(mod, [name]) as recorders:
        mod.forward(q, q, q, args)
    (call,) = recorders[name].calls
    compiled, usage = compile_launch(recorders[name].fn, *call)
    named = dict(zip(recorders[name].fn.arg_names, call[0]), **call[1])
    meta = {n: v for n, v in named.items() if n.isupper() or n.startswith("num_")}
    print(f"{variant} {case} k={k}: {meta}")
    print(f"  ptxas: {usage}")
    for start, end, count in loops(sass(compiled.asm["cubin"])):
        print(f"  loop {start:#x}..{end:#x}: {count} SASS instructions")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 7)
