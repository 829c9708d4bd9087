"""Launch plans (kernels/launch_cache.py): a plan made once per call key must launch
exactly what a fresh plan for the call would, whatever calls came before it (the key
holds everything the plan depends on: strides, table dtypes, pointer alignment, ...).
Kernels are stubbed (sasa_triton.report.host.stub_launches): only the launchers run."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sasa_triton import ops, variants
from sasa_triton.args import check_attend_args
from sasa_triton.kernels import (
    launch_cache,
    rows_bwd,
    rows_fwd,
    tile2d_bwd,
    tile2d_fwd,
    tiled_fwd,
)
from sasa_triton.kernels.common import vector_width
from sasa_triton.report import host

from cases import Case, make_inputs

BACKWARDS = (rows_bwd, tile2d_bwd)


def _describe(x):
    """A launch argument as a comparable value (a tensor by its layout: allocations
    differ from call to call)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype)
    return x


def _record(call) -> list:
    return [(fn.__name__, [_describe(a) for a in args], kwargs)
            for fn, args, kwargs in host._launches(call)]


def _perturbed(rng, backward: bool, q, k, v, kw) -> tuple:
    """The same call but for one property a plan depends on (dout_strides: the
    backward's output gradient with channels not contiguous)."""
    kw = dict(kw)
    what = rng.choice(["q_offset", "k_strides", "rel_f32", "no_rpb", "scale"]
                      + ["dout_strides"] * (5 if backward else 0))
    if what == "dout_strides":
        kw["dout_strides"] = True
    elif what == "q_offset":  # q one element past an aligned address: narrower vectors
        q = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape).copy_(q)
    elif what == "k_strides":  # channels not contiguous
        k = k.transpose(3, 4).contiguous().transpose(3, 4)
    elif what == "rel_f32" and "rel_w" in kw and kw["rel_w"].dtype != torch.float32:
        kw["rel_w"] = kw["rel_w"].float()
    elif what == "no_rpb":
        kw.pop("rpb", None)
    else:
        kw["scale"] = 0.25
    return q, k, v, kw


def _random_calls(seed: int, n: int,
                  modules=(rows_fwd, tile2d_fwd, tiled_fwd, rows_bwd)) -> list:
    """Pairs of calls of the plan-cached launchers `modules` that differ in one property
    only (the second may hit the first one's plan if the key missed it)."""
    rng = random.Random(seed)
    calls = []
    for _ in range(n):
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
        case = Case(B=1, H=rng.choice([5, 8]), W=rng.choice([10, 13]), heads=2,
                    d=rng.choice([8, 16]), k=rng.choice([3, (3, 5)]),
                    dilation=rng.choice([1, (1, 2)]),
                    padding=rng.choice(["zeros", "mask", "shift"]),
                    rel=rng.choice([None, "shared", "per_head"]), rpb=rng.random() < 0.5)
        module = rng.choice(list(modules))
        base = make_inputs(case, dtype, rng.choice(["contiguous", "channels_last"]))
        for q, k, v, kw in (base, _perturbed(rng, module in BACKWARDS, *base)):
            args = check_attend_args(q, k, v, case.k, case.dilation, case.padding,
                                     kw.get("rel_h"), kw.get("rel_w"), kw.get("rpb"),
                                     kw.get("scale"))
            if module.supports(tuple(q.shape), q.dtype, args):
                calls.append((module, q, k, v, args, kw.get("dout_strides", False)))
    return calls


def _launch_all(module, q, k, v, args, dout_strides):
    def call():
        if module in BACKWARDS:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            lse = torch.empty(q.shape[:4])
            dout = torch.empty_like(out)
            if dout_strides:
                dout = dout.transpose(3, 4).contiguous().transpose(3, 4)
            module.backward(q, k, v, out, lse, dout, args)
        else:
            module.forward(q, k, v, args)
    return call


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_plans_launch_what_fresh_plans_launch(seed):
    _check_cached_plans(_random_calls(seed, 24))


def test_cached_tile2dbwd_plans_launch_what_fresh_plans_launch():
    """The same for the tile2dbwd backward's three launches (one plan per call)."""
    calls = _random_calls(8, 16, (tile2d_bwd,))  # a seed with a shifted q among them
    assert len(calls) >= 16  # zeros and mask padding: most calls are supported
    _check_cached_plans(calls)


