"""The one autograd function of the gated residual, above the backends."""

from __future__ import annotations

import torch

from vlkernels import _dispatch, _schema
from vlkernels.gated.args import GatedResidualArgs, GatedResidualGradArgs


class GatedResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: str, x, y, gate):
        ctx.backend = backend
        ctx.save_for_backward(y, gate)
        return _dispatch.backends("gated_residual")[backend].forward(GatedResidualArgs(x, y, gate))

    @staticmethod
    @_schema.first_order("gated_residual")
    def backward(ctx, grad_out):
        y, gate = ctx.saved_tensors
        impl = _dispatch.backends("gated_residual")[ctx.backend]
        dy, dgate = impl.backward(GatedResidualGradArgs(grad_out, y, gate))
        return None, grad_out, dy, dgate
