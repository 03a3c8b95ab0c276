"""The public ``gated_residual``: input checks, backend choice, autograd."""

from __future__ import annotations

import torch

from vlkernels import _dispatch
from vlkernels.gated.args import GatedResidualArgs
from vlkernels.gated.autograd import GatedResidualFunction


def gated_residual(x, y, gate, *, backend=None):
    """``x + tanh(gate) * y`` (Flamingo's gated residual). x, y [...] same shape; gate: one element.
    The result has the shape that expression broadcasts to (x's, with the gate's extra leading
    1-dims). fp16, bf16, fp32 on every backend; float64 on the torch backend (in float64)."""
    for name, t in (("x", x), ("y", y), ("gate", gate)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gated_residual: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"gated_residual: {name} must be floating point, got {t.dtype}")
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(
            f"gated_residual: x and y must match, got {list(x.shape)} {x.dtype} and {list(y.shape)} {y.dtype}"
        )
    if gate.numel() != 1:
        raise ValueError(f"gated_residual: gate must have one element, got shape {list(gate.shape)}")
    if not (x.device == y.device == gate.device):
        raise ValueError(
            f"gated_residual: x, y, gate must be on one device, got {x.device}, {y.device}, {gate.device}"
        )
    chosen = _dispatch.choose("gated_residual", backend, GatedResidualArgs(x, y, gate))
    out = GatedResidualFunction.apply(chosen.name, x, y, gate)
    shape = torch.broadcast_shapes(x.shape, gate.shape)  # what x + tanh(gate) * y gives
    return out if out.shape == shape else out.view(shape)
