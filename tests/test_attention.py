"""vlkernels.attention, every backend, against the float64 eager reference: output, dq, dk, dv."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    DEVICE,
    LOWP,
    ON_GPU,
    assert_launched,
    check_against_reference,
    launched,
    padded_randn,
    tolerance,
)

import vlkernels
from vlkernels import masks
from vlkernels.reference import attention_ref


def _lengths(B, hi, g, low=0):
    return torch.randint(low, hi + 1, (B,), generator=g).to(DEVICE)


def _text_to_media(B, Lq, n_media, g):
    """Sorted image indices per token, starting with tokens that no image precedes."""
    t = torch.randint(0, n_media + 1, (B, Lq), generator=g).sort(dim=1).values
    t[:, 0] = 0
    return t.to(DEVICE)


MASKS = {
    "none": lambda B, Lq, Lk, g: None,
    "dense": lambda B, Lq, Lk, g: (torch.rand(B, 1, Lq, Lk, generator=g) > 0.4).to(DEVICE),
    "dense_broadcast_2d": lambda B, Lq, Lk, g: (torch.rand(Lq, Lk, generator=g) > 0.7).to(DEVICE),
    "causal": lambda B, Lq, Lk, g: masks.causal(),
    "key_padding": lambda B, Lq, Lk, g: masks.key_padding(_lengths(B, Lk, g)),
    "causal&key_padding": lambda B, Lq, Lk, g: masks.causal() & masks.key_padding(_lengths(B, Lk, g)),
    "qformer_bidirectional&pad": lambda B, Lq, Lk, g: (
        masks.qformer(min(32, Lk // 2), "bidirectional") & masks.key_padding(_lengths(B, Lk, g, Lk // 2))
    ),
    "qformer_multimodal_causal": lambda B, Lq, Lk, g: masks.qformer(min(32, Lk // 2), "multimodal_causal"),
    "qformer_multimodal_causal&pad": lambda B, Lq, Lk, g: (
        masks.qformer(min(32, Lk // 2), "multimodal_causal") & masks.key_padding(_lengths(B, Lk, g, Lk // 2))
    ),
    "qformer_unimodal&pad": lambda B, Lq, Lk, g: (
        masks.qformer(min(32, Lk // 2), "unimodal") & masks.key_padding(_lengths(B, Lk, g, Lk // 2))
    ),
    "prefix_lm": lambda B, Lq, Lk, g: masks.prefix_lm(_lengths(B, Lk, g)),
    "prefix_lm&pad": lambda B, Lq, Lk, g: (
        masks.prefix_lm(_lengths(B, Lk, g)) & masks.key_padding(_lengths(B, Lk, g))
    ),
    "causal&sliding_window": lambda B, Lq, Lk, g: masks.causal() & masks.sliding_window(13),
    "media_immediate": lambda B, Lq, Lk, g: masks.media(_text_to_media(B, Lq, Lk // 16, g), 16, True),
    "media_all_previous": lambda B, Lq, Lk, g: masks.media(_text_to_media(B, Lq, Lk // 16, g), 16, False),
}
SELF_ATTENTION = {"qformer", "prefix_lm"}  # masks defined over one sequence: Lq == Lk

# (B, Bq, H, Hk, Lq, Lk, D): ragged lengths, shared queries (Bq=1), grouped keys, odd head dims.
CROSS_SHAPES = [(2, 2, 2, 2, 1, 48, 40), (2, 1, 4, 2, 19, 96, 72), (3, 3, 2, 1, 97, 64, 96)]
SELF_SHAPES = [(2, 2, 2, 2, 7, 7, 16), (2, 1, 3, 1, 70, 70, 64), (2, 2, 2, 2, 45, 45, 128)]


def _shapes(mask_name):
    kind = mask_name.split("_")[0]
    if kind in SELF_ATTENTION:
        return SELF_SHAPES
    if kind == "media":  # keys are whole images of 16 latents
        return CROSS_SHAPES
    return CROSS_SHAPES + SELF_SHAPES


def run_case(shape, mask_name, dtype, backend, seed=0, layout_blhd=False, scale=None, softcap=None):
    B, Bq, H, Hk, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(seed)
    q = padded_randn((Bq, H, Lq, D), dtype, DEVICE, layout_blhd=layout_blhd, generator=g)
    k = padded_randn((B, Hk, Lk, D), dtype, DEVICE, layout_blhd=layout_blhd, generator=g)
    v = padded_randn((B, Hk, Lk, D), dtype, DEVICE, layout_blhd=layout_blhd, generator=g)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = MASKS[mask_name](B, Lq, Lk, g)
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE, dtype)

    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, mask, scale=scale, softcap=softcap, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), do)
    ref = attention_ref(q, k, v, mask, scale=scale, upcast=True, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    lowp = attention_ref(q, k, v, mask, scale=scale, softcap=softcap)
    lowp_grads = torch.autograd.grad(lowp, (q, k, v), do)
    assert out.shape == (B, H, Lq, D) and out.dtype == dtype
    for name, got, r, lp in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (lowp, *lowp_grads), strict=True
    ):
        assert got.shape == r.shape, name
        check_against_reference(f"{mask_name} {shape} {name}", got, r, lp, dtype, "attention", backend)


# Without a GPU the interpreter and the emulation of csrc/ are slow: they run part of the grid.
CPU_FP32_SHAPES = {"triton": None, "cuda": 3, "torch": None}  # how many of the mask's shapes (None: all)
CPU_LOWP = {  # masks and shape of the fp16/bf16 cases
    "triton": (
        ["none", "dense", "qformer_multimodal_causal&pad", "media_immediate", "prefix_lm&pad"],
        (2, 1, 4, 2, 64, 64, 64),
    ),
    "cuda": (
        ["none", "dense", "causal&key_padding", "qformer_unimodal&pad", "media_all_previous"],
        (2, 1, 4, 2, 45, 64, 64),
    ),
    "torch": (list(MASKS), (2, 1, 4, 2, 45, 64, 64)),
}


def _lowp_cases():
    return [(b, m) for b in BACKENDS for m in (MASKS if ON_GPU else CPU_LOWP[b][0])]


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_every_mask_fp32(backend, mask_name):
    shapes = _shapes(mask_name)
    for i, shape in enumerate(shapes if ON_GPU else shapes[: CPU_FP32_SHAPES[backend]]):
        run_case(shape, mask_name, torch.float32, backend, seed=i)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("backend,mask_name", _lowp_cases(), indirect=["backend"])
def test_low_precision_two_x_rule(backend, mask_name, dtype):
    shapes = _shapes(mask_name) if ON_GPU else [CPU_LOWP[backend][1]]
    for i, shape in enumerate(shapes):
        run_case(shape, mask_name, dtype, backend, seed=100 + i)


# The Triton backward's paths (the interpreter's tiles are 32 x 32; tests/test_budget.py checks
# which kernels each launches): one key tile holds every key, one query tile every query, neither.
BACKWARD_PATHS = {
    "keys_fused": (2, 2, 2, 2, 40, 30, 40),
    "queries_fused": (3, 3, 2, 2, 20, 77, 40),
    "split": (2, 2, 4, 2, 45, 70, 24),
}


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("path", BACKWARD_PATHS)
def test_triton_backward_paths_low_precision(path, dtype):
    run_case(BACKWARD_PATHS[path], "causal&key_padding", dtype, "triton", seed=7)


def test_blhd_views_are_not_copied_and_match(backend):
    """[B, L, H, D] tensors viewed as [B, H, L, D] go to the kernel as they are."""
    run_case((2, 2, 4, 2, 33, 50, 64), "causal&key_padding", torch.float32, backend, layout_blhd=True)


def test_custom_scale(backend):
    run_case((2, 2, 2, 2, 20, 30, 32), "key_padding", torch.float32, backend, scale=0.37)


@pytest.mark.parametrize("D", [16, 40, 128, 136, 256])
def test_head_dims_and_blhd_views(backend, D):
    """Every head-dim tile of the kernels (the CUDA C++ ones round to 32, 64, 128, 256)."""
    run_case((2, 2, 2, 1, 33, 70, D), "causal&key_padding", torch.float32, backend, seed=D)
    run_case((1, 1, 2, 2, 20, 20, D), "none", torch.float16, backend, seed=D, layout_blhd=True)


@pytest.mark.parametrize("D", [8, 12, 33, 300])
def test_any_head_dim(backend, D):
    """Head dims SDPA takes (transformers' testers use 8): the Triton kernels pad inside up to 256;
    a backend that cannot serve one says why; the automatic choice runs the rest on the torch
    backend and says so once."""
    cannot = (backend == "triton" and D > 256) or (backend == "cuda" and not (16 <= D <= 256 and D % 8 == 0))
    if not cannot:
        run_case((2, 2, 2, 1, 21, 30, D), "causal&key_padding", torch.float32, backend, seed=D)
        return
    q = torch.randn(1, 2, 5, D, device=DEVICE)
    with pytest.raises(vlkernels.BackendUnavailableError, match=f"head dims .* got {D}"):
        vlkernels.attention(q, q, q, backend=backend)


def test_automatic_choice_warns_once_when_no_kernel_serves():
    from vlkernels import _dispatch

    q = torch.randn(1, 2, 5, 300, device=DEVICE)
    _dispatch._WARNED.clear()
    with pytest.warns(UserWarning, match="running on the torch backend.*head dims up to 256, got 300"):
        out = vlkernels.attention(q, q, q)
    torch.testing.assert_close(out, attention_ref(q, q, q), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlkernels.attention(q, q, q)  # the same reason: no second warning


def test_paper_shapes_qformer_and_pooler(backend):
    """BLIP-2 Q-Former (32 queries + 32 text, 12 heads x 64) and a CoCa-like shared-query pooler."""
    run_case((2, 2, 12, 12, 64, 64, 64), "qformer_multimodal_causal&pad", torch.float32, backend)
    run_case((3, 1, 2, 2, 97, 196, 96), "none", torch.float32, backend)


def test_fully_masked_rows_give_zero_and_zero_gradient(backend):
    B, H, L, D = 2, 2, 40, 32
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, requires_grad=True) for _ in range(3))
    t2m = torch.zeros(B, L, dtype=torch.long, device=DEVICE)
    t2m[:, 20:] = 1  # rows 0..19: no image precedes them
    mask = masks.media(t2m, 8, only_immediate=True)
    out = vlkernels.attention(q, k[:, :, :16], v[:, :, :16], mask, backend=backend)
    assert torch.all(out[:, :, :20] == 0) and not torch.isnan(out).any()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.all(dq[:, :, :20] == 0) and not torch.isnan(dq).any()
    # every key padded away: the whole output is 0, no NaN anywhere
    out = vlkernels.attention(
        q, k, v, masks.key_padding(torch.zeros(B, dtype=torch.long, device=DEVICE)), backend=backend
    )
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for t in (out, dq, dk, dv):
        assert torch.all(t == 0)


def test_qformer_whole_problem_and_fully_padded_batch_entry(backend):
    """The Q-Former's 32 queries + 32 text tokens; a batch entry with every key padded gives 0 and
    0 gradients."""
    B, H, L, D = 3, 2, 64, 64
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = masks.qformer(32, "multimodal_causal") & masks.key_padding(
        torch.tensor([64, 40, 0], device=DEVICE)
    )
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, mask, backend=backend)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.all(out[2] == 0) and all(torch.all(g[2] == 0) for g in grads)
    ref = attention_ref(q, k, v, mask, upcast=True)
    tol = tolerance("attention", backend)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol)


def test_shared_queries_are_not_expanded_and_grad_sums_over_batch(backend):
    B, H, Lq, Lk, D = 5, 2, 9, 30, 32
    q = torch.randn(1, H, Lq, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, H, Lk, D, device=DEVICE) for _ in range(2))
    out = vlkernels.attention(q, k, v, backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    qe = q.detach().expand(B, H, Lq, D).clone().requires_grad_()
    (dqe,) = torch.autograd.grad(attention_ref(qe, k, v, upcast=True).sum(), (qe,))
    assert dq.shape == (1, H, Lq, D)
    tol = tolerance("attention", backend)
    torch.testing.assert_close(dq.double(), dqe.double().sum(0, keepdim=True), rtol=tol, atol=tol)


def test_int64_lengths_past_int32_do_not_wrap(backend):
    """Lengths and prefix lengths of 2**32 + 3 mean "every key" (as Lk would), on every backend."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g).to(DEVICE) for n in (9, 11, 11))
    lengths = lambda first: torch.tensor([first, 5]).to(DEVICE)

    def run(mask):
        qq = q.clone().requires_grad_()
        out = vlkernels.attention(qq, k, v, mask, backend=backend)
        return out, torch.autograd.grad(out.sum(), qq)[0]

    for kind in (masks.key_padding, masks.prefix_lm):
        with launched(backend, "attention"):
            got = run(kind(lengths(2**32 + 3)))
        for a, b in zip(got, run(kind(lengths(11))), strict=True):
            torch.testing.assert_close(a, b)


def test_fp16_large_logits_stay_finite(backend):
    """Scores far past fp16's range (|q·k| ~ 1e4 · scale) give SDPA's answer, not NaN."""
    g = torch.Generator().manual_seed(7)
    q, k = ((torch.randn(2, 2, 13, 16, generator=g) * 60).to(DEVICE, torch.float16) for _ in range(2))
    v = torch.randn(2, 2, 13, 16, generator=g).to(DEVICE, torch.float16)
    with launched(backend, "attention"):
        qq = q.clone().requires_grad_()
        out = vlkernels.attention(qq, k, v, masks.causal(), backend=backend)
        (dq,) = torch.autograd.grad(out.float().sum(), qq)
    ref = attention_ref(q.double(), k.double(), v.double(), masks.causal())
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3)


