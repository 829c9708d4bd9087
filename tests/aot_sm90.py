"""Compile the launches a host launcher makes ahead of time for an H100 (sm_90), no GPU.

The interpreter accepts code the real compiler rejects (non-power-of-two aranges, layout
conversions, constexpr expressions, mask shapes), so tests run a launcher on CPU tensors
with its kernels swapped for recorders (`record_launches`), then compile every recorded
launch with Triton's own specialisation rules (`compile_launch`): ints equal to 1 become
constants, ints and tensor addresses divisible by 16 get tt.divisibility (vectorised
loads), exactly as a launch on a GPU would. Triton's front end, its GPU passes and ptxas
all run; nothing is launched. Registers and spills come from the ptxas -v log that Triton
prints under TRITON_DUMP_PTXAS_LOG (what a launch would report as n_regs / n_spills).

Uses Triton internals that are the same from 3.6 through 3.9 (the JIT's argument
binder and _pack_args). Run in a subprocess without TRITON_INTERPRET, which replaces
triton.jit (see `run_in_subprocess`).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

SM = 90


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def record_launches(module, names):
    """Replace the kernels `names` of `module` by recorders; yields {name: recorder}."""
    recorders = {name: _Recorder(getattr(module, name)) for name in names}
    try:
        for name, rec in recorders.items():
            setattr(module, name, rec)
        yield recorders
    finally:
        for name, rec in recorders.items():
            setattr(module, name, rec.fn)


def compile_launch(fn, args, kwargs):
    """(compiled kernel, ptxas usage) for one recorded launch of `fn`, compiled for sm_90
    with the signature, constants and attributes that a launch of these arguments gets.
    Usage is None when the kernel came from Triton's cache (no ptxas run)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from sasa_triton.cost.compile import specialise

    src, options, _ = specialise(fn, args, kwargs, SM)
    target = GPUTarget("cuda", SM, 32)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target, options=options)
    return compiled, ptxas_usage(log.getvalue())


def ptxas_usage(log: str):
    """{'regs', 'stack', 'spill_stores', 'spill_loads'} from a ptxas -v log, or None."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                  log)
    return dict(regs=int(regs.group(1)), stack=int(m.group(1)), spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)))


def run_in_subprocess(script: str, *args: str, timeout: int = 300):
    """Run `script` (a test file with a __main__ entry) without the interpreter, ptxas
    logging on its stdout; returns the CompletedProcess, or skips the calling test when
    this Triton has no CUDA compiler backend."""
    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences a Triton 3.9 notice; the launch default
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output, for registers and spills
    env["TRITON_ALWAYS_COMPILE"] = "1"  # run ptxas even when the kernel is cached
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    err = proc.stderr.lower()
    if proc.returncode != 0 and (("ptxas" in err and ("not found" in err or "no such file" in err))
                                 or "no module named 'triton.backends.nvidia'" in err):
        pytest.skip("this Triton install has no CUDA compiler backend (ptxas)")
    return proc


def compiled_spill_stores(proc, expected: int) -> tuple[list, list]:
    """(lines, spill stores per line) of a run_in_subprocess that printed one
    "compiled ... {ptxas usage}" line per launch; asserts it ran, printed `expected`
    lines and each carries ptxas's usage."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled")]
    assert len(lines) == expected, proc.stdout[-4000:]
    assert all("'regs'" in ln for ln in lines), "no ptxas usage:\n" + "\n".join(lines)
    return lines, [int(re.search(r"'spill_stores': (\d+)", ln).group(1)) for ln in lines]
