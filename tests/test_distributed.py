"""contrastive_loss across ranks (gloo, 2 and 3 CPU processes): each rank's loss and gradients
equal open_clip's ClipLoss(local_loss=True, gather_with_grad=True) / SigLipLoss on that rank."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, check, *args):
    """One rank: joins the gloo group, runs ``check(rank, world, *args)``, tears the group down."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check(rank, world, *args)
        dist.barrier()  # no rank tears its gloo connections down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    # The checks passed. Leave without interpreter finalization: a gloo worker thread that drops
    # the last reference to a finished collective (the scatters of torch.distributed.nn's
    # all_gather backward, whose captured thread-local state holds a Python object) needs the GIL,
    # and if finalization has begun it aborts the process (SIGABRT, "terminate called without an
    # active exception"; seen 1 run in 15 on 2 cores). A failed check raises before this line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(check, world, *args):
    mp.spawn(_entry, args=(world, _free_port(), check, *args), nprocs=world)


def _ring_check(rank, world, kind, backend, negatives):
    import open_clip.loss as oc

    import vlkernels
    from vlkernels import losses
    from vlkernels._triton_utils import LAUNCHES

    g = torch.Generator().manual_seed(0)
    n, D = 7, 24
    X = torch.nn.functional.normalize(torch.randn(world * n, D, generator=g), dim=-1)
    Y = torch.nn.functional.normalize(torch.randn(world * n, D, generator=g), dim=-1)
    x = X[rank * n : (rank + 1) * n].clone().requires_grad_()
    y = Y[rank * n : (rank + 1) * n].clone().requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    b = torch.tensor(-5.0, requires_grad=True)
    if kind == "clip":
        inputs = (x, y, s)
        ref = oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(x, y, s)
        dropin = losses.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    else:
        inputs = (x, y, s, b)
        ref = oc.SigLipLoss(rank=rank, world_size=world)(x, y, s, b)
        dropin = losses.SigLipLoss(rank=rank, world_size=world)
    before = LAUNCHES["contrastive_bwd"]
    ours = vlkernels.contrastive_loss(*inputs, kind=kind, group=dist.group.WORLD, backend=backend)
    got = torch.autograd.grad(ours, inputs)
    want = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    if backend == "triton":
        assert LAUNCHES["contrastive_bwd"] > before, "the Triton kernels did not run"
    # the drop-in class on the same ranks
    torch.testing.assert_close(dropin(*inputs), ref, rtol=1e-4, atol=1e-4)
    if negatives:  # a queue shared by all ranks: every rank's rows also see it
        q = torch.nn.functional.normalize(torch.randn(5, D, generator=g), dim=-1)
        loss = vlkernels.contrastive_loss(x, y, s, text_negatives=q, group=dist.group.WORLD, backend=backend)
        allx = torch.cat(torch.distributed.nn.all_gather(x))
        ally = torch.cat(torch.distributed.nn.all_gather(y))
        labels = torch.arange(n) + rank * n
        ce = torch.nn.functional.cross_entropy
        ref = (ce(s * x @ torch.cat([ally, q]).T, labels) + ce(s * y @ allx.T, labels)) / 2
        got = torch.autograd.grad(loss, (x, y, s))
        want = torch.autograd.grad(ref, (x, y, s))
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ring_matches_open_clip(world, kind, backend):
    pytest.importorskip("open_clip")
    _spawn(_ring_check, world, kind, backend, kind == "clip" and world == 3)


def _row_count_check(rank, world):
    import vlkernels

    reduces = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: reduces.append(1) or all_reduce(*a, **k)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    s = torch.tensor(10.0)
    for _ in range(2):  # the row count is checked once, not on every call
        vlkernels.contrastive_loss(x, y, s, group=dist.group.WORLD, backend="torch")
    assert len(reduces) == 1, reduces
    n = 3 + rank  # now each rank passes a different number of rows
    with pytest.raises(ValueError, match=f"same number of rows; this rank has {n}, others between 3 and 4"):
        vlkernels.contrastive_loss(x[:n], y[:n], s, group=dist.group.WORLD, backend="torch")


def test_ring_checks_the_row_counts_once():
    _spawn(_row_count_check, 2)
