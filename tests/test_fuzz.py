"""Seeded random fuzz: drawn `attend` calls against the float64 oracle, forward and backward.

Each forward case (a seed) is one random call (tests/fuzz_cases.py draws shapes, options,
dtypes and layouts) run on the reference and on one Triton forward variant (they take
turns by seed; interpreter on CPU, a random config of the variant's pruned search space,
NaN-poisoned outputs), comparing out and lse with tests/oracle.py. Each backward case
runs `attend` with autograd on the reference and on one Triton backend (forward variant
+ backward kernel, random configs), with `requires_grad` on a random subset of the leaf
tensors the inputs are views of, and compares out and every requested gradient.

Environment:
    SASA_FUZZ_N=2000        forward cases (backward cases: N // 5, at least 1); default 500
                            (60 on a GPU, where every new case compiles)
    SASA_FUZZ_SEED=123      first seed (default 0); seeds are SEED, SEED+1, ...;
                            SASA_FUZZ_SEED=random draws a fresh one (the test ids, fwd<seed>
                            and bwd<seed>, and any failure name the seeds)
A failure prints the seed and the case, and the command that replays it alone:
    SASA_FUZZ_SEED=<seed> SASA_FUZZ_N=1 pytest tests/test_fuzz.py
"""
import json
import os
import random

import pytest
import torch
from fuzz_cases import FLOOR, coarser, draw, make_dout, mismatch, own_out_gradients

import sasa_triton
from sasa_triton import dispatch
from sasa_triton.args import check_attend_args
from sasa_triton.kernels import common
from sasa_triton.ops import attend_op
from sasa_triton.reference import reference_forward
from sasa_triton.variants import get, triton_usable, with_direction

from oracle import oracle_attend