def test_autocast_computes_in_its_dtype(backend):
    """Under autocast (bf16), fp32 q, k, v are attended in bf16 and the output is bf16, as SDPA."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 19, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    with launched(backend, "attention"), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = vlkernels.attention(q, k, v, masks.causal(), backend=backend)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert out.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in grads)
    low = [t.detach().bfloat16().double() for t in (q, k, v)]
    ref = attention_ref(*low, masks.causal())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-2)


FLOAT_BIAS_CASES = [  # (Bq, B, H, Hk, Lq, Lk, D, bias shape): each backward path, broadcast biases
    (2, 2, 2, 2, 37, 45, 24, (2, 2, 37, 45)),
    (2, 2, 4, 2, 33, 20, 16, (2, 1, 1, 20)),  # every key in one tile
    (2, 2, 2, 2, 20, 70, 16, (70,)),  # every query in one tile
    (1, 3, 2, 2, 19, 40, 32, (1, 2, 19, 40)),  # shared queries
]


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("case", FLOAT_BIAS_CASES, ids=lambda c: "x".join(map(str, c[-1])))
def test_float_bias_and_its_gradient(backend, case, softcap):
    """A float mask is added to the scaled scores (SDPA's attn_mask; after the soft-cap, as Gemma
    2): out, dq, dk, dv and the bias's gradient (summed over its broadcast) against float64; -inf
    entries mask, a row of -inf gives 0 and 0 gradient."""
    Bq, B, H, Hk, Lq, Lk, D, shape = case
    g = torch.Generator().manual_seed(Lq)
    q = torch.randn(Bq, H, Lq, D, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, Hk, Lk, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    bias = torch.randn(*shape, generator=g) * 2
    bias[..., 3] = float("-inf")
    if len(shape) == 4 and shape[2] > 1:
        bias[..., 5, :] = float("-inf")  # a row with nothing to attend
    bias = bias.to(DEVICE).requires_grad_()
    inputs = (q, k, v, bias)
    if backend == "cuda":
        with pytest.raises(vlkernels.BackendUnavailableError, match="take no float bias"):
            vlkernels.attention(q, k, v, bias, backend=backend)
        return
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE)
    ran = launched(backend, "attention")
    if backend == "triton":
        ran = assert_launched("attention_fwd", "attention_bwd", "attention_bias_grad")
    with ran:
        out = vlkernels.attention(q, k, v, bias, softcap=softcap, backend=backend)
        grads = torch.autograd.grad(out, inputs, do)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = attention_ref(*ref_in, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)
    if len(shape) == 4 and shape[2] > 1:
        assert torch.all(out[:, :, 5] == 0) and torch.all(grads[0][:, :, 5] == 0)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_float_bias_low_precision_two_x_rule(backend, dtype):
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels take no float bias (test_float_bias_and_its_gradient)")
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 4, 45, 64, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(2, 1, 45, 45, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    inputs = (q, k, v, bias)
    do = torch.randn(2, 4, 45, 64, generator=g).to(DEVICE, dtype)
    with launched(backend, "attention"):
        out = vlkernels.attention(*inputs, backend=backend)
        grads = torch.autograd.grad(out, inputs, do)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = attention_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    lowp = attention_ref(*inputs)
    lowp_grads = torch.autograd.grad(lowp, inputs, do)
    for name, got, r, lp in zip(
        ("out", "dq", "dk", "dv", "dbias"), (out, *grads), (ref, *ref_grads), (lowp, *lowp_grads), strict=True
    ):
        check_against_reference(f"bias {name}", got, r, lp, dtype, "attention", backend)


def _sdpa_samples():
    """PyTorch's own SDPA sample inputs (OpInfo), without dropout (SDPA draws its own random masks)."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention")
    samples = op.sample_inputs(DEVICE.type, torch.float32, requires_grad=True)
    return [s for s in samples if not s.kwargs.get("dropout_p")]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pytorch_sdpa_sample_inputs(backend):
    """Every dropout-free SDPA sample input, its batch dims broadcast to [B, H] as SDPA does, its
    float or bool attn_mask as the mask, is_causal as SDPA's top-left causal mask: the same output
    and gradients as F.scaled_dot_product_attention."""
    samples = _sdpa_samples()
    assert len(samples) >= 13
    for s in samples:
        q, (k, v), kw = s.input, s.args[:2], dict(s.kwargs)
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        q4, k4, v4 = (t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
        while q4.dim() < 4:
            q4, k4, v4 = (t.unsqueeze(0) for t in (q4, k4, v4))
        Lq, Lk = q4.shape[-2], k4.shape[-2]
        mask = kw.get("attn_mask")
        if kw.get("is_causal"):
            mask = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril()
        with launched(backend, "attention"):
            got = vlkernels.attention(q4, k4, v4, mask, scale=kw.get("scale"), backend=backend)
            grads = torch.autograd.grad(got.sum(), (q, k, v))
        ins = [t.detach().double().requires_grad_() for t in (q, k, v)]  # SDPA in float64: the oracle
        kw64 = {n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in kw.items()}
        want = F.scaled_dot_product_attention(*ins, **kw64)
        wants = torch.autograd.grad(want.sum(), ins)
        pairs = zip(("out", "dq", "dk", "dv"), (got.reshape(want.shape), *grads), (want, *wants), strict=True)
        for name, a, b in pairs:
            bound = 2e-5 * max(1.0, b.abs().max().item())  # fp32 against float64, relative to the size
            torch.testing.assert_close(a.double(), b, rtol=0, atol=bound, msg=f"{name} {kw}")


def test_packed_documents_equal_the_padded_batch(backend):
    """Three documents (5, 9 and 3 tokens) packed in one row with masks.document & causal give,
    token by token, the output and gradients of the padded batch with causal & key_padding; the
    Triton backward visits only the key tiles of each query's document."""
    g = torch.Generator().manual_seed(12)
    lens, H, D = [5, 9, 3], 2, 16
    packed = [torch.randn(1, H, sum(lens), D, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].to(DEVICE)
    mask = masks.document(ids) & masks.causal()
    do = torch.randn(1, H, sum(lens), D, generator=g).to(DEVICE)
    with launched(backend, "attention"):
        out = vlkernels.attention(*packed, mask, backend=backend)
        grads = torch.autograd.grad(out, packed, do)
    # the same documents padded to a batch of 3 x 9
    L, starts = max(lens), [0, 5, 14]

    def pad(t):
        rows = [
            torch.nn.functional.pad(t[0, :, s : s + n], (0, 0, 0, L - n))
            for s, n in zip(starts, lens, strict=True)
        ]
        return torch.stack(rows)

    padded = [pad(t).detach().requires_grad_() for t in packed]
    lengths = torch.tensor(lens, device=DEVICE)
    ref = vlkernels.attention(*padded, masks.causal() & masks.key_padding(lengths), backend="torch")
    ref_grads = torch.autograd.grad(ref, padded, pad(do))
    for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(
            pad(got),
            want * (torch.arange(L, device=DEVICE) < lengths[:, None])[:, None, :, None],
            rtol=1e-5,
            atol=1e-5,
        )


def test_torch_backend_reuses_a_mask_only_for_the_same_contents():
    """The torch backend keeps the additive masks it built for the next calls (the backward, the
    other layers): a mask of the same contents reuses one, even as another tensor; any change of
    contents gets a mask built from the new values, whether or not it moves the tensor's version
    counter (in place, through ``.data``, through a numpy array sharing the memory); a mask above
    the size limit is not kept."""
    from vlkernels.attention import torch as torch_backend

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 20, 16, generator=g) for _ in range(3))
    lengths = torch.tensor([20, 7])
    m = masks.causal() & masks.key_padding(lengths)
    calls = []
    build, limit = torch_backend._cpu_mask, torch_backend._RECENT_BYTES

    def run(mask):
        out = vlkernels.attention(q, k, v, mask, backend="torch")
        ref = attention_ref(q.double(), k.double(), v.double(), mask.to_dense(2, 20, 20))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        return out

    try:
        torch_backend._cpu_mask = lambda a: calls.append(1) or build(a)
        torch_backend._RECENT_MASKS.clear()
        first = run(m)
        run(m)
        run(masks.causal() & masks.key_padding(lengths.clone()))  # another tensor, same contents
        assert len(calls) == 1
        lengths[1] = 3  # in place: the version counter moves
        run(m)
        lengths.data[1] = 5  # through .data: the version counter does not move
        run(m)
        lengths.numpy()[1] = 9  # through a numpy array sharing the memory: neither does it
        changed = run(m)
        assert len(calls) == 4
        dense = torch.rand(2, 1, 20, 20, generator=g) > 0.5
        vlkernels.attention(q, k, v, dense, backend="torch")
        dense.data[0, 0, 0] = ~dense[0, 0, 0]
        out = vlkernels.attention(q, k, v, dense, backend="torch")
        ref = attention_ref(q.double(), k.double(), v.double(), dense)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert len(calls) == 6
        torch_backend._RECENT_MASKS.clear()
        torch_backend._RECENT_BYTES = 100  # this mask: 2 x 20 x 20 fp32, 3200 B
        run(m)
        run(m)
        assert len(calls) == 8  # too large to keep: built each time
    finally:
        torch_backend._cpu_mask, torch_backend._RECENT_BYTES = build, limit
    assert not torch.allclose(changed[1], first[1])