def _check_cached_plans(calls) -> None:
    with host.stub_launches():
        launch_cache.clear_all()
        shared = [_record(_launch_all(*c)) for c in calls]  # plans accumulate
        for c, got in zip(calls, shared):
            launch_cache.clear_all()
            assert got == _record(_launch_all(*c))  # a fresh plan for this call alone
    launch_cache.clear_all()


def test_tile2d_vector_width_follows_the_pointers():
    """The pointer alignment is part of tile2d's key: the same shape and strides at a
    shifted base address get a narrower vector width, back at an aligned one the wider."""
    case = Case(B=1, H=4, W=8, heads=2, d=16, k=3)
    q, k, v, _ = make_inputs(case, torch.bfloat16)
    args = check_attend_args(q, k, v, 3, 1, "zeros", None, None, None, None)
    shifted = torch.empty(q.numel() + 2, dtype=q.dtype)[2:].view(q.shape)
    widths = []
    with host.stub_launches():
        for query in (q, shifted, q):
            ((fn, values, options),) = host._launches(
                lambda query=query: tile2d_fwd.forward(query, k, v, args))
            named = dict(zip(fn.arg_names, values), **options)
            assert named["VEC"] == vector_width((query, k, v, named["o_ptr"]), 16)
            widths.append(named["VEC"])
    assert widths[1] < widths[0] == widths[2]


@pytest.mark.parametrize("module,runtime_args", [(tile2d_fwd, 16), (rows_fwd, 17)],
                         ids=["tile2d", "rows"])
def test_forward_passes_its_strides_packed(module, runtime_args):
    """Triton binds ints inside a tuple for half the host time of as many arguments
    (scripts/bind_costs.py): the tile2d and rows forwards pass their sizes and each
    input's strides as tuples, no strides for out and lse (the kernel derives them: they
    are the launcher's own contiguous allocations), None for v's strides when they equal
    k's and for an absent table."""
    case = Case(B=1, H=4, W=8, heads=2, d=16, k=3, rel="shared")
    q, k, v, kw = make_inputs(case, torch.bfloat16)
    strided_v = v.transpose(3, 4).contiguous().transpose(3, 4)
    with host.stub_launches():
        for value in (v, strided_v):
            args = check_attend_args(q, k, value, 3, 1, "zeros", kw["rel_h"], kw["rel_w"],
                                     None, None)
            ((fn, values, _),) = host._launches(
                lambda value=value, args=args: module.forward(q, k, value, args))
            named = dict(zip(fn.arg_names, values))
            # runtime arguments, then constexprs
            assert fn.arg_names.index("KH") <= runtime_args
            assert named["sq"] == q.stride() and named["sk"] == k.stride()
            assert named["sv"] == (None if value is v else value.stride())
            assert named["rpb_ptr"] is None and named["relh_ptr"] is kw["rel_h"]
            assert named["sizes"] == (4, 8, 2, 16, 8, named["sizes"][5], named["sizes"][6])
            assert named["o_ptr"].is_contiguous() and named["lse_ptr"].is_contiguous()


