"""Random `attend` calls for the fuzz tests: one seed -> one call, fully determined.

A drawn case holds the call's options and its *sources*: the leaf tensors the inputs are
views of (a projection, a larger buffer that is sliced, a tensor that is expanded, ...).
`case.inputs(sources)` builds q, k, v and the tables from the sources with view
operations only, so the same function applied to float64 copies of the sources gives the
oracle's inputs, and gradients are compared on the sources (which is what autograd would
hand to a user's parameters, whatever the views in between).

Drawn over: padding modes, odd kernels 1..11 square and not, dilation per axis, images
smaller than the window, B 1..2, heads 1..4, d 1..64, no / shared / per-head rel tables,
rpb, scale, dtypes (tables in q's dtype or float32), and layouts of q, k, v (contiguous,
NCHW and channels-last projection views, expanded stride-0 tensors, non-contiguous
slices, transposes, odd strides on size-1 dims, overlapping strides, q is k, overlapping
views of one buffer) and of the tables and of dout. Shapes are tiny: the Triton kernels
run one program after the other in the interpreter.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Optional

import torch

PADDINGS = ("zeros", "mask", "shift")
KERNELS = (1, 3, 3, 3, 5, 5, 7, 9, 11)
HEAD_DIMS = (1, 2, 3, 4, 5, 7, 8, 8, 12, 16, 16, 17, 24, 32, 33, 48, 64)
DTYPES = (torch.float32,) * 5 + (torch.float16,) * 2 + (torch.bfloat16,) * 2 + (torch.float64,)
QKV_LAYOUTS = ("contiguous", "nchw", "nchw_channels_last", "mixed", "mixed", "q_is_k",
               "overlapping_views", "overlapping_strides")
TENSOR_LAYOUTS = ("contiguous", "expanded", "slice", "transposed", "size1_strides")
TABLE_LAYOUTS = ("contiguous", "transposed", "slice", "expanded")
DOUT_LAYOUTS = ("contiguous", "expanded", "transposed", "slice")
SHORT = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
         torch.bfloat16: "bf16"}

# Largest per-case work (pixels x heads x window taps), so that the interpreter runs
# each case in well under a second.
MAX_WORK_FWD = 1200
MAX_WORK_BWD = 600


@dataclasses.dataclass
class FuzzCase:
    seed: int
    B: int
    H: int
    W: int
    heads: int
    d: int
    kh: int
    kw: int
    dh: int
    dw: int
    padding: str
    rel: Optional[str]  # None | "shared" | "per_head"
    rpb: bool
    scale: Optional[float]
    dtype: torch.dtype
    table_dtype: torch.dtype
    layout: str  # of q, k, v (QKV_LAYOUTS; "mixed" lists one per tensor in `parts`)
    parts: tuple  # per-tensor layouts of q, k, v under "mixed"
    table_layout: str
    dout_layout: str
    requires_grad: tuple = ()  # names of the sources that require grad (backward cases)
    sources: dict = dataclasses.field(default_factory=dict, repr=False)
    _build: Optional[Callable] = dataclasses.field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        return (self.B, self.H, self.W, self.heads, self.d)

    def describe(self) -> str:
        parts = f"{self.layout}{list(self.parts) if self.parts else ''}"
        rg = f" requires_grad={list(self.requires_grad)}" if self.requires_grad else ""
        return (f"seed={self.seed}: q{list(self.shape)} {SHORT[self.dtype]} layout={parts} "
                f"kernel_size=({self.kh}, {self.kw}) dilation=({self.dh}, {self.dw}) "
                f"padding={self.padding!r} rel={self.rel} rpb={self.rpb} scale={self.scale} "
                f"tables={SHORT[self.table_dtype]}/{self.table_layout} "
                f"dout={self.dout_layout}{rg}")

    def kwargs(self) -> dict:
        return dict(dilation=(self.dh, self.dw), padding=self.padding, scale=self.scale)

    def inputs(self, sources: dict) -> dict:
        """q, k, v, rel_h, rel_w, rpb (None when absent): views of `sources`."""
        return self._build(sources)

    def work(self) -> int:
        taps = (4 if self.padding == "shift" else 1) * self.kh * self.kw
        return self.B * self.H * self.W * self.heads * taps


def _rand(gen: torch.Generator, shape, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype)


def _odd_kernel(rng: random.Random) -> int:
    return rng.choice(KERNELS)


def draw(seed: int, backward: bool = False) -> FuzzCase:
    """The case of `seed` (the same on every machine and run)."""
    rng = random.Random(seed * 2 + int(backward))
    limit = MAX_WORK_BWD if backward else MAX_WORK_FWD
    while True:
        case = _draw_options(rng, seed)
        if case.work() <= limit:
            break
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    _draw_layouts(case, rng, gen)
    if backward:
        names = list(case.sources)
        chosen = [n for n in names if rng.random() < 0.7] or [rng.choice(names)]
        case.requires_grad = tuple(chosen)
    return case


def _draw_options(rng: random.Random, seed: int) -> FuzzCase:
    padding = rng.choice(PADDINGS)
    kh = _odd_kernel(rng)
    kw = kh if rng.random() < 0.4 else _odd_kernel(rng)
    dh = rng.choice((1, 1, 1, 2, 3))
    dw = dh if rng.random() < 0.5 else rng.choice((1, 1, 2, 3))
    if padding == "shift":  # the window must fit: k * dil <= image side
        H = kh * dh + rng.choice((0, 0, 1, 2, 3))
        W = kw * dw + rng.choice((0, 0, 1, 2, 3))
    elif rng.random() < 0.1:  # a wide strip: more than one 16-pixel column tile
        H, W = rng.randint(1, 2), rng.randint(17, 24)
    else:  # often smaller than the window
        H, W = rng.randint(1, 7), rng.randint(1, 7)
    B = rng.choice((1, 1, 1, 2))
    heads = rng.choice((1, 1, 2, 2, 3, 4))
    d = rng.choice(HEAD_DIMS)
    rel = rng.choice((None, "shared", "per_head")) if d >= 2 else None
    rpb = rng.random() < 0.5
    dtype = rng.choice(DTYPES)
    scale = None if rng.random() < 0.6 else round(rng.uniform(0.05, 2.0), 3)
    table_dtype = dtype if dtype == torch.float64 or rng.random() < 0.7 else torch.float32
    layout = rng.choice(QKV_LAYOUTS)
    parts = tuple(rng.choice(TENSOR_LAYOUTS) for _ in range(3)) if layout == "mixed" else ()
    return FuzzCase(seed, B, H, W, heads, d, kh, kw, dh, dw, padding, rel, rpb, scale, dtype,
                    table_dtype, layout, parts, rng.choice(TABLE_LAYOUTS),
                    rng.choice(DOUT_LAYOUTS))


# ---------------------------------------------------------------- q, k, v layouts

def _split_projection(proj: torch.Tensor, heads: int) -> tuple:
    """(B, 3*heads*d, H, W) -> q, k, v views (B, H, W, heads, d), as SASA2d makes them."""
    B, C3, H, W = proj.shape
    qkv = proj.unflatten(1, (3, heads, C3 // (3 * heads))).permute(1, 0, 4, 5, 2, 3)
    return qkv[0], qkv[1], qkv[2]


def _tensor_layout(layout: str, rng, gen, shape, dtype):
    """(source, view function) for one (B, H, W, heads, d) tensor in `layout`."""
    if layout == "expanded":  # stride 0 on a random non-empty subset of dimensions
        dims = [i for i in range(5) if rng.random() < 0.4] or [rng.randrange(5)]
        src = _rand(gen, [1 if i in dims else s for i, s in enumerate(shape)], dtype)
        return src, lambda t: t.expand(shape)
    if layout == "slice":  # a strided window into a larger buffer
        starts = [rng.randint(0, 2) for _ in range(5)]
        steps = [rng.choice((1, 1, 2, 3)) for _ in range(5)]
        big = [st + (s - 1) * sp + 1 + rng.randint(0, 1)
               for s, st, sp in zip(shape, starts, steps)]
        src = _rand(gen, big, dtype)
        index = tuple(slice(st, st + (s - 1) * sp + 1, sp)
                      for s, st, sp in zip(shape, starts, steps))
        return src, lambda t: t[index]
    if layout == "transposed":  # a permutation of a contiguous tensor
        perm = list(range(5))
        rng.shuffle(perm)
        inverse = [perm.index(i) for i in range(5)]
        src = _rand(gen, [shape[p] for p in perm], dtype)
        return src, lambda t: t.permute(*inverse)
    if layout == "size1_strides":  # size-1 dimensions with odd strides (legal, unused)
        src = _rand(gen, shape, dtype)
        odd = [rng.choice((0, 7, 1000)) for _ in range(5)]

        def view(t):
            strides = [o if s == 1 else st for s, st, o in zip(shape, t.stride(), odd)]
            return t.as_strided(shape, strides, t.storage_offset())
        return src, view
    src = _rand(gen, shape, dtype)
    return src, lambda t: t


def _draw_layouts(case: FuzzCase, rng: random.Random, gen: torch.Generator) -> None:
    B, H, W, N, D = case.shape
    dtype = case.dtype
    sources: dict = {}
    if case.layout in ("nchw", "nchw_channels_last"):
        proj = _rand(gen, (B, 3 * N * D, H, W), dtype)
        if case.layout == "nchw_channels_last":
            proj = proj.contiguous(memory_format=torch.channels_last)
        sources["proj"] = proj

        def qkv(s):
            return _split_projection(s["proj"], N)
    elif case.layout == "q_is_k":  # one tensor passed as two or three of q, k, v
        which = rng.choice(("qk", "kv", "qv", "qkv"))
        sources["x"] = _rand(gen, case.shape, dtype)
        if which != "qkv":
            sources["other"] = _rand(gen, case.shape, dtype)

        def qkv(s):
            x, o = s["x"], s.get("other")
            return {"qk": (x, x, o), "kv": (o, x, x), "qv": (x, o, x), "qkv": (x, x, x)}[which]
    elif case.layout == "overlapping_views":  # channel windows of one buffer overlap
        shifts = sorted(rng.randint(0, max(1, D)) for _ in range(3))
        sources["buf"] = _rand(gen, (B, H, W, N, D + shifts[-1]), dtype)

        def qkv(s):
            return tuple(s["buf"][..., o:o + D] for o in shifts)
    elif case.layout == "overlapping_strides":  # each pixel's row overlaps the next one's
        step_w = rng.randint(1, max(1, N * D))
        strides = ((H * W * step_w + N * D) * 2, (W * step_w + N * D), step_w, D, 1)
        extent = sum((s - 1) * st for s, st in zip(case.shape, strides)) + 1
        sources["buf"] = _rand(gen, (3, extent), dtype)

        def qkv(s):
            return tuple(s["buf"][i].as_strided(case.shape, strides) for i in range(3))
    else:
        parts = case.parts or ("contiguous",) * 3
        views = []
        for name, part in zip("qkv", parts):
            sources[name], view = _tensor_layout(part, rng, gen, case.shape, dtype)
            views.append((name, view))

        def qkv(s):
            return tuple(view(s[name]) for name, view in views)

    tables = _draw_tables(case, rng, gen, sources)

    def build(s):
        q, k, v = qkv(s)
        return dict(q=q, k=k, v=v, **{name: f(s) for name, f in tables.items()})

    case.sources, case._build = sources, build


def _draw_tables(case: FuzzCase, rng, gen, sources: dict) -> dict:
    """Adds the table sources; returns name -> view function (None for absent tables)."""
    N, D, kh, kw = case.heads, case.d, case.kh, case.kw
    dt, layout = case.table_dtype, case.table_layout
    views: dict = {"rel_h": lambda s: None, "rel_w": lambda s: None, "rpb": lambda s: None}
    if case.rel:
        shift = case.padding == "shift"
        rows, cols = (2 * kh - 1, 2 * kw - 1) if shift else (kh, kw)
        for name, r, c in (("rel_h", rows, D // 2), ("rel_w", cols, D - D // 2)):
            shape = (N, r, c) if case.rel == "per_head" else (r, c)
            views[name] = _table(name, shape, layout, gen, dt, sources)
    if case.rpb:
        views["rpb"] = _table("rpb", (N, 2 * kh - 1, 2 * kw - 1), layout, gen, dt, sources)
    return views


def _table(name, shape, layout, gen, dtype, sources) -> Callable:
    if layout == "transposed":  # last two dims swapped
        sources[name] = _rand(gen, (*shape[:-2], shape[-1], shape[-2]), dtype, 0.5)
        return lambda s: s[name].transpose(-1, -2)
    if layout == "slice":  # every other column of a wider table
        sources[name] = _rand(gen, (*shape[:-1], 2 * shape[-1]), dtype, 0.5)
        return lambda s: s[name][..., ::2]
    if layout == "expanded" and len(shape) == 3:  # one table for every head, stride 0
        sources[name] = _rand(gen, (1, *shape[1:]), dtype, 0.5)
        return lambda s: s[name].expand(shape)
    sources[name] = _rand(gen, shape, dtype, 0.5)
    return lambda s: s[name]


def make_dout(case: FuzzCase, dtype=None) -> torch.Tensor:
    """The upstream gradient of the case, in its dout layout."""
    dtype = dtype or case.dtype
    gen = torch.Generator().manual_seed(case.seed + 7919)
    shape = case.shape
    if case.dout_layout == "expanded":  # d(out.sum()) / d(out): one value, stride 0
        return _rand(gen, (), dtype).expand(shape)
    if case.dout_layout == "transposed":
        return _rand(gen, (shape[0], shape[2], shape[1], shape[4], shape[3]), dtype) \
            .permute(0, 2, 1, 4, 3)
    if case.dout_layout == "slice":
        return _rand(gen, (*shape[:-1], 2 * shape[-1]), dtype)[..., 1::2]
    return _rand(gen, shape, dtype)


# ---------------------------------------------------------------- comparison

# Relative error per tensor (max |got - want| over max |want|) allowed per dtype: the
# oracle sees the same rounded inputs, so this is rounding inside the implementation
# (float32 accumulation, P rounded to the value dtype before P V, outputs rounded).
# Largest errors over 500 calibration cases: float32 1e-4 (a constant dout, as from
# out.sum(), makes dS a near-cancelling difference of two float32 sums over d; 2e-5
# otherwise), float16 7e-4, bfloat16 8.5e-3: about 3-7x below these.
RTOL = {torch.float64: 1e-9, torch.float32: 3e-4, torch.float16: 5e-3,
        torch.bfloat16: 3e-2}
# The absolute floor, as a fraction of the case's largest gradient (of v's largest
# value for out): a tensor that is exactly zero in exact arithmetic (drel_w when every
# tap shares one column: a softmax row's gradients sum to zero) is judged by absolute
# error. (The rounding of the saved out, which every backward reads, is accounted for
# exactly by `own_out_gradients`, so it needs no looser floor in half precision.)
FLOOR = {torch.float64: 0.05, torch.float32: 0.05, torch.float16: 0.05,
         torch.bfloat16: 0.05}


def coarser(*dtypes) -> torch.dtype:
    """The dtype with the largest tolerance."""
    return max(dtypes, key=lambda t: RTOL[t])


def mismatch(name: str, got: torch.Tensor, want: torch.Tensor, dtype,
             floor: float = 0.0) -> Optional[str]:
    """None when `got` matches `want` (float64) within the tolerance of `dtype`."""
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got = got.detach().cpu().double()
    fin_got, fin_want = got.isfinite(), want.isfinite()
    if not torch.equal(fin_got, fin_want):
        bad = (fin_got != fin_want).nonzero()[:4].tolist()
        return f"{name}: non-finite entries differ (got/expected finite differ at {bad})"
    if not fin_want.any():
        return None
    err = (got - want).abs()[fin_want].max().item()
    scale = max(want.abs()[fin_want].max().item(), floor, 1e-30)
    if not err <= RTOL[dtype] * scale:
        at = ((got - want).abs() == err).nonzero()[0].tolist()
        return (f"{name}: max abs error {err:.3g} at {at} > {RTOL[dtype]:g} x {scale:.3g} "
                f"(relative {err / scale:.3g}); got {got[tuple(at)].item():.6g}, "
                f"expected {want[tuple(at)].item():.6g}")
    return None


def own_out_gradients(out, want, want_lse, dout64, leaves) -> list:
    """The exact gradients of `leaves` (float64, under the oracle's `want` and `want_lse`),
    given that the backward reads the forward's own `out`.

    Every backward (FlashAttention style) computes dS = P * (dout . v - delta) with
    delta = rowsum(dout * out) from the saved out, which is rounded to the dtype (and,
    for the tiled kernel, summed from P rounded to it). delta is then off by
    e = rowsum(dout * (out - exact out)), which shifts dS by -e * P = -e * dlse/dlogit,
    so the gradients by exactly -d(sum e * lse)/d(source). The oracle applies that shift:
    what remains is the backward's own rounding, judged at the dtype's tolerance (the
    caller checks out itself against the exact one).
    """
    e = ((out.detach().cpu().double() - want.detach()) * dout64.cpu()).sum(-1)
    e = torch.where(e.isfinite(), e, 0.0)  # non-finite outputs are compared as such
    objective = (want * dout64).sum() - (e * want_lse).sum()
    return torch.autograd.grad(objective, leaves, retain_graph=True)
