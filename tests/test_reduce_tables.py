"""The table reduction of the query-owned backward kernels (rows_bwd_query's
`_reduce_tables_kernel`, shared with tile2d_bwd) on random partials, against float64
sums in the [row, slot, column] layout (slot = tile * heads + head): shared and per-head
rel tables (odd d: rel_h and rel_w walk apart), rpb in every padding (its zero border),
one or many positions per program, the mask-free walk plus its masked rest, run-to-run
equality. Runs through Triton's interpreter on CPU.
"""
from typing import Optional

import pytest
import torch

from sasa_triton.kernels import rows_bwd_query as mod
from sasa_triton.types import AttendArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (heads, d, k, padding, rel_h sharing, rel_w sharing, rpb, tiles): None = no rel tables
CASES = [
    (3, 8, (3, 3), "zeros", "shared", "shared", False, 37),
    (2, 5, (3, 5), "mask", "per_head", "per_head", True, 9),
    (4, 6, (5, 3), "zeros", "shared", "per_head", True, 11),
    (2, 12, (3, 3), "shift", "per_head", "per_head", True, 13),
    (3, 4, (3, 3), "zeros", None, None, True, 21),
    (1, 64, (3, 3), "shift", "shared", "shared", False, 5),
]


def _table(sharing: Optional[str], heads: int, rows: int, cols: int, dtype) -> Optional[torch.Tensor]:
    if sharing is None:
        return None
    shape = (rows, cols) if sharing == "shared" else (heads, rows, cols)
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


def _expected(part: torch.Tensor, tiles: int, heads: int, shared: bool) -> torch.Tensor:
    """[rows, tiles * heads, C] partials -> [rows, C] (shared) or [heads, rows, C]."""
    rows, _, c = part.shape
    p = part.double().view(rows, tiles, heads, c)
    return p.sum(dim=(1, 2)) if shared else p.sum(dim=1).permute(1, 0, 2)


@pytest.mark.parametrize("loads,programs", [(32, 132), (1, 1)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}-d{c[1]}-{c[3]}-{c[4]}-{c[6]}")
def test_reduce_tables_match_float64_sums(case, loads, programs, monkeypatch):
    # loads=1: several mask-free steps and a masked rest; programs=1: 16 positions per
    # program (position masks where a row's slot group is not a multiple of 16)
    monkeypatch.setattr(mod, "REDUCE_LOADS", loads)
    monkeypatch.setattr(mod, "REDUCE_PROGRAMS", programs)
    heads, d, (kh, kw), padding, sh_h, sh_w, has_rpb, tiles = case
    ty, tx = (2 * kh - 1, 2 * kw - 1) if padding == "shift" else (kh, kw)
    dt = torch.bfloat16 if d == 12 else torch.float32
    rel_h = _table(sh_h, heads, ty, d // 2, dt)
    rel_w = _table(sh_w, heads, tx, d - d // 2, dt)
    rpb = torch.zeros(heads, 2 * kh - 1, 2 * kw - 1, dtype=dt, device=DEVICE) if has_rpb else None
    args = AttendArgs(kh, kw, 1, 1, padding, rel_h, rel_w, rpb, 1.0)
    plan = mod.reduce_plan(args, heads, d, tiles, ty, tx)
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    n_slots = tiles * heads
    part_h = torch.randn(ty, n_slots, d // 2, generator=g).to(DEVICE)
    part_w = torch.randn(tx, n_slots, d - d // 2, generator=g).to(DEVICE)
    part_b = torch.randn(ty, n_slots, tx, generator=g).to(DEVICE)

    def run():
        outs = [None if t is None else torch.full_like(t, float("nan")) for t in (rel_h, rel_w, rpb)]
        dummy = part_h
        mod._reduce_tables_kernel[plan.grid](
            part_h, part_w, part_b, *(dummy if o is None else o for o in outs),
            *plan.head, *plan.tail, **plan.options)
        return outs

    outs = run()
    tol = dict(rtol=1e-2, atol=1e-2) if dt == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    if rel_h is not None:
        torch.testing.assert_close(outs[0].double(), _expected(part_h, tiles, heads, sh_h == "shared"),
                                   **tol)
        torch.testing.assert_close(outs[1].double(), _expected(part_w, tiles, heads, sh_w == "shared"),
                                   **tol)
    if rpb is not None:
        want = torch.zeros(heads, 2 * kh - 1, 2 * kw - 1, dtype=torch.float64)
        rows = slice(0, ty) if padding == "shift" else slice(kh // 2, kh // 2 + kh)
        cols = slice(0, tx) if padding == "shift" else slice(kw // 2, kw // 2 + kw)
        want[:, rows, cols] = _expected(part_b, tiles, heads, False)
        torch.testing.assert_close(outs[2].double(), want, **tol)
    again = run()
    for a, b in zip(outs, again):
        assert a is None or torch.equal(a, b)
