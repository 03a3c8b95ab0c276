"""The PyTorch backend of the contrastive losses, a chunk of rows at a time so that memory stays
O(N·D) on any device. CLIP and SigLIP on [N, D] features without queues or distillation: one pass
over the logits forward (both directions' statistics, the columns' log-sum-exps merged online) and
one backward (each logit tile recomputed once, both softmaxes at once). Everything else: the row
passes in the kernels' arithmetic, composed by ``contrastive/rows.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _fused(a: A.LossArgs) -> bool:
    """The losses the one-pass path serves."""
    return a.x.dim() == 2 and a.xm is None and a.neg_x is None and a.neg_y is None


def _tiles(a: A.LossArgs):
    """(i0, x rows [i0, i1), y, similarities and logits [i1 - i0, N] of those rows) per chunk, fp32."""
    x, y = a.x.float(), a.y.float()
    s = a.scale.float()
    b = a.bias.float() if a.bias is not None else 0.0
    N = x.shape[0]
    chunk = max(1, min(N, 2**22 // N))  # at most 2**22 logits (16 MiB fp32) at a time
    for i0 in range(0, N, chunk):
        xc = x[i0 : i0 + chunk]
        sim = xc @ y.T
        yield i0, xc, y, sim, s * sim + b


def _diag(t: torch.Tensor, i0: int) -> torch.Tensor:
    """The positives of a chunk of rows starting at row i0: t[r, i0 + r]."""
    return t.diagonal(offset=i0)


def _fused_forward(a: A.LossArgs) -> tuple[torch.Tensor, torch.Tensor]:
    N = a.x.shape[0]
    stats = a.y.new_zeros((2, len(A.RowStats._fields), N), dtype=torch.float32)
    st_i, st_t = A.RowStats.of(stats[0]), A.RowStats.of(stats[1])
    m_col = torch.full((N,), float("-inf"), device=a.y.device)  # the columns' running max
    e_col = torch.zeros(N, device=a.y.device)  # and sum of exp(logit - max)
    for i0, _, _, _, logit in _tiles(a):
        i1 = i0 + logit.shape[0]
        pos = _diag(logit, i0)
        if a.kind == "siglip":  # -log σ(+l) on the positive, -log σ(-l) elsewhere
            st_i.tot[i0:i1] = F.softplus(logit).sum(1) - pos
            continue
        st_i.lse[i0:i1] = torch.logsumexp(logit, dim=1)
        st_i.pos[i0:i1] = pos
        if a.smooth:  # the sums of logits serve label smoothing only
            st_i.tot[i0:i1] = logit.sum(1)
            st_t.tot.add_(logit.sum(0))
        m_new = torch.maximum(m_col, logit.amax(0))
        e_col = e_col * torch.exp(m_col - m_new) + torch.exp(logit - m_new).sum(0)
        m_col = m_new
    if a.kind == "siglip":
        stats[1] = stats[0]
        return st_i.tot.sum() / N, stats
    st_t.lse.copy_(m_col + torch.log(e_col))
    st_t.pos.copy_(st_i.pos)
    return rows.clip_loss(stats[0], stats[1], a.smooth, N, N), stats


def _fused_backward(g: A.LossGradArgs) -> tuple[torch.Tensor, ...]:
    a = g.fwd
    N = a.x.shape[0]
    st_i, st_t = A.RowStats.of(g.stats[0]), A.RowStats.of(g.stats[1])
    s = a.scale.float()
    dx = torch.empty(a.x.shape, dtype=torch.float32, device=a.x.device)
    dy = torch.zeros(a.y.shape, dtype=torch.float32, device=a.y.device)
    ds = db = torch.zeros((), device=a.x.device)
    for i0, xc, y, _, logit in _tiles(a):
        i1 = i0 + logit.shape[0]
        if a.kind == "siglip":  # d/dl of -log σ(±l) / N: σ(l) off the positives, σ(l) - 1 on them
            grad = torch.sigmoid(logit).div_(N)
            _diag(grad, i0).sub_(1.0 / N)
        else:  # ½ (softmax over the row + softmax over the column) - the smoothed one-hot, / N
            w = 0.5 / N
            grad = torch.exp(logit - st_i.lse[i0:i1, None]).add_(torch.exp(logit - st_t.lse[None, :]))
            grad.sub_(2 * a.smooth / N).mul_(w)
            _diag(grad, i0).sub_(2 * w * (1 - a.smooth))
        dx[i0:i1] = grad @ y
        ds = ds + (dx[i0:i1] * xc).sum()  # Σ grad ∘ sim, as (grad y) · x: O(n·D), not O(n·N)
        if a.bias is not None:
            db = db + grad.sum()
        dy.addmm_(grad.T, xc)
    dx.mul_(s)
    dy.mul_(s)
    gout = g.grad_loss
    d_scale, d_bias = rows.scale_grads(ds * gout, db * gout, a.scale, a.bias)
    return (dx * gout).to(a.x.dtype), (dy * gout).to(a.y.dtype), d_scale, d_bias


def _loss_forward(a: A.LossArgs):
    return _fused_forward(a) if _fused(a) else rows.loss_forward(ROWS, a)


def _loss_backward(g: A.LossGradArgs):
    return _fused_backward(g) if _fused(g.fwd) else rows.loss_backward(ROWS, g)


ROWS = _dispatch.Backend("torch", _forward, _backward, _dispatch.TORCH)
BACKEND = _dispatch.Backend("torch", _loss_forward, _loss_backward, _dispatch.TORCH)
