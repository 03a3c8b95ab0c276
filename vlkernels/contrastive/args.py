"""The kernel arguments of the contrastive losses, declared once (schema order), and their outputs
by name. Every backend takes these tuples; the op schemas (Triton and C++), fake kernels and
launchers derive from them.

Two levels:
- ``LossArgs`` / ``LossGradArgs``: the whole loss on one device, forward (the loss and each row's
  statistics) and backward (every gradient). The Triton backend runs them as fused kernels; every
  backend can compose them from row passes (``contrastive/rows.py``).
- ``RowPass`` / ``RowPassGrad``: "rows" (one side's features) against "columns" (the other
  side's features, then the negatives). The forward keeps a few statistics per row; the backward
  recomputes each logit tile and turns it into dLoss/dlogit: the rows' own direction (softmax over
  the row) plus, when the columns are the other direction's rows, that direction's term (softmax
  over the column). The ring across ranks and momentum distillation are built from them.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch


class LossKind(enum.IntEnum):
    """The losses, as the kernels take them (csrc/vlk.h's ``LossKind`` has the same values)."""

    CLIP = 0  # InfoNCE over both directions
    SIGLIP = 1  # pairwise sigmoid


KINDS = tuple(kind.name.lower() for kind in LossKind)  # the names contrastive_loss takes


class RowPass(NamedTuple):
    """Forward: the statistics of ``rows`` against the columns [cols ; neg]."""

    rows: torch.Tensor  # [M, QR, D]
    cols: torch.Tensor  # [N, QC, D]; QR or QC is 1 (similarity: max over the queries)
    scale: torch.Tensor  # one element, already exponentiated
    bias: torch.Tensor | None = None  # one element
    neg: torch.Tensor | None = None  # [K, D] extra columns, no positives among them
    rows_m: torch.Tensor | None = None  # momentum features like rows (distillation: targets)
    kind: str = "clip"  # one of KINDS
    row_off: int = 0  # global index of rows[0]: row i's positive is column row_off + i - col_off
    col_off: int = 0  # global index of cols[0]


class RowPassGrad(NamedTuple):
    """Backward: dLoss/drows and the per-row sums for the scale and bias gradients."""

    fwd: RowPass
    lse_row: torch.Tensor  # [M] fp32: the rows' log-sum-exp (RowStats.lse)
    lsem_row: torch.Tensor | None = None  # [M] fp32: momentum log-sum-exp (distillation)
    lse_col: torch.Tensor | None = None  # [N] fp32: the columns' log-sum-exp (other=True)
    own: bool = True  # add the rows' own direction's term
    other: bool = False  # add the other direction's term (columns only)
    w_own: float = 0.0  # weight of each own / other term (1/(2N) for CLIP, 1/N for SigLIP)
    w_other: float = 0.0
    smooth: float = 0.0  # label smoothing
    n_cls_own: int = 1  # classes of each direction (label smoothing spreads over them)
    n_cls_other: int = 1
    alpha: float = 0.0  # distillation: targets alpha * momentum softmax + (1 - alpha) * one-hot


FWD_RETURNS = "Tensor"
BWD_RETURNS = "(Tensor, Tensor)"


class LossArgs(NamedTuple):
    """Forward of the loss on one device: (loss [] fp32, stats [2, 5, N] fp32: RowStats of the
    image rows and of the text rows)."""

    x: torch.Tensor  # image features [N, D], or [N, Q, D] (similarity: max over the Q queries)
    y: torch.Tensor  # text features [N, D]
    scale: torch.Tensor  # one element, already exponentiated
    bias: torch.Tensor | None = None  # one element
    neg_x: torch.Tensor | None = None  # [Kx, D] extra columns of the text rows (image queue)
    neg_y: torch.Tensor | None = None  # [Ky, D] extra columns of the image rows (text queue)
    xm: torch.Tensor | None = None  # distillation: momentum image features like x
    ym: torch.Tensor | None = None  # distillation: momentum text features like y
    kind: str = "clip"  # one of KINDS
    smooth: float = 0.0  # label smoothing
    alpha: float = 0.0  # distillation weight


class LossGradArgs(NamedTuple):
    """Backward of the loss: (dx, dy, d_scale, d_bias) shaped like x, y, scale and bias (or scale
    when there is no bias)."""

    grad_loss: torch.Tensor  # [] the loss's gradient
    stats: torch.Tensor  # [2, 5, N] from the forward
    fwd: LossArgs


LOSS_FWD_RETURNS = "(Tensor, Tensor)"
LOSS_BWD_RETURNS = "(Tensor, Tensor, Tensor, Tensor)"


class RowStats(NamedTuple):
    """The forward's output [5, M] fp32, by name."""

    lse: torch.Tensor  # log-sum-exp of the row's logits (clip)
    pos: torch.Tensor  # the positive logit (clip)
    tot: torch.Tensor  # clip: sum of the logits; siglip: sum of -log sigmoid(±logit)
    lse_m: torch.Tensor  # distillation: log-sum-exp of the momentum logits
    weighted: torch.Tensor  # distillation: logits weighted by the momentum softmax

    @classmethod
    def of(cls, t: torch.Tensor) -> RowStats:
        return cls(*t.unbind(0))


class ScaleBiasSums(NamedTuple):
    """The backward's second output [4] fp32, by name: sums of dLoss/dlogit · similarity (for the
    scale) and of dLoss/dlogit (for the bias), over the columns and over the negatives."""

    ds_cols: torch.Tensor
    db_cols: torch.Tensor
    ds_neg: torch.Tensor
    db_neg: torch.Tensor

    @classmethod
    def of(cls, t: torch.Tensor) -> ScaleBiasSums:
        return cls(*t.unbind(0))


def loss_fwd_fake(a: LossArgs) -> tuple[torch.Tensor, torch.Tensor]:
    stats = a.y.new_empty((2, len(RowStats._fields), a.y.shape[0]), dtype=torch.float32)
    return a.y.new_empty((), dtype=torch.float32), stats


def loss_bwd_fake(g: LossGradArgs) -> tuple[torch.Tensor, ...]:
    a = g.fwd
    bias = a.bias if a.bias is not None else a.scale
    return torch.empty_like(a.x), torch.empty_like(a.y), torch.empty_like(a.scale), torch.empty_like(bias)


def fwd_fake(a: RowPass) -> torch.Tensor:
    return a.rows.new_empty((len(RowStats._fields), a.rows.shape[0]), dtype=torch.float32)


def bwd_fake(g: RowPassGrad) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(g.fwd.rows), g.fwd.rows.new_empty(len(ScaleBiasSums._fields), dtype=torch.float32)
