"""Eager PyTorch references: the ``"torch"`` backend and the oracle the kernels are tested against.

They materialise everything (dense masks, full score matrices) and are written from the
definitions, independently of the kernels' mask lowering.
"""

from __future__ import annotations

import math

import torch

from vlkernels.masks import Mask


def attention_ref(q, k, v, mask=None, scale=None, upcast=False):
    """Masked attention, eager. q [Bq, H, Lq, D]; k, v [B, Hk, Lk, D] -> [B, H, Lq, D].

    ``mask``: None, bool broadcastable to [B, H, Lq, Lk] (True = may attend) or a ``Mask``.
    Rows with no allowed key give 0 and pass 0 gradient. ``upcast`` computes in float64.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    B, Hk, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if H != Hk:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # q broadcasts over B when Bq == 1
    if mask is not None:
        allowed = mask.to_dense(B, Lq, Lk) if isinstance(mask, Mask) else mask
        allowed = allowed.expand(B, H, Lq, Lk)
        any_allowed = allowed.any(dim=-1, keepdim=True)
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(~any_allowed, 0.0)
        p = torch.softmax(s, dim=-1) * any_allowed
    else:
        p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, v)
    return out if upcast else out.to(dtype)


def gated_residual_ref(x, y, gate):
    """x + tanh(gate) * y, eager; ``gate`` a one-element tensor."""
    return (x + torch.tanh(gate) * y).to(x.dtype)