@pytest.mark.parametrize("tables", [None, "rel_rpb"])
def test_rowsbwd_query_and_reduction_pass_their_strides_packed(tables):
    """The same packing for rowsbwd's query kernel (sizes and each input's strides as
    tuples, no dq strides: its own contiguous output; None for absent tables, their
    partials and, without ROW_DOT, the one-hot table) and the table reduction (no strides
    of the gradients it stores: contiguous, derived from its constexprs)."""
    case = Case(B=1, H=5, W=6, heads=2, d=16, k=3, rel="per_head" if tables else None,
                rpb=bool(tables))
    q, k, v, kw = make_inputs(case, torch.float32)
    args = check_attend_args(q, k, v, 3, 1, "zeros", kw.get("rel_h"), kw.get("rel_w"),
                             kw.get("rpb"), None)
    out, lse, dout = torch.empty_like(q), torch.empty(q.shape[:4]), torch.empty_like(q)
    with host.stub_launches():
        launches = host._launches(
            lambda: rows_bwd.backward(q, k, v, out, lse, dout, args))
    by_name = {fn.__name__: dict(zip(fn.arg_names, values)) for fn, values, _ in launches}
    named = by_name["_query_grads_kernel"]
    fn = next(fn for fn, _, _ in launches if fn.__name__ == "_query_grads_kernel")
    assert fn.arg_names.index("KH") <= 25  # runtime arguments, then constexprs
    # (H, W, heads, d, d // 2), then the multipliers and shifts of heads, column blocks
    # and row blocks (rows_bwd_query.div_magic)
    assert named["sizes"][:7] == (5, 6, 2, 16, 8, 2**31, 1) and len(named["sizes"]) == 11
    for name, t in (("sq", q), ("sk", k), ("sv", v), ("so", out), ("sdo", dout), ("sl", lse)):
        assert named[name] == t.stride()
    assert named["dq_ptr"].is_contiguous() and named["sel_ptr"] is None  # fp32: no ROW_DOT
    for name in ("relh_ptr", "relw_ptr", "rpb_ptr", "parth_ptr", "partw_ptr", "partb_ptr"):
        assert (named[name] is None) == (tables is None), name
    if tables is None:
        assert "_reduce_tables_kernel" not in by_name
    else:
        red = by_name["_reduce_tables_kernel"]
        fn = next(fn for fn, _, _ in launches if fn.__name__ == "_reduce_tables_kernel")
        assert fn.arg_names.index("HEADS") == 7  # 6 pointers and the tile count
        assert all(red[n].is_contiguous() for n in ("dh_ptr", "dw_ptr", "db_ptr"))


def test_tile2dbwd_passes_its_strides_packed():
    """Both tile2dbwd kernels pass their sizes and each input's strides as tuples, no
    strides for the gradients they write (the launcher's contiguous dq, dk, dv: derived
    in-kernel), None for absent tables and their partials, and the key kernel None for
    v's strides when they equal k's (the query kernel always passes them)."""
    case = Case(B=1, H=4, W=8, heads=2, d=8, k=3, rel="shared")
    q, k, v, kw = make_inputs(case, torch.bfloat16)
    strided_v = v.transpose(3, 4).contiguous().transpose(3, 4)
    out, lse, dout = torch.empty_like(q), torch.empty(q.shape[:4]), torch.empty_like(q)
    with host.stub_launches():
        for value, rel in ((v, True), (strided_v, False)):
            args = check_attend_args(q, k, value, 3, 1, "zeros", kw["rel_h"] if rel else None,
                                     kw["rel_w"] if rel else None, None, None)
            launches = host._launches(lambda value=value, args=args: tile2d_bwd.backward(
                q, k, value, out, lse, dout, args))
            assert len(launches) == (3 if rel else 2)
            named = [dict(zip(fn.arg_names, values)) for fn, values, _ in launches]
            query, key = named[0], named[-1]
            for each in (query, key):
                assert each["sq"] == q.stride() and each["sk"] == k.stride()
                assert each["sizes"][:3] == (4, 8, 2) and each["rpb_ptr"] is None
                assert (each["relh_ptr"] is kw["rel_h"]) if rel else each["relh_ptr"] is None
                assert not any(n.startswith(("sdq", "sdk", "sdv")) for n in each)
            assert query["sv"] == value.stride() and query["partb_ptr"] is None
            assert key["sv"] == (None if value is v else value.stride())
            assert key["KV_SAME"] == (value is v)
            assert (query["parth_ptr"] is None) != rel
            for fn, _values, _ in (launches[0], launches[-1]):
                assert fn.arg_names.index("D") <= 25  # runtime arguments, then constexprs


def test_tile2dbwd_vector_width_follows_the_pointers():
    """Likewise for both tile2dbwd kernels, whose width also follows out, dout and the
    gradients it allocates."""
    case = Case(B=1, H=4, W=8, heads=2, d=8, k=3)
    q, k, v, _ = make_inputs(case, torch.bfloat16)
    args = check_attend_args(q, k, v, 3, 1, "zeros", None, None, None, None)
    out, lse, dout = torch.empty_like(q), torch.empty(q.shape[:4]), torch.empty_like(q)
    shifted = torch.empty(q.numel() + 2, dtype=q.dtype)[2:].view(q.shape)
    widths = []
    with host.stub_launches():
        for query in (q, shifted, q):
            launches = host._launches(
                lambda query=query: tile2d_bwd.backward(query, k, v, out, lse, dout, args))
            assert len(launches) == 2  # no tables: no reduction
            for fn, values, options in launches:
                named = dict(zip(fn.arg_names, values), **options)
                grads = [named[n] for n in ("dq_ptr", "dk_ptr", "dv_ptr") if n in named]
                assert named["VEC"] == vector_width((query, k, v, out, dout, *grads), 8)
                widths.append(named["VEC"])
    assert widths[2] < widths[0] == widths[4] and widths[2] == widths[3]


