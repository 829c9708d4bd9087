"""Reference backward of `attend` in plain PyTorch: the gradients written out directly.

The CPU path's backward (run inside the `attend_bwd` custom op, where autograd is off).
It walks the window offsets like `reference_attend`, recomputing P from the saved
log-sum-exp (FlashAttention style), so memory stays a few times the input whatever k
is: dS = P * (dout . v - delta) with delta = rowsum(dout * out);
dq += scale dS (k + r), dk/dv are scattered (accumulated) to the neighbor positions,
drel/drpb are summed per table row. Float32 (float64 for float64 input) throughout.
"""
from __future__ import annotations

import torch

from .types import AttendArgs
from .window import window_taps


def reference_backward(q, k, v, out, lse, dout, args: AttendArgs, config=None) -> tuple:
    """(dq, dk, dv, drel_h, drel_w, drpb), the last three None when absent."""
    B, H, W, N, D = q.shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    d2 = D // 2

    q_c, dout_c, lse_c = q.to(cdt), dout.to(cdt), lse.to(cdt)
    delta = torch.einsum("bhwnd,bhwnd->bhwn", dout_c, out.to(cdt))
    dq = torch.zeros((B, H, W, N, D), dtype=cdt, device=dev)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    if rel_h is not None:
        rel_h_n = rel_h.to(cdt).expand(N, *rel_h.shape[-2:])
        rel_w_n = rel_w.to(cdt).expand(N, *rel_w.shape[-2:])
        drel_h_n = torch.zeros(rel_h_n.shape, dtype=cdt, device=dev)
        drel_w_n = torch.zeros(rel_w_n.shape, dtype=cdt, device=dev)
    if rpb is not None:
        rpb_c = rpb.to(cdt)
        drpb = torch.zeros(rpb.shape, dtype=cdt, device=dev)
    n_idx = torch.arange(N, device=dev)[:, None, None]

    for tap in window_taps(H, W, kh, kw, dh, dw, padding, dev):
        y, x, row, col, inside = tap.y, tap.x, tap.row, tap.col, tap.inside
        k_n = torch.where(inside[..., None], k[:, y[:, None], x[None, :]].to(cdt), 0.0)
        v_n = torch.where(inside[..., None], v[:, y[:, None], x[None, :]].to(cdt), 0.0)
        logit = torch.einsum("bhwnd,bhwnd->bhwn", q_c, k_n)
        if rel_h is not None:  # separable: q_h . rel_h[row] + q_w . rel_w[col]
            r_h = rel_h_n[:, row].transpose(0, 1)  # (H, N, d2)
            r_w = rel_w_n[:, col].transpose(0, 1)  # (W, N, d - d2)
            logit = logit + torch.einsum("bhwnd,hnd->bhwn", q_c[..., :d2], r_h)
            logit = logit + torch.einsum("bhwnd,wnd->bhwn", q_c[..., d2:], r_w)
        logit = logit * scale
        if rpb is not None:
            logit = logit + rpb_c[:, tap.rel_y][:, :, tap.rel_x].permute(1, 2, 0)
        p = torch.exp(logit - lse_c)
        ds = p * (torch.einsum("bhwnd,bhwnd->bhwn", dout_c, v_n) - delta)
        if padding == "mask":  # left out of the softmax: no gradient at all
            p = torch.where(inside, p, 0.0)
            ds = torch.where(inside, ds, 0.0)

        dq += ds[..., None] * k_n
        if rel_h is not None:
            dq[..., :d2] += ds[..., None] * r_h[None, :, None]
            dq[..., d2:] += ds[..., None] * r_w[None, None]
        # keys/values: only in-image neighbors exist (zeros mode drops the rest);
        # index_add_ over flat pixels (shift windows map several queries to one key)
        dk_part = torch.where(inside[..., None], ds[..., None] * q_c, 0.0)
        dv_part = torch.where(inside[..., None], p[..., None] * dout_c, 0.0)
        at = (y[:, None] * W + x[None, :]).reshape(-1)
        dk.view(B, H * W, N, D).index_add_(1, at, dk_part.view(B, H * W, N, D))
        dv.view(B, H * W, N, D).index_add_(1, at, dv_part.view(B, H * W, N, D))
        if rel_h is not None:
            drel_h_n.index_add_(1, row, torch.einsum("bhwn,bhwnd->nhd", ds, q_c[..., :d2]))
            drel_w_n.index_add_(1, col, torch.einsum("bhwn,bhwnd->nwd", ds, q_c[..., d2:]))
        if rpb is not None:
            drpb.index_put_((n_idx, tap.rel_y[None, :, None], tap.rel_x[None, None, :]),
                            ds.sum(0).permute(2, 0, 1), accumulate=True)

    grads = [(dq * scale).to(q.dtype), (dk * scale).to(q.dtype), dv.to(q.dtype)]
    if rel_h is not None:
        for table, g in ((rel_h, drel_h_n), (rel_w, drel_w_n)):
            g = g * scale
            grads.append((g.sum(0) if table.dim() == 2 else g).to(table.dtype))
    else:
        grads += [None, None]
    grads.append(drpb.to(rpb.dtype) if rpb is not None else None)
    return tuple(grads)
