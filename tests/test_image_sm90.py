"""The image forward and imagebwd kernels compiled for an H100 (sm_90) as their launchers
launch them, without a GPU.

A subprocess runs each launcher on CPU tensors with the kernels swapped for recorders and
compiles every recorded launch with Triton's compiler and ptxas (aot_sm90.py): the suite
shape these kernels serve (s4: bf16, 7 x 7, d 64, k 7, zeros, shared rel; default
configs) and feature combinations that change the code (mask with dilation and
non-square k, per-head rel, rpb, fp16, shift, odd d, d 128, channels-last
strides, zeros without rel), imagebwd's non-finite slow pass (inside its gradient
kernel; d <= 64) included. Every launch must compile; no launch may spill.
"""
import re

import torch

from cases import Case, make_inputs

SUITE = [  # report suite cases at B = 2 (the batch does not change the code)
    (Case(B=2, H=7, W=7, heads=8, d=64, k=7, rel="shared"), torch.bfloat16, "contiguous"),
]
FEATURES = [
    (Case(B=2, H=7, W=7, heads=4, d=32, k=(3, 5), dilation=(1, 2), padding="mask",
          rel="per_head", rpb=True), torch.float16, "channels_last"),
    (Case(B=2, H=6, W=5, heads=2, d=5, k=3, rel="shared", rpb=True), torch.bfloat16,
     "contiguous"),
    (Case(B=2, H=7, W=7, heads=2, d=64, k=7, padding="shift", rel="per_head"),
     torch.bfloat16, "contiguous"),
    (Case(B=2, H=7, W=7, heads=2, d=128, k=7, padding="mask", rel="shared"), torch.float16,
     "nchw_view"),
    (Case(B=2, H=4, W=16, heads=2, d=64, k=(3, 7), dilation=(1, 2), padding="shift"),
     torch.bfloat16, "contiguous"),
    # zeros without rel: the zero keys' q . 0 (a NaN / inf q) by a small dot
    (Case(B=2, H=7, W=7, heads=2, d=64, k=7), torch.bfloat16, "contiguous"),
]
KERNELS = ("_image_fwd_kernel", "_image_bwd_kernel")


def _compile_all() -> None:
    from sasa_triton.args import check_attend_args
    from sasa_triton.kernels import image_bwd, image_fwd, rows_bwd_query

    from aot_sm90 import compile_launch, record_launches

    for spec_id, (case, dtype, layout) in enumerate(SUITE + FEATURES):
        q, k, v, kw = make_inputs(case, dtype, layout)
        args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"],
                                 kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"), kw["scale"])
        lse = torch.zeros(q.shape[:4])
        with record_launches(image_fwd, KERNELS[:1]) as rf, \
                record_launches(image_bwd, KERNELS[1:]) as rb, \
                record_launches(rows_bwd_query, ["_reduce_tables_kernel"]):
            image_fwd.forward(q, k, v, args)
            bwd = image_bwd.supports(tuple(q.shape), dtype, args)  # d <= 64
            if bwd:
                image_bwd.backward(q, k, v, q, lse, q, args)
        for name, rec in ((KERNELS[0], rf[KERNELS[0]]), *((n, rb[n]) for n in KERNELS[1:])):
            if name != KERNELS[0] and not bwd:
                continue
            (call,) = rec.calls
            compiled, usage = compile_launch(rec.fn, *call)
            print("compiled", spec_id, name, case.id, dtype, layout, usage, flush=True)


def test_image_kernels_compile_for_sm90_without_spills():
    from aot_sm90 import run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled")]
    # the d 128 case compiles the forward only (imagebwd: d <= 64)
    assert len(lines) == len(KERNELS) * len(SUITE + FEATURES) - 1, proc.stdout[-4000:]
    assert all("'regs'" in ln for ln in lines), "no ptxas usage:\n" + "\n".join(lines)
    for ln in lines:
        assert int(re.search(r"'spill_stores': (\d+)", ln).group(1)) == 0, (
            "a launch spills:\n" + "\n".join(lines))


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    if "--aot-compile" in sys.argv:
        _compile_all()
