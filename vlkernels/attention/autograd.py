"""The one autograd function of attention, above the backends: the forward asks the chosen
backend for (out, lse), the backward asks the same backend for (dq, dk, dv) and, when a float bias
needs one, for its gradient, and when a position bias's table or slopes need one, for theirs."""

from __future__ import annotations

import torch

from vlkernels import _dispatch, _schema
from vlkernels.attention.args import AttentionArgs, AttentionGradArgs


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, backend: str, q, k, v, mask, scale: float, softcap: float, dropout_p: float, seed, bias, position
    ):
        """``bias`` and ``position`` are ``mask.bias`` and ``mask.position_bias`` again, as inputs
        autograd tracks."""
        impl = _dispatch.backends("attention")[backend]
        args = AttentionArgs(q, k, v, mask, scale, softcap, dropout_p, seed)
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
        impl = _dispatch.backends("attention")[ctx.backend]
        dbias = dposition = None
        with _dispatch.no_autocast(grad_out):
            dq, dk, dv = impl.backward(args)
            if ctx.needs_input_grad[9]:
                dbias = _sum_to(impl.ops["bias_grad"](args), args.fwd.mask.bias)
            if ctx.needs_input_grad[10]:
                position = args.fwd.mask.position_bias
                dposition = _sum_to(impl.ops["position_grad"](args), position)
        return None, dq, dk, dv, None, None, None, None, None, dbias, dposition


def _sum_to(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` [B, H, Lq, Lk] summed over the dims that ``like`` broadcasts, in ``like``'s shape
    and dtype."""
    lead = full.dim() - like.dim()
    dims = [i for i in range(full.dim()) if i < lead or (like.shape[i - lead] == 1 < full.shape[i])]
    return (full.sum(dims, keepdim=True) if dims else full).reshape(like.shape).to(like.dtype)
