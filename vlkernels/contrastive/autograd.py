"""The contrastive loss above the backends: ``ContrastiveLoss`` on one device (the backend's
``contrastive`` loss-level forward and backward) and ``RingContrastiveLoss`` across the ranks of a
process group (the backend's ``contrastive_rows`` row passes, feature blocks travelling in a ring)."""

from __future__ import annotations

import torch

from vlkernels import _dispatch, _schema
from vlkernels.contrastive.args import LossArgs, LossGradArgs, RowPass, RowPassGrad, RowStats, ScaleBiasSums
from vlkernels.contrastive.rows import as3, clip_loss, scale_grads


def _backend(family: str, name: str):
    return _dispatch.backends(family)[name]


def _grad(impl, fwd: RowPass, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """dLoss/drows and the scale/bias sums [4] (ScaleBiasSums) of one backward row pass."""
    return impl.backward(RowPassGrad(fwd, **kw))


class ContrastiveLoss(torch.autograd.Function):
    """The loss on one device: the backend's forward gives the loss and each row's statistics,
    its backward every gradient."""

    @staticmethod
    def forward(ctx, backend, x, y, scale, bias, neg_x, neg_y, xm, ym, kind, smooth, alpha):
        args = LossArgs(x, y, scale, bias, neg_x, neg_y, xm, ym, kind, smooth, alpha)
        with _dispatch.no_autocast(x):
            loss, stats = _backend("contrastive", backend).forward(args)
        ctx.backend = backend
        _schema.stash(ctx, LossGradArgs(None, stats, args))
        return loss

    @staticmethod
    @_schema.first_order("contrastive_loss")
    def backward(ctx, gout):
        g = _schema.unstash(ctx)._replace(grad_loss=gout)
        with _dispatch.no_autocast(gout):
            dx, dy, d_scale, d_bias = _backend("contrastive", ctx.backend).backward(g)
        return None, dx, dy, d_scale, d_bias if g.fwd.bias is not None else None, *(None,) * 7


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


_AGREED: set = set()  # (process group, row count) pairs the ranks were checked to agree on


def _check_rows(n: int, group, device) -> None:
    """Every rank must pass the same number of rows. Checked (an all-reduce and a host sync) the
    first time this rank passes ``n`` rows to ``group``; later calls with the same count do not
    synchronise (no stall, CUDA-graph capturable)."""
    import torch.distributed as dist

    key = (id(group), n)
    if key in _AGREED:
        return
    sizes = torch.tensor([n, -n], device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    most, fewest = sizes.tolist()
    if most != -fewest:
        raise ValueError(
            f"contrastive_loss: every rank must pass the same number of rows; this rank "
            f"has {n}, others between {-fewest} and {most}"
        )
    _AGREED.add(key)


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

        impl = _backend("contrastive_rows", backend)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        _check_rows(n, group, x.device)
        x3, y3 = as3(x).contiguous(), as3(y).contiguous()
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
            loss = clip_loss(st_i, st_t, smooth, N + ky, N + kx)
            ctx.save_for_backward(x3, y3, scale, bias, neg_x, neg_y, st_i, st_t)
        ctx.conf = (kind, smooth, backend, group, x.shape, y.shape)
        return loss

    @staticmethod
    @_schema.first_order("contrastive_loss")
    def backward(ctx, gout):
        import torch.distributed as dist

        kind, smooth, backend, group, x_shape, y_shape = ctx.conf
        impl = _backend("contrastive_rows", backend)
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
        dsb = torch.zeros(len(ScaleBiasSums._fields), device=x3.device, dtype=torch.float32)
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
        d_scale, d_bias = scale_grads(
            (sums.ds_cols + sums.ds_neg) * gout, (sums.db_cols + sums.db_neg) * gout, scale, bias
        )
        return (
            None,
            gx.to(x3.dtype).reshape(x_shape),
            gy.to(y3.dtype).reshape(y_shape),
            d_scale,
            d_bias if bias is not None else None,
            *(None,) * 5,
        )
