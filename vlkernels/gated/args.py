"""The kernel arguments of the tanh-gated residual, declared once (schema order)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class GatedResidualArgs(NamedTuple):
    """Forward: x + tanh(gate) * y."""

    x: torch.Tensor  # any shape
    y: torch.Tensor  # like x
    gate: torch.Tensor  # one element


class GatedResidualGradArgs(NamedTuple):
    """Backward: (dy, dgate) from the output gradient (dx is the output gradient itself)."""

    grad_out: torch.Tensor  # like y
    y: torch.Tensor
    gate: torch.Tensor


FWD_RETURNS = "Tensor"
BWD_RETURNS = "(Tensor, Tensor)"


def fwd_fake(a: GatedResidualArgs) -> torch.Tensor:
    return torch.empty(a.x.shape, dtype=a.x.dtype, device=a.x.device)


def bwd_fake(g: GatedResidualGradArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(g.y.shape, dtype=g.y.dtype, device=g.y.device), torch.empty_like(g.gate)
