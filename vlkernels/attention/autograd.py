"""The one autograd function of attention, above the backends: the forward asks the chosen
backend for (out, lse), the backward asks the same backend for (dq, dk, dv)."""

from __future__ import annotations

import torch

from vlkernels import _dispatch, _schema
from vlkernels.attention.args import AttentionArgs, AttentionGradArgs


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: str, q, k, v, mask, scale: float):
        impl = _dispatch.backends("attention")[backend]
        args = AttentionArgs(q, k, v, mask, scale)
        with _dispatch.no_autocast(q):
            out, lse = impl.forward(args)
        ctx.mark_non_differentiable(lse)
        ctx.backend = backend
        _schema.stash(ctx, AttentionGradArgs(None, out, lse, args))
        return out, lse

    @staticmethod
    @_schema.first_order("attention")
    def backward(ctx, grad_out, grad_lse):
        args = _schema.unstash(ctx)._replace(grad_out=grad_out)
        with _dispatch.no_autocast(grad_out):
            dq, dk, dv = _dispatch.backends("attention")[ctx.backend].backward(args)
        return None, dq, dk, dv, None, None