SOFTCAP_MASKS = ["none", "causal&sliding_window", "prefix_lm&pad", "dense", "qformer_unimodal&pad"]


@pytest.mark.parametrize("mask_name", SOFTCAP_MASKS)
def test_softcap_forward_backward(backend, mask_name):
    """Logit soft-capping (Gemma 2: softcap · tanh(scores / softcap)), forward and backward against
    float64, with a cap small enough to bend most scores."""
    run_case(_shapes(mask_name)[1], mask_name, torch.float32, backend, scale=1.0, softcap=1.5)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_softcap_low_precision_two_x_rule(dtype):
    run_case((2, 2, 4, 2, 70, 70, 64), "causal&sliding_window", dtype, "triton", scale=0.5, softcap=3.0)


def test_softcap_bad_values():
    q = torch.randn(1, 1, 4, 16)
    for bad, err in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError)):
        with pytest.raises(err, match="softcap"):
            vlkernels.attention(q, q, q, softcap=bad)


def test_varlen_cu_seqlens_is_each_sequence_on_its_own(backend):
    """masks.varlen (FlashAttention's cu_seqlens): sequences of 5, 11 and 3 tokens packed into 24
    (5 tokens of tail padding), causal: each sequence's output and gradients are those of the
    sequence alone (float64 reference); the tail rows give 0 and receive 0."""
    g = torch.Generator().manual_seed(21)
    H, D, L = 2, 24, 24
    cu = torch.tensor([0, 5, 16, 19], device=DEVICE)
    packed = [torch.randn(1, H, L, D, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    mask = masks.varlen(cu, L) & masks.causal()
    do = torch.randn(1, H, L, D, generator=g).to(DEVICE)
    with launched(backend, "attention"):
        out = vlkernels.attention(*packed, mask, backend=backend)
        grads = torch.autograd.grad(out, packed, do)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        part = [t[:, :, s:e].detach().double().requires_grad_() for t in packed]
        ref = attention_ref(*part, masks.causal())
        ref_grads = torch.autograd.grad(ref, part, do[:, :, s:e].double())
        for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
            torch.testing.assert_close(got[:, :, s:e].double(), want, rtol=1e-5, atol=1e-5)
    for t in (out, *grads):
        assert torch.all(t[:, :, 19:] == 0)


def test_varlen_bad_inputs():
    with pytest.raises(TypeError, match="varlen: cu_seqlens must be an integer tensor"):
        masks.varlen(torch.tensor([0.0, 3.0]), 4)
    with pytest.raises(ValueError, match="at least 2 entries"):
        masks.varlen(torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        masks.varlen(torch.tensor([0, 3]), 0)
    for cu in ([1, 3, 5], [0, 4, 2, 6], [0, 3, 9]):  # not from 0, not ascending, past seq_len
        with pytest.raises(
            ValueError, match=r"cu_seqlens must be non-decreasing from 0 to at most seq_len=8"
        ):
            masks.varlen(torch.tensor(cu), 8)
    masks.varlen(torch.tensor([0, 3, 3, 8]), 8)  # an empty sequence is a sequence


DECODE_CASES = [  # (B, Bq, H, Hk, Lq, Lk, D), mask: a few query rows over many keys
    ((2, 2, 4, 2, 1, 300, 64), "none"),
    ((3, 3, 2, 2, 5, 517, 40), "key_padding"),
    ((2, 1, 4, 1, 1, 700, 64), "none"),
    ((2, 2, 2, 2, 3, 400, 16), "causal&sliding_window"),
    ((2, 2, 2, 2, 4, 320, 16), "media_all_previous"),
    ((2, 2, 2, 2, 2, 300, 24), "dense"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[1]}-Lq{c[0][4]}-Lk{c[0][5]}")
def test_decoding_splits_the_keys(backend, case):
    """Flash-decoding: with a few query rows over many keys the forward splits the keys across
    programs and combines the partial results (Triton: the split path ran; the CUDA C++ backend
    splits by the same rule); out and gradients against float64, empty rows 0, every mask."""
    shape, mask_name = case
    with assert_launched("attention_fwd_split") if backend == "triton" else contextlib.nullcontext():
        run_case(shape, mask_name, torch.float32, backend)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_decoding_low_precision_two_x_rule_with_softcap(dtype):
    with assert_launched("attention_fwd_split"):
        run_case((2, 2, 4, 1, 1, 600, 64), "key_padding", dtype, "triton", softcap=5.0)


PACKED_CASES = [  # (B, Bq, H, Hk, Lq, Lk, D), mask: grouped keys, a few query rows
    ((2, 2, 6, 2, 5, 70, 24), "causal&key_padding"),  # 3 heads x 5 rows in one tile
    ((2, 1, 8, 1, 7, 45, 16), "dense"),  # 56 rows: a tile boundary inside a head; shared queries
    ((3, 3, 4, 2, 3, 300, 40), "prefix_lm&pad"),  # split keys too
    ((2, 2, 4, 2, 16, 64, 16), "media_immediate"),
]


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: f"{c[1]}-G{c[0][2] // c[0][3]}-Lq{c[0][4]}")
def test_grouped_query_decoding_packs_the_heads(case):
    """With grouped keys and a few query rows the forward packs the query heads of a key head into
    one program's rows (each key head's K and V read once): out and gradients (the backward takes
    the packed forward's lse) against float64, every mask kind's per-row bounds."""
    shape, mask_name = case
    with assert_launched("attention_fwd_packed"):
        run_case(shape, mask_name, torch.float32, "triton")


def test_packed_decoding_per_head_bias_and_dropout():
    """The per-row heads of a packed tile address a per-head float bias and draw each head's own
    dropout bits: out and gradients against the float64 reference with the same keep mask."""
    B, H, Hk, Lq, Lk, D = 2, 6, 2, 3, 50, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, Lq, D, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, Hk, Lk, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    bias = (torch.randn(1, H, Lq, Lk, generator=g) * 2).to(DEVICE).requires_grad_()
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE)
    inputs = (q, k, v, bias)
    with assert_launched("attention_fwd_packed"):
        out = vlkernels.attention(q, k, v, bias, dropout_p=0.3, seed=11, backend="triton")
        grads = torch.autograd.grad(out, inputs, do)
    keep = vlkernels.attention_dropout_mask(q, k, 0.3, 11)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = attention_ref(*ref_in, dropout_keep=keep, dropout_p=0.3)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    for name, got, want in zip(
        ("out", "dq", "dk", "dv", "dbias"), (out, *grads), (ref, *ref_grads), strict=True
    ):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_decode_split_rule():
    from vlkernels.attention.plan import decode_splits, packs

    cpu = torch.device("cpu")
    assert decode_splits(2, 4, 1, 1000, cpu) == (4, 256)  # 4 splits of a multiple of 64 keys
    assert decode_splits(2, 4, 17, 1000, cpu) == (1, 1000)  # more than 16 query rows: one pass
    assert decode_splits(2, 4, 1, 200, cpu) == (1, 200)  # too few keys to split
    assert packs(4, 2, 16) and not packs(4, 2, 17) and not packs(4, 4, 1)
    assert decode_splits(2, 8, 1, 1000, cpu, group=4) == (4, 256)


DROPOUT_CASES = [  # (B, Bq, H, Hk, Lq, Lk, D), mask: each backward path, shared queries, decoding
    ((2, 2, 2, 2, 45, 45, 32), "qformer_multimodal_causal&pad"),  # one key tile: fused dk/dv
    ((2, 2, 2, 2, 20, 70, 16), "key_padding"),  # one query tile: fused dq
    ((2, 1, 4, 2, 50, 70, 24), "none"),  # shared queries, grouped keys: split backward
    ((2, 2, 2, 2, 2, 300, 16), "causal&sliding_window"),  # decoding: split keys
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"{c[1]}-{c[0][4]}x{c[0][5]}")
def test_dropout_against_the_reference_given_its_keep_mask(backend, case):
    """Attention dropout: out, dq, dk, dv against the float64 eager reference that applies the
    keep mask ``attention_dropout_mask`` exposes (the same Philox bits on every backend; the
    backward regenerates them); rows with nothing to attend stay 0."""
    (B, Bq, H, Hk, Lq, Lk, D), mask_name = case
    g = torch.Generator().manual_seed(Lq + Lk)
    q = torch.randn(Bq, H, Lq, D, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, Hk, Lk, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    mask = MASKS[mask_name](B, Lq, Lk, g)
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE)
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, mask, dropout_p=0.3, seed=7, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), do)
    keep = vlkernels.attention_dropout_mask(q, k, 0.3, 7)
    assert keep.shape == (B, H, Lq, Lk) and 0.6 < keep.float().mean() < 0.8
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_in, mask, dropout_keep=keep, dropout_p=0.3)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_keep_rate_seeds_and_determinism():
    """The keep rate is 1 - p (4·8·128·128 draws: within 5 sigma), the streams of different heads
    and batch entries differ, a seed gives the same output twice and another seed another one;
    seed=None draws from torch's generator (reproducible under torch.manual_seed)."""
    q = torch.randn(4, 8, 128, 16, device=DEVICE)
    for p in (0.1, 0.5):
        keep = vlkernels.attention_dropout_mask(q, q, p, 1234)
        rate = keep.float().mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5, (p, rate)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    x = q[:1, :2, :40]
    run = lambda seed: vlkernels.attention(x, x, x, dropout_p=0.2, seed=seed, backend="triton")
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    torch.manual_seed(0)
    first = vlkernels.attention(x, x, x, dropout_p=0.2, backend="triton")
    torch.manual_seed(0)
    assert torch.equal(first, vlkernels.attention(x, x, x, dropout_p=0.2, backend="triton"))
    assert torch.equal(vlkernels.attention(x, x, x, dropout_p=1.0, backend="triton"), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\], got 1.5"):
        vlkernels.attention(x, x, x, dropout_p=1.5)
    with pytest.raises(ValueError, match="seed must be an int"):
        vlkernels.attention(x, x, x, dropout_p=0.1, seed=-1)


