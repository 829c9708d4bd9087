"""Compile one recorded launch for an H100 (sm_90) with Triton's real compiler, no GPU.

A launch is specialised exactly as on a GPU (Triton's own argument binder: ints equal to
1 become constants, ints and tensor addresses divisible by 16 get tt.divisibility), then
Triton's front end, its GPU passes and ptxas run; nothing is launched. Identical
specialisations compile once per process (`compile_cached`), and Triton's disk cache
keeps repeat runs fast.

Uses Triton internals that are the same from 3.6 through 3.9 (the JIT's argument binder
and `_pack_args`; tests/aot_sm90.py compiles through `specialise` too). Needs a process without
TRITON_INTERPRET, which replaces triton.jit (see sasa_triton/cost/__main__.py).
"""
from __future__ import annotations

import contextlib
import io
import os


def check_not_interpreted() -> None:
    """The real compiler cannot run under Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sasa_triton.cost compiles with Triton's real compiler: run it "
                           "without TRITON_INTERPRET=1 (python -m sasa_triton.cost re-runs "
                           "itself without it)")


def specialise(fn, args, kwargs, arch: int):
    """(ASTSource, options dict, cache key) of a launch of `fn` with these arguments."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    key = (fn.__name__, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    return src, options.__dict__, key


_COMPILED: dict = {}


def compile_cached(fn, args, kwargs, arch: int = 90):
    """Triton's CompiledKernel of this launch for sm_`arch`; one compile per specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget

    check_not_interpreted()
    src, options, key = specialise(fn, args, kwargs, arch)
    hit = _COMPILED.get(key)
    if hit is None:
        with contextlib.redirect_stdout(io.StringIO()):  # TRITON_DUMP_PTXAS_LOG, if set
            hit = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        _COMPILED[key] = hit
    return hit
