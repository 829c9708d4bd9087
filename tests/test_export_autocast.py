"""torch.export of a module calling `attend` and of SASA-ResNet-26 (the exported program
runs and matches eager, also after a save/load round trip), and `attend` / `SASA2d`
under torch.autocast (CPU bfloat16)."""
import io

import pytest
import torch

import sasa_triton
from sasa_triton.nn import SASA2d, sasa_resnet26

from cases import TOLERANCES, Case, assert_close, make_inputs
from oracle import oracle_attend


class Attention(torch.nn.Module):
    """attend with learned rel tables and rpb, the kind of module users export."""

    def __init__(self, heads: int = 2, d: int = 8, k: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k = k
        self.rel_h = torch.nn.Parameter(torch.randn(k, d // 2, generator=g))
        self.rel_w = torch.nn.Parameter(torch.randn(k, d - d // 2, generator=g))
        self.rpb = torch.nn.Parameter(torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=g))

    def forward(self, q, k, v):
        return sasa_triton.attend(q, k, v, self.k, padding="mask", rel_h=self.rel_h,
                                  rel_w=self.rel_w, rpb=self.rpb)


def _round_trip(program):
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def test_export_module_calling_attend():
    module = Attention()
    q, k, v, _ = make_inputs(Case(B=2, H=6, W=5), torch.float32)
    program = torch.export.export(module, (q, k, v))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "sasa_triton.attend_fwd.default" in ops  # one opaque op, not its insides
    for runnable in (program, _round_trip(program)):
        torch.testing.assert_close(runnable.module()(q, k, v), module(q, k, v), rtol=0, atol=0)


def test_export_sasa_resnet26():
    torch.manual_seed(0)
    model = sasa_resnet26(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    program = _round_trip(torch.export.export(model, (x,)))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program.module()(x * 2), model(x * 2), rtol=1e-5, atol=1e-5)


def test_autocast_runs_attend_in_the_autocast_dtype():
    """float32 q, k, v and tables under autocast(bf16): the attention runs on bfloat16
    inputs (the oracle on the rounded inputs agrees); gradients reach the float32 leaves."""
    case = Case(H=6, W=7, k=3, padding="mask", rel="per_head", rpb=True)
    q, k, v, kw = make_inputs(case, torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sasa_triton.attend(q, k, v, case.k, **kw)
    assert out.dtype == torch.bfloat16
    rounded = {n: t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t
               for n, t in kw.items()}
    want = oracle_attend(*(t.to(torch.bfloat16) for t in (q, k, v)), case.k, **rounded)
    assert_close(out, want, torch.bfloat16, "autocast out")
    leaves = [q, k, v, kw["rel_h"], kw["rel_w"], kw["rpb"]]
    grads = torch.autograd.grad(out.float().sum(), leaves)
    want_grads = torch.autograd.grad(oracle_attend(q, k, v, case.k, **kw).sum(), leaves)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        atol, rtol = TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(g, w, atol=4 * atol * max(1.0, w.abs().max().item()),
                                   rtol=4 * rtol)


def test_autocast_leaves_float64_and_disabled_calls_alone():
    q, k, v, _ = make_inputs(Case(), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sasa_triton.attend(q, k, v, 3).dtype == torch.float64
    q32 = q.float()
    assert sasa_triton.attend(q32, q32, q32, 3).dtype == torch.float32


@pytest.mark.parametrize("rpb", [False, True])
def test_sasa2d_under_autocast(rpb):
    torch.manual_seed(0)
    layer = SASA2d(8, 8, kernel_size=3, heads=2, rpb=rpb)
    x = torch.randn(2, 8, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=5e-2, rtol=5e-2)
    y.float().square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
