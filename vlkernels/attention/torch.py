"""The PyTorch backend of attention, for any device and mask: out (0 for rows with no allowed key)
and the row log-sum-exp its backward takes back.

On CPU it runs PyTorch's own fused CPU attention (the kernel behind SDPA there), forward and
backward, with the mask as one additive float [B or 1, H or 1, Lq, Lk] tensor (built once for a
mask and reused for a mask of the same contents); its output keeps SDPA's [B, H, Lq, D] memory
layout, its lse is that kernel's own (natural log, 0 for a row with no allowed key, which its
backward takes as it is). Elsewhere, with soft-capping or dropout, with NaN or inf in q, and for
the backward of rows whose lse that kernel cannot hold precisely (a float mask so negative that it
swamps the scores): the kernels' algorithm in PyTorch operations (fp32 arithmetic; materialises
the [B, H, Lq, Lk] scores; natural-log lse, +inf for a row with no allowed key; the backward
recomputes the softmax from the scores, exactly normalised, rather than from the lse).

Keys that no query row may attend are never used, whatever they hold (NaN after the valid length
of a KV buffer): they are zeroed before the kernel sees them.
"""

from __future__ import annotations

import torch

from vlkernels import _dispatch
from vlkernels import bias as position
from vlkernels.attention import args as A
from vlkernels.attention import dropout


def _allowed(a: A.AttentionArgs, Lq: int, Lk: int, device) -> torch.Tensor:
    """Bool broadcastable to [B, H, Lq, Lk]: the mask's allowed keys, a float bias's -inf excluded."""
    allowed = a.mask.allowed(Lq, Lk, device)
    if a.mask.bias is not None:
        allowed = allowed & (a.mask.bias != float("-inf"))
    return allowed


def _unused_keys(allowed: torch.Tensor) -> torch.Tensor:
    """[B or 1, H or 1, Lk, 1] bool: the keys that no query row may attend."""
    return ~allowed.any(-2).unsqueeze(-1)


