"""vlkernels.contrastive_loss, every backend, against open_clip's losses and literal transcriptions
of LAVIS's BLIP-2 ITC and BLIP's ITC with queues and momentum distillation; bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, LOWP, ON_GPU, assert_launched, check_against_reference, launched, tolerance

import vlkernels
from vlkernels import MomentumDistillation, _schema, contrastive_loss
from vlkernels.contrastive.args import RowPass, RowPassGrad, RowStats
from vlkernels.reference import blip2_itc_ref, blip_itc_ref, clip_loss_ref, siglip_loss_ref


def _feats(N, D, dtype=torch.float32, Q=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (N, Q, D) if Q else (N, D)
    x = F.normalize(torch.randn(*shape, generator=g), dim=-1).to(DEVICE, dtype).requires_grad_()
    y = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(DEVICE, dtype).requires_grad_()
    return x, y


def _scalar(v):
    return torch.tensor(v, device=DEVICE, requires_grad=True)


def _check(ours, ref, inputs, backend="triton"):
    """Loss and every gradient (features, scale, bias) of ``ours`` match ``ref``."""
    tol = tolerance("contrastive", backend)
    got = torch.autograd.grad(ours, inputs)
    want = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=tol, atol=tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("N,D", [(1, 16), (37, 24), (70, 72)])
def test_clip_matches_open_clip(backend, N, D):
    from open_clip.loss import ClipLoss

    x, y = _feats(N, D)
    s = _scalar(100.0)  # open_clip's clamp: the hardest stable case
    with launched(backend, "contrastive"):
        ours = contrastive_loss(x, y, s, backend=backend)
        _check(ours, ClipLoss()(x, y, s), (x, y, s), backend)


def test_clip_bias_smoothing_and_queues(backend):
    x, y = _feats(45, 32)
    s, b = _scalar(14.0), _scalar(-2.0)
    g = torch.Generator().manual_seed(3)
    nx, ny = (F.normalize(torch.randn(k, 32, generator=g), dim=-1).to(DEVICE) for k in (19, 40))
    with launched(backend, "contrastive"):
        ours = contrastive_loss(
            x, y, s, b, label_smoothing=0.1, image_negatives=nx, text_negatives=ny, backend=backend
        )
        _check(ours, clip_loss_ref(x, y, s, b, 0.1, nx, ny), (x, y, s, b), backend)


@pytest.mark.parametrize("N", [1, 37])
def test_siglip_matches_open_clip(backend, N):
    from open_clip.loss import SigLipLoss

    x, y = _feats(N, 40)
    s, b = _scalar(10.0), _scalar(-10.0)
    with launched(backend, "contrastive"):
        ours = contrastive_loss(x, y, s, b, kind="siglip", backend=backend)
        _check(ours, SigLipLoss()(x, y, s, b), (x, y, s, b), backend)


def test_blip2_max_over_queries_matches_lavis(backend):
    x, y = _feats(33, 24, Q=5)
    s = _scalar(1 / 0.07)
    with launched(backend, "contrastive"):
        ours = contrastive_loss(x, y, s, label_smoothing=0.1, backend=backend)
        _check(ours, blip2_itc_ref(x, y, 1 / s, 0.1), (x, y, s), backend)


def test_blip_queue_and_momentum_distillation_match_blip(backend):
    x, y = _feats(29, 32)
    xm, ym = (t.detach() + 0.05 * torch.randn_like(t) for t in (x, y))
    g = torch.Generator().manual_seed(1)
    image_queue, text_queue = (
        F.normalize(torch.randn(32, 50, generator=g), dim=0).to(DEVICE) for _ in range(2)
    )
    s = _scalar(1 / 0.07)
    with launched(backend, "contrastive"):
        ours = contrastive_loss(
            x,
            y,
            s,
            image_negatives=image_queue.T,
            text_negatives=text_queue.T,
            distill=MomentumDistillation(xm, ym, alpha=0.4),
            backend=backend,
        )
        ref = blip_itc_ref(x, y, xm, ym, image_queue, text_queue, 1 / s, 0.4)
        _check(ours, ref, (x, y, s), backend)


def test_large_odd_batch_triton():
    x, y = _feats(530, 16, seed=5)  # 9 bands of the interpreter's 64 rows, the last one partial
    s = _scalar(30.0)
    with launched("triton", "contrastive"):
        ours = contrastive_loss(x, y, s, backend="triton")
        _check(ours, clip_loss_ref(x, y, s), (x, y, s))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_low_precision_two_x_rule(dtype, kind, backend):
    x, y = _feats(64 if ON_GPU else 40, 64, dtype)
    s, b = _scalar(50.0), _scalar(-5.0)
    ref_fn = clip_loss_ref if kind == "clip" else siglip_loss_ref
    with launched(backend, "contrastive"):
        ours = contrastive_loss(x, y, s, b, kind=kind, backend=backend)
        grads = torch.autograd.grad(ours, (x, y, s, b))
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    s64, b64 = (t.detach().double().requires_grad_() for t in (s, b))
    ref = ref_fn(x64, y64, s64, b64)
    ref_grads = torch.autograd.grad(ref, (x64, y64, s64, b64))
    lowp = ref_fn(x, y, s.to(dtype), b.to(dtype))
    lowp_grads = torch.autograd.grad(lowp, (x, y, s, b))
    for name, got, r, lp in zip(
        ("loss", "dx", "dy", "ds", "db"), (ours, *grads), (ref, *ref_grads), (lowp, *lowp_grads), strict=True
    ):
        check_against_reference(f"{kind} {name}", got, r, lp, dtype, "contrastive", backend)


def test_drop_in_classes_match_open_clip():
    import open_clip.loss as oc

    from vlkernels import losses

    x, y = _feats(21, 32)
    s, b = _scalar(20.0), _scalar(-4.0)
    _check(losses.ClipLoss()(x, y, s), oc.ClipLoss()(x, y, s), (x, y, s))
    _check(losses.SigLipLoss()(x, y, s, b), oc.SigLipLoss()(x, y, s, b), (x, y, s, b))
    # open_clip's newest arguments: chunk_size (logits in row chunks: the same loss) and dist_impl
    chunked = losses.SigLipLoss(dist_impl="shift", chunk_size=8)
    assert (chunked.chunk_size, chunked.dist_impl) == (8, "shift")
    _check(chunked(x, y, s, b), oc.SigLipLoss()(x, y, s, b), (x, y, s, b))
    with pytest.raises(ValueError, match="chunk_size must be an int >= 0, got -1"):
        losses.SigLipLoss(chunk_size=-1)
    logits = torch.randn(21, 7, 50, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 50, (21, 7), device=DEVICE)
    labels[:, 5:] = 0  # pad_id
    ours = losses.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
        x, y, logits, labels, s, output_dict=True
    )
    ref = oc.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
        x, y, logits, labels, s, output_dict=True
    )
    _check(
        ours["contrastive_loss"] + ours["caption_loss"],
        ref["contrastive_loss"] + ref["caption_loss"],
        (x, y, s, logits),
    )
    # open_clip also takes Python numbers for logit_scale / logit_bias, returns the features' dtype
    # (fp32 under autocast) and exposes the caption criterion as ``caption_loss``
    _check(losses.ClipLoss()(x, y, 20.0), oc.ClipLoss()(x, y, 20.0), (x, y))
    _check(losses.SigLipLoss()(x, y, 20.0, -4.0), oc.SigLipLoss()(x, y, 20.0, -4.0), (x, y))
    xb, yb = x.detach().bfloat16(), y.detach().bfloat16()
    for ours_cls, theirs_cls, args in (
        (losses.ClipLoss, oc.ClipLoss, (s,)),
        (losses.SigLipLoss, oc.SigLipLoss, (s, b)),
    ):
        assert ours_cls()(xb, yb, *args).dtype == theirs_cls()(xb, yb, *args).dtype == torch.bfloat16
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            assert ours_cls()(x, y, *args).dtype == theirs_cls()(x, y, *args).dtype == torch.float32
    coca = losses.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=3)
    assert isinstance(coca.caption_loss, torch.nn.CrossEntropyLoss) and coca.caption_loss.ignore_index == 3
    with pytest.raises(ValueError, match="only local_loss=True, gather_with_grad=True"):
        losses.ClipLoss(world_size=2)
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        losses.ClipLoss(use_horovod=True)


def test_opcheck_contrastive_ops():
    x, y = _feats(20, 16)
    s = _scalar(5.0)
    neg = torch.randn(7, 16, device=DEVICE)
    fwd = RowPass(x.detach()[:, None], y.detach()[:, None], s.detach(), neg=neg)
    torch.library.opcheck(torch.ops.vlkernels.triton_contrastive_fwd, _schema.flatten(fwd))
    st = RowStats.of(torch.ops.vlkernels.triton_contrastive_fwd(*_schema.flatten(fwd)))
    grad = RowPassGrad(
        fwd, st.lse, lse_col=st.lse, other=True, w_own=0.1, w_other=0.1, n_cls_own=27, n_cls_other=27
    )
    torch.library.opcheck(torch.ops.vlkernels.triton_contrastive_bwd, _schema.flatten(grad))


def _peak_growth_bytes(N, D=64):
    """Peak bytes PyTorch's CPU allocator holds above what it held before, while the CPU fallback
    runs forward + backward (its allocation events; a process's peak RSS also counts the C
    library's free lists and varied by 100 MiB between runs of the same call)."""
    from benchmarks.common import cpu_peak_mib

    g = torch.Generator().manual_seed(N)
    x, y = (torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1) for _ in range(2))
    x.requires_grad_(), y.requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    return cpu_peak_mib(lambda: vlkernels.contrastive_loss(x, y, s, backend="torch").backward()) * 2**20


