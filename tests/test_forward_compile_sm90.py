"""The CUDA-core forward kernel "tile2d" compiled for an H100 (sm_90) as its launcher
launches it, without a GPU.

A subprocess runs each launcher on CPU tensors with its kernel swapped for a recorder and
compiles the recorded launch with Triton's compiler and ptxas, specialised as a GPU
launch would be (see aot_sm90.py): the suite's s1/s2 shapes and feature combinations that
change the kernel (every padding mode, dilation, rel shared/per head, rpb, fp16/bf16/fp32,
d not a power of two, d 32, wide windows, k and v with different strides). No launch
may spill more than a few words: ptxas sometimes parks one or two outside the window
loop to stay at an occupancy step (Triton 3.8: a predicate word at 80 registers; 3.9:
12 bytes at 128 registers for fp16 d = 12), where a layout that does not fit spills
hundreds of bytes.
"""

import torch

from cases import Case, make_inputs

SPECS = [  # (variant, case, dtype, k layout, v layout)
    ("tile2d", Case(B=2, H=16, W=16, heads=8, d=8, k=7, rel="shared"), torch.bfloat16,
     "contiguous", "contiguous"),
    ("tile2d", Case(B=2, H=16, W=16, heads=8, d=16, k=7, rel="shared"), torch.bfloat16,
     "contiguous", "contiguous"),
    ("tile2d", Case(B=2, H=12, W=16, heads=4, d=8, k=(3, 5), dilation=(1, 2), padding="mask",
                    rel="per_head", rpb=True), torch.float32, "contiguous", "contiguous"),
    ("tile2d", Case(B=2, H=12, W=16, heads=3, d=12, k=5, padding="shift", rel="shared",
                    rpb=True), torch.float16, "channels_last", "channels_last"),
    ("tile2d", Case(B=2, H=16, W=16, heads=2, d=16, k=11, rel="shared"), torch.bfloat16,
     "contiguous", "nchw_view"),
    # a head over four lanes (d 32; float32 d 16: more lanes than the config planned), the
    # widest window holding 4 pixels (kw 9), the widest window (kw 15, 2 pixels per thread)
    ("tile2d", Case(B=2, H=14, W=14, heads=8, d=32, k=7, rel="shared"), torch.bfloat16,
     "contiguous", "contiguous"),
    ("tile2d", Case(B=2, H=16, W=16, heads=8, d=16, k=7, padding="mask", rel="shared"),
     torch.float32, "contiguous", "contiguous"),
    ("tile2d", Case(B=2, H=16, W=16, heads=8, d=8, k=9, rel="per_head", rpb=True),
     torch.bfloat16, "contiguous", "contiguous"),
    ("tile2d", Case(B=2, H=16, W=20, heads=4, d=8, k=(5, 15), rel="shared", rpb=True),
     torch.float16, "contiguous", "contiguous"),
]
_KERNELS = {"tile2d": "_tile2d_fwd_kernel"}


def _compile_all() -> None:
    import importlib

    from sasa_triton.args import check_attend_args

    from aot_sm90 import compile_launch, record_launches

    for variant, case, dtype, k_layout, v_layout in SPECS:
        q, k, _, kw = make_inputs(case, dtype, k_layout)
        v = make_inputs(case, dtype, v_layout, seed=1)[2]
        args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"],
                                 kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"), kw["scale"])
        mod = importlib.import_module(f"sasa_triton.kernels.{variant}_fwd")
        name = _KERNELS[variant]
        with record_launches(mod, [name]) as recorders:
            mod.forward(q, k, v, args)
        (call,) = recorders[name].calls
        _, usage = compile_launch(recorders[name].fn, *call)
        print("compiled", variant, case.id, dtype, k_layout, v_layout, usage, flush=True)


def test_forward_kernels_compile_for_sm90_without_spills():
    from aot_sm90 import compiled_spill_stores, run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile")
    lines, stores = compiled_spill_stores(proc, len(SPECS))
    assert max(stores) <= 16, "a launch spills registers:\n" + "\n".join(lines)


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    if "--aot-compile" in sys.argv:
        _compile_all()
