"""`attend` through the custom ops: gradcheck, opcheck, backward kernels wired into
autograd, and torch.compile(fullgraph=True) of modules that call it."""
import dataclasses
import json

import pytest
import torch

import sasa_triton
import sasa_triton.args
import sasa_triton.dispatch
from sasa_triton import ops, variants

from cases import REFERENCE_CASES, Case, assert_close, make_inputs
from oracle import oracle_attend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLES = ("rel_h", "rel_w", "rpb")


@pytest.fixture
def triton_bwd_test(monkeypatch):
    """A temporary backend: reference forward + the default backward kernel."""
    # a forced forward's backward is the default backward kernel (dispatch.heuristic_backward)
    variant = dataclasses.replace(variants.get("reference"), name="triton_bwd_test",
                                  backward=None, needs_triton=True)
    monkeypatch.setitem(variants.VARIANTS, "triton_bwd_test", variant)  # restored after
    yield "triton_bwd_test"


def _leaves(q, k, v, kw):
    return [q, k, v, *[kw[n] for n in TABLES if n in kw and kw[n] is not None]]


GRADCHECK_CASES = [
    Case(B=1, H=3, W=4, heads=2, d=4, k=3, rel="per_head", rpb=True),
    Case(B=1, H=5, W=4, heads=1, d=4, k=(3, 1), dilation=(2, 1), padding="mask", rel="shared",
         rpb=True),
    Case(B=1, H=4, W=5, heads=1, d=3, k=(3, 5), padding="shift", rel="per_head", rpb=True),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck_float64_through_op(case):
    q, k, v, kw = make_inputs(case, torch.float64, device=DEVICE, requires_grad=True)
    names = [n for n in TABLES if n in kw]

    def f(q, k, v, *tables):
        return sasa_triton.attend(q, k, v, case.k, backend="reference",
                                  **dict(kw, **dict(zip(names, tables))))

    assert torch.autograd.gradcheck(f, tuple(_leaves(q, k, v, kw)))


SOME_REFERENCE_CASES = [REFERENCE_CASES[i] for i in (2, 4, 7, 9, 13, 14)]


@pytest.mark.parametrize("case", SOME_REFERENCE_CASES, ids=lambda c: c.id)
def test_reference_backward_matches_oracle(case):
    """The reference path's direct backward (inside the op), float32 vs the oracle."""
    q, k, v, kw = make_inputs(case, torch.float32, "nchw_view", DEVICE, requires_grad=True)
    leaves = _leaves(q, k, v, kw)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = torch.autograd.grad(sasa_triton.attend(q, k, v, case.k, **kw), leaves, dout)
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    extra = dict(kw, **dict(zip([n for n in TABLES if n in kw], ref[3:])))
    want = torch.autograd.grad(oracle_attend(*ref[:3], case.k, **extra), ref, dout.cpu().double())
    for name, g, w in zip(["q", "k", "v", *[n for n in TABLES if n in kw]], got, want):
        assert_close(g.cpu(), w, torch.float32, name)


def test_opcheck():
    """Schema, fake (meta) implementations and autograd registration of both ops."""
    case = Case(B=1, H=4, W=5, heads=2, d=4, k=3, rel="shared", rpb=True)
    q, k, v, kw = make_inputs(case, torch.float32, "nchw_view", DEVICE, requires_grad=True)
    fwd_args = (q, k, v, kw["rel_h"], kw["rel_w"], kw["rpb"], 3, 3, 1, 1, "zeros", 0.5,
                "reference", "", "")
    torch.library.opcheck(torch.ops.sasa_triton.attend_fwd.default, fwd_args)
    with torch.no_grad():
        out, lse = torch.ops.sasa_triton.attend_fwd(*fwd_args)
    bwd_args = (q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(out),
                None, None, kw["rpb"].detach(), 3, 3, 1, 1, "zeros", 0.5, "reference", "")
    torch.library.opcheck(torch.ops.sasa_triton.attend_bwd.default, bwd_args)


@pytest.mark.parametrize("case", [
    Case(B=1, H=5, W=6, heads=2, d=8, k=3, padding="mask", rel="per_head", rpb=True),
    Case(B=1, H=7, W=6, heads=2, d=8, k=(3, 5), padding="shift", rel="shared", rpb=True),
], ids=lambda c: c.id)
def test_kernel_backward_through_autograd(case, triton_bwd_test):
    q, k, v, kw = make_inputs(case, torch.float32, "channels_last", DEVICE, requires_grad=True)
    leaves = _leaves(q, k, v, kw)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = sasa_triton.attend(q, k, v, case.k, backend=triton_bwd_test, **kw)
    got = torch.autograd.grad(out, leaves, dout)
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    extra = dict(kw, **dict(zip([n for n in TABLES if n in kw], ref[3:])))
    want = torch.autograd.grad(oracle_attend(*ref[:3], case.k, **extra), ref, dout.cpu().double())
    for name, g, w in zip(["q", "k", "v", *TABLES], got, want):
        assert_close(g.cpu(), w, torch.float32, name)


def test_op_passes_the_backward_config(triton_bwd_test, monkeypatch):
    """The bwd_config JSON given to the op reaches the backward kernel as a dict."""
    seen = []
    case = Case(B=1, H=4, W=5, heads=2, d=8, k=3, rel="shared")
    q, k, v, kw = make_inputs(case, torch.float32, device=DEVICE, requires_grad=True)
    args = sasa_triton.args.check_attend_args(q, k, v, 3, 1, "zeros", kw["rel_h"], kw["rel_w"],
                                              None, None)
    name, _ = sasa_triton.dispatch.default_backward(q, args)  # what the op's backward runs
    module = variants.get(name).backward.module()
    real = module.backward
    monkeypatch.setattr(module, "backward", lambda *a: seen.append(a[-1]) or real(*a))
    config = module.default_config(tuple(q.shape), args)
    config["K_num_warps"] = 2 if config.get("K_num_warps") != 2 else 1  # not the default
    out = ops.attend_op(q, k, v, args, triton_bwd_test, "", json.dumps(config))
    out.sum().backward()
    assert seen == [config] and q.grad is not None


class TinySASA(torch.nn.Module):
    """attend on given q, k, v with learned relative embeddings and bias."""

    def __init__(self, heads=2, d=8, k=3, padding="mask", backend="auto"):
        super().__init__()
        rows = 2 * k - 1 if padding == "shift" else k
        g = torch.Generator().manual_seed(0)
        self.rel_h = torch.nn.Parameter(0.3 * torch.randn(rows, d // 2, generator=g))
        self.rel_w = torch.nn.Parameter(0.3 * torch.randn(heads, rows, d - d // 2, generator=g))
        self.rpb = torch.nn.Parameter(0.3 * torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=g))
        self.k, self.padding, self.backend = k, padding, backend

    def forward(self, q, k, v):
        return sasa_triton.attend(q, k, v, self.k, padding=self.padding, rel_h=self.rel_h,
                                  rel_w=self.rel_w, rpb=self.rpb, backend=self.backend)


class ProjectedSASA(TinySASA):
    """A 1x1 projection of an NCHW map, viewed (not copied) as q, k, v."""

    def __init__(self, channels=16, heads=2, **kw):
        super().__init__(heads=heads, d=channels // heads, **kw)
        self.proj = torch.nn.Conv2d(channels, 3 * channels, 1)
        self.heads = heads

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.proj(x).unflatten(1, (3, self.heads, C // self.heads)).permute(1, 0, 4, 5, 2, 3)
        return super().forward(qkv[0], qkv[1], qkv[2]).flatten(3).permute(0, 3, 1, 2)


def _run(model, inputs):
    out = model(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device))
    grads = [t.grad for t in inputs if t.requires_grad] + [p.grad for p in model.parameters()]
    return out.detach(), grads


def _compare_compiled(make_model, inputs, compile_backend):
    eager_model, compiled_model = make_model().to(DEVICE), make_model().to(DEVICE)
    compiled_model.load_state_dict(eager_model.state_dict())

    def leaves():
        return [t.detach().clone().requires_grad_() for t in inputs]

    want_out, want_grads = _run(eager_model, leaves())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compile_backend)
    got_out, got_grads = _run(compiled, leaves())
    assert_close(got_out, want_out, torch.float32, "out")
    assert len(got_grads) == len(want_grads)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(g, w, torch.float32, f"grad {i}")


def test_compile_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 6, 7, 2, 8, generator=g).to(DEVICE) for _ in range(3)]
    _compare_compiled(lambda: TinySASA(padding="mask"), inputs, "inductor")


@pytest.mark.parametrize("padding", ["zeros", "shift"])
def test_compile_fullgraph_projection_module(padding):
    """Strided q/k/v views of a projection, through Dynamo + AOTAutograd (no codegen)."""
    torch._dynamo.reset()
    x = torch.randn(2, 16, 6, 7, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    _compare_compiled(lambda: ProjectedSASA(padding=padding), [x], "aot_eager")


def test_compile_fullgraph_with_kernel_backward(triton_bwd_test):
    torch._dynamo.reset()
    x = torch.randn(1, 16, 5, 6, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    _compare_compiled(lambda: ProjectedSASA(padding="shift", backend=triton_bwd_test), [x],
                      "aot_eager")


def test_compile_reports_a_bad_backend():
    torch._dynamo.reset()
    q = torch.randn(1, 4, 4, 2, 8, device=DEVICE)
    f = torch.compile(lambda q: sasa_triton.attend(q, q, q, 3, backend="no-such-backend"),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="backend must be one of"):
        f(q)
