"""Analytic position biases, added to the attention scores from the row and column indices: the
kernels compute them, nothing [Lq, Lk] is materialised, and the backward reduces their gradient
to the learnable parameters' shape.

>>> out = vlkernels.attention(q, k, v, mask, scale=1.0, position_bias=bias.t5(table, bidirectional=True))
>>> out = vlkernels.attention(q, k, v, masks.causal(), position_bias=bias.alibi(slopes))

Query row ``i`` sits at key position ``i + offset`` (``query_offset``; None: ``Lk - Lq``, the
bottom-right alignment of ``masks.causal`` and of FlashAttention's ALiBi, which is where a
decoding step's queries are); the relative position of key ``j`` is ``j - (i + offset)``.

``PositionBias.dense`` is the definition (what the eager reference adds); the backends take the
fields ``lower`` gives (``masks.MaskArgs.position_*``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake


@dataclass(frozen=True)
class PositionBias:
    """A position bias; build it with ``t5`` or ``alibi``.

    table:         T5: the learnable table as [H, num_buckets] (a view of what was given);
                   ALiBi: the slopes as [B or 1, H]
    kind:          "t5" or "alibi"
    bidirectional: T5 only: buckets for keys before and after the query (encoder), else only
                   before (decoder: a key after the query shares the distance-0 bucket)
    num_buckets, max_distance: T5 only
    query_offset:  key position of query row 0 (None: Lk - Lq)
    buckets:       T5 only: ``bucket_table`` on the table's device
    """

    table: torch.Tensor
    kind: str
    bidirectional: bool = True
    num_buckets: int = 0
    max_distance: int = 0
    query_offset: int | None = None
    buckets: torch.Tensor | None = None

    def check(self, batch: int, heads: int, device: torch.device) -> None:
        """Raise ValueError if this bias cannot apply to attention over [batch, heads, *, *]."""
        if self.table.device != device:
            raise ValueError(
                f"position_bias: the {self._what} is on {self.table.device}, the inputs on {device}"
            )
        shape = list(self.table.shape)
        if self.kind == "alibi" and (self.table.shape[1] != heads or self.table.shape[0] not in (1, batch)):
            raise ValueError(
                f"position_bias: alibi slopes must be [H] or [B, H] with H = {heads}, B = {batch}, "
                f"got {shape}"
            )
        if self.kind == "t5" and self.table.shape[0] != heads:
            raise ValueError(
                f"position_bias: the t5 table must be [num_buckets, H] or [H, num_buckets] with H = {heads} "
                f"and num_buckets = {self.num_buckets}, got (as [H, num_buckets]) {shape}"
            )

    @property
    def _what(self) -> str:
        return "t5 table" if self.kind == "t5" else "alibi slopes"

    def offset(self, q_len: int, k_len: int) -> int:
        return k_len - q_len if self.query_offset is None else self.query_offset

    def dense(self, q_len: int, k_len: int) -> torch.Tensor:
        """The bias as a tensor [B or 1, H, q_len, k_len] in the table's dtype (the definition:
        plain indexing, differentiable by autograd)."""
        dev = self.table.device
        i = torch.arange(q_len, device=dev)[:, None] + self.offset(q_len, k_len)
        rel = torch.arange(k_len, device=dev)[None, :] - i
        if self.kind == "alibi":
            return -self.table[:, :, None, None] * rel.abs().to(self.table.dtype)
        buckets = t5_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.table[:, buckets].unsqueeze(0)


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's relative position buckets (Raffel et al. 2020; Mesh TensorFlow's rule): the bucket of
    each relative position (key - query), int64. Half the buckets (of each direction when
    ``bidirectional``) are exact distances, the rest log-spaced up to ``max_distance``, past which
    every distance shares the last bucket. The same float operations as transformers' T5, so the
    same buckets on every device."""
    buckets = torch.zeros_like(relative_position)
    n = relative_position
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (n > 0).long() * num_buckets
        n = n.abs()
    else:
        n = -torch.min(n, torch.zeros_like(n))
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(n < max_exact, n, large)


_BUCKET_TABLES: dict = {}  # (bidirectional, num_buckets, max_distance, device) -> its bucket table


