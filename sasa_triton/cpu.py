"""The fast CPU implementation of `attend` ("cpu"): every window tap at once, as strided
views and vectorized products, in chunks of query rows.

The reference walks the kh x kw window offsets one by one (tens of small ops each), so
on small maps it is Python overhead. This path does a whole chunk of query pixels in a
fixed handful of ops, whatever k is:

* Layout: channels first, pixels last, (B*heads, d, H, W) per tensor, so that every
  product below is an elementwise op plus a sum over an outer dimension, vectorized
  along the image row (a batched product of (taps x d) by (d x 1) matrices per pixel is
  much slower on CPU). k and v are copied once, side by side, into `kv` of shape
  (B*heads, 2d, H + 2ph, W + 2pw) in float32 (float64 for float64 input), with a zero
  border of the window's reach in zeros/mask mode (exactly the contract's zero keys and
  values; mask mode then sets those logits to -inf). Shift windows stay inside the image.
* Windows of all taps, (B*heads, 2d, kh, kw, rows, W), are a strided view of `kv`
  (zeros/mask: no copy) or an index gather (shift).
* Query pixels go in chunks of (images, rows) sized so that a chunk's per-tap
  temporaries fit `config["chunk_bytes"]` (default `CHUNK_BYTES`): peak extra memory is
  a few copies of the input plus that budget, never k^2 times the input (the smallest
  chunk, one image row, sets a floor).
* Per chunk: logits = sum_d(windows * q), + the separable rel logits (rel_h @ q_h and
  rel_w @ q_w, broadcast over the window), + rpb, softmax over the taps in float32,
  out = sum_taps(p * values). The backward recomputes p from the saved log-sum-exp,
  dS = p * (dout . v - delta), dq = sum_taps(dS * (k + r)), and sends scale q dS and
  p dout back to the key positions: a key's queries form the same window around it
  (taps flipped), so that is one more strided window product (zeros/mask), or an
  accumulating index_put (shift).

Signatures as the reference and the kernel variants:
`forward(q, k, v, args, config) -> (out, lse)`,
`backward(q, k, v, out, lse, dout, args, config) -> (dq, dk, dv, drel_h, drel_w, drpb)`.
Plain PyTorch: it also runs on CUDA tensors, but it is tuned for, and chosen on, CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .types import AttendArgs
from .window import window_positions

# Working-set budgets of one chunk's per-tap temporaries, bytes (config["chunk_bytes"]
# overrides both). The forward's fits a large cache better; the backward's is larger so
# that its key halo (the window's reach above and below a chunk) stays a small part.
CHUNK_BYTES = {"forward": 16 * 2 ** 20, "backward": 64 * 2 ** 20}


class _Geometry(NamedTuple):
    """Where each query pixel's window taps sit in the padded `kv`, per call shape."""

    ph: int  # zero border rows (0 in shift mode)
    pw: int
    pos_y: torch.Tensor  # (kh, H) padded row of tap a of query row i (shift: gather index)
    pos_x: torch.Tensor  # (kw, W)
    rel_y: torch.Tensor  # (kh, H) rpb / shift-table row of the tap
    rel_x: torch.Tensor  # (kw, W)
    masked: Optional[torch.Tensor]  # (kh, kw, H, W) bool, True: tap left out (mask mode)


