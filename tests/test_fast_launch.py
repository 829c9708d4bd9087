"""The fast launch path (kernels/fast_launch.py): repeat launches skip Triton's binder.

Checked on CPU, no GPU: (1) whenever two launches get the same fast key, Triton's own
specialisation (the sm_90 backend's binder -> compute_cache_key) is the same too, on
seeded random launches; (2) the repeat launch passes the compiled kernel exactly what
JITFunction.run passes it; (3) SASA_TRITON_FAST_LAUNCH=0, the interpreter and a launch
returning no compiled kernel never take it; (4) the host benchmark's stub still sees
every launch."""
from __future__ import annotations

import random

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend  # import it while interpreting
from triton.knobs import HookChain
from triton.runtime.jit import JITFunction

from sasa_triton.kernels import fast_launch
from sasa_triton.kernels.launch_cache import launch_plan
from sasa_triton.report import host  # imports Triton's compiler: while interpreting


def _toy(a_ptr, b_ptr, c_ptr, sizes, n, s_tab, x, BLOCK: tl.constexpr, MODE: tl.constexpr):
    pass  # never compiled: only its signature is bound


KERNEL = JITFunction(_toy)
PARAMS = KERNEL.arg_names


def _plan(sizes=(4, 5), x=0.5, block=16, mode=0, warps=4):
    """args: (a, b, c, *head = sizes, n, s_tab, *tail = x, BLOCK, MODE)."""
    return launch_plan(PARAMS, (3, 2), (sizes,), (x,),
                       {"BLOCK": block, "MODE": mode, "num_warps": warps})


def _args(plan, a, b, c, n, s_tab) -> tuple:
    return (a, b, c, *plan.head, n, s_tab, *plan.tail)


@pytest.fixture(autouse=True)
def _fresh():
    fast_launch.configure(True)
    yield
    fast_launch.configure()


# ------------------------------------------------- (1) same fast key -> same specialisation

