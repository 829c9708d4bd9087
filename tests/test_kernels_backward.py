"""Backward kernels against float64 autograd through the oracle.

Each kernel gets out and lse from the reference forward (the forward kernels are tested
on their own) and must return the gradient of every differentiable input. Runs through
Triton's interpreter on CPU; on a CUDA machine the same tests run on the GPU.
"""

import pytest
import torch

from sasa_triton.args import check_attend_args
from sasa_triton.reference import reference_attend
from sasa_triton.variants import with_direction

from cases import Case, assert_close, check_grads, make_inputs
from oracle import oracle_attend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = {v.name: v for v in with_direction("bwd") if v.needs_triton}
TABLES = ("rel_h", "rel_w", "rpb")

# A covering set: every padding, dilation 1 / square / not, square and non-square odd
# kernels 1..13, image smaller than the window, shared and per-head rel, rpb, scale,
# head dims 1..256 (odd ones split rel_h/rel_w unevenly).
CASES = [
    Case(B=2, H=5, W=6, heads=2, d=8, k=3),
    Case(B=1, H=5, W=6, heads=2, d=8, k=3, rel="per_head", rpb=True, scale=0.7),
    Case(B=1, H=6, W=5, heads=2, d=8, k=5, padding="mask", rel="shared"),
    Case(B=1, H=9, W=7, heads=1, d=8, k=3, dilation=2, padding="mask", rpb=True),
    Case(B=1, H=7, W=7, heads=2, d=8, k=3, padding="shift", rel="shared", rpb=True),
    Case(B=1, H=8, W=6, heads=2, d=5, k=(3, 5), dilation=(2, 1), padding="shift",
         rel="per_head", rpb=True),
    Case(B=2, H=9, W=10, heads=1, d=4, k=3, dilation=(2, 3), padding="shift", rel="per_head"),
    Case(B=1, H=3, W=2, heads=1, d=8, k=5, rel="shared", rpb=True),
    Case(B=1, H=3, W=2, heads=2, d=8, k=5, padding="mask", rpb=True),
    Case(B=1, H=4, W=5, heads=2, d=6, k=1, rel="shared", rpb=True),
    Case(B=1, H=6, W=7, heads=1, d=16, k=(5, 3), dilation=(1, 2), rel="per_head", rpb=True),
    Case(B=1, H=4, W=4, heads=2, d=1, k=3, padding="mask", rpb=True),
    Case(B=1, H=3, W=4, heads=1, d=256, k=3, rel="shared", rpb=True),
    Case(B=1, H=5, W=7, heads=1, d=4, k=13, padding="mask", rel="shared", rpb=True),
    Case(B=1, H=7, W=8, heads=1, d=8, k=7, padding="shift", rel="per_head", rpb=True),
]
# Half precision and strided layouts on the cases with every feature on.
FULL = [CASES[1], CASES[2], CASES[5]]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    from sasa_triton.kernels import common

    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _args(q, k, v, case, kw):
    return check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])


def _dout(q, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.dtype).to(q.device)


def kernel_grads(module, q, k, v, kw, case, dout, config=None):
    """Gradients of (q, k, v, tables present) from one backward variant."""
    args = _args(q, k, v, case, kw)
    if not module.supports(tuple(q.shape), q.dtype, args):
        # the dispatcher gives such a case to the next backward in the table
        pytest.skip(f"{module.name} does not support this case (d={q.shape[-1]})")
    with torch.no_grad():
        out, lse = reference_attend(q, k, v, args, return_lse=True)
    grads = module.backward(q, k, v, out, lse, dout, args, config)
    names = [n for n in TABLES if kw.get(n) is not None]
    for name, g in zip(TABLES, grads[3:]):
        assert (g is None) == (kw.get(name) is None), name
        if g is not None:
            assert g.shape == kw[name].shape and g.dtype == kw[name].dtype, name
    for g in grads[:3]:
        assert g.shape == q.shape and g.dtype == q.dtype
    return dict(zip(["q", "k", "v", *names], [g for g in grads if g is not None]))


def oracle_grads(q, k, v, kw, case, dout):
    names = [n for n in TABLES if kw.get(n) is not None]
    tensors = (q, k, v, *[kw[n] for n in names])
    leaves = [t.detach().cpu().double().requires_grad_() for t in tensors]
    extra = dict(kw, **dict(zip(names, leaves[3:])))
    out = oracle_attend(*leaves[:3], case.k, **extra)
    grads = torch.autograd.grad(out, leaves, dout.cpu().double())
    return dict(zip(["q", "k", "v", *names], grads))


