"""The PyTorch backend of the contrastive losses: the row passes in the kernels' arithmetic, a chunk
of rows at a time (at most 2**20 logits at once), so memory stays O(N·D) on any device, and the
loss composed from them (``contrastive/rows.py``)."""

from __future__ import annotations

import torch

from vlkernels import _dispatch
from vlkernels.contrastive import args as A
from vlkernels.contrastive import rows


def _chunk_rows(M, n_cols, q):
    """Rows per chunk: at most 2**20 logits (4 MiB fp32) at a time."""
    return max(1, min(M, 2**20 // max(1, n_cols * q)))


def _sim(r, c):
    """max over queries of r [m, QR, D] · c [n, QC, D] -> (sim [m, n] fp32, arg-max index)."""
    prod = torch.einsum("aqd,bkd->abqk", r.float(), c.float()).flatten(2)
    return prod.max(dim=-1)


def _logits(rows, cols, neg, s, b, i0, i1):
    """(sim, arg-max index, logits) of rows [i0, i1) against [cols ; neg]."""
    sim, arg = _sim(rows[i0:i1], cols)
    parts = [(sim, arg)]
    if neg is not None:
        parts.append(_sim(rows[i0:i1], neg[:, None]))
    sims = torch.cat([p[0] for p in parts], dim=1)
    args = torch.cat([p[1] for p in parts], dim=1)
    return sims, args, s * sims + b


def _positives(i0, i1, row_off, col_off, N, n_cols, device):
    """Float [i1 - i0, n_cols]: 1 where global row index == global column index (main columns)."""
    r = torch.arange(i0, i1, device=device)[:, None] + row_off
    c = torch.arange(n_cols, device=device)[None, :]
    return ((c < N) & (c + col_off == r)).float()


def _forward(a: A.RowPass) -> torch.Tensor:
    rows, cols = a.rows, a.cols
    M, N = rows.shape[0], cols.shape[0]
    neg = a.neg if a.kind == "clip" else None
    K = 0 if neg is None else neg.shape[0]
    out = A.fwd_fake(a)
    st = A.RowStats.of(out)
    s = a.scale.float()
    b = a.bias.float() if a.bias is not None else 0.0
    chunk = _chunk_rows(M, N + K, max(rows.shape[1], cols.shape[1]))
    for i0 in range(0, M, chunk):
        i1 = min(M, i0 + chunk)
        _, _, logit = _logits(rows, cols, neg, s, b, i0, i1)
        pos = _positives(i0, i1, a.row_off, a.col_off, N, logit.shape[1], rows.device)
        if a.kind == "clip":
            st.lse[i0:i1] = torch.logsumexp(logit, dim=1)
            st.pos[i0:i1] = (logit * pos).sum(1)
            st.tot[i0:i1] = logit.sum(1)
            if a.rows_m is not None:
                mlog = s * _logits(a.rows_m, cols, neg, 1.0, 0.0, i0, i1)[0]
                st.lse_m[i0:i1] = torch.logsumexp(mlog, dim=1)
                st.weighted[i0:i1] = (torch.softmax(mlog, dim=1) * logit).sum(1)
            else:
                st.lse_m[i0:i1] = 0.0
                st.weighted[i0:i1] = 0.0
        else:
            eps = pos * 2.0 - 1.0
            st.tot[i0:i1] = torch.nn.functional.softplus(-eps * logit).sum(1)
            for t in (st.lse, st.pos, st.lse_m, st.weighted):
                t[i0:i1] = 0.0
    return out


def _backward(g: A.RowPassGrad) -> tuple[torch.Tensor, torch.Tensor]:
    a = g.fwd
    rows, cols = a.rows, a.cols
    M, QR, _ = rows.shape
    N, QC = cols.shape[0], cols.shape[1]
    neg = a.neg if (a.kind == "clip" and g.own) else None
    K = 0 if neg is None else neg.shape[0]
    s = a.scale.float()
    b = a.bias.float() if a.bias is not None else 0.0
    dr = rows.new_zeros(rows.shape, dtype=torch.float32)
    dsb = rows.new_zeros(len(A.ScaleBiasSums._fields), dtype=torch.float32)
    sums = A.ScaleBiasSums.of(dsb)
    chunk = _chunk_rows(M, N + K, max(QR, QC))
    for i0 in range(0, M, chunk):
        i1 = min(M, i0 + chunk)
        sim, arg, logit = _logits(rows, cols, neg, s, b, i0, i1)
        pos = _positives(i0, i1, a.row_off, a.col_off, N, logit.shape[1], rows.device)
        grad = torch.zeros_like(logit)  # dLoss/dlogit
        if a.kind == "clip":
            if g.own:
                p = torch.exp(logit - g.lse_row[i0:i1, None])
                if a.rows_m is not None:
                    mlog = s * _logits(a.rows_m, cols, neg, 1.0, 0.0, i0, i1)[0]
                    target = g.alpha * torch.exp(mlog - g.lsem_row[i0:i1, None]) + (1 - g.alpha) * pos
                else:
                    target = (1 - g.smooth) * pos + g.smooth / g.n_cls_own
                grad += g.w_own * (p - target)
            if g.other:
                q = torch.exp(logit[:, :N] - g.lse_col[None, :])
                grad[:, :N] += g.w_other * (q - ((1 - g.smooth) * pos[:, :N] + g.smooth / g.n_cls_other))
        else:
            eps = pos * 2.0 - 1.0
            grad = g.w_own * (-eps * torch.sigmoid(-eps * logit))
        sums.ds_cols.add_((grad[:, :N] * sim[:, :N]).sum())
        sums.db_cols.add_(grad[:, :N].sum())
        sums.ds_neg.add_((grad[:, N:] * sim[:, N:]).sum())
        sums.db_neg.add_(grad[:, N:].sum())
        if QR > 1:  # gradient to the arg-max query of each (row, column) pair
            c = cols[:, 0].float() if neg is None else torch.cat([cols[:, 0], neg]).float()
            for qr in range(QR):
                dr[i0:i1, qr] = s * (grad * (arg == qr)) @ c
        else:
            for qc in range(QC):
                c = cols[:, qc].float()
                gq = grad[:, :N] * (arg[:, :N] == qc) if QC > 1 else grad[:, :N]
                dr[i0:i1, 0] += s * gq @ c
            if K:
                dr[i0:i1, 0] += s * grad[:, N:] @ neg.float()
    return dr.to(rows.dtype), dsb


ROWS = _dispatch.Backend("torch", _forward, _backward)
BACKEND = _dispatch.Backend(
    "torch", lambda a: rows.loss_forward(ROWS, a), lambda g: rows.loss_backward(ROWS, g)
)