def bucket_table(bidirectional: bool, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """int32 [2 · max_distance + 1]: the T5 bucket of relative position r at r + max_distance, for
    r in [-max_distance, max_distance]; a position farther away has the bucket of the nearest end
    (every distance >= max_distance shares one bucket, ``t5_bucket``). A function of its arguments
    alone, kept per device."""
    key = (bidirectional, num_buckets, max_distance, torch.device(device))
    table = _BUCKET_TABLES.get(key)
    if table is None:
        rel = torch.arange(-max_distance, max_distance + 1, device=device)
        table = t5_bucket(rel, bidirectional, num_buckets, max_distance).int()
        if torch.compiler.is_compiling():  # a tensor of a trace, or of a fake mode, is not kept
            return table
        if not is_fake(table):
            _BUCKET_TABLES[key] = table
    return table


def _check_offset(query_offset) -> None:
    if query_offset is not None and (isinstance(query_offset, bool) or not isinstance(query_offset, int)):
        raise TypeError(
            f"position_bias: query_offset must be an int or None, got {type(query_offset).__name__}"
        )


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")


def t5(table: torch.Tensor, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128,
       query_offset: int | None = None) -> PositionBias:  # fmt: skip
    """T5's learned relative position bias (T5, mT5, UMT5, PaLI's mT5): ``table`` [num_buckets, H]
    (``nn.Embedding(num_buckets, H).weight``, as transformers keeps it) or [H, num_buckets], a
    learnable tensor (its gradient is reduced in the backward, deterministically); the bias of query
    i and key j is table[bucket(j - (i + offset)), h] (``t5_bucket``). ``bidirectional``: True in
    T5's encoder, False in its decoder. A square table is read as [num_buckets, H]."""
    _check_float("t5: table", table)
    if table.dim() != 2 or num_buckets not in table.shape:
        raise ValueError(
            f"t5: table must be [num_buckets, H] or [H, num_buckets] with num_buckets = {num_buckets}, "
            f"got shape {list(table.shape)}"
        )
    for name, value in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"t5: {name} must be an int, got {type(value).__name__}")
    per_side = num_buckets // 2 if bidirectional else num_buckets
    if per_side // 2 < 1 or max_distance <= per_side // 2:
        raise ValueError(
            f"t5: needs num_buckets >= {4 if bidirectional else 2} and max_distance > the exact buckets "
            f"({per_side // 2}), got num_buckets={num_buckets}, max_distance={max_distance}"
        )
    _check_offset(query_offset)
    heads_first = table.shape[0] != num_buckets
    buckets = bucket_table(bool(bidirectional), num_buckets, max_distance, table.device)
    return PositionBias(
        table if heads_first else table.t(),
        "t5",
        bool(bidirectional),
        num_buckets,
        max_distance,
        query_offset,
        buckets,
    )


def alibi(slopes: torch.Tensor, query_offset: int | None = None) -> PositionBias:
    """ALiBi (Press et al. 2022), FlashAttention's semantics: the bias of query i and key j is
    -slope · |i + offset - j| (causal or not: combine with ``masks.causal()``). ``slopes``: [H] or
    [B, H] (one set per batch entry), a learnable tensor or not."""
    _check_float("alibi: slopes", slopes)
    if slopes.dim() not in (1, 2):
        raise ValueError(f"alibi: slopes must be [H] or [B, H], got shape {list(slopes.shape)}")
    _check_offset(query_offset)
    return PositionBias(slopes if slopes.dim() == 2 else slopes[None], "alibi", query_offset=query_offset)


def lower(pb: PositionBias | None, batch: int, heads: int, q_len: int, k_len: int, device) -> dict:
    """The ``masks.MaskArgs`` fields of ``pb`` for attention over [batch, heads, q_len, k_len]
    ({} without one): ``position_bias`` (the table [H, num_buckets] or the slopes [B or 1, H]),
    ``position_buckets`` (T5: ``bucket_table``; None: ALiBi), ``position_shift`` (the query
    offset minus Lk - Lq)."""
    if pb is None:
        return {}
    if not isinstance(pb, PositionBias):
        raise TypeError(
            "attention: position_bias must be None or a vlkernels.bias position bias, "
            f"got {type(pb).__name__}"
        )
    pb.check(batch, heads, device)
    shift = pb.offset(q_len, k_len) - (k_len - q_len)
    return dict(position_bias=pb.table, position_buckets=pb.buckets, position_shift=shift)


def dense_args(table: torch.Tensor, buckets: torch.Tensor | None, shift: int, q_len: int, k_len: int):
    """The bias of the lowered fields (``lower``) as fp32 [B or 1, H, q_len, k_len], differentiable
    in ``table``; a T5 table's gradient is reduced deterministically (sums over the diagonals,
    then over the buckets, in a fixed order: no scatter)."""
    dev = table.device
    rel = (
        torch.arange(k_len, device=dev)[None, :]
        - torch.arange(q_len, device=dev)[:, None]
        - (k_len - q_len + shift)
    )
    if buckets is None:
        return -table.float()[:, :, None, None] * rel.abs().float()
    return _T5Dense.apply(table, buckets, rel, k_len - q_len + shift)


def _bucket_of(buckets: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    md = (buckets.numel() - 1) // 2
    return buckets.long()[rel.clamp(-md, md) + md]


class _T5Dense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, buckets, rel, c):
        ctx.save_for_backward(buckets)
        ctx.shape, ctx.c, ctx.dtype, ctx.buckets = rel.shape, c, table.dtype, table.shape[1]
        return table.float()[:, _bucket_of(buckets, rel)].unsqueeze(0)

    @staticmethod
    def backward(ctx, grad):
        (buckets,) = ctx.saved_tensors
        Lq, Lk = ctx.shape
        g = grad.sum(0)  # [H, Lq, Lk]
        H, W = g.shape[0], Lq + Lk
        # diagonal sums: skewed[h, i, t] = g[h, i, i + t - Lq] (0 off the matrix), so that column t
        # holds the keys j with j - i = t - Lq
        flat = torch.nn.functional.pad(torch.nn.functional.pad(g, (Lq, 0)).reshape(H, Lq * W), (0, W))
        diag = flat.as_strided((H, Lq, W), (flat.stride(0), W + 1, 1)).sum(1)  # [H, W]
        t = torch.arange(W, device=g.device)
        onehot = torch.nn.functional.one_hot(_bucket_of(buckets, t - Lq - ctx.c), ctx.buckets)
        dtable = diag @ onehot.to(diag.dtype)
        return dtable.to(ctx.dtype), None, None, None
