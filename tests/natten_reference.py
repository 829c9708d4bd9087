"""NATTEN's computation in plain PyTorch, written from NATTEN's sources, not from this
library: the window and rpb index formulas of NATTEN's naive CPU kernels
(`get_window_start`, `get_pb_start`), cross-checked against the per-dilation-group form
of its newer kernels, and NATTEN 0.17's module forward along its unfused path (heads-first
q/k/v, query scaled before QK, rpb added to the logits, softmax, AV). No code is shared
with sasa_triton, so agreement with it is a real check.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _window_start(index: int, length: int, K: int, dil: int) -> int:
    """NATTEN's naive-kernel `get_window_start`."""
    ns = K // 2
    if dil <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dil
    if ni < 0:
        return index % dil
    if index + ns * dil >= length:
        imodd = index % dil
        a = (length // dil) * dil
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dil
        return a + imodd - K * dil
    return ni


def _window_start_grouped(index: int, length: int, K: int, dil: int) -> int:
    """The newer kernels' form: the window inside index's dilation group."""
    ns = K // 2
    group, member = index % dil, index // dil
    group_len = -(-length // dil)
    if group >= dil - (group_len * dil - length):
        group_len -= 1
    start = max(member - ns, 0)
    if member + ns >= group_len:
        start += group_len - member - ns - 1
    return start * dil + group


def _pb_start(index: int, length: int, K: int, dil: int) -> int:
    """NATTEN's `get_pb_start`: rpb index of the window's first tap."""
    ns = K // 2
    if dil <= 1:
        return ns + (index < ns) * (ns - index) + (index + ns >= length) * (length - index - 1 - ns)
    if index - ns * dil < 0:
        return K - 1 - index // dil
    if index + ns * dil >= length:
        return (length - index - 1) // dil
    return ns


def neighbors(length: int, K: int, dil: int):
    """(positions, rpb indices), both (length, K) int64: NATTEN's window along one axis."""
    assert length >= K * dil, "NATTEN needs kernel_size * dilation <= length"
    starts = [_window_start(i, length, K, dil) for i in range(length)]
    assert starts == [_window_start_grouped(i, length, K, dil) for i in range(length)]
    pos = [[s + a * dil for a in range(K)] for s in starts]
    pb = [[_pb_start(i, length, K, dil) + a for a in range(K)] for i in range(length)]
    return torch.tensor(pos), torch.tensor(pb)


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def natten_qk(q, k, kernel_size, dilation=1, rpb=None):
    """na2d_qk: q, k (B, heads, H, W, d) -> (B, heads, H, W, kh*kw), float64."""
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    H, W = q.shape[2:4]
    pos_y, pb_y = neighbors(H, kh, dh)
    pos_x, pb_x = neighbors(W, kw, dw)
    taps = []
    for ki in range(kh):
        for kj in range(kw):
            key = k.double()[:, :, pos_y[:, ki]][:, :, :, pos_x[:, kj]]
            logit = (q.double() * key).sum(-1)
            if rpb is not None:
                logit = logit + rpb.double()[:, pb_y[:, ki]][:, :, pb_x[:, kj]]
            taps.append(logit)
    return torch.stack(taps, dim=-1)


def natten_av(attn, v, kernel_size, dilation=1):
    """na2d_av: attn (B, heads, H, W, kh*kw), v (B, heads, H, W, d) -> (B, heads, H, W, d)."""
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    H, W = v.shape[2:4]
    pos_y, _ = neighbors(H, kh, dh)
    pos_x, _ = neighbors(W, kw, dw)
    out = 0
    for ki in range(kh):
        for kj in range(kw):
            value = v.double()[:, :, pos_y[:, ki]][:, :, :, pos_x[:, kj]]
            out = out + attn.double()[..., ki * kw + kj, None] * value
    return out


def natten_module_forward(sd, x, num_heads, kernel_size, dilation=1, qk_scale=None,
                          attn_drop=0.0):
    """NeighborhoodAttention2D.forward (NATTEN 0.17 unfused path; inputs smaller than the
    window padded as NATTEN <= 0.14 did) from a state dict, in float64. With attn_drop > 0
    the attention weights go through F.dropout (training), as NATTEN's module did."""
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    x = x.double()
    B, H, W, C = x.shape
    head_dim = C // num_heads
    scale = qk_scale or head_dim ** -0.5
    pad_h, pad_w = max(0, kh * dh - H), max(0, kw * dw - W)
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    qkv_bias = sd.get("qkv.bias")
    qkv = F.linear(x, sd["qkv.weight"].double(), None if qkv_bias is None else qkv_bias.double())
    qkv = qkv.reshape(B, Hp, Wp, 3, num_heads, head_dim).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * scale
    attn = natten_qk(q, k, (kh, kw), (dh, dw), rpb=sd.get("rpb"))
    attn = attn.softmax(dim=-1)
    if attn_drop > 0:
        attn = F.dropout(attn, attn_drop, training=True)
    out = natten_av(attn, v, (kh, kw), (dh, dw))
    out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)[:, :H, :W]
    return F.linear(out, sd["proj.weight"].double(), sd["proj.bias"].double())
