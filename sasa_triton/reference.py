"""Reference implementation of `attend` in plain PyTorch: the readable definition.

It is the CPU path and the oracle the kernels are benchmarked against. It walks the
kh x kw window offsets one at a time with an online softmax, so its memory stays a few
times the output, whatever k is (no k^2-sized unfold). Autograd works through it.
Accumulation and softmax run in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from .types import AttendArgs
from .window import window_taps


def _per_head(table, heads: int, dtype) -> torch.Tensor:
    """A shared (R, c) table becomes (heads, R, c); a per-head table stays as it is."""
    table = table.to(dtype)
    return table.expand(heads, *table.shape) if table.dim() == 2 else table


def reference_attend(q, k, v, args: AttendArgs, return_lse: bool = False,
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, W, heads, d) in q's dtype; with return_lse also the float32 (float64)
    log-sum-exp of the logits, (B, H, W, heads)."""
    B, H, W, N, D = q.shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    in_place = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, rel_h, rel_w, rpb)))

    q_c = q.to(cdt)  # no copy for float32 input
    d2 = D // 2
    if rel_h is not None:
        q_h, q_w = q_c[..., :d2], q_c[..., d2:]
        rel_h_n, rel_w_n = _per_head(rel_h, N, cdt), _per_head(rel_w, N, cdt)
    if rpb is not None:
        rpb_c = rpb.to(cdt)

    m = torch.full((B, H, W, N), float("-inf"), dtype=cdt, device=dev)
    denom = torch.zeros((B, H, W, N), dtype=cdt, device=dev)
    acc = torch.zeros((B, H, W, N, D), dtype=cdt, device=dev)
    for tap in window_taps(H, W, kh, kw, dh, dw, padding, dev):
        y, x, inside, all_inside = tap.y, tap.x, tap.inside, tap.all_inside
        k_n = k[:, y[:, None], x[None, :]].to(cdt)  # (B, H, W, N, D)
        v_n = v[:, y[:, None], x[None, :]].to(cdt)
        if not all_inside and padding == "zeros":
            # where, not a multiply: a NaN outside the window must not leak in
            k_n = torch.where(inside[..., None], k_n, 0.0)
            v_n = torch.where(inside[..., None], v_n, 0.0)
        logit = torch.einsum("bhwnd,bhwnd->bhwn", q_c, k_n)
        del k_n
        if rel_h is not None:  # separable: q_h . rel_h[row] + q_w . rel_w[col]
            logit = logit + torch.einsum("bhwnd,nhd->bhwn", q_h, rel_h_n[:, tap.row])
            logit = logit + torch.einsum("bhwnd,nwd->bhwn", q_w, rel_w_n[:, tap.col])
        logit = logit * scale
        if rpb is not None:
            bias = rpb_c[:, tap.rel_y][:, :, tap.rel_x]  # (N, H, W)
            logit = logit + bias.permute(1, 2, 0)
        if not all_inside and padding == "mask":
            logit = torch.where(inside, logit, float("-inf"))

        # online softmax; the running max is a constant for autograd (exact grads)
        m_new = torch.maximum(m, logit.detach())
        m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(logit - m_safe)
        if in_place:
            denom.mul_(alpha).add_(p)
            acc.mul_(alpha[..., None]).addcmul_(p[..., None], v_n)
        else:
            denom = denom * alpha + p
            acc = acc * alpha[..., None] + p[..., None] * v_n
        m = m_new
        del v_n
    out = (acc.div_(denom[..., None]) if in_place else acc / denom[..., None]).to(q.dtype)
    if return_lse:
        return out, m + torch.log(denom)
    return out


def reference_forward(q, k, v, args: AttendArgs, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the reference with the kernel-variant signature, without building
    an autograd graph (the "reference" entry of sasa_triton.variants)."""
    with torch.no_grad():
        return reference_attend(q, k, v, args, return_lse=True)