def _triton_key(binder, cache: dict, args: tuple, options: dict) -> str:
    """What JITFunction.run looks its compiled kernel up by (sm_90 backend, this CPU)."""
    from triton.runtime.jit import compute_cache_key

    kwargs = dict(options, debug=KERNEL.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    _, specialization, opts = binder(*args, **kwargs)
    return compute_cache_key(cache, specialization, opts)


def _random_launches(rng: random.Random, count: int) -> list:
    """Launches drawn from small pools, so that fast keys repeat: tensors of two dtypes
    at offsets that keep or break 16-byte alignment (an 8-element bf16 offset keeps it),
    None for c, ints 1 / 16 / 17 / 2**31 (and a bool) for n, a few table-stride tuples
    (one with a bool in it), two plans."""
    f32, bf16 = torch.empty(64), torch.empty(64, dtype=torch.bfloat16)
    tensors = [f32, f32[1:], f32[4:], bf16, bf16[8:], bf16[3:]]
    plans = [_plan(), _plan(sizes=(16, 1), x=2.0, block=32, mode=1, warps=8)]
    s_tabs = [(0, 16, 1), (16, 17, 1), (2**31, 16, 32), (0, 16, True)]
    launches = []
    for _ in range(count):
        plan = rng.choice(plans)
        c = rng.choice([None, bf16, bf16[8:], bf16[1:]])
        n = rng.choice([1, 16, 17, 2**31, 32, True])
        args = _args(plan, rng.choice(tensors), rng.choice(tensors[:2]), c, n,
                     rng.choice(s_tabs))
        launches.append((plan, args, dict(plan.options)))
    return launches


def _key_map(launches: list, fast_key) -> tuple[dict, int]:
    """{fast key: [Triton key of each launch]} and the number of distinct Triton keys."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(KERNEL.signature, KERNEL.params,
                                            CUDABackend(GPUTarget("cuda", 90, 32)))
    cache: dict = {}
    seen: dict = {}
    for plan, args, options in launches:
        slot = fast_launch._find_slot(KERNEL, plan, args, options)
        assert slot is not None
        key = (id(plan), fast_key(slot, args, 0))
        seen.setdefault(key, []).append(_triton_key(binder, cache, args, options))
    return seen, len({k for keys in seen.values() for k in keys})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_fast_key_same_triton_specialisation(seed):
    launches = _random_launches(random.Random(seed), 600)
    seen, n_triton = _key_map(launches, fast_launch.fast_key)
    mixed = [set(v) for v in seen.values() if len(set(v)) > 1]
    assert not mixed, f"fast keys with several Triton keys: {mixed[:2]}"
    # not vacuous: Triton sees many specialisations, and many fast keys repeat
    assert n_triton > 50 and sum(len(v) > 1 for v in seen.values()) > 50


def test_the_property_check_catches_a_key_blind_to_alignment():
    """The check above can fail: a key that ignores pointer alignment is caught."""
    def blind(slot, args, device):
        return tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args[:3]) + \
            fast_launch._other_keys(slot.others(args))

    seen, _ = _key_map(_random_launches(random.Random(0), 600), blind)
    assert any(len(set(v)) > 1 for v in seen.values())


# ------------------------------------------------- (2) the repeat launch = run()'s launch

class _Compiled:
    """A compiled kernel that records its launches."""
    function, packed_metadata = object(), object()

    def __init__(self):
        self.launches, self.metadata_calls = [], []

    def launch_metadata(self, grid, stream, *args):
        self.metadata_calls.append((grid, stream, args))
        return ("metadata", len(self.metadata_calls))

    def run(self, *args):
        self.launches.append(args)


class _Driver:
    def __init__(self):
        self.device, self.stream = 3, 1234

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return self.stream + device


class _DriverConfig:
    def __init__(self):
        self.active = _Driver()


@pytest.fixture
def fake_triton(monkeypatch):
    """KERNEL's run returns a recording compiled kernel (counting its calls); a fake
    driver; not interpreting."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = _DriverConfig()
    monkeypatch.setattr(fast_launch, "driver", config)
    calls = []
    compiled = _Compiled()

    def run(*args, grid, warmup, **kwargs):
        calls.append((args, grid, kwargs))
        return compiled

    monkeypatch.setattr(KERNEL, "run", run, raising=False)
    yield calls, compiled, config.active
    fast_launch.forget()


def _toy_launch(plan, a, b, n=7):
    return fast_launch.launch_kernel(KERNEL, plan, a, b, None, *plan.head, n, (1, 2, 3),
                                     *plan.tail, **plan.options)


def test_repeat_launch_passes_exactly_runs_arguments(fake_triton):
    """With a launch hook set, the repeat launch passes exactly run()'s arguments; with
    Triton's default hooks (empty chains, which would do nothing) it passes None for them
    and for the launch metadata, which only hooks read."""
    calls, compiled, driver = fake_triton
    plan = _plan()
    a, b = torch.empty(8), torch.empty(8)
    assert _toy_launch(plan, a, b) is compiled and len(calls) == 1  # Triton's path
    args, grid, kwargs = calls[0]
    assert grid == plan.grid and kwargs == plan.options
    enter = knobs.runtime.launch_enter_hook
    assert isinstance(enter, HookChain) and not enter.calls  # Triton's default: no hook
    assert _toy_launch(plan, a, b) is compiled and len(calls) == 1  # the fast path
    (launched,) = compiled.launches
    stream = driver.stream + driver.device
    assert launched == (3, 2, 1, stream, compiled.function, compiled.packed_metadata,
                        None, None, None, *args)
    assert len(launched) - 9 == len(PARAMS)  # every argument, constexprs included
    assert not compiled.metadata_calls
    seen = []
    enter.add(seen.append)  # a hook (a profiler's): run()'s own arguments again
    try:
        _toy_launch(plan, a, b)
    finally:
        enter.remove(seen.append)
    assert compiled.launches[-1] == (3, 2, 1, stream, compiled.function,
                                     compiled.packed_metadata, ("metadata", 1), enter,
                                     knobs.runtime.launch_exit_hook, *args)
    assert compiled.metadata_calls == [(plan.grid, stream, args)]
    driver.stream = 99  # the stream (and device) are read on every call
    _toy_launch(plan, a, b)
    assert compiled.launches[-1][3] == 99 + driver.device and len(calls) == 1
    assert compiled.launches[-1][6:9] == (None, None, None)


def test_a_new_specialisation_goes_through_triton(fake_triton):
    calls, compiled, driver = fake_triton
    plan = _plan()
    a, b = torch.empty(8), torch.empty(8)
    _toy_launch(plan, a, b)
    _toy_launch(plan, a, b[1:])  # b unaligned
    _toy_launch(plan, a, b.to(torch.bfloat16))  # another dtype
    _toy_launch(plan, a, b, n=16)  # another int
    _toy_launch(_plan(), a, b)  # an equal plan, another object
    assert len(calls) == 5 and not compiled.launches
    driver.device = 4
    _toy_launch(plan, a, b)
    assert len(calls) == 6
    for _ in range(3):
        _toy_launch(plan, a, b[1:])  # device 4: kept once, then fast
        _toy_launch(plan, a, b)
    assert len(calls) == 7 and len(compiled.launches) == 5


def test_arguments_not_the_plans_take_triton_path(fake_triton):
    calls, _, _ = fake_triton
    plan = _plan()
    a, b = torch.empty(8), torch.empty(8)
    equal = tuple([4, 5])
    assert equal == plan.head[0] and equal is not plan.head[0]
    for _ in range(2):  # before and after the plan's slot exists
        fast_launch.launch_kernel(KERNEL, plan, a, b, None, equal, 7, (1, 2, 3),
                                  *plan.tail, **plan.options)  # head: an equal tuple
        fast_launch.launch_kernel(KERNEL, plan, a, b, None, *plan.head, 7, (1, 2, 3),
                                  0.5, 16, 0.0, **plan.options)  # tail: equal values
        fast_launch.launch_kernel(KERNEL, plan, a, b, None, *plan.head, 7, (1, 2, 3),
                                  *plan.tail, num_warps=8)  # other options
        _toy_launch(plan, a, b)
    assert len(calls) == 7


# ------------------------------------------------- (3) when it is never taken

def test_env_switch_turns_it_off(fake_triton, monkeypatch):
    calls, compiled, _ = fake_triton
    monkeypatch.setenv("SASA_TRITON_FAST_LAUNCH", "0")
    assert fast_launch.configure() is False and not fast_launch.enabled()
    plan = _plan()
    a, b = torch.empty(8), torch.empty(8)
    for _ in range(3):
        _toy_launch(plan, a, b)
    assert len(calls) == 3 and not compiled.launches
    monkeypatch.setenv("SASA_TRITON_FAST_LAUNCH", "1")
    assert fast_launch.configure() is True


def test_interpreter_mode_never_fast(fake_triton, monkeypatch):
    calls, compiled, _ = fake_triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plan = _plan()
    a, b = torch.empty(8), torch.empty(8)
    for _ in range(3):
        _toy_launch(plan, a, b)
    assert len(calls) == 3 and not compiled.launches


def test_no_compiled_kernel_never_fast(fake_triton, monkeypatch):
    calls = []

    def run(*args, grid, warmup, **kwargs):
        calls.append(args)
        return None  # a stub; the interpreter

    monkeypatch.setattr(KERNEL, "run", run, raising=False)
    plan = _plan()
    for _ in range(3):
        _toy_launch(plan, torch.empty(8), torch.empty(8))
    assert len(calls) == 3


def test_interpreted_kernels_launch_as_before():
    """Under TRITON_INTERPRET (the suite's default) a real launcher runs its kernel every
    call, and the fast path keeps nothing."""
    import os

    import sasa_triton

    assert os.environ.get("TRITON_INTERPRET") == "1"
    q, k, v = (torch.randn(1, 5, 5, 2, 4) for _ in range(3))
    want = sasa_triton.attend(q, k, v, 3, backend="reference")
    for _ in range(2):
        torch.testing.assert_close(sasa_triton.attend(q, k, v, 3), want,
                                   rtol=1e-4, atol=1e-5)
    assert not any(slot.compiled for slot in fast_launch._SLOTS.values())


# ------------------------------------------------- (4) the host benchmark's stub

def test_stub_counts_every_launch_fast_or_not(monkeypatch):
    """stub_launches: the first launch runs Triton's binder path (a fake compiled kernel
    returned), the repeats go the fast path; `_launches` records all of them, with the
    arguments in signature order and the launch options."""
    from triton.runtime.driver import driver

    # as if not interpreting (the binder would import Triton's gluon, which then fails)
    monkeypatch.setattr(fast_launch, "_interpreting", lambda: False)
    active = driver._active
    plan = _plan()
    a, b = torch.empty(8), torch.empty(8)
    with host.stub_launches():
        launches = host._launches(lambda: [_toy_launch(plan, a, b) for _ in range(3)])
        assert any(slot.compiled for slot in fast_launch._SLOTS.values())
    assert driver._active is active and not fast_launch._SLOTS
    assert len(launches) == 3
    for fn, args, kwargs in launches:
        assert fn is KERNEL and kwargs == plan.options
        assert args == (a, b, None, *plan.head, 7, (1, 2, 3), *plan.tail)
