"""The tile2dbwd kernels compiled for an H100 (sm_90) as tile2d_bwd.backward launches
them, without a GPU.

A subprocess runs the launcher on CPU tensors with the query, reduction and key kernels
swapped for recorders and compiles each recorded query / key launch with Triton's
compiler and ptxas (aot_sm90.py): the suite shapes this backward serves (s1, s2, det,
h16: bf16, k 7, and k3; zeros, shared rel; default configs) and feature combinations that change
the code (mask with dilation and non-square k, per-head rel, rpb, fp16, fp32, odd d,
channels-last strides). Every launch must compile; the suite launches must not spill.
"""
import re

import torch
import triton

from cases import Case, make_inputs

SUITE = [  # report suite cases at B = 2 (the batch does not change the code)
    (Case(B=2, H=56, W=56, heads=8, d=8, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=2, H=28, W=28, heads=8, d=16, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=2, H=128, W=128, heads=4, d=16, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=2, H=28, W=28, heads=16, d=8, k=7, rel="shared"), torch.bfloat16, "contiguous"),
    (Case(B=2, H=28, W=28, heads=8, d=16, k=3, rel="shared"), torch.bfloat16, "contiguous"),
]
FEATURES = [
    (Case(B=2, H=12, W=20, heads=4, d=8, k=(3, 5), dilation=(1, 2), padding="mask",
          rel="per_head", rpb=True), torch.float16, "channels_last"),
    (Case(B=2, H=12, W=20, heads=2, d=5, k=5, rel="shared", rpb=True), torch.float32,
     "contiguous"),
]
KERNELS = ("_tile2d_bwd_query_kernel", "_tile2d_bwd_key_kernel")


def _compile_all() -> None:
    from sasa_triton.args import check_attend_args
    from sasa_triton.kernels import rows_bwd_query, tile2d_bwd, tile2d_bwd_key, tile2d_bwd_query

    from aot_sm90 import compile_launch, record_launches

    for spec_id, (case, dtype, layout) in enumerate(SUITE + FEATURES):
        q, k, v, kw = make_inputs(case, dtype, layout)
        args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"],
                                 kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"), kw["scale"])
        lse = torch.zeros(q.shape[:4])
        with record_launches(tile2d_bwd_query, KERNELS[:1]) as rq, \
                record_launches(tile2d_bwd_key, KERNELS[1:]) as rk, \
                record_launches(rows_bwd_query, ["_reduce_tables_kernel"]):
            tile2d_bwd.backward(q, k, v, q, lse, q, args)
        for name, rec in ((KERNELS[0], rq[KERNELS[0]]), (KERNELS[1], rk[KERNELS[1]])):
            (call,) = rec.calls
            compiled, usage = compile_launch(rec.fn, *call)
            print("compiled", spec_id, name, case.id, dtype, layout, usage, flush=True)


def test_tile2d_bwd_compiles_for_sm90_without_spills():
    from aot_sm90 import run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled")]
    assert len(lines) == 2 * len(SUITE + FEATURES), proc.stdout[-4000:]
    assert all("'regs'" in ln for ln in lines), "no ptxas usage:\n" + "\n".join(lines)
    # Triton 3.6 (the GPU machine's) parks one 8-byte value of the det query kernel on the
    # stack (255 registers); 3.8+ spill nothing
    allowed = 0 if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8) else 8
    for ln in lines[:2 * len(SUITE)]:
        assert int(re.search(r"'spill_stores': (\d+)", ln).group(1)) <= allowed, (
            "a suite launch spills:\n" + "\n".join(lines))


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    if "--aot-compile" in sys.argv:
        _compile_all()
