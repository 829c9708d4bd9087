"""A short demonstration of `attend` on a default input: `python -m sasa_triton.demo`."""
from __future__ import annotations

import time

import torch

import sasa_triton


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, H, W, heads, d, k = 2, 28, 28, 8, 16, 7
    g = torch.Generator(device=device).manual_seed(0)
    q, key, v = (torch.randn(B, H, W, heads, d, generator=g, device=device, dtype=dtype)
                 for _ in range(3))
    rel_h = torch.randn(k, d // 2, device=device, dtype=dtype) * 0.1
    rel_w = torch.randn(k, d - d // 2, device=device, dtype=dtype) * 0.1
    print(f"sasa_triton {sasa_triton.__version__}: torch {torch.__version__}, device {device}")
    print(f"backends here: {', '.join(sasa_triton.backends(device))}")
    for padding in ("zeros", "mask", "shift"):
        start = time.perf_counter()
        out = sasa_triton.attend(q, key, v, k, padding=padding, rel_h=rel_h if padding != "shift" else None,
                                 rel_w=rel_w if padding != "shift" else None)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        print(f"attend(q, k, v, kernel_size={k}, padding={padding!r}) on "
              f"{tuple(q.shape)} {str(dtype)[6:]}: out {tuple(out.shape)}, "
              f"mean {out.float().mean():+.4f}, std {out.float().std():.4f}, {ms:.1f} ms")


if __name__ == "__main__":
    main()
