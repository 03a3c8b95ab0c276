"""The PyTorch backend of attention, for any device and mask: out (0 for rows with no allowed key)
and the row log-sum-exp its backward takes back.

On CPU it runs PyTorch's own fused CPU attention (the kernel behind SDPA there), forward and
backward, with the mask as one additive float [B or 1, H or 1, Lq, Lk] tensor (built once for a
mask and reused while its tensors are unchanged); its output keeps SDPA's [B, H, Lq, D] memory
layout, its lse is that kernel's own (natural log, 0 for a row with no allowed key, which its
backward takes as it is). Elsewhere, and with soft-capping or dropout: the kernels' algorithm in
PyTorch operations (fp32 arithmetic; materialises the [B, H, Lq, Lk] scores; the kernels' log2
lse, +inf for a row with no allowed key)."""

from __future__ import annotations

import math

import torch

from vlkernels import _dispatch
from vlkernels.attention import args as A
from vlkernels.attention import dropout

LOG2E = 1.0 / math.log(2.0)


def _scores(a: A.AttentionArgs):
    """fp32 (scores [B, H, Lq, Lk]: capped, + bias, masked to -inf; the cap's derivative (1.0
    without a cap); q, k, v upcast, k and v per query head)."""
    q, k, v = (t.float() for t in (a.q, a.k, a.v))
    H, Hk, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if H != Hk:  # grouped keys: each key head serves H // Hk query heads
        k, v = (t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
    allowed = a.mask.allowed(Lq, Lk, q.device)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(a.scale)
    dcap = 1.0
    if a.softcap > 0:
        t = torch.tanh(s / a.softcap)
        s, dcap = t * a.softcap, 1.0 - t * t
    if a.mask.bias is not None:
        s = s + a.mask.bias.float()
    return s.masked_fill_(~allowed, float("-inf")), dcap, q, k, v


def _per_query_head(a: A.AttentionArgs):
    """q, k, v with k and v repeated per query head and q expanded over the batch (a view)."""
    q, k, v = a.q, a.k, a.v
    B, Hk = k.shape[:2]
    if q.shape[1] != Hk:  # grouped keys: each key head serves H // Hk query heads
        k, v = (t.repeat_interleave(q.shape[1] // Hk, dim=1) for t in (k, v))
    return (q if q.shape[0] == B else q.expand(B, *q.shape[1:])), k, v


_RECENT_MASKS: list = []  # [(key, tensors the key names, result)], newest last
_RECENT_MAX = 2
_RECENT_BYTES = 64 << 20  # a larger mask is rebuilt rather than kept between calls


def _mask_key(a: A.AttentionArgs):
    """What ``_additive``'s result depends on: the sizes, the dtype, the mask's integers and the
    identity and version of each of its tensors (None when a tensor has no version counter)."""
    tensors, key = [], [a.q.shape[2], a.k.shape[2], a.q.dtype, a.q.device]
    for x in a.mask:
        if isinstance(x, torch.Tensor):
            if x.is_inference():
                return None, tensors
            tensors.append(x)
            key.append((id(x), x._version))
        else:
            key.append(x)
    return tuple(key), tensors


def _additive_recent(a: A.AttentionArgs):
    """``_additive``, reusing the result for the same mask (the backward of a call, the other
    layers of a model): the last two results up to _RECENT_BYTES each are kept, with the tensors
    their keys name, so an id in a key cannot be reused by another tensor while it is kept."""
    if torch.compiler.is_compiling():  # traced once into the graph: nothing to keep
        return _additive(a)
    key, tensors = _mask_key(a)
    if key is None:
        return _additive(a)
    for k, _, result in _RECENT_MASKS:
        if k == key:
            return result
    result = _additive(a)
    if result is not None and result.numel() * result.element_size() > _RECENT_BYTES:
        return result
    _RECENT_MASKS.append((key, tensors, result))
    del _RECENT_MASKS[:-_RECENT_MAX]
    return result


def _additive(a: A.AttentionArgs) -> torch.Tensor | None:
    """The mask as the additive float tensor SDPA's CPU kernel takes (-inf = not allowed), or None."""
    m, (Lq, Lk) = a.mask, (a.q.shape[2], a.k.shape[2])
    if not m.restricts() and m.bias is None:
        return None
    if not m.restricts():
        add = m.bias.to(a.q.dtype)
        return add.expand(*add.shape[:-2], Lq, Lk) if add.dim() >= 2 else add.expand(Lq, Lk)
    zero = torch.zeros((), dtype=a.q.dtype, device=a.q.device)
    add = torch.where(m.allowed(Lq, Lk, a.q.device), zero, float("-inf"))
    return add if m.bias is None else add + m.bias.to(a.q.dtype)


def _cpu_forward(a: A.AttentionArgs):
    """PyTorch's CPU kernel: out in SDPA's layout (a copy to [B, Lq, H, D] costs more than it
    saves), its own lse (rows with no allowed key: out 0, lse 0)."""
    q, k, v = _per_query_head(a)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=_additive_recent(a), scale=a.scale
    )


def _cpu_backward(g: A.AttentionGradArgs):
    a = g.fwd
    q, k, v = _per_query_head(a)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g.grad_out, q, k, v, g.out, g.lse, 0.0, False, attn_mask=_additive_recent(a), scale=a.scale
    )
    return _group_sum(dq, a.q), _group_sum(dk, a.k), _group_sum(dv, a.v)


def _group_sum(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gradient of a tensor broadcast from ``like``'s shape: sum over the batch (shared queries)
    and over the query heads of each key head."""
    if t.shape[0] != like.shape[0]:
        t = t.sum(0, keepdim=True)
    if t.shape[1] != like.shape[1]:
        t = t.unflatten(1, (like.shape[1], -1)).sum(2)
    return t.to(like.dtype)


def _dropout_factor(a: A.AttentionArgs):
    """Dropout's factor [B, H, Lq, Lk] (1 / (1 - p) kept, 0 dropped; attention/dropout.py), or 1.0."""
    if a.dropout_p == 0:
        return 1.0
    B, H, Lq, Lk = a.k.shape[0], a.q.shape[1], a.q.shape[2], a.k.shape[2]
    keep = dropout.keep_mask(a.seed, a.dropout_p, B, H, Lq, Lk, a.q.device)
    return keep * dropout.scale(a.dropout_p)


def _forward(a: A.AttentionArgs):
    s, _, _, _, v = _scores(a)
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(m == float("-inf"), 0.0, m))
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p * _dropout_factor(a), v) / torch.where(l == 0, 1.0, l)
    lse = torch.where(l == 0, float("inf"), m + torch.log(l)).squeeze(-1) * LOG2E
    return out.to(a.q.dtype).transpose(1, 2).contiguous().transpose(1, 2), lse


