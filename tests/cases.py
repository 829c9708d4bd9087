"""Test cases shared by the reference and kernel tests: shapes, inputs, layouts, tolerances."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

# Per-dtype tolerances (atol, rtol) against the float64 oracle, in one place.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
LAYOUTS = ("contiguous", "nchw_view", "channels_last")


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 6
    W: int = 5
    heads: int = 2
    d: int = 8
    k: object = 3  # int or (kh, kw)
    dilation: object = 1
    padding: str = "zeros"
    rel: Optional[str] = None  # None | "shared" | "per_head"
    rpb: bool = False
    scale: Optional[float] = None

    @property
    def kh_kw(self):
        return (self.k, self.k) if isinstance(self.k, int) else tuple(self.k)

    @property
    def id(self) -> str:
        k = "x".join(map(str, self.kh_kw))
        dil = self.dilation if isinstance(self.dilation, int) else "x".join(map(str, self.dilation))
        parts = [f"B{self.B}-H{self.H}W{self.W}-h{self.heads}-d{self.d}-k{k}-dil{dil}-{self.padding}"]
        if self.rel:
            parts.append(f"rel_{self.rel}")
        if self.rpb:
            parts.append("rpb")
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        return "-".join(parts)


def _view_heads(proj: torch.Tensor, heads: int) -> tuple:
    """(B, 3C, H, W) projection -> q, k, v views of shape (B, H, W, heads, d)."""
    B, C3, H, W = proj.shape
    qkv = proj.unflatten(1, (3, heads, C3 // (3 * heads))).permute(1, 0, 4, 5, 2, 3)
    return qkv[0], qkv[1], qkv[2]


def make_inputs(case: Case, dtype=torch.float32, layout="contiguous", device="cpu",
                seed: int = 0, requires_grad: bool = False):
    """q, k, v and the keyword arguments of `attend` for `case` (random, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    B, H, W, N, D = case.B, case.H, case.W, case.heads, case.d
    kh, kw = case.kh_kw

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    if layout == "contiguous":
        q, k, v = rand(B, H, W, N, D), rand(B, H, W, N, D), rand(B, H, W, N, D)
    else:
        proj = rand(B, 3 * N * D, H, W)
        if layout == "channels_last":
            proj = proj.contiguous(memory_format=torch.channels_last)
        q, k, v = _view_heads(proj, N)
    kwargs = dict(dilation=case.dilation, padding=case.padding, scale=case.scale)
    if case.rel:
        rows = 2 * kh - 1 if case.padding == "shift" else kh
        cols = 2 * kw - 1 if case.padding == "shift" else kw
        lead = (N,) if case.rel == "per_head" else ()
        kwargs["rel_h"] = rand(*lead, rows, D // 2, scale=0.5)
        kwargs["rel_w"] = rand(*lead, cols, D - D // 2, scale=0.5)
    if case.rpb:
        kwargs["rpb"] = rand(N, 2 * kh - 1, 2 * kw - 1, scale=0.5)
    if requires_grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        for name in ("rel_h", "rel_w", "rpb"):
            if name in kwargs:
                kwargs[name] = kwargs[name].detach().requires_grad_()
    return q, k, v, kwargs


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def check_forward(module, case: Case, dtype=torch.float32, layout="contiguous", config=None,
                  device="cpu", seed=0, v_layout=None, label=""):
    """Runs a forward kernel module (its `supports` must accept the case) on the case's
    inputs with NaN-poisoned outputs and checks out and lse against the float64 oracle;
    `v_layout` takes v from a second input set in another layout."""
    from sasa_triton.args import check_attend_args

    from oracle import oracle_attend

    q, k, v, kw = make_inputs(case, dtype, layout, device, seed=seed)
    if v_layout is not None:
        v = make_inputs(case, dtype, v_layout, device, seed=seed + 1)[2]
    args = check_attend_args(q, k, v, case.k, kw["dilation"], kw["padding"], kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), kw["scale"])
    what = f"{label or module.__name__} {case.id} {dtype} {layout} {config}"
    assert module.supports(tuple(q.shape), dtype, args), what
    out, lse = module.forward(q, k, v, args, config, _poison=True)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous(), what
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32 and lse.is_contiguous()
    cpu = {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in kw.items()}
    want, want_lse = oracle_attend(q.cpu(), k.cpu(), v.cpu(), case.k, return_lse=True, **cpu)
    assert_close(out.cpu(), want, dtype, f"out {what}")
    # lse of low-precision inputs: logits are exact products of the rounded inputs,
    # summed in float32, so the float32 tolerance with an atol for the logit size fits
    atol = 2e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=atol, rtol=2e-5,
                               msg=lambda m: f"lse {what}: {m}")


# The reference's coverage matrix: every padding, dilation 1 and 2, square and not,
# odd image sizes (H != W, image smaller than the window), shared and per-head rel, rpb.
REFERENCE_CASES = [
    Case(),
    Case(k=5, padding="mask"),
    Case(H=7, W=7, k=3, padding="shift"),
    Case(H=3, W=2, k=5),  # image smaller than the window
    Case(H=3, W=2, k=5, padding="mask"),
    Case(H=9, W=7, k=3, dilation=2),
    Case(H=9, W=7, k=3, dilation=2, padding="mask", rel="shared"),
    Case(H=9, W=10, k=3, dilation=(2, 3), padding="shift", rel="per_head", rpb=True),
    Case(H=7, W=9, k=(3, 5), dilation=(1, 2), rel="per_head", rpb=True),
    Case(H=6, W=7, k=(5, 3), padding="shift", rel="shared", rpb=True),
    Case(k=3, rel="shared"),
    Case(k=3, rel="per_head", padding="mask", rpb=True, scale=0.7),
    Case(H=5, W=6, k=5, rpb=True),
    Case(k=1),
    Case(d=5, heads=3, k=3, rel="shared", rpb=True),  # odd d: rel_h gets 2, rel_w 3
    Case(H=11, W=10, k=7, padding="shift", dilation=1, rel="shared"),
]


def oracle_grads(q, k, v, kw, kernel_size, dout):
    """The float64 oracle's (out, lse, {name: gradient}) for q, k, v and the tables `kw`
    holds (rel_h, rel_w, rpb), by autograd, for a backward kernel's tests."""
    from oracle import oracle_attend

    names = [n for n in ("rel_h", "rel_w", "rpb") if kw.get(n) is not None]
    tensors = (q, k, v, *[kw[n] for n in names])
    leaves = [t.detach().cpu().double().requires_grad_() for t in tensors]
    extra = dict(kw, **dict(zip(names, leaves[3:])))
    out, lse = oracle_attend(*leaves[:3], kernel_size, return_lse=True, **extra)
    grads = torch.autograd.grad(out, leaves, dout.cpu().double())
    return out.detach(), lse.detach(), dict(zip(["q", "k", "v", *names], grads))


TABLE_NAMES = ("rel_h", "rel_w", "rpb")


def check_grads(got: dict, want: dict, dtype, label: str, table_factor: float = 1.0) -> None:
    """Each gradient of `want` (the oracle's, float64) against `got`'s: written in full (no
    NaN left by a poisoned output), and within the dtype's tolerance, atol scaled by the
    gradient's size (table gradients sum over every pixel) and, for the tables, by
    `table_factor`."""
    for name, w in want.items():
        g = got[name].cpu()
        assert not g.isnan().any(), f"{label}: d{name} has unwritten (NaN) entries"
        atol, rtol = TOLERANCES[dtype]
        atol = atol * max(1.0, w.abs().max().item())
        if name in TABLE_NAMES:
            atol *= table_factor
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{label} d{name}: {m}")
