"""The host path of `attend` (docs/host.md): the `--suite host` benchmark runs and writes
its files (never timed here), the eager fast path and the custom op agree, no host sync
in a forward + backward (what CUDA-graph capture needs), and on a GPU a SASA2d training
step captured in a CUDA graph replays like eager."""
from __future__ import annotations

import contextlib
import copy

import pandas as pd
import pytest
import torch

import sasa_triton
from sasa_triton import ops
from sasa_triton.args import check_attend_args
from sasa_triton.report import __main__ as cli
from sasa_triton.report import host
from sasa_triton.variants import with_direction

from cases import Case, assert_close, make_inputs

TABLES = ("rel_h", "rel_w", "rpb")


def test_host_suite_writes_csv_and_summary(tmp_path):
    from triton.runtime.jit import JITFunction

    from sasa_triton import dispatch

    run, choose = JITFunction.run, dispatch._choose
    csv_path, summary = cli.main(["--suite", "host", "--out", str(tmp_path), "--host-reps", "3"])
    frame = pd.read_csv(csv_path)
    assert list(frame.columns)[:len(host.COLUMNS)] == host.COLUMNS
    assert len(frame) == len(host.host_cases("cpu")) * len(host.DIRECTIONS)
    assert set(frame["direction"]) == set(host.DIRECTIONS)
    assert (frame[["host_us", "floor_us"]] > 0).all().all()
    # "auto" resolved as on a GPU: Triton kernels, not the CPU path
    assert not frame["fwd_impl"].isin(["cpu", "reference"]).any()
    kernels = [v.name for v in with_direction("bwd") if v.needs_triton]
    assert frame[frame["direction"] == "fwdbwd"]["bwd_impl"].isin(kernels).all()
    assert frame["launch"].str.startswith("stubbed").all()
    assert "| s3-b1 | fwdbwd |" in summary.read_text()
    # the stub is gone afterwards
    assert JITFunction.run is run and dispatch._choose is choose