def test_bad_configs_raise_on_every_call():
    """A plan that raises is not stored: the second call with a bad config raises too."""
    q, k, v, _ = make_inputs(Case(B=1, H=4, W=40, heads=2, d=16, k=3), torch.bfloat16)
    args = check_attend_args(q, k, v, 3, 1, "zeros", None, None, None, None)
    for _ in range(2):
        with pytest.raises(ValueError, match="BLOCK_M"):
            rows_fwd.forward(q, k, v, args, dict(BLOCK_M=16, BLOCK_W=32, num_warps=1))
        with pytest.raises(ValueError, match="PIX"):
            tile2d_fwd.forward(q, k, v, args, dict(BLOCK_H=2, BLOCK_W=6, PIX=4))


class _Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("empty", "empty_like", "empty_strided"):
            self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize("module", BACKWARDS, ids=["rowsbwd", "tile2dbwd"])
def test_backward_allocates_one_float32_buffer(module):
    """dq, dk, dv and the three table gradients, plus one float32 buffer for delta (lse2
    and delta pairs in tile2dbwd) and every table partial."""
    case = Case(B=1, H=5, W=6, heads=2, d=16, k=3, rel="per_head", rpb=True)
    q, k, v, kw = make_inputs(case, torch.bfloat16)
    args = check_attend_args(q, k, v, 3, 1, "zeros", kw["rel_h"], kw["rel_w"], kw["rpb"], None)
    lse = torch.empty(q.shape[:4])
    with host.stub_launches(), _Allocations() as seen:
        grads = module.backward(q, k, v, q, lse, q, args)
    assert all(g is not None for g in grads)
    assert sorted(map(str, seen.dtypes)) == sorted(["torch.float32"] + ["torch.bfloat16"] * 6)


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


@pytest.mark.parametrize("name", [v.name for v in variants.VARIANTS.values() if v.needs_triton])
def test_triton_launchers_allocate_every_output(name):
    """What lets ops._fresh skip its storage check for Triton variants: no output of
    their forward or backward shares storage with an input."""
    variant = variants.VARIANTS[name]
    case = Case(B=1, H=5, W=6, heads=2, d=16, k=3, rel="shared", rpb=True)
    q, k, v, kw = make_inputs(case, torch.bfloat16)
    args = check_attend_args(q, k, v, 3, 1, "zeros", kw["rel_h"], kw["rel_w"], kw["rpb"], None)
    if not variant.supports(tuple(q.shape), q.dtype, args):
        pytest.skip(f"{name} does not support the case")
    out, lse = torch.empty_like(q), torch.empty(q.shape[:4])
    with host.stub_launches():
        if variant.forward is not None:
            outputs = variant.forward(q, k, v, args)
            assert not _storages(outputs) & _storages((q, k, v))
            out, lse = outputs
        if variant.backward is not None:
            inputs = (q, k, v, out, lse, k, *args[5:8])
            grads = variant.backward(q, k, v, out, lse, k, args)
            assert not _storages(grads) & _storages(inputs)
            fresh = ops._fresh(grads, inputs, allocated=True)
            assert all(g is None or g.is_contiguous() for g in fresh)


