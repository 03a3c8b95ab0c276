"""The kernel arguments of attention, declared once (schema order): every backend takes these
tuples, and the op schemas (Triton and C++), fake kernels and launchers derive from them.

Shapes: q [Bq, H, Lq, D] (Bq = B, or 1 for queries shared by the batch), k and v [B, Hk, Lk, D],
out and grad_out [B, H, Lq, D], lse [B, H, Lq]: the rows' log-sum-exp, which the backward of the
backend that computed it takes back, fp32 (the Triton kernels: [B, H, Lq, 2], log2 units, the
pair (its rounding, the rest) that keeps a row's sum when a float bias of finfo.min swamps its
scores, +inf for a row with no allowed key; the CUDA C++ kernels, which take no float bias: the
rounding alone; the torch backend: natural log, on CPU PyTorch's CPU kernel's, 0 for such a row).
The output's memory is laid out as [B, Lq, H, D], so merging heads is free.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vlkernels._dispatch import Needs
from vlkernels.masks import MaskArgs

FLOAT_BIAS = "float bias (a float attn_mask)"


class AttentionArgs(NamedTuple):
    """Forward: dropout(softmax(cap(scale · q kᵀ) + bias, masked)) v -> (out, lse), where cap(s) =
    softcap · tanh(s / softcap) when softcap > 0 (Gemma 2's logit soft-capping), else s; dropout
    with probability ``dropout_p`` draws its keep mask from ``seed`` (attention/dropout.py: an int64
    0-d tensor on q's device, None without dropout; read by the kernels, so that a new seed is a new
    value, not a new argument: CUDA graphs and torch.compile take it as data); lse
    is the softmax's, before dropout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: MaskArgs
    scale: float
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: torch.Tensor | None = None

    @property
    def shared_queries(self) -> bool:
        return self.q.shape[0] == 1 and self.k.shape[0] > 1


class AttentionGradArgs(NamedTuple):
    """Backward: (dq, dk, dv) from the forward's arguments, output, lse and the output gradient
    (and, for a float bias that needs one, its gradient [B, H, Lq, Lk] fp32: ``bias_grad``)."""

    grad_out: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    fwd: AttentionArgs


class AttentionLaunch(NamedTuple):
    """The launch decisions the CUDA C++ ops take from the plan (plan.py) as arguments: the forward
    splits the keys into ``splits`` runs of ``keys_per_split`` (flash-decoding; 1 and 0: none), a
    shared-query backward sums dq over ``dq_chunks`` chunks of ``per_chunk`` batch entries (queries
    not shared: B chunks of 1)."""

    splits: int
    keys_per_split: int
    dq_chunks: int
    per_chunk: int


class PlannedAttentionArgs(NamedTuple):
    """The CUDA C++ forward's arguments: the attention's and the plan's launch decisions."""

    fwd: AttentionArgs
    launch: AttentionLaunch


class PlannedAttentionGradArgs(NamedTuple):
    """The CUDA C++ backward's arguments: the gradient's and the plan's launch decisions."""

    grad: AttentionGradArgs
    launch: AttentionLaunch


FWD_RETURNS = "(Tensor, Tensor)"
BWD_RETURNS = "(Tensor, Tensor, Tensor)"


def fwd_fake(a: AttentionArgs, lse_pair: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the forward: out [B, H, Lq, D] stored as [B, Lq, H, D], lse [B, H, Lq] fp32
    (``lse_pair``: [B, H, Lq, 2])."""
    B, _, _, D = a.k.shape
    H, Lq = a.q.shape[1], a.q.shape[2]
    out = a.q.new_empty((B, Lq, H, D)).transpose(1, 2)
    return out, a.q.new_empty((B, H, Lq, 2) if lse_pair else (B, H, Lq), dtype=torch.float32)


def bwd_fake(a: AttentionGradArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs of the backward: dq, dk, dv shaped like q, k, v."""
    f = a.fwd
    return torch.empty_like(f.q), torch.empty_like(f.k), torch.empty_like(f.v)


def bias_grad_fake(a: AttentionGradArgs) -> torch.Tensor:
    """The float bias's gradient before its broadcast is summed: [B, H, Lq, Lk] fp32."""
    f = a.fwd
    return f.q.new_empty((f.k.shape[0], f.q.shape[1], f.q.shape[2], f.k.shape[2]), dtype=torch.float32)


def position_grad_fake(a: AttentionGradArgs) -> torch.Tensor:
    """The position bias's gradient before its broadcast is summed, fp32: T5, the table's shape
    [H, num_buckets]; ALiBi, the slopes' [B, H]."""
    f = a.fwd
    table = f.mask.position_bias
    if f.mask.position_buckets is not None:
        return table.new_empty(table.shape, dtype=torch.float32)
    return table.new_empty((f.k.shape[0], f.q.shape[1]), dtype=torch.float32)


def needs(a: AttentionArgs) -> Needs:
    """What a call asks of a backend (``_dispatch.not_supported_reasons`` reads it against each
    backend's capabilities): its head dim, batch entries and heads (each a grid axis of the
    kernels' launches), a float bias."""
    axes = {"batch": a.k.shape[0], "q heads": a.q.shape[1], "k/v heads": a.k.shape[1]}
    return Needs(a.q.shape[-1], axes, (FLOAT_BIAS,) if a.mask.bias is not None else ())
