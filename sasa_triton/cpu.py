"""The fast CPU implementation of `attend` ("cpu"): unfolded windows in chunks, batched
matrix products.

The reference walks the kh x kw window offsets one by one (tens of small ops each), so
on small maps it is Python overhead. This path does a whole chunk of query pixels in a
fixed handful of ops, whatever k is:

* k and v are copied once, head-major and side by side, into `kv` of shape
  (B*heads, H + 2ph, W + 2pw, 2d) in float32 (float64 for float64 input), with a zero
  border of the window's reach in zeros/mask mode (exactly the contract's zero keys and
  values; mask mode then adds -inf to those logits). Shift windows stay inside the image:
  no border.
* Query pixels go in chunks of (images, rows) sized so that a chunk's unfolded windows
  (M pixels x kh*kw taps x 2d) and logits fit `config["chunk_bytes"]` (default
  `CHUNK_BYTES`): peak extra memory is a few copies of the input plus that budget,
  never k^2 times the input. Windows are a strided view of `kv` (zeros/mask) or an
  index gather (shift), copied once to (M, taps, 2d).
* Per chunk: logits = windows @ q (one batched product), + the separable rel logits
  (q_h @ rel_h^T, q_w @ rel_w^T, broadcast over the window), + rpb, softmax in
  float32, out = p @ values. The backward recomputes p from the saved log-sum-exp
  (dS = p * (dout . v - delta)), dq = dS @ (k + r), and scatters q dS and p dout back to
  the key positions with `F.fold` (col2im; an accumulating index_put in shift mode).

Signatures as the reference and the kernel variants:
`forward(q, k, v, args, config) -> (out, lse)`,
`backward(q, k, v, out, lse, dout, args, config) -> (dq, dk, dv, drel_h, drel_w, drpb)`.
Plain PyTorch: it also runs on CUDA tensors, but it is tuned for, and chosen on, CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .args import AttendArgs
from .window import window_positions

# Working-set budget of one chunk (unfolded windows, logits, their gradients), bytes.
CHUNK_BYTES = 16 * 2 ** 20


class _Geometry(NamedTuple):
    """Where each query pixel's window taps sit in the padded `kv`, per call shape."""

    ph: int  # zero border rows (0 in shift mode)
    pw: int
    pos_y: torch.Tensor  # (H, kh) padded row of tap a of query row i (shift: gather index)
    pos_x: torch.Tensor  # (W, kw)
    rel_y: torch.Tensor  # (H, kh) rpb / shift-table row of the tap
    rel_x: torch.Tensor  # (W, kw)
    mask: Optional[torch.Tensor]  # (H, W, kh, kw) 0 / -inf (mask mode), else None