def _scores(a: A.AttentionArgs):
    """fp32 (scores [B, H, Lq, Lk]: capped, + bias, masked to -inf; the cap's derivative (1.0
    without a cap); q, k, v upcast, k and v per query head, the keys no row may attend zeroed)."""
    q, k, v = (t.float() for t in (a.q, a.k, a.v))
    H, Hk, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if H != Hk:  # grouped keys: each key head serves H // Hk query heads
        k, v = (t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
    allowed = _allowed(a, Lq, Lk, q.device)
    unused = _unused_keys(allowed)
    k, v = k.masked_fill(unused, 0.0), v.masked_fill(unused, 0.0)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(a.scale)
    dcap = 1.0
    if a.softcap > 0:
        t = torch.tanh(s / a.softcap)
        s, dcap = t * a.softcap, 1.0 - t * t
    if a.mask.bias is not None:
        s = s + a.mask.bias.float()
    return s.masked_fill_(~allowed, float("-inf")), dcap, q, k, v


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit-stride last dim, as PyTorch's CPU kernel reads it (SDPA checks this before
    choosing that kernel; with another stride it reads the wrong memory): copied only when needed."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _per_query_head(a: A.AttentionArgs, unused: torch.Tensor | None):
    """q, k, v as PyTorch's CPU kernel takes them: unit-stride last dims, k and v repeated per
    query head and zeroed at the ``unused`` keys, q expanded over the batch (a view)."""
    q, k, v = (_unit_stride(t) for t in (a.q, a.k, a.v))
    B, Hk = k.shape[:2]
    if q.shape[1] != Hk:  # grouped keys: each key head serves H // Hk query heads
        k, v = (t.repeat_interleave(q.shape[1] // Hk, dim=1) for t in (k, v))
    if unused is not None:
        k, v = k.masked_fill(unused, 0.0), v.masked_fill(unused, 0.0)
    return (q if q.shape[0] == B else q.expand(B, *q.shape[1:])), k, v


_RECENT_MASKS: list = []  # [(key, snapshots of the mask's tensors, result)], newest last
_RECENT_MAX = 2
_RECENT_BYTES = 64 << 20  # a larger mask is rebuilt rather than kept between calls


def _same_contents(snapshots, tensors) -> bool:
    return all(
        s.shape == t.shape and s.dtype == t.dtype and torch.equal(s, t)
        for s, t in zip(snapshots, tensors, strict=True)
    )


def _cpu_mask_recent(a: A.AttentionArgs):
    """``_cpu_mask``, reusing the result built for a mask of the same contents (the backward of a
    call, the other layers of a model, the next step): the last two results up to _RECENT_BYTES
    are kept with copies of the tensors they were built from, compared element by element (an
    equality test reads the mask once, cheaper than building it; no write to a mask, in place or
    through shared memory, can go unseen)."""
    m = a.mask
    if not m.restricts() and m.bias is None:
        return None, None
    if torch.compiler.is_compiling():  # traced once into the graph: nothing to keep
        return _cpu_mask(a)
    tensors = [x for x in m if isinstance(x, torch.Tensor)]
    key = (
        a.q.shape[2],
        a.k.shape[2],
        a.q.dtype,
        a.q.device,
        *(x for x in m if not isinstance(x, torch.Tensor)),
    )
    for k, snapshots, result in _RECENT_MASKS:
        if k == key and _same_contents(snapshots, tensors):
            return result
    result = _cpu_mask(a)
    size = sum(t.numel() * t.element_size() for t in (result[0], *tensors))
    if size <= _RECENT_BYTES:
        _RECENT_MASKS.append((key, [t.clone() for t in tensors], result))
        del _RECENT_MASKS[:-_RECENT_MAX]
    return result


def _cpu_mask(a: A.AttentionArgs):
    """(the mask as the additive 4-D float tensor PyTorch's CPU kernel takes, -inf = not allowed:
    in q's dtype when it only masks, in fp32 when it carries a float bias (added to the fp32
    scores as it is: no rounding to fp16/bf16, no overflow past their range); the keys no row may
    attend as ``_unused_keys`` gives them, or None when there are none)."""
    m, (Lq, Lk) = a.mask, (a.q.shape[2], a.k.shape[2])
    if m.bias is None:
        allowed = m.allowed(Lq, Lk, a.q.device)
        add = torch.where(allowed, torch.zeros((), dtype=a.q.dtype, device=a.q.device), float("-inf"))
    else:
        add = m.bias.float()
        add = add.view((1,) * (4 - add.dim()) + add.shape)  # the kernel takes a 2-D or 4-D mask
        if m.restricts():
            add = add.masked_fill(~m.allowed(Lq, Lk, a.q.device), float("-inf"))
        add = add.expand(*add.shape[:2], Lq, Lk)
        allowed = add != float("-inf")
    unused = _unused_keys(allowed)
    return add, (unused if bool(unused.any()) else None)


def _cpu_forward(a: A.AttentionArgs):
    """PyTorch's CPU kernel: out in SDPA's layout (a copy to [B, Lq, H, D] costs more than it
    saves), its own lse (rows with no allowed key: out 0, lse 0)."""
    add, unused = _cpu_mask_recent(a)
    q, k, v = _per_query_head(a, unused)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=add, scale=a.scale
    )


def _cpu_backward(g: A.AttentionGradArgs):
    a = g.fwd
    add, unused = _cpu_mask_recent(a)
    q, k, v = _per_query_head(a, unused)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _unit_stride(g.grad_out),
        q,
        k,
        v,
        _unit_stride(g.out),
        g.lse,
        0.0,
        False,
        attn_mask=add,
        scale=a.scale,
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


def _softmax(s: torch.Tensor):
    """(exp(s - m), its row sums l, m) with m the row maxima (0 for a row of -inf): p / l is the
    softmax, 0 in a row with no allowed key."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    p = torch.exp(s - m)
    return p, p.sum(dim=-1, keepdim=True), m


def dense_position(a: A.AttentionArgs) -> A.AttentionArgs:
    """The backend's ``prepare``: a position bias folded into the float bias, fp32 [B or 1, H, Lq,
    Lk] (``bias.dense_args``: its table's or slopes' gradient flows back through it)."""
    m = a.mask
    if m.position_bias is None:
        return a
    dense = position.dense_args(
        m.position_bias, m.position_buckets, m.position_shift, a.q.shape[2], a.k.shape[2]
    )
    if m.bias is not None:
        dense = m.bias.float() + dense
    return a._replace(
        mask=m._replace(bias=dense, position_bias=None, position_buckets=None, position_shift=0)
    )


def probabilities(a: A.AttentionArgs) -> torch.Tensor:
    """fp32 [B, H, Lq, Lk]: softmax(cap(scale · q kᵀ) + bias, masked) after dropout, 0 where masked
    and in rows with no allowed key (``a.v`` is not read)."""
    s, _, _, _, _ = _scores(dense_position(a))
    p, l, _ = _softmax(s)
    return p / torch.where(l == 0, 1.0, l) * _dropout_factor(a)


def _forward(a: A.AttentionArgs):
    s, _, _, _, v = _scores(a)
    p, l, m = _softmax(s)
    out = torch.matmul(p * _dropout_factor(a), v) / torch.where(l == 0, 1.0, l)
    lse = torch.where(l == 0, float("inf"), m + torch.log(l)).squeeze(-1)
    return out.to(a.q.dtype).transpose(1, 2).contiguous().transpose(1, 2), lse


def _score_grad(g: A.AttentionGradArgs):
    """(dLoss/dscores [B, H, Lq, Lk] fp32: of the scores after the cap (what the bias is added
    to), the cap's derivative, the probabilities after dropout, do, q, k). The softmax is
    recomputed from the scores, exactly normalised in every row (an lse far from 0 holds fewer
    of its bits)."""
    s, dcap, q, k, v = _scores(g.fwd)
    p, l, _ = _softmax(s)
    p = p / torch.where(l == 0, 1.0, l)  # 0 where masked and in rows with no key
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


_LSE_PRECISE = 1024.0  # |lse| below it: fp32 holds the row's normalisation to 6e-5 or better


def _fused_cpu(a: A.AttentionArgs) -> bool:
    """Whether PyTorch's fused CPU kernel may compute this: it has no soft-capping, its dropout is
    not the kernels', and the checks that choose it depend on values, which a traced graph
    (torch.compile) cannot branch on."""
    return (
        a.q.device.type == "cpu" and a.softcap == 0 and a.dropout_p == 0 and not torch.compiler.is_compiling()
    )


def _any_forward(a: A.AttentionArgs):
    """The fused CPU kernel, unless q holds NaN or inf: that kernel gives some such rows 0 (as if
    they had no key to attend) where they are NaN."""
    return (_cpu_forward if _fused_cpu(a) and bool(a.q.isfinite().all()) else _forward)(a)


def _any_backward(g: A.AttentionGradArgs):
    """The fused CPU kernel's backward when its forward ran and every row's lse is finite and
    small enough to hold the row's normalisation (a float mask of finfo.min swamps the scores: the
    lse of such a row is that number, log(row sum) lost in its rounding); else the exact one."""
    fused = _fused_cpu(g.fwd) and bool((g.lse.abs() < _LSE_PRECISE).all())
    return (_cpu_backward if fused else _backward)(g)


BACKEND = _dispatch.Backend(
    "torch",
    _any_forward,
    _any_backward,
    _dispatch.TORCH,
    prepare=dense_position,
    bias_grad=lambda g: _score_grad(g)[0],
)
