"""The loss on one device composed from row passes (``contrastive.args.RowPass``): what every
backend runs for momentum distillation, and what the CUDA C++ and PyTorch backends run for every
loss. ``rows`` is a backend of the ``contrastive_rows`` family."""

from __future__ import annotations

import torch

from vlkernels.contrastive.args import LossArgs, LossGradArgs, RowPass, RowPassGrad, RowStats, ScaleBiasSums


def row_losses(st: RowStats, smooth, n_cls, alpha=0.0, distill=False):
    """Per-row cross-entropy from the statistics (label smoothing over n_cls, or distillation)."""
    if distill:
        return st.lse - alpha * st.weighted - (1 - alpha) * st.pos
    return st.lse - (1 - smooth) * st.pos - smooth * st.tot / n_cls


def clip_loss(st_i, st_t, smooth, n_cls_i, n_cls_t, alpha=0.0, distill=False):
    """½ (mean image-to-text + mean text-to-image cross-entropy) from both directions' [5, M] statistics."""
    return 0.5 * (
        row_losses(RowStats.of(st_i), smooth, n_cls_i, alpha, distill).mean()
        + row_losses(RowStats.of(st_t), smooth, n_cls_t, alpha, distill).mean()
    )


def as3(t):
    """[N, D] features as [N, 1, D] (one query each)."""
    return None if t is None else (t if t.dim() == 3 else t[:, None])


def scale_grads(ds, db, scale, bias):
    """The scale's and bias's gradients in their dtypes and shapes (the bias's: like the scale when
    there is no bias)."""
    like = bias if bias is not None else scale
    return ds.to(scale.dtype).reshape(scale.shape), db.to(like.dtype).reshape(like.shape)


def _counts(a: LossArgs):
    kx, ky = (0 if t is None else t.shape[0] for t in (a.neg_x, a.neg_y))
    return a.x.shape[0], kx, ky


def loss_forward(rows, a: LossArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats [2, 5, N]): both directions' row passes."""
    x3, y3, xm3, ym3 = as3(a.x), as3(a.y), as3(a.xm), as3(a.ym)
    N, kx, ky = _counts(a)
    if a.kind == "siglip":
        st = rows.forward(RowPass(x3, y3, a.scale, a.bias, kind="siglip"))
        return RowStats.of(st).tot.sum() / N, torch.stack([st, st])
    distill = a.xm is not None
    st_i = rows.forward(RowPass(x3, ym3 if distill else y3, a.scale, a.bias, neg=a.neg_y, rows_m=xm3))
    st_t = rows.forward(RowPass(y3, xm3 if distill else x3, a.scale, a.bias, neg=a.neg_x, rows_m=ym3))
    loss = clip_loss(st_i, st_t, a.smooth, N + ky, N + kx, a.alpha, distill)
    return loss, torch.stack([st_i, st_t])


def loss_backward(rows, g: LossGradArgs) -> tuple[torch.Tensor, ...]:
    """(dx, dy, d_scale, d_bias): two backward row passes."""
    a = g.fwd
    x3, y3, xm3, ym3 = as3(a.x), as3(a.y), as3(a.xm), as3(a.ym)
    N, kx, ky = _counts(a)
    st_i, st_t = RowStats.of(g.stats[0]), RowStats.of(g.stats[1])

    def grad(fwd, **kw):
        dr, sums = rows.backward(RowPassGrad(fwd, **kw))
        return dr, ScaleBiasSums.of(sums)

    if a.kind == "siglip":
        w = 1.0 / N
        dx, s1 = grad(RowPass(x3, y3, a.scale, a.bias, kind="siglip"), lse_row=st_i.lse, w_own=w)
        dy, _ = grad(RowPass(y3, x3, a.scale, a.bias, kind="siglip"), lse_row=st_i.lse, w_own=w)
        ds, db = s1.ds_cols, s1.db_cols
    elif a.xm is not None:  # distillation: columns are momentum features, no "other" term
        w = 0.5 / N
        img = RowPass(x3, ym3, a.scale, a.bias, neg=a.neg_y, rows_m=xm3)
        txt = RowPass(y3, xm3, a.scale, a.bias, neg=a.neg_x, rows_m=ym3)
        dx, s1 = grad(img, lse_row=st_i.lse, lsem_row=st_i.lse_m, w_own=w, n_cls_own=N + ky, alpha=a.alpha)
        dy, s2 = grad(txt, lse_row=st_t.lse, lsem_row=st_t.lse_m, w_own=w, n_cls_own=N + kx, alpha=a.alpha)
        ds = s1.ds_cols + s1.ds_neg + s2.ds_cols + s2.ds_neg
        db = s1.db_cols + s1.db_neg + s2.db_cols + s2.db_neg
    else:  # the N x N block carries both directions' terms: count it once for the scale
        w = 0.5 / N
        both = dict(other=True, w_own=w, w_other=w, smooth=a.smooth)
        img, txt = (
            RowPass(x3, y3, a.scale, a.bias, neg=a.neg_y),
            RowPass(y3, x3, a.scale, a.bias, neg=a.neg_x),
        )
        dx, s1 = grad(img, lse_row=st_i.lse, lse_col=st_t.lse, n_cls_own=N + ky, n_cls_other=N + kx, **both)
        dy, s2 = grad(txt, lse_row=st_t.lse, lse_col=st_i.lse, n_cls_own=N + kx, n_cls_other=N + ky, **both)
        ds, db = s1.ds_cols + s1.ds_neg + s2.ds_neg, s1.db_cols + s1.db_neg + s2.db_neg
    gout = g.grad_loss
    d_scale, d_bias = scale_grads(ds * gout, db * gout, a.scale, a.bias)
    return (
        (dx * gout.to(dx.dtype)).reshape(a.x.shape),
        (dy * gout.to(dy.dtype)).reshape(a.y.shape),
        d_scale,
        d_bias,
    )
