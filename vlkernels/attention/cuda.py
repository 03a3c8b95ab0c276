"""The CUDA C++ backend of attention: csrc/attention.cu through ``vlkernels._C``, as the ops
``vlkernels::cuda_attention_fwd`` / ``_bwd`` / ``_position_grad`` (schemas derived from
``attention.args``). The forward op is the backend's entry point: its autograd kernel (C++)
records the backward ops, so a call runs no Python between the op and its kernels, forward or
backward. Every mask, position biases, shared queries, grouped keys on mma.sync tensor cores;
fp16, bf16, fp32; CUDA tensors."""

from __future__ import annotations

import dataclasses

import torch

from vlkernels import _dispatch, _extension, _schema
from vlkernels.attention import args as A
from vlkernels.attention import plan as P
from vlkernels.masks import MaskArgs

_fwd_op = _extension.declare(
    "cuda_attention_fwd", A.PlannedAttentionArgs, A.FWD_RETURNS, lambda p: A.fwd_fake(p.fwd)
)
# called by the forward's autograd kernel (C++) only: the backward, a dense mask's row spans
# (int32 [B, Lq] lo, hi; computed once, for the forward and the backward) and the position bias's
# gradient
_extension.declare(
    "cuda_attention_bwd", A.PlannedAttentionGradArgs, A.BWD_RETURNS, lambda p: A.bwd_fake(p.grad)
)
_extension.declare(
    "cuda_attention_mask_span",
    A.PlannedAttentionArgs,
    "(Tensor, Tensor)",
    lambda p: tuple(p.fwd.q.new_empty((p.fwd.k.shape[0], p.fwd.q.shape[2]), dtype=torch.int32) for _ in "lh"),
)
_extension.declare(
    "cuda_attention_position_grad",
    A.PlannedAttentionGradArgs,
    "Tensor",
    lambda p: A.position_grad_fake(p.grad),
)


def launch(a: A.AttentionArgs) -> A.AttentionLaunch:
    """The plan's decisions for these kernels (plan.py's rules; they give each query head its own
    programs, so flash-decoding's split is that of a group of one)."""
    B, _, Lk, _ = a.k.shape
    H, Lq = a.q.shape[1], a.q.shape[2]
    splits, per_split = P.decode_splits(B, H, Lq, Lk, a.q.device)
    chunks = P.dq_chunks(B, H, Lq, a.shared_queries, a.q.device)
    per_chunk = -(-B // chunks)
    return A.AttentionLaunch(splits, per_split if splits > 1 else 0, -(-B // per_chunk), per_chunk)


_INT32 = torch.iinfo(torch.int32)
_TENSORS = tuple(name for name, kind in _schema.fields(MaskArgs) if kind.startswith("Tensor"))


def _int32(m: MaskArgs) -> MaskArgs:
    """The mask with its int64 metadata as int32 (what csrc/attention.cu reads), clamped to the
    int32 range: a length past it still means "every key", never a wrapped value."""
    narrowed = {}
    for f in _TENSORS:
        v = getattr(m, f)
        if v is not None and v.dtype == torch.int64:
            narrowed[f] = v.clamp(_INT32.min, _INT32.max).int()
    return m._replace(**narrowed) if narrowed else m


def _forward(a: A.AttentionArgs):
    """(out, lse), the backward recorded by the op (csrc/bindings.cpp: AttentionFn)."""
    return _fwd_op(A.PlannedAttentionArgs(a._replace(mask=_int32(a.mask)), launch(a)))


CAPABILITIES = dataclasses.replace(
    _dispatch.EXTENSION, head_dims=(16, 256, 8), max_grid_axis=P.GRID_AXIS_MAX, without=(A.FLOAT_BIAS,)
)
BACKEND = _dispatch.Backend("cuda", _forward, None, CAPABILITIES, records_backward=True)
