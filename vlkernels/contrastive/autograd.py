"""The contrastive loss from row passes, above the backends: ``ContrastiveLoss`` on one device and
``RingContrastiveLoss`` across the ranks of a process group. Both ask the chosen backend for the
row passes of ``contrastive.args`` and turn the per-row statistics into the loss."""

from __future__ import annotations

import torch

from vlkernels import _dispatch
from vlkernels.contrastive.args import RowPass, RowPassGrad, RowStats, ScaleBiasSums


def _backend(name: str):
    return _dispatch.backends("contrastive")[name]


def _grad(impl, fwd: RowPass, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """dLoss/drows and the scale/bias sums [4] (ScaleBiasSums) of one backward row pass."""
    return impl.backward(RowPassGrad(fwd, **kw))


def _row_losses(st: RowStats, smooth, n_cls, alpha, distill):
    """Per-row cross-entropy from the statistics (label smoothing over n_cls, or distillation)."""
    if distill:
        return st.lse - alpha * st.weighted - (1 - alpha) * st.pos
    return st.lse - (1 - smooth) * st.pos - smooth * st.tot / n_cls


def _clip_loss(st_i, st_t, smooth, n_cls_i, n_cls_t, alpha=0.0, distill=False):
    """½ (mean image-to-text + mean text-to-image cross-entropy) from both directions' [5, M] statistics."""
    return 0.5 * (
        _row_losses(RowStats.of(st_i), smooth, n_cls_i, alpha, distill).mean()
        + _row_losses(RowStats.of(st_t), smooth, n_cls_t, alpha, distill).mean()
    )


def _as3(t):
    return None if t is None else (t if t.dim() == 3 else t[:, None])


def _scale_grads(ds, db, scale, bias):
    d_scale = ds.to(scale.dtype).reshape(scale.shape)
    d_bias = None if bias is None else db.to(bias.dtype).reshape(bias.shape)
    return d_scale, d_bias


class ContrastiveLoss(torch.autograd.Function):
    """Loss on one device: both directions' row passes forward, two fused row passes backward."""

    @staticmethod
    def forward(ctx, backend, x, y, scale, bias, neg_x, neg_y, xm, ym, kind, smooth, alpha):
        impl = _backend(backend)
        x3, y3, xm3, ym3 = _as3(x), _as3(y), _as3(xm), _as3(ym)
        N = x.shape[0]
        distill = xm is not None
        if kind == "siglip":
            st = impl.forward(RowPass(x3, y3, scale, bias, kind="siglip"))
            loss = RowStats.of(st).tot.sum() / N
            ctx.save_for_backward(x3, y3, scale, bias, st)
        else:
            kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
            st_i = impl.forward(RowPass(x3, ym3 if distill else y3, scale, bias, neg=neg_y, rows_m=xm3))
            st_t = impl.forward(RowPass(y3, xm3 if distill else x3, scale, bias, neg=neg_x, rows_m=ym3))
            loss = _clip_loss(st_i, st_t, smooth, N + ky, N + kx, alpha, distill)
            ctx.save_for_backward(x3, y3, scale, bias, neg_x, neg_y, xm3, ym3, st_i, st_t)
        ctx.conf = (kind, smooth, alpha, backend, x.shape, y.shape)
        return loss

    @staticmethod
    def backward(ctx, gout):
        kind, smooth, alpha, backend, x_shape, y_shape = ctx.conf
        impl = _backend(backend)
        if kind == "siglip":
            x3, y3, scale, bias, st = ctx.saved_tensors
            lse, w = RowStats.of(st).lse, 1.0 / x3.shape[0]
            dx, sums = _grad(impl, RowPass(x3, y3, scale, bias, kind="siglip"), lse_row=lse, w_own=w)
            dy, _ = _grad(impl, RowPass(y3, x3, scale, bias, kind="siglip"), lse_row=lse, w_own=w)
            sums = ScaleBiasSums.of(sums)
            ds, db = sums.ds_cols, sums.db_cols
        else:
            x3, y3, scale, bias, neg_x, neg_y, xm3, ym3, st_i, st_t = ctx.saved_tensors
            st_i, st_t = RowStats.of(st_i), RowStats.of(st_t)
            N = x3.shape[0]
            kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
            w = 0.5 / N
            if xm3 is not None:  # distillation: columns are momentum features, no "other" term
                img = RowPass(x3, ym3, scale, bias, neg=neg_y, rows_m=xm3)
                txt = RowPass(y3, xm3, scale, bias, neg=neg_x, rows_m=ym3)
                dx, s1 = _grad(
                    impl, img, lse_row=st_i.lse, lsem_row=st_i.lse_m, w_own=w, n_cls_own=N + ky, alpha=alpha
                )
                dy, s2 = _grad(
                    impl, txt, lse_row=st_t.lse, lsem_row=st_t.lse_m, w_own=w, n_cls_own=N + kx, alpha=alpha
                )
                s1, s2 = ScaleBiasSums.of(s1), ScaleBiasSums.of(s2)
                ds = s1.ds_cols + s1.ds_neg + s2.ds_cols + s2.ds_neg
                db = s1.db_cols + s1.db_neg + s2.db_cols + s2.db_neg
            else:  # the N x N block carries both directions' terms: count it once for the scale
                both = dict(other=True, w_own=w, w_other=w, smooth=smooth)
                dx, s1 = _grad(
                    impl,
                    RowPass(x3, y3, scale, bias, neg=neg_y),
                    lse_row=st_i.lse,
                    lse_col=st_t.lse,
                    n_cls_own=N + ky,
                    n_cls_other=N + kx,
                    **both,
                )
                dy, s2 = _grad(
                    impl,
                    RowPass(y3, x3, scale, bias, neg=neg_x),
                    lse_row=st_t.lse,
                    lse_col=st_i.lse,
                    n_cls_own=N + kx,
                    n_cls_other=N + ky,
                    **both,
                )
                s1, s2 = ScaleBiasSums.of(s1), ScaleBiasSums.of(s2)
                ds, db = s1.ds_cols + s1.ds_neg + s2.ds_neg, s1.db_cols + s1.db_neg + s2.db_neg
        d_scale, d_bias = _scale_grads(ds * gout, db * gout, scale, bias)
        return (
            None,
            (dx * gout.to(dx.dtype)).reshape(x_shape),
            (dy * gout.to(dy.dtype)).reshape(y_shape),
            d_scale,
            d_bias,
            *(None,) * 7,
        )


def _ring_pass(tensors, group):
    """Send ``tensors`` to the next rank of the ring and receive the previous rank's; returns the
    received tensors and the requests to wait on (the caller computes meanwhile)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, prv, group) for t in received]
    return received, dist.batch_isend_irecv(ops)


def _merge_stats(a, b):
    """Statistics [5, M] of rows over two disjoint column sets (log-sum-exps merge, sums add)."""
    out = a + b
    out[0] = torch.logaddexp(a[0], b[0])
    return out


class RingContrastiveLoss(torch.autograd.Function):
    """Loss of this rank across a process group, as open_clip's ClipLoss(local_loss=True,
    gather_with_grad=True) / SigLipLoss: the other ranks' feature blocks travel around a ring
    (the next block is in flight while the current one is computed), and in the backward the
    gradients of a visiting block travel with it back to its owner. Memory is O(n·D) per rank."""

    @staticmethod
    def forward(ctx, backend, x, y, scale, bias, neg_x, neg_y, kind, smooth, group):
        import torch.distributed as dist

        impl = _backend(backend)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        sizes = torch.tensor([n, -n], device=x.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
        if sizes[0].item() != -sizes[1].item():
            raise ValueError(
                f"contrastive_loss: every rank must pass the same number of rows; this rank "
                f"has {n}, others between {-sizes[1].item()} and {sizes[0].item()}"
            )
        x3, y3 = _as3(x).contiguous(), _as3(y).contiguous()
        kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
        xb, yb = x3, y3
        st_i = st_t = None
        for t in range(world):
            p = (rank - t) % world
            if t + 1 < world:
                (xn, yn), reqs = _ring_pass([xb, yb], group)
            offsets = dict(kind=kind, row_off=rank * n, col_off=p * n)
            a = impl.forward(RowPass(x3, yb, scale, bias, neg=neg_y if t == 0 else None, **offsets))
            st_i = a if st_i is None else _merge_stats(st_i, a)
            if kind == "clip":
                b = impl.forward(RowPass(y3, xb, scale, bias, neg=neg_x if t == 0 else None, **offsets))
                st_t = b if st_t is None else _merge_stats(st_t, b)
            if t + 1 < world:
                for r in reqs:
                    r.wait()
                xb, yb = xn, yn
        N = world * n
        if kind == "siglip":
            loss = RowStats.of(st_i).tot.sum() / n
            ctx.save_for_backward(x3, y3, scale, bias, st_i)
        else:
            loss = _clip_loss(st_i, st_t, smooth, N + ky, N + kx)
            ctx.save_for_backward(x3, y3, scale, bias, neg_x, neg_y, st_i, st_t)
        ctx.conf = (kind, smooth, backend, group, x.shape, y.shape)
        return loss

    @staticmethod
    def backward(ctx, gout):
        import torch.distributed as dist

        kind, smooth, backend, group, x_shape, y_shape = ctx.conf
        impl = _backend(backend)
        if kind == "siglip":
            x3, y3, scale, bias, st_i = ctx.saved_tensors
            neg_x = neg_y = st_t = None
        else:
            x3, y3, scale, bias, neg_x, neg_y, st_i, st_t = ctx.saved_tensors
            st_t = RowStats.of(st_t)
        st_i = RowStats.of(st_i)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x3.shape[0]
        N = world * n
        kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
        w = 1.0 / n if kind == "siglip" else 0.5 / n
        dx = torch.zeros_like(x3, dtype=torch.float32)
        dy = torch.zeros_like(y3, dtype=torch.float32)
        dsb = torch.zeros(4, device=x3.device, dtype=torch.float32)
        xb, yb = x3, y3
        dxb = torch.zeros_like(x3, dtype=torch.float32)
        dyb = torch.zeros_like(y3, dtype=torch.float32)
        for t in range(world):
            p = (rank - t) % world
            if t + 1 < world:
                (xn, yn), reqs = _ring_pass([xb, yb], group)
            # offsets of this rank's rows against the visiting columns, and the other way round
            mine = dict(kind=kind, row_off=rank * n, col_off=p * n)
            theirs = dict(kind=kind, row_off=p * n, col_off=rank * n)
            # per direction: this rank's rows, the visiting block of the other side (as columns),
            # the rows' statistics, negatives and their count, and where the two gradients go
            directions = [(x3, yb, st_i, neg_y, ky, dx, dyb)]
            if kind == "clip":
                directions.append((y3, xb, st_t, neg_x, kx, dy, dxb))
            for rows, visiting, st, neg, k, d_rows, d_visiting in directions:
                # this rank's rows against the visiting block: their own terms
                g, part = _grad(
                    impl,
                    RowPass(rows, visiting, scale, bias, neg=neg if t == 0 else None, **mine),
                    lse_row=st.lse,
                    w_own=w,
                    smooth=smooth,
                    n_cls_own=N + k,
                )
                d_rows += g
                dsb += part
                # the visiting rows against this rank's: this rank's loss terms (SigLIP: the pair
                # terms; CLIP: this direction's softmax over the column), sent back with the block
                visit = RowPass(visiting, rows, scale, bias, **theirs)
                if kind == "siglip":
                    g, _ = _grad(impl, visit, lse_row=st.lse, w_own=w)
                else:
                    g, _ = _grad(
                        impl,
                        visit,
                        lse_row=st.lse,
                        lse_col=st.lse,
                        own=False,
                        other=True,
                        w_other=w,
                        smooth=smooth,
                        n_cls_other=N + k,
                    )
                d_visiting += g
            # pass the block's gradients on (after the last step they arrive at their owner)
            (dxb, dyb), greqs = _ring_pass([dxb, dyb], group)
            for r in greqs:
                r.wait()
            if t + 1 < world:
                for r in reqs:
                    r.wait()
                xb, yb = xn, yn
        gx = (dx + dxb) * gout
        gy = (dy + dyb) * gout
        sums = ScaleBiasSums.of(dsb)
        d_scale, d_bias = _scale_grads(
            (sums.ds_cols + sums.ds_neg) * gout, (sums.db_cols + sums.db_neg) * gout, scale, bias
        )
        return (
            None,
            gx.to(x3.dtype).reshape(x_shape),
            gy.to(y3.dtype).reshape(y_shape),
            d_scale,
            d_bias,
            *(None,) * 5,
        )