CASES = [
    Case(B=1, H=5, W=6, heads=2, d=8, k=3, padding="mask", rel="per_head", rpb=True),
    Case(B=1, H=4, W=6, heads=1, d=16, k=(3, 5), padding="shift", rel="shared", rpb=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_eager_path_matches_the_custom_op(case):
    """The eager autograd Function and the custom ops run the same bodies: same output
    and gradients (bit for bit) for a Triton forward with the default backward kernel."""
    q, k, v, kw = make_inputs(case, torch.float32, "channels_last", requires_grad=True)
    leaves = [q, k, v, *[kw[n] for n in TABLES if n in kw]]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    args = check_attend_args(q, k, v, case.k, case.dilation, case.padding, kw.get("rel_h"),
                             kw.get("rel_w"), kw.get("rpb"), None)
    eager = ops.attend_op(q, k, v, args, "tiled")
    got = torch.autograd.grad(eager, leaves, dout)
    kh, kw_, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    via_op, _ = ops.attend_fwd(q, k, v, rel_h, rel_w, rpb, kh, kw_, dh, dw, padding, scale,
                               "tiled", "", "")
    want = torch.autograd.grad(via_op, leaves, dout)
    assert eager.grad_fn.name().endswith("_EagerAttendBackward")  # the fast path ran
    torch.testing.assert_close(eager, via_op, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_eager_path_refuses_double_backward():
    q, k, v, _ = make_inputs(Case(B=1, H=4, W=4), torch.float32, requires_grad=True)
    out = sasa_triton.attend(q, k, v, 3, backend="tiled")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()


# ------------------------------------------------------------------ no host sync

_SYNCING = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
# aten ops that read tensor data on the host (a device sync on CUDA)
_SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
             "aten::masked_select", "aten::equal", "aten::unique", "aten::_unique2")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def _no_python_sync():
    """Tensor.item / tolist / numpy / bool() / int() / float() / index raise HostSync,
    except inside a Triton launch (the interpreter reads its tensors on the host; on a
    GPU that is the kernel itself)."""
    from triton.runtime.interpreter import InterpretedFunction

    state = {"inside": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCING}
    run = InterpretedFunction.__dict__["run"]

    def guard(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            if not state["inside"]:
                raise HostSync(f"Tensor.{name} on the host path of attend")
            return original(self, *args, **kwargs)
        return method

    def launch(self, *args, **kwargs):
        state["inside"] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            state["inside"] -= 1

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, guard(name))
        InterpretedFunction.run = launch
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        InterpretedFunction.run = run


def _step(case, backend):
    q, k, v, kw = make_inputs(case, torch.float32, "channels_last", requires_grad=True)
    leaves = [q, k, v, *[kw[n] for n in TABLES if n in kw]]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def step():
        out = sasa_triton.attend(q, k, v, case.k, backend=backend, **kw)
        return out, torch.autograd.grad(out, leaves, dout)
    return step


def test_sync_guard_catches_a_sync():
    """The guard is live: a host read of tensor data raises inside it."""
    t = torch.ones(2)
    with _no_python_sync(), pytest.raises(HostSync):
        if t.sum():
            pass
    with _no_python_sync(), pytest.raises(HostSync):
        t.max().item()


@pytest.mark.parametrize("backend", ["tiled", "tile2d", "rows"])
def test_forward_backward_reads_no_tensor_data_on_the_host(backend):
    """Warm (caches filled, as before a CUDA-graph capture), a forward + backward of a
    Triton forward and the default backward kernel reads no tensor data on the host."""
    case = CASES[0]
    step = _step(case, backend)
    want_out, want_grads = step()
    with _no_python_sync():
        out, grads = step()
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["zeros", "mask", "shift"])
def test_host_path_runs_no_syncing_aten_op(padding):
    """With the launches stubbed (report.host.stub_launches: the kernels' own host reads
    are out of the picture), a warm forward + backward of "auto" as dispatched on a GPU
    calls no aten op that reads tensor data on the host (item, nonzero, equal...)."""
    from torch.profiler import ProfilerActivity, profile

    case = Case(B=1, H=6, W=7, heads=2, d=16, k=3, padding=padding, rel="shared", rpb=True)
    with host.stub_launches():
        step = _step(case, "auto")
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            torch.ones(1).item()  # the profile sees a sync when there is one
    names = [e.name for e in prof.events()]
    assert names.count("aten::_local_scalar_dense") == 1, "the probe sync is missing"
    names.remove("aten::_local_scalar_dense")
    assert "aten::item" in names
    names = [n for n in names if n != "aten::item"]
    found = sorted({n for n in names if n in _SYNC_OPS})
    assert not found, f"host syncs in attend's forward + backward: {found}"


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_cuda_graph_captures_a_sasa2d_training_step():
    """Forward + backward of SASA2d captured once, replayed on new inputs: output, input
    and parameter gradients equal those of eager calls."""
    from sasa_triton.nn import SASA2d

    torch.manual_seed(0)
    dev = "cuda"
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    # full fp32 projections: capture and eager may pick different cuDNN algorithms
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _capture_and_compare(SASA2d(64, 64, kernel_size=7, heads=8, rpb=True).to(dev), dev)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _capture_and_compare(layer, dev: str) -> None:
    reference = copy.deepcopy(layer)
    static_x = torch.randn(2, 64, 14, 14, device=dev, requires_grad=True)
    static_g = torch.randn(2, 64, 14, 14, device=dev)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the caches
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            layer(static_x).backward(static_g)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
        static_out.backward(static_g)

    for seed in (1, 2):
        gen = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(static_x.shape, device=dev, generator=gen)
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        reference.zero_grad(set_to_none=True)
        x_ref = x.clone().requires_grad_()
        want = reference(x_ref)
        want.backward(static_g)
        assert_close(static_out, want, torch.float32, "out")
        assert_close(static_x.grad, x_ref.grad, torch.float32, "grad of x")
        for (name, p), (_, p_ref) in zip(layer.named_parameters(),
                                         reference.named_parameters()):
            assert_close(p.grad, p_ref.grad, torch.float32, f"grad of {name}")


@pytest.mark.gpu
def test_no_device_sync_in_a_cuda_forward_backward():
    """torch.cuda's sync debug mode raises on any synchronising call in attend's warm
    forward + backward."""
    case = Case(B=2, H=14, W=14, heads=4, d=32, k=7, rel="shared", rpb=True)
    q, k, v, kw = make_inputs(case, torch.bfloat16, "channels_last", device="cuda",
                              requires_grad=True)
    leaves = [q, k, v, *[kw[n] for n in TABLES if n in kw]]
    dout = torch.randn_like(q)

    def step():
        return torch.autograd.grad(sasa_triton.attend(q, k, v, case.k, **kw), leaves, dout)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
