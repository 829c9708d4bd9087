"""Backward family "rowsbwd": the two kernels of the row-tile backward, composed.

1. `rows_bwd_query.query_grads` (a program owns a tile of query pixels): delta =
   rowsum(dout * out), dq, and the relative-table / rpb gradients (per-program partials
   reduced in a fixed order by a small second kernel);
2. `rows_bwd_key.key_grads` (a program owns a tile of key pixels): dk and dv over the
   inverse neighborhood, reading the delta that kernel 1 wrote.

Both on tensor cores, no atomics: gradients are bit-identical run to run. A config is
one flat dict of ints: the query kernel's keys start with "Q_", the key kernel's with
"K_" (each kernel reads only its own). Where either kernel does not fit a case,
`supports` says no and the dispatcher's next backward ("offsets") runs it.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from sasa_triton.types import AttendArgs

from . import rows_bwd_key as key_kernel
from . import rows_bwd_query as query_kernel
from .common import pointer_alignment
from .launch_cache import args_key, config_key, per_call_key, plan_cache


@per_call_key
def supports(q_shape, dtype, args: AttendArgs) -> bool:
    """Both kernels support the case; float32 only up to d = 64 (its dots run on CUDA
    cores, and wider heads spill: "offsets" is the better kernel there) and only from
    Triton 3.8 on (key_kernel.FP32_COMPILES)."""
    if dtype == torch.float32 and (q_shape[-1] > 64 or not key_kernel.FP32_COMPILES):
        return False
    return (query_kernel.supports(q_shape, dtype, args)
            and key_kernel.supports(q_shape, dtype, args))


@per_call_key
def default_config(q_shape, args: AttendArgs) -> dict:
    return {**query_kernel.default_config(q_shape, args),
            **key_kernel.default_config(q_shape, args)}


def search_space() -> list[dict]:
    """Every pairing of the two kernels' settings (prune cuts it per shape)."""
    return [{**a, **b} for a, b in itertools.product(query_kernel.search_space(),
                                                     key_kernel.search_space())]


def _split(config: dict, prefix: str) -> dict:
    return {k: v for k, v in config.items() if k.startswith(prefix)}


# Each kernel's half keeps at most this many settings per shape (its default and an even
# spread of the rest), so a pairing space stays tunable (8 x 8), not 1,500 pairs.
HALF_LIMIT = 8


def _spread(halves: list[dict], default: dict, limit: int) -> list[dict]:
    rest = [h for h in halves if h != default]
    step = max(1, len(rest) / max(1, limit - 1))
    picked = [rest[int(i * step)] for i in range(min(limit - 1, len(rest)))]
    return ([default] if default in halves else []) + picked


def prune(configs: list[dict], q_shape, args: AttendArgs) -> list[dict]:
    """The pairings whose halves both survive their kernel's own pruning, each half cut
    to HALF_LIMIT settings (the two kernels' times add up, so the best pair is the pair of
    the best halves: tuning the halves' spreads jointly finds it)."""
    def kept(module, prefix) -> set:
        halves = [dict(t) for t in dict.fromkeys(
            tuple(sorted(_split(c, prefix).items())) for c in configs)]
        good = module.prune(halves, q_shape, args)
        default = module.default_config(q_shape, args)
        return {tuple(sorted(h.items())) for h in _spread(good, default, HALF_LIMIT)}

    good_q, good_k = kept(query_kernel, "Q_"), kept(key_kernel, "K_")
    return [c for c in configs if tuple(sorted(_split(c, "Q_").items())) in good_q
            and tuple(sorted(_split(c, "K_").items())) in good_k]


def _plan(q_shape, dtype, strides, args: AttendArgs, table_half: bool,
          config: Optional[dict], align: int) -> tuple:
    """The two kernels' launch plans for one call key (q, k, v, out, dout and lse
    strides; `align`: common.pointer_alignment of q, k, v and dout); raises for an
    unsupported call or a bad config."""
    if not supports(q_shape, dtype, args):
        raise ValueError(f"rowsbwd backward does not support q of shape {q_shape} "
                         f"and dtype {dtype} with these arguments")
    if config == default_config(q_shape, args):
        config = None  # the dispatcher's default: each kernel's own, dtype-aware default
    queries = query_kernel._plan(q_shape, dtype, strides, args, table_half, config)
    delta_strides = queries.delta_layout[1]
    keys = key_kernel._plan(q_shape, dtype, (*strides[:3], strides[4], strides[5],
                                             delta_strides), args, config, align)
    return queries, keys


_plans = plan_cache(_plan)


def backward(q, k, v, out, lse, dout, args: AttendArgs, config: Optional[dict] = None,
             _poison: bool = False):
    """(dq, dk, dv, drel_h, drel_w, drpb); see the module docstring. One plan lookup per
    call covers both kernels' launches."""
    strides = (q.stride(), k.stride(), v.stride(), out.stride(), dout.stride(), lse.stride())
    table_half = query_kernel.plan_table_half(q, args)
    align = pointer_alignment((q, k, v, dout))
    queries, keys = _plans(
        (q.shape, q.dtype, strides, args_key(args), table_half, config_key(config), align),
        tuple(q.shape), q.dtype, strides, args, table_half, config, align)
    dq, delta, drel_h, drel_w, drpb = query_kernel.launch(
        queries, q, k, v, out, lse, dout, args, _poison)
    dk, dv = key_kernel.launch(keys, q, k, v, dout, lse, delta, args, _poison)
    return dq, dk, dv, drel_h, drel_w, drpb
