"""rows_bwd_key compiled for an H100 (sm_90) as key_grads launches it, without a GPU.

A subprocess runs key_grads on CPU tensors with the kernel swapped for a recorder and
compiles each recorded launch with Triton's compiler and ptxas (see aot_sm90.py): the
suite shapes (s1..s4, det: bf16, k 7, zeros, shared rel) and feature combinations that
change the kernel (mask, shift with dilation, per-head rel, rpb, fp16, fp32 at d = 16,
d = 80, row segments). Every launch must compile. The default launches of the suite
shapes must not spill at all (ptxas: no spill stores), their query-row loop least of all;
the non-finite slow pass walks the tile in 16-key sub-tiles so that it does not set
the register peak. (fp32 with d > 64 compiles but spills: its dots run on CUDA cores.)
"""
import re

import torch

from cases import Case, make_inputs

SUITE = [  # the report suite's cases at B = 1 or 2 (the batch does not change the code)
    (Case(B=2, H=56, W=56, heads=8, d=8, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=2, H=28, W=28, heads=8, d=16, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=2, H=14, W=14, heads=8, d=32, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=2, H=7, W=7, heads=8, d=64, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=1, H=128, W=128, heads=4, d=16, k=7, rel="shared"), torch.bfloat16, "contiguous"),
]
FEATURES = [
    (Case(B=2, H=12, W=40, heads=4, d=16, k=(3, 5), dilation=(1, 2), padding="mask",
          rel="per_head", rpb=True), torch.float16, "channels_last"),
    (Case(B=2, H=12, W=20, heads=2, d=80, k=5, dilation=2, padding="shift", rel="shared",
          rpb=True), torch.bfloat16, "nchw_view"),
    (Case(B=2, H=28, W=28, heads=2, d=16, k=7, rel="per_head", rpb=True), torch.float32,
     "contiguous"),
]


def _specs() -> list:
    """SUITE + FEATURES, less the float32 spec where the kernel refuses float32 (Triton
    before 3.8: its compiler fails on that path; the dispatcher runs "offsets" there)."""
    from sasa_triton.kernels import rows_bwd_key

    return SUITE + [s for s in FEATURES
                    if s[1] != torch.float32 or rows_bwd_key.FP32_COMPILES]


def _compile_all() -> None:
    from sasa_triton.args import check_attend_args
    from sasa_triton.cost.sass import read_cubin
    from sasa_triton.kernels import rows_bwd_key

    from aot_sm90 import compile_launch, record_launches

    for spec_id, (case, dtype, layout) in enumerate(_specs()):
        q, k, v, kw = make_inputs(case, dtype, layout)
        args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"],
                                 kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"), kw["scale"])
        lse = torch.zeros(q.shape[:4])
        config = rows_bwd_key.default_config(tuple(q.shape), args)
        with record_launches(rows_bwd_key, ["_key_bwd_kernel"]) as recorders:
            rows_bwd_key.key_grads(q, k, v, q, lse, lse, args)
        (call,) = recorders["_key_bwd_kernel"].calls
        compiled, usage = compile_launch(recorders["_key_bwd_kernel"].fn, *call)
        instructions, loops = read_cubin(compiled.asm["cubin"])
        main = min(loops, key=lambda loop: loop.start)  # the query-row loop comes first
        local = sum(1 for ins in instructions if main.contains(ins.address)
                    and ins.base in ("LDL", "STL"))
        print("compiled", spec_id, case.id, dtype, layout, config, usage,
              f"loop_local={local}", flush=True)


def test_key_kernel_compiles_for_sm90_without_spills_in_its_loop():
    from aot_sm90 import run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled")]
    assert len(lines) == len(_specs()), proc.stdout[-4000:]
    assert all("'regs'" in ln for ln in lines), "no ptxas usage:\n" + "\n".join(lines)
    for ln in lines[:len(SUITE)]:
        assert int(re.search(r"loop_local=(\d+)", ln).group(1)) == 0, (
            "a suite launch spills in its query-row loop:\n" + "\n".join(lines))
        assert int(re.search(r"'spill_stores': (\d+)", ln).group(1)) == 0, (
            "a suite launch spills:\n" + "\n".join(lines))


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    if "--aot-compile" in sys.argv:
        _compile_all()
