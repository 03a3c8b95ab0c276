"""The PyTorch backend of the tanh-gated residual (fp32 arithmetic, float64 for float64 inputs;
any device)."""

from __future__ import annotations

import dataclasses

import torch

from vlkernels import _dispatch
from vlkernels.gated import args as A


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _forward(a: A.GatedResidualArgs) -> torch.Tensor:
    t = torch.tanh(_acc(a.gate)).reshape(())
    return (_acc(a.x) + t * _acc(a.y)).to(a.x.dtype)


def _backward(g: A.GatedResidualGradArgs) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(_acc(g.gate)).reshape(())
    do = _acc(g.grad_out)
    dgate = (do * _acc(g.y)).sum() * (1 - t * t)
    return (t * do).to(g.y.dtype), dgate.to(g.gate.dtype).reshape(g.gate.shape)


BACKEND = _dispatch.Backend(
    "torch",
    _forward,
    _backward,
    dataclasses.replace(_dispatch.TORCH, dtypes=(*_dispatch.FLOATS, torch.float64)),
)
