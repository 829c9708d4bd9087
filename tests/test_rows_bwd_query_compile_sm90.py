"""The query-owned backward kernel (kernels/rows_bwd_query.py) and its table reduction
compiled for an H100 (sm_90) as `query_grads` launches them, without a GPU (see
aot_sm90.py): the suite shapes (k 7, zeros, shared rel, bf16) and the feature
combinations that change the kernel (mask / shift, dilation, per-head rel, rpb, fp16 /
fp32, d not a power of two, strided layouts). No launch may spill more than a few words.
"""
import re

import torch
import triton

from cases import Case, make_inputs

SUITE = dict(k=7, rel="shared")
SPECS = [  # (case, dtype, layout); B is small: it changes the grid, not the kernel
    (Case(B=2, H=56, W=56, heads=8, d=8, **SUITE), torch.bfloat16, "contiguous"),
    (Case(B=2, H=28, W=28, heads=8, d=16, **SUITE), torch.bfloat16, "contiguous"),
    (Case(B=2, H=14, W=14, heads=8, d=32, **SUITE), torch.bfloat16, "contiguous"),
    (Case(B=2, H=7, W=7, heads=8, d=64, **SUITE), torch.bfloat16, "contiguous"),
    (Case(B=2, H=128, W=128, heads=4, d=16, **SUITE), torch.bfloat16, "contiguous"),
    (Case(B=2, H=28, W=28, heads=1, d=128, **SUITE), torch.bfloat16, "contiguous"),  # h1
    (Case(B=2, H=12, W=16, heads=4, d=8, k=(3, 5), dilation=(1, 2), padding="mask",
          rel="per_head", rpb=True), torch.float32, "contiguous"),
    (Case(B=2, H=12, W=16, heads=3, d=12, k=5, padding="shift", rel="shared", rpb=True),
     torch.float16, "channels_last"),
    (Case(B=1, H=16, W=16, heads=2, d=128, k=7, rel="per_head"), torch.bfloat16, "nchw_view"),
    (Case(B=1, H=16, W=16, heads=2, d=128, k=3, padding="mask", rpb=True), torch.float32,
     "contiguous"),
    # one query tile: the reduction's tile count arrives as the constexpr 1
    (Case(B=1, H=4, W=8, heads=1, d=8, k=3, rel="shared", rpb=True), torch.bfloat16,
     "contiguous"),
]
KERNELS = ("_query_grads_kernel", "_reduce_tables_kernel")


def _compile_all() -> None:
    from sasa_triton.args import check_attend_args
    from sasa_triton.kernels import rows_bwd_query as mod

    from aot_sm90 import compile_launch, record_launches

    for case, dtype, layout in SPECS:
        q, k, v, kw = make_inputs(case, dtype, layout)
        args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"],
                                 kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"), kw["scale"])
        lse = torch.zeros(q.shape[:4])
        with record_launches(mod, KERNELS) as recorders:
            mod.query_grads(q, k, v, q, lse, q, args)
        for name in KERNELS:
            (call,) = recorders[name].calls
            _, usage = compile_launch(recorders[name].fn, *call)
            print("compiled", name, case.id, dtype, layout,
                  mod.default_config(tuple(q.shape), args, dtype), usage, flush=True)


def test_query_grads_compile_for_sm90_without_spills():
    from aot_sm90 import run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled")]
    assert len(lines) == len(SPECS) * len(KERNELS), proc.stdout[-4000:]
    assert all("'regs'" in ln for ln in lines), "no ptxas usage:\n" + "\n".join(lines)
    stores = [int(re.search(r"'spill_stores': (\d+)", ln).group(1)) for ln in lines]
    # The suite shapes (first six) spill nothing. Elsewhere ptxas may park a few scalars
    # that only the non-finite slow pass reads (stored once before the key-row walk,
    # reloaded only when that pass runs): fp32 / rpb at 4 warps, 28 bytes with 3.9.
    suite = len(KERNELS) * 6
    assert max(stores[:suite]) == 0, "a suite launch spills:\n" + "\n".join(lines)
    # Before Triton 3.8, float32 goes to the "offsets" backward (rows_bwd.supports; the key
    # kernel does not compile there), and its query kernel spills 44 bytes with 3.6
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):
        stores = [n for n, ln in zip(stores, lines) if "torch.float32" not in ln]
    assert max(stores) <= 32, "a launch spills registers:\n" + "\n".join(lines)


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    if "--aot-compile" in sys.argv:
        _compile_all()
