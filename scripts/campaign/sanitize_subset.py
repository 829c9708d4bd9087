"""A small subset of the kernels for compute-sanitizer: every kernel variant, forward and
backward, on shapes whose edges cut every tile (odd H and W, padding zeros / mask / shift,
rel and rpb, a strided view, half precision). Prints one line per call and 'subset ok'.

    compute-sanitizer --tool memcheck python scripts/campaign/sanitize_subset.py
Runs on CPU under TRITON_INTERPRET=1 too (the campaign's rehearsal)."""
from __future__ import annotations

import os

import torch

import sasa_triton

SHAPES = [  # (B, H, W, heads, d, k, padding, dtype, rel, rpb, view)
    (1, 5, 7, 2, 8, 3, "zeros", torch.float32, True, False, False),
    (2, 9, 19, 2, 16, 5, "mask", torch.bfloat16, True, True, True),
    (1, 7, 6, 4, 8, 3, "shift", torch.float16, False, True, False),
]
if os.environ.get("SASA_CAMPAIGN_REHEARSE") == "1":  # the interpreter is slow: toy sizes
    SHAPES = [SHAPES[0], (1, 5, 6, 2, 8, 3, "mask", torch.bfloat16, True, True, True)]


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v.name for v in sasa_triton.variants.VARIANTS.values()  # the Triton kernels
               if v.needs_triton and v.name in sasa_triton.backends(device)]
    if not variants:
        raise SystemExit("no Triton kernel runs here (needs CUDA or TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(0)
    for B, H, W, N, D, k, padding, dtype, rel, rpb, view in SHAPES:
        if view:  # q, k, v as strided views of one NCHW projection
            proj = torch.randn(B, 3 * N * D, H, W, generator=g)
            qkv = proj.unflatten(1, (3, N, D)).permute(1, 0, 4, 5, 2, 3)
            q, key, v = (t.to(device, dtype) for t in qkv)
        else:
            q, key, v = (torch.randn(B, H, W, N, D, generator=g).to(device, dtype)
                         for _ in range(3))
        rows = 2 * k - 1 if padding == "shift" else k
        kw = dict(padding=padding)
        if rel:
            kw.update(rel_h=torch.randn(rows, D // 2, generator=g).to(device, dtype),
                      rel_w=torch.randn(rows, D - D // 2, generator=g).to(device, dtype))
        if rpb:
            kw["rpb"] = torch.randn(N, 2 * k - 1, 2 * k - 1, generator=g).to(device, dtype)
        for variant in variants:
            leaves = [t.detach().requires_grad_() for t in (q, key, v)]
            out = sasa_triton.attend(*leaves, k, backend=variant, **kw)
            grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
            if device == "cuda":
                torch.cuda.synchronize()
            finite = bool(out.isfinite().all()) and all(bool(t.isfinite().all()) for t in grads)
            print(f"{variant} B{B} {H}x{W} heads{N} d{D} k{k} {padding} {str(dtype)[6:]}"
                  f"{' rel' if rel else ''}{' rpb' if rpb else ''}{' view' if view else ''}: "
                  f"{'finite' if finite else 'NOT FINITE'}", flush=True)
            if not finite:
                raise SystemExit(f"{variant}: non-finite output or gradient")
    print("subset ok")


if __name__ == "__main__":
    main()