@functools.lru_cache(maxsize=64)
def _geometry(H, W, kh, kw, dh, dw, padding, dtype) -> _Geometry:
    shift = padding == "shift"
    ph, pw = (0, 0) if shift else ((kh // 2) * dh, (kw // 2) * dw)
    pos_y, rel_y = window_positions(H, kh, dh, padding)
    pos_x, rel_x = window_positions(W, kw, dw, padding)
    mask = None
    if padding == "mask":
        in_y = (pos_y >= 0) & (pos_y < H)
        in_x = (pos_x >= 0) & (pos_x < W)
        inside = in_y[:, None, :, None] & in_x[None, :, None, :]
        mask = torch.zeros(inside.shape, dtype=dtype).masked_fill_(~inside, float("-inf"))
    return _Geometry(ph, pw, pos_y + ph, pos_x + pw, rel_y, rel_x, mask)


class _Call(NamedTuple):
    """Everything the chunks of one call share."""

    shape: tuple  # B, H, W, N, D
    args: AttendArgs
    geo: _Geometry
    kv: torch.Tensor  # (B*N, Hp, Wp, 2D), k then v, zero border
    qs: torch.Tensor  # (B, N, H, W, D) scale * q, contiguous
    rel_h: Optional[torch.Tensor]  # (rows, d//2) shared or (N, rows, d//2), compute dtype
    rel_w: Optional[torch.Tensor]
    rpb: Optional[torch.Tensor]  # (N, 2kh-1, 2kw-1), compute dtype


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _head_major(t: torch.Tensor, dtype) -> torch.Tensor:
    """(B, H, W, N, D) any strides -> a new contiguous (B, N, H, W, D) in dtype."""
    B, H, W, N, D = t.shape
    return torch.empty((B, N, H, W, D), dtype=dtype, device=t.device).copy_(
        t.permute(0, 3, 1, 2, 4))


def _bhwnd(t: torch.Tensor, dtype) -> torch.Tensor:
    """(B, N, H, W, D) any strides -> a new contiguous (B, H, W, N, D) in dtype."""
    B, N, H, W, D = t.shape
    return torch.empty((B, H, W, N, D), dtype=dtype, device=t.device).copy_(
        t.permute(0, 2, 3, 1, 4))


def _prepare(q, k, v, args: AttendArgs) -> _Call:
    B, H, W, N, D = q.shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    cdt = _compute_dtype(q)
    geo = _geometry(H, W, kh, kw, dh, dw, padding, cdt)
    geo = _Geometry(*(t.to(q.device) if isinstance(t, torch.Tensor) else t for t in geo))
    Hp, Wp = H + 2 * geo.ph, W + 2 * geo.pw
    alloc = torch.zeros if geo.ph or geo.pw else torch.empty
    kv = alloc((B, N, Hp, Wp, 2 * D), dtype=cdt, device=q.device)
    inner = kv[:, :, geo.ph:geo.ph + H, geo.pw:geo.pw + W]
    inner[..., :D].copy_(k.permute(0, 3, 1, 2, 4))
    inner[..., D:].copy_(v.permute(0, 3, 1, 2, 4))
    qs = _head_major(q, cdt).mul_(scale)  # the copy is ours: scale it in place
    tables = [None if t is None else t.to(cdt) for t in (rel_h, rel_w, rpb)]
    return _Call((B, H, W, N, D), args, geo, kv.view(B * N, Hp, Wp, 2 * D), qs, *tables)


def _chunks(call: _Call, elems_per_tap: int, config: Optional[dict]):
    """(b0, b1, i0, i1) blocks of query pixels whose windows fit the chunk budget."""
    B, H, W, N, D = call.shape
    budget = (config or {}).get("chunk_bytes", CHUNK_BYTES)
    taps = call.args.kh * call.args.kw
    row_bytes = N * W * taps * elems_per_tap * call.kv.element_size()
    rows = max(1, budget // max(row_bytes, 1))
    if rows >= H:  # whole images per chunk
        images = max(1, rows // H)
        for b0 in range(0, B, images):
            yield b0, min(B, b0 + images), 0, H
        return
    for b0 in range(B):
        for i0 in range(0, H, rows):
            yield b0, b0 + 1, i0, min(H, i0 + rows)


def _windows(call: _Call, b0: int, b1: int, i0: int, i1: int) -> torch.Tensor:
    """(M, taps, 2D) keys and values of the windows of chunk pixels (M = images * N *
    rows * W, head-major), a new tensor."""
    B, H, W, N, D = call.shape
    kh, kw, dh, dw = call.args.kh, call.args.kw, call.args.dh, call.args.dw
    kv, geo = call.kv, call.geo
    P, r = (b1 - b0) * N, i1 - i0
    if call.args.padding == "shift":  # windows move per pixel: gather
        rows = geo.pos_y[i0:i1][:, None, :, None]  # (r, 1, kh, 1)
        cols = geo.pos_x[None, :, None, :]  # (1, W, 1, kw)
        win = kv[b0 * N:b1 * N][:, rows, cols]  # (P, r, W, kh, kw, 2D)
        return win.view(P * r * W, kh * kw, 2 * D)
    _, Hp, Wp, C = kv.shape
    sP, sH, sW = Hp * Wp * C, Wp * C, C
    view = kv.as_strided((P, r, W, kh, kw, C), (sP, sH, sW, dh * sH, dw * sW, 1),
                         kv.storage_offset() + b0 * N * sP + i0 * sH)
    return view.reshape(P * r * W, kh * kw, C)


def _table_logits(q_part: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q_part (b, N, r, W, c) . every table row: (b, N, r, W, rows)."""
    if table.dim() == 2:  # shared by the heads
        return q_part @ table.t()
    return q_part @ table.transpose(1, 2)[:, None]  # (N, 1, c, rows) per head


def _logits(call: _Call, win: torch.Tensor, qc: torch.Tensor, i0: int, i1: int):
    """Logits (b, N, r, W, kh, kw) of chunk queries qc (b, N, r, W, D) over windows."""
    b, N, r, W, D = qc.shape
    kh, kw = call.args.kh, call.args.kw
    shift = call.args.padding == "shift"
    geo = call.geo
    logit = torch.bmm(win[..., :D], qc.reshape(-1, D, 1)).view(b, N, r, W, kh, kw)
    if call.rel_h is not None:
        d2 = D // 2
        lh = _table_logits(qc[..., :d2], call.rel_h)  # (b, N, r, W, kh or 2kh-1)
        lw = _table_logits(qc[..., d2:], call.rel_w)
        if shift:  # the table row of each tap depends on the pixel
            lh = lh.take_along_dim(geo.rel_y[i0:i1][None, None, :, None], dim=-1)
            lw = lw.take_along_dim(geo.rel_x[None, None, None], dim=-1)
        logit += lh[..., :, None]
        logit += lw[..., None, :]
    if call.rpb is not None:
        if shift:
            bias = call.rpb[:, geo.rel_y[i0:i1][:, None, :, None], geo.rel_x[None, :, None, :]]
            logit += bias  # (N, r, W, kh, kw)
        else:  # centered windows: the same kh x kw entries for every pixel
            logit += call.rpb[:, None, None, kh // 2:kh // 2 + kh, kw // 2:kw // 2 + kw]
    if geo.mask is not None:
        logit += geo.mask[i0:i1]
    return logit


def forward(q, k, v, args: AttendArgs, config: Optional[dict] = None):
    """(out (B, H, W, heads, d) in q's dtype, lse (B, H, W, heads) float32/float64)."""
    with torch.no_grad():
        return _forward(q, k, v, args, config)


def _forward(q, k, v, args: AttendArgs, config):
    call = _prepare(q, k, v, args)
    B, H, W, N, D = call.shape
    out = torch.empty((B, H, W, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, W, N), dtype=call.kv.dtype, device=q.device)
    out_hm, lse_hm = out.permute(0, 3, 1, 2, 4), lse.permute(0, 3, 1, 2)
    for b0, b1, i0, i1 in _chunks(call, 2 * D + 2, config):
        win = _windows(call, b0, b1, i0, i1)
        qc = call.qs[b0:b1, :, i0:i1]
        p = _logits(call, win, qc, i0, i1).flatten(-2).flatten(0, -2)  # (M, taps)
        m = p.amax(-1, keepdim=True)
        p.sub_(m).exp_()
        s = p.sum(-1, keepdim=True)
        o = torch.bmm(p.unsqueeze(1), win[..., D:]).squeeze(1).div_(s)  # (M, D)
        chunk = qc.shape[:4]
        out_hm[b0:b1, :, i0:i1] = o.view(*chunk, D)
        lse_hm[b0:b1, :, i0:i1] = m.add_(s.log_()).view(chunk)
    return out, lse


def backward(q, k, v, out, lse, dout, args: AttendArgs, config: Optional[dict] = None):
    """(dq, dk, dv, drel_h, drel_w, drpb), the last three None when absent."""
    with torch.no_grad():
        return _backward(q, k, v, out, lse, dout, args, config)


def _backward(q, k, v, out, lse, dout, args: AttendArgs, config):
    call = _prepare(q, k, v, args)
    B, H, W, N, D = call.shape
    kh, kw, dh, dw, padding = args[:5]
    shift, geo, cdt, dev = padding == "shift", call.geo, call.kv.dtype, q.device
    _, Hp, Wp, _ = call.kv.shape
    d2 = D // 2
    do = _head_major(dout, cdt)
    delta = (do * out.permute(0, 3, 1, 2, 4)).sum(-1)  # (B, N, H, W) rowsum(dout * out)
    lse_hm = lse.permute(0, 3, 1, 2)
    dq = torch.empty((B, N, H, W, D), dtype=cdt, device=dev)
    if shift:  # accumulated by index_put at the gathered positions
        dkv = torch.zeros((B * N, H, W, 2 * D), dtype=cdt, device=dev)
    else:  # F.fold's layout: channels before the (padded) image
        dkv = torch.zeros((B * N, 2 * D, Hp, Wp), dtype=cdt, device=dev)
    grads = [None if t is None else torch.zeros(t.shape, dtype=cdt, device=dev)
             for t in (call.rel_h, call.rel_w, call.rpb)]
    drel_h, drel_w, drpb = grads

    for b0, b1, i0, i1 in _chunks(call, 4 * D + 4, config):
        win = _windows(call, b0, b1, i0, i1)
        qc, doc = call.qs[b0:b1, :, i0:i1], do[b0:b1, :, i0:i1]
        b, r = b1 - b0, i1 - i0
        P, M, T = b * N, b * N * r * W, kh * kw
        p = _logits(call, win, qc, i0, i1).view(M, T)
        p.sub_(lse_hm[b0:b1, :, i0:i1].reshape(M, 1)).exp_()
        ds = torch.bmm(win[..., D:], doc.reshape(M, D, 1)).view(M, T)  # dout . v
        ds.sub_(delta[b0:b1, :, i0:i1].reshape(M, 1)).mul_(p)  # dS = p (dout . v - delta)

        dqc = torch.bmm(ds.unsqueeze(1), win[..., :D]).view(b, N, r, W, D)
        if call.rel_h is not None:
            ds6 = ds.view(b, N, r, W, kh, kw)
            _rel_backward(call, ds6.sum(-1), qc[..., :d2], dqc[..., :d2], drel_h,
                          geo.rel_y[i0:i1], per_column=False)
            _rel_backward(call, ds6.sum(-2), qc[..., d2:], dqc[..., d2:], drel_w,
                          geo.rel_x, per_column=True)
        dq[b0:b1, :, i0:i1] = dqc
        if drpb is not None:
            per_tap = ds.view(b, N, r, W, kh, kw).sum(0)  # (N, r, W, kh, kw)
            if shift:
                n = torch.arange(N, device=dev)[:, None, None, None, None]
                drpb.index_put_((n, geo.rel_y[i0:i1][None, :, None, :, None],
                                 geo.rel_x[None, None, :, None, :]), per_tap, accumulate=True)
            else:
                drpb[:, kh // 2:kh // 2 + kh, kw // 2:kw // 2 + kw] += per_tap.sum((1, 2))

        # key/value gradients of the chunk's windows: scale q dS and p dout, per tap
        if shift:
            part = torch.empty((M, T, 2 * D), dtype=cdt, device=dev)
            torch.mul(ds[:, :, None], qc.reshape(M, 1, D), out=part[..., :D])
            torch.mul(p[:, :, None], doc.reshape(M, 1, D), out=part[..., D:])
            pix = torch.arange(b0 * N, b1 * N, device=dev)[:, None, None, None, None]
            rows = geo.pos_y[i0:i1][None, :, None, :, None]
            cols = geo.pos_x[None, None, :, None, :]
            dkv.index_put_((pix, rows, cols), part.view(P, r, W, kh, kw, 2 * D),
                           accumulate=True)
        else:  # (P, 2, D, taps, r*W) is F.fold's (P, C * kh * kw, L) input
            part = torch.empty((P, 2, D, T, r * W), dtype=cdt, device=dev)
            torch.mul(qc.reshape(P, r * W, D).transpose(1, 2)[:, :, None],  # (P, D, 1, L)
                      ds.view(P, r * W, T).transpose(1, 2)[:, None], out=part[:, 0])
            torch.mul(doc.reshape(P, r * W, D).transpose(1, 2)[:, :, None],
                      p.view(P, r * W, T).transpose(1, 2)[:, None], out=part[:, 1])
            span = r + (kh - 1) * dh  # padded rows the chunk's windows cover
            dkv[b0 * N:b1 * N, :, i0:i0 + span] += F.fold(
                part.view(P, 2 * D * T, r * W), (span, Wp), (kh, kw), dilation=(dh, dw))

    dq = _bhwnd(dq.mul_(args.scale), q.dtype)
    if shift:
        dkv = dkv.view(B, N, H, W, 2 * D)
        dk, dv = _bhwnd(dkv[..., :D], q.dtype), _bhwnd(dkv[..., D:], q.dtype)
    else:
        inner = dkv.view(B, N, 2, D, Hp, Wp)[..., geo.ph:geo.ph + H, geo.pw:geo.pw + W]
        dk = _bhwnd(inner[:, :, 0].permute(0, 1, 3, 4, 2), q.dtype)
        dv = _bhwnd(inner[:, :, 1].permute(0, 1, 3, 4, 2), q.dtype)
    result = [dq, dk, dv]
    for given, g in zip((args.rel_h, args.rel_w, args.rpb), grads):
        result.append(None if given is None else g.to(given.dtype))
    return tuple(result)


def _rel_backward(call: _Call, ds_axis, q_part, dq_part, dtable, idx, per_column: bool):
    """One separable rel table's share of the backward, for a chunk.

    ds_axis (b, N, r, W, k): dS summed over the other window axis; q_part: the chunk's
    scaled q channels of this table; dq_part: the view of dq to add dS @ r to; dtable:
    the table's gradient (accumulated); idx: (r or W, k) table rows of the taps (shift).
    """
    table = call.rel_w if per_column else call.rel_h
    shared = table.dim() == 2
    if call.args.padding != "shift":  # tap a uses row a for every pixel
        rows = table if shared else table[:, None]  # (k, c) or (N, 1, k, c)
        dq_part += ds_axis @ rows
        dtable += torch.einsum("bnrwa,bnrwd->ad" if shared else "bnrwa,bnrwd->nad",
                               ds_axis, q_part)
        return
    rows = table[idx] if shared else table[:, idx]  # (r|W, k, c) or (N, r|W, k, c)
    if per_column:  # the row depends on the pixel's column: one small product per pixel
        dq_part += (ds_axis.unsqueeze(-2) @ (rows if shared else rows[:, None])).squeeze(-2)
        spec = "bnrwa,bnrwd->wad" if shared else "bnrwa,bnrwd->nwad"
    else:
        dq_part += ds_axis @ rows
        spec = "bnrwa,bnrwd->rad" if shared else "bnrwa,bnrwd->nrad"
    g = torch.einsum(spec, ds_axis, q_part)  # per (pixel row|column, tap)
    dim = 0 if shared else 1
    dtable.index_add_(dim, idx.reshape(-1), g.flatten(dim, dim + 1))