def test_no_n_by_n_buffer_on_cpu():
    """At N = 20 000 one N×N fp32 matrix is 1.6 GB: the CPU fallback's peak stays far under it and
    does not grow with N² (it holds a few row chunks of 2**22 logits)."""
    n_sq = 20000**2 * 4
    small, large = _peak_growth_bytes(2000), _peak_growth_bytes(20000)
    assert large < n_sq / 4, f"peak grew by {large / 2**20:.0f} MiB at N=20000"
    assert large - small < n_sq / 20, f"peak grew by {(large - small) / 2**20:.0f} MiB from N=2000 to 20000"


BAD = [
    (dict(kind="infonce"), ValueError, "kind must be one of"),
    (dict(x=torch.randn(4)), ValueError, r"image_features must be 2-D or 3-D, got shape \[4\]"),
    (dict(y=torch.randn(5, 8)), ValueError, "must have the same N >= 1, got 4 and 5"),
    (dict(y=torch.randn(4, 9)), ValueError, "feature dims differ: image 8, text 9"),
    (
        dict(x=torch.randn(4, 8).double(), y=torch.randn(4, 8).double()),
        TypeError,
        "must be float16, bfloat16 or float32",
    ),
    (dict(s=torch.ones(2)), TypeError, r"logit_scale must be a one-element float tensor, got shape \[2\]"),
    (dict(s=3.0), TypeError, "logit_scale must be a one-element float tensor, got float"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(text_negatives=torch.randn(3, 7)), ValueError, r"text_negatives must be \[K, 8\]"),
    (dict(kind="siglip", text_negatives=torch.randn(3, 8)), ValueError, "only used by kind='clip'"),
    (dict(kind="siglip", label_smoothing=0.1), ValueError, "label_smoothing is only used by kind='clip'"),
    (
        dict(text_negatives=torch.randn(3, 8, requires_grad=True)),
        ValueError,
        r"text_negatives requires grad.*pass text_negatives.detach\(\)",
    ),
    (
        dict(distill=MomentumDistillation(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), 0.4)),
        ValueError,
        "distill.image_features requires grad",
    ),
    (dict(distill=(1, 2)), TypeError, "distill must be a MomentumDistillation"),
    (
        dict(distill=MomentumDistillation(torch.randn(4, 8), torch.randn(3, 8), 0.4)),
        ValueError,
        "distill.text_features must match",
    ),
    (dict(group="x"), TypeError, "group must be a torch.distributed process group or None, got str"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    over, exc, msg = BAD[case]
    kw = dict(over)
    x = kw.pop("x", torch.randn(4, 8))
    y = kw.pop("y", torch.randn(4, 8))
    s = kw.pop("s", torch.tensor(1.0))
    with pytest.raises(exc, match=msg):
        contrastive_loss(x, y, s, backend="torch", **kw)


def test_automatic_backend_on_this_machine():
    x, y = _feats(8, 16)
    with assert_launched("contrastive_fwd"):
        vlkernels.contrastive_loss(x, y, _scalar(3.0))


def test_torch_compile_fullgraph():
    x, y = _feats(20, 16)
    s = _scalar(5.0)
    f = lambda x, y, s: contrastive_loss(x, y, s, label_smoothing=0.1, backend="triton")
    compiled = torch.compile(f, fullgraph=True)
    with assert_launched("contrastive_fwd", "contrastive_bwd"):
        loss = compiled(x, y, s)
        grads = torch.autograd.grad(loss, (x, y, s))
    want = torch.autograd.grad(clip_loss_ref(x, y, s, label_smoothing=0.1), (x, y, s))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_queues_may_be_updated_in_place_before_backward():
    """BLIP enqueues the new momentum features right after the loss, before the backward."""
    x, y = _feats(10, 16)
    s = _scalar(10.0)
    queue = torch.randn(6, 16, device=DEVICE)
    loss = contrastive_loss(x, y, s, text_negatives=queue, backend="triton")
    ref = clip_loss_ref(x, y, s, text_negatives=queue.clone())
    queue.zero_()
    _check(loss, ref, (x, y, s))


def test_autocast_multiplies_features_in_its_dtype(backend):
    """Under autocast (bf16) the features are multiplied in bf16, as open_clip's matmuls; the loss
    is fp32 and the gradients reach the fp32 features."""
    from vlkernels.reference import clip_loss_ref

    g = torch.Generator().manual_seed(9)
    x, y = (
        F.normalize(torch.randn(37, 24, generator=g), dim=-1).to(DEVICE).requires_grad_() for _ in range(2)
    )
    s = torch.tensor(20.0, device=DEVICE)
    with launched(backend, "contrastive"), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = contrastive_loss(x, y, s, backend=backend)
        dx, dy = torch.autograd.grad(loss, (x, y))
    assert loss.dtype == torch.float32 and dx.dtype == dy.dtype == torch.float32
    ref = clip_loss_ref(x.detach().bfloat16().double(), y.detach().bfloat16().double(), s.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