def check_against_oracle(module, case, dtype, layout, tables_fp32=False):
    q, k, v, kw = make_inputs(case, dtype, layout, DEVICE)
    if tables_fp32:
        kw = {n: (t.float() if n in TABLES and t is not None else t) for n, t in kw.items()}
    dout = _dout(q)
    got = kernel_grads(module, q, k, v, kw, case, dout)
    want = oracle_grads(q, k, v, kw, case, dout)
    assert got.keys() == want.keys()
    check_grads(got, want, dtype, case.id)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_grads_match_oracle_fp32(variant, case):
    check_against_oracle(VARIANTS[variant], case, torch.float32, "contiguous")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FULL, ids=lambda c: c.id)
def test_grads_match_oracle_half(variant, case, dtype):
    check_against_oracle(VARIANTS[variant], case, dtype, "contiguous")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["nchw_view", "channels_last"])
@pytest.mark.parametrize("case", FULL[:2], ids=lambda c: c.id)
def test_grads_strided_layouts(variant, case, layout):
    check_against_oracle(VARIANTS[variant], case, torch.float32, layout)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_half_inputs_with_fp32_tables(variant):
    check_against_oracle(VARIANTS[variant], CASES[4], torch.bfloat16, "channels_last",
                         tables_fp32=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deterministic(variant):
    """Two runs give bit-identical gradients (no float atomics)."""
    case = Case(B=1, H=6, W=5, heads=2, d=8, k=3, padding="shift", rel="shared", rpb=True)
    q, k, v, kw = make_inputs(case, torch.float32, "contiguous", DEVICE)
    dout = _dout(q)
    first = kernel_grads(VARIANTS[variant], q, k, v, kw, case, dout)
    second = kernel_grads(VARIANTS[variant], q, k, v, kw, case, dout)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_pruned_config_agrees(variant):
    """Each config the tuner may pick for this shape gives the same gradients."""
    module = VARIANTS[variant]
    case = Case(B=1, H=6, W=7, heads=2, d=8, k=3, padding="mask", rel="per_head", rpb=True)
    q, k, v, kw = make_inputs(case, torch.float32, "contiguous", DEVICE)
    args = _args(q, k, v, case, kw)
    configs = module.prune(module.search_space(), tuple(q.shape), args)
    assert configs and module.default_config(tuple(q.shape), args) in module.search_space()
    # launch settings (warps, stages) do not change the math: one config per tile shape
    blocks = {tuple(sorted((k, v) for k, v in c.items() if "BLOCK" in k)): c for c in configs}
    dout = _dout(q)
    want = kernel_grads(module, q, k, v, kw, case, dout)
    for config in blocks.values():
        got = kernel_grads(module, q, k, v, kw, case, dout, config)
        for name in want:
            assert_close(got[name], want[name], torch.float32, f"{config} d{name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("d", [1, 8, 16, 64, 256])
@pytest.mark.parametrize("hw", [(3, 4), (64, 64)])
def test_default_config_survives_prune(variant, d, hw):
    """The launcher's default is one of the configs the tuner keeps (none that spill)."""
    module = VARIANTS[variant]
    q = torch.zeros(1, *hw, 2, d)
    args = check_attend_args(q, q, q, 7, 1, "zeros", None, None, None, None)
    if not module.supports(tuple(q.shape), q.dtype, args):
        pytest.skip(f"{variant} does not support q {tuple(q.shape)} {q.dtype}")
    default = module.default_config(tuple(q.shape), args)
    assert default in module.prune(module.search_space(), tuple(q.shape), args)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_broadcast_dout(variant):
    """dout of out.sum() is an expanded (stride 0) tensor: read with its strides."""
    case = Case(B=1, H=4, W=5, heads=2, d=8, k=3, rel="shared")
    q, k, v, kw = make_inputs(case, torch.float32, "nchw_view", DEVICE)
    dout = torch.ones((), device=DEVICE).expand(q.shape)
    got = kernel_grads(VARIANTS[variant], q, k, v, kw, case, dout)
    want = oracle_grads(q, k, v, kw, case, dout)
    for name in want:
        assert_close(got[name].cpu(), want[name], torch.float32, name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_supports_and_empty(variant):
    module = VARIANTS[variant]
    q = torch.zeros(0, 4, 4, 2, 8, device=DEVICE, dtype=torch.float16)  # every kernel's dtype
    args = check_attend_args(q, q, q, 3, 1, "zeros", None, None, None, None)
    assert not module.supports((1, 4, 4, 2, 8), torch.float64, args)
    assert not module.supports((1, 4, 4, 2, 512), torch.float32, args)
    grads = module.backward(q, q, q, q, q[..., 0], q, args)
    assert [g.shape for g in grads[:3]] == [q.shape] * 3 and grads[3:] == (None, None, None)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU (a > 2**31-element view)")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_64bit_offsets(variant):
    """A batch stride of 2**31 elements: offsets must be computed in 64 bits."""
    H, W, N, D = 4, 5, 2, 8
    big = torch.randn(2 ** 31 + H * W * N * D, device="cuda", dtype=torch.float16)
    q = big.as_strided((2, H, W, N, D), (2 ** 31, W * N * D, N * D, D, 1))
    case = Case(B=2, H=H, W=W, heads=N, d=D, k=3, padding="mask")
    kw = dict(dilation=1, padding="mask", scale=None)
    dout = _dout(q)
    got = kernel_grads(VARIANTS[variant], q, q, q, kw, case, dout)
    small = q.contiguous()
    del big, q
    want = kernel_grads(VARIANTS[variant], small, small, small, kw, case, dout)
    for name in want:
        assert torch.equal(got[name], want[name]), name



# --- the real compiler, without a GPU ---------------------------------------------------
# A subprocess runs `backward` on CPU tensors with both kernels swapped for recorders and
# compiles each recorded launch for an H100 (sm_90) with Triton's compiler and ptxas,
# specialised as a GPU launch would be (see aot_sm90.py): every padding mode, rel/rpb on
# and off, d = 8/16/64, fp16/bf16/fp32 (and bf16 with fp32 tables), contiguous and
# channels_last, each at the config the launcher picks by default, which must not spill
# more than a few bytes (ptxas sometimes parks a word or two on the stack at 150-170
# registers; pruned configs spill hundreds).

BWD_AOT_SPECS = [  # (case, dtype, layout, fp32 tables)
    (Case(B=2, H=16, W=16, heads=4, d=64, k=7, rel="shared"), torch.bfloat16, "contiguous",
     False),
    (Case(B=2, H=16, W=16, heads=2, d=8, k=3, padding="mask", rpb=True), torch.float16,
     "contiguous", False),
    (Case(B=2, H=12, W=16, heads=4, d=16, k=5, dilation=(1, 2), padding="shift",
          rel="per_head", rpb=True), torch.float32, "contiguous", False),
    (Case(B=2, H=16, W=16, heads=2, d=16, k=3, padding="shift", rel="shared", rpb=True),
     torch.bfloat16, "channels_last", True),
]
_BWD_KERNELS = ("_dq_kernel", "_dkv_kernel")


def _bwd_aot_compile_all() -> None:
    from sasa_triton.kernels import offsets_bwd

    from aot_sm90 import compile_launch, record_launches

    for case, dtype, layout, tables_fp32 in BWD_AOT_SPECS:
        q, k, v, kw = make_inputs(case, dtype, layout)
        if tables_fp32:
            kw = {n: (t.float() if n in TABLES and t is not None else t) for n, t in kw.items()}
        args = _args(q, k, v, case, kw)
        out = torch.empty_like(q)
        lse = torch.zeros(q.shape[:-1], dtype=torch.float32)
        config = offsets_bwd.default_config(tuple(q.shape), args)
        with record_launches(offsets_bwd, _BWD_KERNELS) as recorders:
            offsets_bwd.backward(q, k, v, out, lse, _dout(q), args)
        for name in _BWD_KERNELS:
            rec = recorders[name]
            assert len(rec.calls) == 1, name
            _, usage = compile_launch(rec.fn, *rec.calls[0])
            print("compiled", name, case.id, dtype, layout, config, usage, flush=True)


def test_backward_kernels_compile_for_sm90():
    import re

    from aot_sm90 import run_in_subprocess

    proc = run_in_subprocess(__file__, "--aot-compile")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled")]
    assert len(lines) == 2 * len(BWD_AOT_SPECS), proc.stdout[-4000:]
    stores = [int(re.search(r"'spill_stores': (\d+)", ln).group(1)) for ln in lines]
    assert max(stores) <= 32, "default configs spill registers:\n" + "\n".join(lines)


if __name__ == "__main__":
    import sys

    if "--aot-compile" in sys.argv:
        _bwd_aot_compile_all()
