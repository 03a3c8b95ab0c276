"""The kernel arguments of the contrastive row passes, declared once (schema order), and their
outputs by name. Every backend takes these tuples; the op schemas (Triton and C++), fake kernels
and launchers derive from them.

A row pass works on "rows" (one side's features) against "columns": the other side's features,
then the negatives. The forward keeps a few statistics per row; the backward recomputes each
logit tile and turns it into dLoss/dlogit: the rows' own direction (softmax over the row) plus,
when the columns are the other direction's rows, that direction's term (softmax over the column).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

KINDS = ("clip", "siglip")


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


def fwd_fake(a: RowPass) -> torch.Tensor:
    return a.rows.new_empty((len(RowStats._fields), a.rows.shape[0]), dtype=torch.float32)


def bwd_fake(g: RowPassGrad) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(g.fwd.rows), g.fwd.rows.new_empty(len(ScaleBiasSums._fields), dtype=torch.float32)
