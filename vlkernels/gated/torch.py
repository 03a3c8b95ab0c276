"""The PyTorch backend of the tanh-gated residual (fp32 arithmetic, any device)."""

from __future__ import annotations

import torch

from vlkernels import _dispatch
from vlkernels.gated import args as A


def _forward(a: A.GatedResidualArgs) -> torch.Tensor:
    t = torch.tanh(a.gate.float()).reshape(())
    return (a.x.float() + t * a.y.float()).to(a.x.dtype)


def _backward(g: A.GatedResidualGradArgs) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(g.gate.float()).reshape(())
    do = g.grad_out.float()
    dgate = (do * g.y.float()).sum() * (1 - t * t)
    return (t * do).to(g.y.dtype), dgate.to(g.gate.dtype).reshape(g.gate.shape)


BACKEND = _dispatch.Backend("torch", _forward, _backward)