def test_rows_key_backward_passes_its_strides_packed():
    """rowsbwd's key kernel packs its launch like tile2d's forward: sizes, each tensor's
    strides (q, k, v, dout, lse, delta, dk / dv) and the table strides as tuples, None
    for absent tables; the identity table of its one-hots is None where the paired
    register build replaces it (PAIR_ONEHOT, 4+ warps)."""
    case = Case(B=1, H=4, W=8, heads=2, d=16, k=3, rel="shared")
    q, k, v, kw = make_inputs(case, torch.bfloat16, "channels_last")
    args = check_attend_args(q, k, v, 3, 1, "zeros", kw["rel_h"], kw["rel_w"], None, None)
    out, lse, dout = torch.empty_like(q), torch.empty(q.shape[:4]), torch.empty_like(q)
    paired = dict(rows_bwd.default_config(tuple(q.shape), args), K_BLOCK_M=32, K_num_warps=4)
    for config in (None, paired):
        with host.stub_launches():
            launches = host._launches(
                lambda config=config: rows_bwd.backward(q, k, v, out, lse, dout, args, config))
        ((fn, values, _),) = [x for x in launches if x[0].__name__ == "_key_bwd_kernel"]
        named = dict(zip(fn.arg_names, values))
        assert fn.arg_names.index("D") <= 24  # runtime arguments, then constexprs
        assert named["sizes"][:3] == (4, 8, 2)
        assert (named["sq"], named["sk"], named["sv"], named["sdo"], named["sl"]) == (
            q.stride(), k.stride(), v.stride(), dout.stride(), lse.stride())
        assert named["sdk"] == named["dk_ptr"].stride() == named["dv_ptr"].stride()
        assert named["dk_ptr"].is_contiguous() and len(named["sdl"]) == 4  # delta: a view
        assert named["rpb_ptr"] is None and named["relh_ptr"] is kw["rel_h"]
        assert named["dil"] == (1, 1) and len(named["s_tab"]) == 9
        eye = named["eye_ptr"]
        if named["PAIR_ONEHOT"]:
            assert eye is None
        elif named["COMBINED"]:  # the one-hots by tile slot (8 columns: one row a slot)
            assert eye.shape == (named["BLOCK_M"], named["BLOCK_N"])
            slot = torch.arange(named["BLOCK_M"])
            ones = torch.eye(named["BLOCK_M"] + 8)[:, :named["BLOCK_N"]]
            assert torch.equal(eye.float(), ones[slot % 8] + ones[8 + slot // 8])
        else:
            assert torch.equal(eye.float(), torch.eye(named["EYE"]))
    assert config is not None and named["PAIR_ONEHOT"]  # the second config took that path


def test_image_kernels_pass_their_strides_packed():
    """The image forward and imagebwd's gradient kernel pack their launches as tile2d's
    forward does: sizes and each input's strides as tuples, none for what the launcher
    allocates (out, lse; dq, dk, dv), None for v's strides equal to k's and for absent
    tables (and, backward, their partials)."""
    from sasa_triton.kernels import image_bwd, image_fwd

    case = Case(B=1, H=5, W=6, heads=2, d=16, k=3, rel="shared")
    q, k, v, kw = make_inputs(case, torch.bfloat16)
    strided_v = v.transpose(3, 4).contiguous().transpose(3, 4)
    lse = torch.zeros(q.shape[:4])
    with host.stub_launches():
        for value, rel in ((v, True), (strided_v, False)):
            tables = (kw["rel_h"], kw["rel_w"]) if rel else (None, None)
            args = check_attend_args(q, k, value, 3, 1, "zeros", *tables, None, None)
            (fwd, values, _), = host._launches(
                lambda value=value, args=args: image_fwd.forward(q, k, value, args))
            (bwd, bvalues, _), *rest = host._launches(
                lambda value=value, args=args: image_bwd.backward(q, k, value, q, lse, q, args))
            assert len(rest) == (1 if rel else 0)  # the table reduction
            for fn, vals in ((fwd, values), (bwd, bvalues)):
                named = dict(zip(fn.arg_names, vals))
                assert fn.arg_names.index("KH") <= 26  # runtime arguments, then constexprs
                assert named["sq"] == q.stride() and named["sk"] == k.stride()
                assert named["sv"] == (None if value is v else value.stride())
                assert named["rpb_ptr"] is None
                assert (named["relh_ptr"] is None) == (not rel)
                assert named["sizes"][:5] == (5, 6, 2, 16, 8)
                assert not any(n in fn.arg_names for n in ("so_b", "sl_b", "sg_b"))
            named = dict(zip(bwd.arg_names, bvalues))
            assert named["partb_ptr"] is None and (named["parth_ptr"] is None) == (not rel)
            assert named["so"] == q.stride() and named["sl"] == lse.stride()
            assert all(named[n].is_contiguous() for n in ("dq_ptr", "dk_ptr", "dv_ptr"))