def _score_grad(g: A.AttentionGradArgs):
    """(dLoss/dscores [B, H, Lq, Lk] fp32: of the scores after the cap (what the bias is added
    to), the cap's derivative, the probabilities after dropout, do, q, k)."""
    s, dcap, q, k, v = _scores(g.fwd)
    lse = g.lse if _fused_cpu(g.fwd) else g.lse / LOG2E  # natural log (module docstring)
    p = torch.exp(s - lse[..., None])  # 0 where masked and in rows with no key
    do = g.grad_out.float()
    dp = torch.matmul(do, v.transpose(-1, -2)) * _dropout_factor(g.fwd)
    delta = (p * dp).sum(-1, keepdim=True)  # = rowsum(o · do), without the output's rounding
    return p * (dp - delta), dcap, p * _dropout_factor(g.fwd), do, q, k


def _backward(g: A.AttentionGradArgs):
    a = g.fwd
    ds, dcap, p, do, q, k = _score_grad(g)
    ds = ds * dcap * a.scale
    dq = torch.matmul(ds, k)
    dk = torch.matmul(ds.transpose(-1, -2), q)
    dv = torch.matmul(p.transpose(-1, -2), do)
    return _group_sum(dq, a.q), _group_sum(dk, a.k), _group_sum(dv, a.v)


def _fused_cpu(a: A.AttentionArgs) -> bool:
    """Whether PyTorch's fused CPU kernel computes this (it has no soft-capping, and its dropout
    is not the kernels')."""
    return a.q.device.type == "cpu" and a.softcap == 0 and a.dropout_p == 0


def _any_forward(a: A.AttentionArgs):
    return (_cpu_forward if _fused_cpu(a) else _forward)(a)


def _any_backward(g: A.AttentionGradArgs):
    return (_cpu_backward if _fused_cpu(g.fwd) else _backward)(g)


BACKEND = _dispatch.Backend("torch", _any_forward, _any_backward, bias_grad=lambda g: _score_grad(g)[0])