def test_dropout_with_a_float_bias_and_its_gradient(backend):
    """Dropout with a float mask that needs a gradient: the bias's gradient is that of the
    reference given the same keep mask (the Triton dbias kernel regenerates it too)."""
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels take no float bias (test_float_bias_and_its_gradient)")
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 33, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    bias = (torch.randn(2, 1, 33, 33, generator=g) * 2).to(DEVICE).requires_grad_()
    do = torch.randn(2, 2, 33, 16, generator=g).to(DEVICE)
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, bias, dropout_p=0.25, seed=11, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v, bias), do)
    keep = vlkernels.attention_dropout_mask(q, k, 0.25, 11)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = attention_ref(*ref_in, dropout_keep=keep, dropout_p=0.25)
    for got, want in zip((out, *grads), (ref, *torch.autograd.grad(ref, ref_in, do.double())), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_dropout_low_precision_two_x_rule(dtype):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 64, 64, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    mask = masks.causal()
    do = torch.randn(2, 4, 64, 64, generator=g).to(DEVICE, dtype)
    with assert_launched("attention_fwd", "attention_bwd"):
        out = vlkernels.attention(q, k, v, mask, dropout_p=0.1, seed=5, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
    keep = vlkernels.attention_dropout_mask(q, k, 0.1, 5)
    ref = attention_ref(q, k, v, mask, upcast=True, dropout_keep=keep, dropout_p=0.1)
    lowp = attention_ref(q, k, v, mask, dropout_keep=keep, dropout_p=0.1)
    refs = (ref, *torch.autograd.grad(ref, (q, k, v), do.double()))
    lowps = (lowp, *torch.autograd.grad(lowp, (q, k, v), do))
    for name, got, r, lp in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, lowps, strict=True):
        check_against_reference(f"dropout {name}", got, r, lp, dtype, "attention", "triton")


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_dropout_rescale_does_not_bias_low_precision(backend, dtype):
    """Dropout's 1 / (1 - p) multiplies fp32 values (the output, dV), not the probabilities rounded
    to 16 bits for the P·V and Pᵀ·dO GEMMs: rounded there, bf16's 1 / 0.9 (1.109) scales every
    row's largest probability alike, a bias the max error hides but a model's sums (a tanh gate's
    gradient) do not. The output's and dV's least-squares scale against float64 is 1 within
    eps/32 (unbiased rounding: eps/1000 here)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    do = torch.randn(2, 4, 64, 32, generator=g).to(DEVICE, dtype)
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, dropout_p=0.1, seed=5, scale=0.5, backend=backend)
        (dv,) = torch.autograd.grad(out, (v,), do)
    keep = vlkernels.attention_dropout_mask(q, k, 0.1, 5)
    ref = attention_ref(q, k, v, upcast=True, dropout_keep=keep, dropout_p=0.1, scale=0.5)
    (ref_dv,) = torch.autograd.grad(ref, (v,), do.double())
    for name, got, want in (("out", out, ref), ("dv", dv, ref_dv)):
        bias = ((got.double() - want) * want).sum() / (want * want).sum()
        assert abs(bias) <= torch.finfo(dtype).eps / 32, (name, bias.item())


def test_dropout_rows_with_nothing_to_attend_stay_zero(backend):
    """Dropout on rows with no allowed key (a batch entry padded away entirely): 0 out, 0 gradient."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    mask = masks.causal() & masks.key_padding(torch.tensor([40, 0], device=DEVICE))
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, mask, dropout_p=0.2, seed=3, backend=backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert (
        torch.all(out[1] == 0) and torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    )
    assert torch.isfinite(out).all() and out[0].abs().sum() > 0