TRITON = triton_usable("cpu") or torch.cuda.is_available()
FORWARD_VARIANTS = sorted(v.name for v in with_direction("fwd") if v.needs_triton)
# plain-PyTorch implementations besides the reference (the CPU path): every case
PLAIN = sorted(v.name for v in with_direction("fwd") if not v.needs_triton and v.name != "reference")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU each new (shape, options, config) compiles for seconds (the interpreter
# compiles nothing): fewer cases by default there.
N_FWD = int(os.environ.get("SASA_FUZZ_N", "500" if DEVICE == "cpu" else "60"))
N_BWD = max(1, N_FWD // 5)
_seed = os.environ.get("SASA_FUZZ_SEED", "0")
SEED = random.SystemRandom().randrange(10**6) if _seed == "random" else int(_seed)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel fails to write fails."""
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _fail(case, problems, what):
    replay = (f"SASA_FUZZ_SEED={case.seed} SASA_FUZZ_N=1 pytest tests/test_fuzz.py "
              f"-k {what}")
    pytest.fail(f"fuzz {what} case failed\n  {case.describe()}\n  "
                + "\n  ".join(problems) + f"\n  replay: {replay}", pytrace=False)


def _on_device(tensors: dict) -> dict:
    return {n: t.to(DEVICE) for n, t in tensors.items()}


def _call_args(inputs: dict, case):
    return check_attend_args(inputs["q"], inputs["k"], inputs["v"], (case.kh, case.kw),
                             (case.dh, case.dw), case.padding, inputs["rel_h"],
                             inputs["rel_w"], inputs["rpb"], case.scale)


def _oracle(case, sources64: dict, want_lse: bool = False):
    x = case.inputs(sources64)
    return oracle_attend(x["q"], x["k"], x["v"], (case.kh, case.kw), (case.dh, case.dw),
                         case.padding, x["rel_h"], x["rel_w"], x["rpb"], case.scale,
                         return_lse=want_lse)


def _random_config(module, shape, args, rng: random.Random):
    """A random config of the variant's pruned search space (or its default)."""
    kept = module.prune(module.search_space(), shape, args)
    return rng.choice(kept) if kept and rng.random() < 0.7 else module.default_config(shape,
                                                                                      args)


def _triton_variant(case, args):
    """The Triton forward variant of this case (they take turns, seed by seed), or None
    where Triton cannot run it (float64, no interpreter and no GPU, unsupported shape)."""
    if not TRITON or case.dtype == torch.float64:
        return None
    name = sorted(FORWARD_VARIANTS)[case.seed % len(FORWARD_VARIANTS)]
    if not get(name).supports(case.shape, case.dtype, args):
        return None
    return name


def _forward_impls(case, args, rng):
    """(name, forward function, config): the reference, the other plain implementations
    and one Triton variant."""
    impls = [("reference", reference_forward, None)]
    impls += [(name, get(name).forward, None) for name in PLAIN]
    name = _triton_variant(case, args)
    if name is not None:
        module = get(name)
        impls.append((name, module.forward, _random_config(module, case.shape, args, rng)))
    return impls


def check_forward(seed: int) -> tuple:
    """(case, problems, implementations run) of forward case `seed`."""
    case = draw(seed)
    rng = random.Random(seed)
    inputs = case.inputs(_on_device(case.sources))
    args = _call_args(inputs, case)
    sources64 = {n: t.double() for n, t in case.sources.items()}
    want, want_lse = _oracle(case, sources64, want_lse=True)
    tol = coarser(case.dtype, case.table_dtype)
    v_max = _v_max(case, sources64)
    problems, ran = [], []
    for name, forward, config in _forward_impls(case, args, rng):
        kwargs = {"_poison": True} if get(name).needs_triton else {}
        try:
            out, lse = forward(inputs["q"], inputs["k"], inputs["v"], args, config, **kwargs)
        except Exception as e:  # a crash is a finding too: report it with the seed
            problems.append(f"{name} {config}: raised {type(e).__name__}: {e}")
            continue
        ran.append(name)
        for what, got, exp, floor in (("out", out, want, FLOOR[tol] * v_max),
                                      ("lse", lse, want_lse, 1.0)):
            problem = mismatch(what, got, exp, tol, floor)
            if problem:
                problems.append(f"{name} {config}: {problem}")
        if out.dtype != case.dtype or not out.is_contiguous():
            problems.append(f"{name}: out is {out.dtype}, contiguous={out.is_contiguous()}")
    return case, problems, ran


def _backward_impls(case, args, rng):
    """(backend, fwd config, bwd config): the reference, the other plain implementations
    and one Triton backend."""
    impls = [("reference", "", "")] + [(name, "", "") for name in PLAIN]
    name = _triton_variant(case, args)
    if name is not None:
        module = get(name)
        q_meta = torch.empty(case.shape, dtype=case.dtype, device=DEVICE)
        bwd_name, _ = dispatch.default_backward(q_meta, args)
        fwd_cfg = bwd_cfg = ""
        if rng.random() < 0.6:  # else the defaults, through the public attend
            fwd_cfg = json.dumps(_random_config(module, case.shape, args, rng))
            if bwd_name != "reference":
                bwd_module = get(bwd_name)
                bwd_cfg = json.dumps(_random_config(bwd_module, case.shape, args, rng))
        impls.append((name, fwd_cfg, bwd_cfg))
    return impls


def check_backward(seed: int) -> tuple:
    """(case, problems, implementations run) of backward case `seed`."""
    case = draw(seed, backward=True)
    rng = random.Random(seed)
    names = list(case.requires_grad)
    dout = make_dout(case).to(DEVICE)
    # the oracle differentiates every source: the largest gradient of the case sets the
    # absolute floor (a requested gradient may be exactly zero in exact arithmetic)
    sources64 = {n: t.double().requires_grad_() for n, t in case.sources.items()}
    want, want_lse = _oracle(case, sources64, want_lse=True)
    dout64 = dout.double()
    all_grads = dict(zip(sources64, torch.autograd.grad(
        want, list(sources64.values()), dout64, retain_graph=True)))
    largest = max(g.abs().max().item() for g in all_grads.values() if g.numel())
    v_max = _v_max(case, sources64)
    problems, ran = [], []
    for backend, fwd_cfg, bwd_cfg in _backward_impls(case, _call_args(
            case.inputs(_on_device(case.sources)), case), rng):
        src = {n: t.detach().to(DEVICE).requires_grad_(n in names)
               for n, t in case.sources.items()}
        x = case.inputs(src)
        try:
            if fwd_cfg or bwd_cfg:
                out = attend_op(x["q"], x["k"], x["v"], _call_args(x, case), backend, fwd_cfg,
                                bwd_cfg)
            else:
                out = sasa_triton.attend(x["q"], x["k"], x["v"], (case.kh, case.kw),
                                         rel_h=x["rel_h"], rel_w=x["rel_w"], rpb=x["rpb"],
                                         backend=backend, **case.kwargs())
            grads = torch.autograd.grad(out, [src[n] for n in names], dout)
        except Exception as e:
            problems.append(f"{backend} {fwd_cfg} {bwd_cfg}: raised {type(e).__name__}: {e}")
            continue
        ran.append(backend)
        tol = coarser(case.dtype, case.table_dtype)
        problem = mismatch("out", out, want.detach(), tol, FLOOR[tol] * v_max)
        if problem:
            problems.append(f"{backend}: {problem}")
        want_grads = own_out_gradients(out, want, want_lse, dout64,
                                       [sources64[n] for n in names])
        for name, got, exp in zip(names, grads, want_grads):
            g_tol = coarser(tol, src[name].dtype)
            problem = mismatch(f"grad of {name}", got, exp, g_tol, FLOOR[g_tol] * largest)
            if problem:
                problems.append(f"{backend} {fwd_cfg} {bwd_cfg}: {problem}")
    return case, problems, ran


def _v_max(case, sources64) -> float:
    """Largest |v| of the case (the scale of out and of its rounding)."""
    with torch.no_grad():
        v = case.inputs(sources64)["v"]
        return v.abs().max().item() if v.numel() else 0.0


@pytest.mark.parametrize("seed", range(SEED, SEED + N_FWD), ids=lambda s: f"fwd{s}")
def test_fuzz_forward(seed):
    case, problems, _ = check_forward(seed)
    if problems:
        _fail(case, problems, "forward")


@pytest.mark.parametrize("seed", range(SEED, SEED + N_BWD), ids=lambda s: f"bwd{s}")
def test_fuzz_backward(seed):
    case, problems, _ = check_backward(seed)
    if problems:
        _fail(case, problems, "backward")