@functools.lru_cache(maxsize=64)
def _geometry(H, W, kh, kw, dh, dw, padding, device) -> _Geometry:
    shift = padding == "shift"
    ph, pw = (0, 0) if shift else ((kh // 2) * dh, (kw // 2) * dw)
    pos_y, rel_y = (t.t().contiguous() for t in window_positions(H, kh, dh, padding, device))
    pos_x, rel_x = (t.t().contiguous() for t in window_positions(W, kw, dw, padding, device))
    masked = None
    if padding == "mask":
        in_y = (pos_y >= 0) & (pos_y < H)
        in_x = (pos_x >= 0) & (pos_x < W)
        masked = ~(in_y[:, None, :, None] & in_x[None, :, None, :])
    return _Geometry(ph, pw, pos_y + ph, pos_x + pw, rel_y, rel_x, masked)


class _Call(NamedTuple):
    """Everything the chunks of one call share."""

    shape: tuple  # B, H, W, N, D
    args: AttendArgs
    geo: _Geometry
    kv: torch.Tensor  # (B*N, 2D, Hp, Wp): k then v channels, zero border
    qs: torch.Tensor  # (B, N, D, H, W) scale * q, contiguous
    rel_h: Optional[torch.Tensor]  # (rows, d//2) shared or (N, rows, d//2), compute dtype
    rel_w: Optional[torch.Tensor]
    rpb: Optional[torch.Tensor]  # (N, 2kh-1, 2kw-1), compute dtype
    scratch: list  # [one flat buffer], reused by every product of the call (_tap_sum)


def _channels_first(t: torch.Tensor, dtype) -> torch.Tensor:
    """(B, H, W, N, D) any strides -> a new contiguous (B, N, D, H, W) in dtype."""
    B, H, W, N, D = t.shape
    return torch.empty((B, N, D, H, W), dtype=dtype, device=t.device).copy_(
        t.permute(0, 3, 4, 1, 2))


def _bhwnd(t: torch.Tensor, dtype) -> torch.Tensor:
    """(B, N, D, H, W) any strides -> a new contiguous (B, H, W, N, D) in dtype."""
    B, N, D, H, W = t.shape
    return torch.empty((B, H, W, N, D), dtype=dtype, device=t.device).copy_(
        t.permute(0, 3, 4, 1, 2))


def _prepare(q, k, v, args: AttendArgs) -> _Call:
    B, H, W, N, D = q.shape
    kh, kw, dh, dw, padding, rel_h, rel_w, rpb, scale = args
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    geo = _geometry(H, W, kh, kw, dh, dw, padding, q.device)
    Hp, Wp = H + 2 * geo.ph, W + 2 * geo.pw
    alloc = torch.zeros if geo.ph or geo.pw else torch.empty
    kv = alloc((B, N, 2 * D, Hp, Wp), dtype=cdt, device=q.device)
    inner = kv[..., geo.ph:geo.ph + H, geo.pw:geo.pw + W]
    inner[:, :, :D].copy_(k.permute(0, 3, 4, 1, 2))
    inner[:, :, D:].copy_(v.permute(0, 3, 4, 1, 2))
    qs = _channels_first(q, cdt).mul_(scale)  # the copy is ours: scale it in place
    tables = [None if t is None else t.to(cdt) for t in (rel_h, rel_w, rpb)]
    return _Call((B, H, W, N, D), args, geo, kv.view(B * N, 2 * D, Hp, Wp), qs, *tables, [])


def _chunks(call: _Call, direction: str, per_tap: int, config: Optional[dict],
            halo_per_tap: int = 0):
    """(b0, b1, i0, i1) blocks of query pixels whose per-tap temporaries fit the budget:
    per_tap values per query pixel and tap, plus halo_per_tap per key pixel and tap for
    the rows the windows reach beyond the chunk (the backward's key products). The
    smallest chunk is one image row: its temporaries are the floor of the budget."""
    B, H, W, N, D = call.shape
    budget = (config or {}).get("chunk_bytes", CHUNK_BYTES[direction])
    tap_bytes = N * W * call.args.kh * call.args.kw * call.kv.element_size()
    row_bytes = max(tap_bytes * per_tap, 1)
    halo_bytes = tap_bytes * halo_per_tap * 2 * call.geo.ph
    rows = max(1, (budget - halo_bytes) // row_bytes)
    if rows >= H:  # whole images per chunk
        images = max(1, budget // (row_bytes * max(H, 1) + halo_bytes))
        for b0 in range(0, B, images):
            yield b0, min(B, b0 + images), 0, H
        return
    for b0 in range(B):
        for i0 in range(0, H, rows):
            yield b0, b0 + 1, i0, min(H, i0 + rows)


def _windows(call: _Call, b0: int, b1: int, i0: int, i1: int) -> torch.Tensor:
    """(P, 2D, kh, kw, r, W): keys then values of the windows of the chunk's pixels
    (P = images * heads, r rows); a strided view of `kv` (zeros/mask) or a gather (shift)."""
    N, kh, kw, dh, dw = call.shape[3], call.args.kh, call.args.kw, call.args.dh, call.args.dw
    kv, geo, W = call.kv, call.geo, call.shape[2]
    if call.args.padding == "shift":  # windows move per pixel
        rows = geo.pos_y[:, None, i0:i1, None]  # (kh, 1, r, 1)
        cols = geo.pos_x[None, :, None, :]  # (1, kw, 1, W)
        return kv[b0 * N:b1 * N][:, :, rows, cols]
    _, C, Hp, Wp = kv.shape
    sP = C * Hp * Wp
    return kv.as_strided((b1 * N - b0 * N, C, kh, kw, i1 - i0, W),
                         (sP, Hp * Wp, dh * Wp, dw, Wp, 1),
                         kv.storage_offset() + b0 * N * sP + i0 * Wp)


def _tap_sum(a: torch.Tensor, b: torch.Tensor, dims, scratch: list) -> torch.Tensor:
    """sum over dims of a * b (broadcast), the product written contiguously first into
    the call's scratch buffer (`scratch[0]`, grown as needed): one buffer reused by
    every product of a call, since fresh large allocations cost page faults each time."""
    shape = torch.broadcast_shapes(a.shape, b.shape)
    numel = shape.numel()
    if not scratch or scratch[0].numel() < numel:
        scratch[:] = [torch.empty(numel, dtype=a.dtype, device=a.device)]
    return torch.mul(a, b, out=scratch[0][:numel].view(shape)).sum(dims)


def _table_logits(q_part: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Every table row . q_part (b, N, c, r, W): (b, N, rows, r, W)."""
    b, N, c, r, W = q_part.shape
    out = table @ q_part.reshape(b, N, c, r * W)  # (rows, c) or (N, rows, c) per head
    return out.view(b, N, -1, r, W)


def _logits(call: _Call, win: torch.Tensor, qc: torch.Tensor, i0: int, i1: int):
    """Logits (b, N, kh, kw, r, W) of the chunk's queries qc (b, N, D, r, W)."""
    b, N, D, r, W = qc.shape
    kh, kw = call.args.kh, call.args.kw
    shift, geo = call.args.padding == "shift", call.geo
    logit = _tap_sum(win[:, :D], qc.reshape(b * N, D, 1, 1, r, W), 1, call.scratch)
    logit = logit.view(b, N, kh, kw, r, W)
    if call.rel_h is not None:
        d2 = D // 2
        lh = _table_logits(qc[:, :, :d2], call.rel_h)  # (b, N, kh or 2kh-1, r, W)
        lw = _table_logits(qc[:, :, d2:], call.rel_w)
        if shift:  # the table row of a tap depends on the pixel
            lh = lh.take_along_dim(geo.rel_y[None, None, :, i0:i1, None], dim=2)
            lw = lw.take_along_dim(geo.rel_x[None, None, :, None, :], dim=2)
        logit += lh[:, :, :, None]
        logit += lw[:, :, None]
    if call.rpb is not None:
        if shift:
            logit += call.rpb[:, geo.rel_y[:, None, i0:i1, None], geo.rel_x[None, :, None, :]]
        else:  # centered windows: the same kh x kw entries for every pixel
            logit += call.rpb[:, kh // 2:kh // 2 + kh, kw // 2:kw // 2 + kw, None, None]
    if geo.masked is not None:  # fill, not add: an inf rel/rpb term + -inf would be NaN
        logit.masked_fill_(geo.masked[:, :, i0:i1], float("-inf"))
    return logit


def forward(q, k, v, args: AttendArgs, config: Optional[dict] = None):
    """(out (B, H, W, heads, d) in q's dtype, lse (B, H, W, heads) float32/float64)."""
    with torch.no_grad():
        return _forward(q, k, v, args, config)


def _forward(q, k, v, args: AttendArgs, config):
    call = _prepare(q, k, v, args)
    B, H, W, N, D = call.shape
    kh, kw = args.kh, args.kw
    out = torch.empty((B, H, W, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, W, N), dtype=call.kv.dtype, device=q.device)
    out_cf, lse_cf = out.permute(0, 3, 4, 1, 2), lse.permute(0, 3, 1, 2)
    for b0, b1, i0, i1 in _chunks(call, "forward", D + 2, config):
        win = _windows(call, b0, b1, i0, i1)
        qc = call.qs[b0:b1, :, :, i0:i1]
        b, r = b1 - b0, i1 - i0
        P = b * N
        p = _logits(call, win, qc, i0, i1).view(P, kh * kw, r, W)
        m = p.amax(1, keepdim=True)
        p.sub_(m).exp_()
        s = p.sum(1, keepdim=True)  # (P, 1, r, W)
        o = _tap_sum(win[:, D:], p.view(P, 1, kh, kw, r, W), (2, 3), call.scratch)
        o.div_(s)  # (P, D, r, W)
        out_cf[b0:b1, :, :, i0:i1] = o.view(b, N, D, r, W)
        lse_cf[b0:b1, :, i0:i1] = m.add_(s.log_()).view(b, N, r, W)
    return out, lse


def backward(q, k, v, out, lse, dout, args: AttendArgs, config: Optional[dict] = None):
    """(dq, dk, dv, drel_h, drel_w, drpb), the last three None when absent."""
    with torch.no_grad():
        return _backward(q, k, v, out, lse, dout, args, config)


def _backward(q, k, v, out, lse, dout, args: AttendArgs, config):
    # the chunk loop's buffers (padded k/v, scaled q, dout copy) are freed on its return,
    # before the gradients are copied to their final layout
    dq, dkv, grads = _backward_sums(q, k, v, out, lse, dout, args, config)
    B, H, W, N, D = q.shape
    dkv = dkv.view(B, N, 2 * D, H, W)
    result = [_bhwnd(dq.mul_(args.scale), q.dtype), _bhwnd(dkv[:, :, :D], q.dtype),
              _bhwnd(dkv[:, :, D:], q.dtype)]
    for given, grad in zip((args.rel_h, args.rel_w, args.rpb), grads):
        result.append(None if given is None else grad.to(given.dtype))
    return tuple(result)


def _backward_sums(q, k, v, out, lse, dout, args: AttendArgs, config):
    """(dq / scale as (B, N, D, H, W), [dk | dv] as (B*N, 2D, H, W), [drel_h, drel_w,
    drpb]) in the compute dtype."""
    call = _prepare(q, k, v, args)
    B, H, W, N, D = call.shape
    kh, kw, dh, dw, padding = args[:5]
    shift, geo, cdt, dev = padding == "shift", call.geo, call.kv.dtype, q.device
    d2 = D // 2
    do = _channels_first(dout, cdt)
    delta = (do * out.permute(0, 3, 4, 1, 2)).sum(2)  # (B, N, H, W) rowsum(dout * out)
    lse_cf = lse.permute(0, 3, 1, 2)
    dq = torch.empty((B, N, D, H, W), dtype=cdt, device=dev)
    dkv = torch.zeros((B * N, 2 * D, H, W), dtype=cdt, device=dev)  # [dk | dv], no border
    grads = [None if t is None else torch.zeros(t.shape, dtype=cdt, device=dev)
             for t in (call.rel_h, call.rel_w, call.rpb)]
    drel_h, drel_w, drpb = grads

    # per tap: one product buffer (reused), p, dS, their stacked copies and flipped pads
    for b0, b1, i0, i1 in _chunks(call, "backward", 2 * D + 8, config, halo_per_tap=2 * D + 4):
        win = _windows(call, b0, b1, i0, i1)
        qc, doc = call.qs[b0:b1, :, :, i0:i1], do[b0:b1, :, :, i0:i1]
        b, r = b1 - b0, i1 - i0
        P = b * N
        qc6, doc6 = qc.reshape(P, D, 1, 1, r, W), doc.reshape(P, D, 1, 1, r, W)
        p = _logits(call, win, qc, i0, i1).view(P, 1, kh, kw, r, W)
        p.sub_(lse_cf[b0:b1, :, i0:i1].reshape(P, 1, 1, 1, r, W)).exp_()
        ds = _tap_sum(win[:, D:], doc6, 1, call.scratch).view(P, 1, kh, kw, r, W)  # dout.v
        ds.sub_(delta[b0:b1, :, i0:i1].reshape(P, 1, 1, 1, r, W)).mul_(p)  # dS
        dead = None if geo.masked is None else geo.masked[:, :, i0:i1]
        if dead is not None:  # a masked tap's dS is 0, even where delta is NaN (0 * NaN)
            ds.masked_fill_(dead, 0.0)

        dqc = _tap_sum(win[:, :D], ds, (2, 3), call.scratch).view(b, N, D, r, W)
        if call.rel_h is not None:
            ds_b = ds.view(b, N, kh, kw, r, W)
            _rel_backward(call, ds_b.sum(3), qc[:, :, :d2], dqc[:, :, :d2], drel_h,
                          geo.rel_y[None, None, :, i0:i1, None], call.rel_h,
                          None if dead is None else dead.all(1))
            _rel_backward(call, ds_b.sum(2), qc[:, :, d2:], dqc[:, :, d2:], drel_w,
                          geo.rel_x[None, None, :, None, :], call.rel_w,
                          None if dead is None else dead.all(0))
        dq[b0:b1, :, :, i0:i1] = dqc
        if drpb is not None:
            per_tap = ds.view(b, N, kh, kw, r, W).sum(0)  # (N, kh, kw, r, W)
            if shift:
                n = torch.arange(N, device=dev)[:, None, None, None, None]
                drpb.index_put_((n, geo.rel_y[None, :, None, i0:i1, None],
                                 geo.rel_x[None, None, :, None, :]), per_tap, accumulate=True)
            else:
                drpb[:, kh // 2:kh // 2 + kh, kw // 2:kw // 2 + kw] += per_tap.sum((3, 4))

        # key/value gradients: scale q dS and p dout of every tap, at the tap's key
        if shift:
            part = torch.empty((P, 2 * D, kh, kw, r, W), dtype=cdt, device=dev)
            torch.mul(qc6, ds, out=part[:, :D])
            torch.mul(doc6, p, out=part[:, D:])
            pix = torch.arange(b0 * N, b1 * N, device=dev)[:, None, None, None, None, None]
            ch = torch.arange(2 * D, device=dev)[:, None, None, None, None]
            dkv.index_put_((pix, ch, geo.pos_y[:, None, i0:i1, None],
                            geo.pos_x[None, :, None, :]), part, accumulate=True)
        else:  # the image rows the chunk's windows reach
            y0, y1 = max(0, i0 - geo.ph), min(H, i1 + geo.ph)
            dkv[b0 * N:b1 * N, :, y0:y1] += _key_gradients(
                call, torch.stack((qc6, doc6), 1), torch.stack((ds, p), 1), i0, y0, y1)

    return dq, dkv, grads


def _key_gradients(call: _Call, x, s, i0: int, y0: int, y1: int) -> torch.Tensor:
    """sum over the chunk's queries whose window holds key y of x(query) * s(query, tap),
    for image rows y0 <= y < y1: (P, 2D, y1 - y0, W), channels [scale q dS | dout p].

    x (P, 2, D, 1, 1, r, W) and s (P, 2, 1, kh, kw, r, W). Key y sees tap (a, c) from
    query y - o(a, c), o = ((a - kh//2) dh, (c - kw//2) dw), i.e. tap (kh-1-a, kw-1-c)
    of a window around y: so x and s (taps flipped) are zero-padded by twice the
    window's reach and read through the same strided window view as the keys.
    """
    kh, kw, dh, dw = call.args.kh, call.args.kw, call.args.dh, call.args.dw
    P, _, D, _, _, r, W = x.shape
    ph, pw = call.geo.ph, call.geo.pw
    Rq, Wq = r + 4 * ph, W + 4 * pw
    xp = x.new_zeros((P, 2, D, Rq, Wq))
    xp[..., 2 * ph:2 * ph + r, 2 * pw:2 * pw + W] = x.view(P, 2, D, r, W)
    sp = s.new_zeros((P, 2, kh, kw, Rq, Wq))
    sp[..., 2 * ph:2 * ph + r, 2 * pw:2 * pw + W] = s.view(P, 2, kh, kw, r, W).flip((2, 3))
    # key y (image row; column x) reads buffer row y + ph - i0 + a' dh, column x + pw + c' dw
    rows, start = y1 - y0, (y0 + ph - i0) * Wq + pw
    st = Rq * Wq  # one image in xp / sp
    x_win = xp.as_strided((P, 2, D, kh, kw, rows, W),
                          (2 * D * st, D * st, st, dh * Wq, dw, Wq, 1), start)
    s_win = sp.as_strided((P, 2, 1, kh, kw, rows, W),
                          (2 * kh * kw * st, kh * kw * st, 0, kw * st + dh * Wq, st + dw, Wq, 1),
                          start)
    return _tap_sum(x_win, s_win, (3, 4), call.scratch).view(P, 2 * D, rows, W)


def _rel_backward(call: _Call, ds_axis, q_part, dq_part, dtable, idx, table,
                  dead=None) -> None:
    """One separable rel table's share of a chunk's backward.

    ds_axis (b, N, k, r, W): dS summed over the other window axis; q_part (b, N, c, r, W):
    the chunk's scaled q channels of this table; dq_part: the view of dq that gets
    table^T dS; dtable: the table's gradient (accumulated); idx: the table row of each
    tap, broadcastable to ds_axis (used in shift mode, where it depends on the pixel);
    dead (k, r, W): mask mode, table rows whose taps are all masked for the pixel (shift
    mode computes its own: the rows a pixel's window does not reach).
    """
    b, N, k, r, W = ds_axis.shape
    if call.args.padding == "shift":  # move dS from taps to table rows
        full = torch.zeros((b, N, table.shape[-2], r, W), dtype=ds_axis.dtype,
                           device=ds_axis.device)
        ds_axis = full.scatter_add_(2, idx.expand(ds_axis.shape), ds_axis)
        used = torch.zeros((table.shape[-2], r, W), dtype=torch.bool, device=ds_axis.device)
        dead = ~used.scatter_(0, idx[0, 0].expand(k, r, W), True)  # rows this pixel never uses
    rows = ds_axis.shape[2]
    ds_flat = ds_axis.reshape(b, N, rows, r * W)
    q_flat = q_part.reshape(b, N, -1, r * W)
    if dead is not None and dead.any() and not (table.isfinite().all() and q_flat.isfinite().all()):
        # a dead row's dS is 0, but 0 * inf (table) or 0 * NaN (q) is not: leave its
        # terms out, per pixel (rare: mask/shift mode with non-finite inputs only)
        live = ~dead.reshape(1, 1, rows, 1, r * W)
        tab = (table if table.dim() == 3 else table[None])[None, :, :, :, None]  # 1,N|1,k,c,1
        dq_part += torch.where(live, tab * ds_flat[:, :, :, None], 0).sum(2).view(dq_part.shape)
        terms = torch.where(live, ds_flat[:, :, :, None] * q_flat[:, :, None], 0).sum((0, 4))
        dtable += terms if table.dim() == 3 else terms.sum(0)
        return
    dq_part += (table.transpose(-1, -2) @ ds_flat).view(dq_part.shape)
    spec = "bnkl,bncl->kc" if table.dim() == 2 else "bnkl,bncl->nkc"
    dtable += torch.einsum(spec, ds_flat, q_flat)
