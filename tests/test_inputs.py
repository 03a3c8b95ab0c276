"""Every input right: any layout and stride, garbage where the mask rules it out, float masks as
the numbers they are, NaN where the math says NaN; every op, every backend, against float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_FACTOR, LOWP, check_against_reference, launched
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import vlkernels
from vlkernels import masks
from vlkernels.reference import attention_ref

# ----------------------------------------------------------------------------------------------
# Layouts: how a tensor of logical shape [B, H, L, D] can lie in memory. Each builds the storage
# (the autograd leaf) and the view of it that the op is given.
# ----------------------------------------------------------------------------------------------


def _storage(layout, B, H, L, D, g):
    """(leaf storage, function storage -> the [B, H, L, D] view of it)."""
    if layout == "contiguous":
        return torch.randn(B, H, L, D, generator=g), lambda t: t
    if layout == "blhd":  # [B, L, H, D] viewed as [B, H, L, D]
        return torch.randn(B, L, H, D, generator=g), lambda t: t.transpose(1, 2)
    if layout == "bhdl":  # [B, H, D, L] transposed: the last dim is not unit-stride
        return torch.randn(B, H, D, L, generator=g), lambda t: t.transpose(2, 3)
    if layout == "einops":  # b n (d h) -> b h n d
        return torch.randn(B, L, D * H, generator=g), lambda t: t.view(B, L, D, H).permute(0, 3, 1, 2)
    if layout == "channels_last":
        return torch.randn(B, H, L, D, generator=g), lambda t: t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # an offset window of a larger buffer
        return torch.randn(B + 1, H, L + 3, D + 5, generator=g), lambda t: t[1:, :, 3:, 2 : 2 + D]
    if layout == "expanded_batch":  # stride 0 over the batch
        return torch.randn(1, H, L, D, generator=g), lambda t: t.expand(B, H, L, D)
    if layout == "expanded_heads":  # stride 0 over the heads
        return torch.randn(B, 1, L, D, generator=g), lambda t: t.expand(B, H, L, D)
    raise AssertionError(layout)


LAYOUTS = [
    "contiguous",
    "blhd",
    "bhdl",
    "einops",
    "channels_last",
    "sliced",
    "expanded_batch",
    "expanded_heads",
]


def _dense_shape(rank, B, H, Lq, Lk, draw):
    """A shape of ``rank`` dims broadcastable to [B, H, Lq, Lk], each dim full or 1."""
    full = (B, H, Lq, Lk)[4 - rank :]
    return (*(n if draw(st.booleans()) else 1 for n in full[:-1]), full[-1])


@st.composite
def attention_problems(draw, backend):
    """(q, k, v as views of their storages, the storages, mask, dtype, the keys [B, Lk] to fill
    with garbage, the output gradient, a description)."""
    cuda = backend == "cuda"
    B = draw(st.integers(1, 3))
    Hk = draw(st.integers(1, 2))
    H = Hk * draw(st.integers(1, 2))
    Bq = draw(st.sampled_from([B, 1]))
    D = draw(st.sampled_from([16, 24, 40] if cuda else [8, 16, 24, 33, 40]))
    self_attn = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float32, *LOWP]))
    # fp16/bf16: the 2x rule is a statement about many roundings; a handful of elements can be off
    # by one rounding more than the reference by chance, so low precision starts at 16 x 16, and
    # its masks leave most keys (a row of one key has a zero dq, which the same-dtype reference
    # gets exactly and any kernel that takes delta from the rounded output gets within its noise:
    # PyTorch's own SDPA kernel is then 30-60x "over" the rule)
    lowp = dtype != torch.float32
    least = 16 if lowp else 1
    Lq = draw(st.integers(least, 40))
    Lk = Lq if self_attn else draw(st.integers(least, 40))
    if lowp:
        D = max(D, 16)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    kinds = ["none", "bool", "key_padding", "causal&key_padding", "dense_tail"]
    if not cuda:  # the CUDA C++ kernels take no float bias
        kinds += ["float", "float_tail"]
    if self_attn:
        kinds += ["qformer", "prefix_lm"]
    kind = draw(st.sampled_from(kinds))
    lengths = torch.randint(Lk // 2 if lowp else 0, Lk + 1, (B,), generator=g)
    if kind == "none":
        mask = None
    elif kind in ("bool", "float", "dense_tail", "float_tail"):
        shape = _dense_shape(draw(st.integers(1, 4)), B, H, Lq, Lk, draw)
        if kind.endswith("tail"):  # a valid length per batch entry: the tail of a KV buffer
            shape = (B, *((1,) * (4 - len(shape)) + shape)[1:])
        allowed = torch.rand(shape, generator=g) > draw(
            st.sampled_from([0.0, 0.3] if lowp else [0.0, 0.3, 0.7])
        )
        if kind.endswith("tail"):
            allowed &= torch.arange(Lk) < lengths.view(B, 1, 1, 1)
        if kind.startswith("float"):
            mask = torch.randn(shape, generator=g) * (1 if lowp else 3)  # (a peaked softmax: see above)
            mask = mask.masked_fill(~allowed, float("-inf"))
        else:
            mask = allowed
        mask = mask.to(DEVICE)
    elif kind == "key_padding":
        mask = masks.key_padding(lengths.to(DEVICE))
    elif kind == "causal&key_padding":
        mask = masks.causal() & masks.key_padding(lengths.to(DEVICE))
    elif kind == "qformer":
        mode = draw(st.sampled_from(["bidirectional", "multimodal_causal", "unimodal"]))
        mask = masks.qformer(draw(st.integers(0, Lk)), mode) & masks.key_padding(lengths.to(DEVICE))
    else:
        mask = masks.prefix_lm(lengths.to(DEVICE))

    # (fp16/bf16 results are compared per view, below: one storage shared by two views sums two
    # rounded gradients, which the 2x rule does not speak of)
    sharing = ["none", "k_is_v", "q_k_v"] if Bq == B and H == Hk and self_attn else ["none", "k_is_v"]
    shared = draw(st.sampled_from(["none"] if lowp else sharing))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    leaves, views = [], []
    for i, (b, h, n) in enumerate(((Bq, H, Lq), (B, Hk, Lk), (B, Hk, Lk))):
        if (shared == "k_is_v" and i == 2) or (shared == "q_k_v" and i > 0):
            continue
        base, view = _storage(layouts[i], b, h, n, D, g)
        leaves.append(base.to(DEVICE, dtype))
        views.append(view)
    if shared == "k_is_v":
        views.append(views[1])
    elif shared == "q_k_v":
        views += [views[0], views[0]]

    # the keys before the first and after the last key that any query row of a batch entry may
    # attend (a KV buffer's tail, left padding), and whether garbage can go there (an expanded
    # batch dim is one storage row for every batch entry)
    live = _allowed(mask, B, H, Lq, Lk).any(dim=(1, 2))  # [B, Lk]
    j = torch.arange(Lk)
    first = torch.where(live, j, Lk).amin(-1, keepdim=True)
    last = torch.where(live, j, -1).amax(-1, keepdim=True)
    unused = (j < first) | (j > last)
    garbage_ok = all(layouts[i] != "expanded_batch" for i in (1, 2)) and shared != "q_k_v"
    desc = (
        f"B={B} Bq={Bq} H={H} Hk={Hk} Lq={Lq} Lk={Lk} D={D} {dtype} mask={kind} {_describe(mask)} "
        f"layouts={layouts} shared={shared} garbage={garbage_ok}"
    )
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE, dtype)
    return views, leaves, mask, dtype, unused if garbage_ok else torch.zeros_like(unused), do, desc


def _describe(mask):
    if isinstance(mask, torch.Tensor):
        return f"{mask.dtype} {list(mask.shape)}"
    return repr(mask)


def _allowed(mask, B, H, Lq, Lk):
    if mask is None:
        return torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if isinstance(mask, masks.Mask):
        allowed = mask.to_dense(B, Lq, Lk)
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask != float("-inf")
    return allowed.cpu().expand(B, H, Lq, Lk)


def _with_garbage(views, leaves, unused):
    """Leaves whose unused keys (in k and v) hold NaN and inf, as fresh leaves needing grad."""
    dirty = [t.detach().clone() for t in leaves]
    if unused.any():
        kv_leaves = {1: dirty[1], 2: dirty[2] if len(dirty) > 2 else dirty[1]}
        for i, t in kv_leaves.items():
            view = views[i](t)
            b, j = unused.nonzero(as_tuple=True)
            fill = torch.where(torch.arange(len(b)) % 2 == 0, float("nan"), float("inf")).to(t.dtype)
            view[b.to(DEVICE), :, j.to(DEVICE)] = fill.to(DEVICE)[:, None, None]
    return [t.requires_grad_() for t in dirty]


def _run_attention_problem(problem, backend):
    """fp32: the output and the gradient of every storage (what autograd sums over expanded and
    shared views included) within the tolerance. fp16/bf16: the output and the gradients of q, k,
    v as viewed, by FlashAttention's rule (2x, 3x for gradients) against the same-dtype reference
    on contiguous copies (how PyTorch's CPU matmuls round depends on the layout; the rule compares
    kernels, not that)."""
    views, leaves, mask, dtype, unused, do, desc = problem
    note(desc)
    dirty = _with_garbage(views, leaves, unused)
    q, k, v = (view(t) for view, t in zip(views, _leaf_of_each(dirty), strict=True))
    lowp = dtype != torch.float32
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, mask, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v) if lowp else dirty, do)
    clean64 = [t.detach().double().requires_grad_() for t in leaves]
    qkv64 = [view(t) for view, t in zip(views, _leaf_of_each(clean64), strict=True)]
    ref = attention_ref(*qkv64, mask)
    ref_grads = torch.autograd.grad(ref, qkv64 if lowp else clean64, do.double())
    names = ["out", *(("dq", "dk", "dv") if lowp else (f"d(leaf {i})" for i in range(len(leaves))))]
    if not lowp:
        for name, got, r in zip(names, (out, *grads), (ref, *ref_grads), strict=True):
            check_against_reference(name, got, r, None, dtype, "attention", backend)
        return
    clean = [view(t.detach()).contiguous().requires_grad_() for view, t in zip(views, leaves, strict=True)]
    same = attention_ref(*clean, mask)
    same_grads = torch.autograd.grad(same, clean, do)
    for name, got, r, lp in zip(names, (out, *grads), (ref, *ref_grads), (same, *same_grads), strict=True):
        factor = 2 if name == "out" else GRAD_FACTOR
        check_against_reference(name, got, r, lp, dtype, "attention", backend, factor)


def _leaf_of_each(leaves):
    """The leaves of q, k, v in order (k and v share one when there are two, all when one)."""
    if len(leaves) == 3:
        return leaves
    if len(leaves) == 2:
        return [leaves[0], leaves[1], leaves[1]]
    return [leaves[0]] * 3


FUZZ_EXAMPLES = {"torch": 300, "triton": 30, "cuda": 12}


def test_attention_any_layout_mask_and_garbage(backend):
    """Fuzz: every layout of q, k, v (unit-stride or not, sliced, expanded, shared storage), masks
    of every kind and broadcastable rank, NaN and inf in the keys no row may attend; output and
    the gradient of every storage against float64 (fp16/bf16: FlashAttention's rule)."""

    @settings(
        max_examples=FUZZ_EXAMPLES[backend],
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(attention_problems(backend))
    def run(problem):
        _run_attention_problem(problem, backend)

    run()


# ----------------------------------------------------------------------------------------------
# Float masks are numbers; NaN where the math has NaN
# ----------------------------------------------------------------------------------------------


def _qkv(B, H, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype).requires_grad_() for L in (Lq, Lk, Lk)]


def test_rows_of_finfo_min_give_sdpa_forward_and_the_reference_gradient(backend):
    """transformers' padding convention: a float mask of finfo(float32).min. A row that is all of
    it swamps its scores: SDPA (and float64) average the values uniformly; every backend gives
    that forward and the float64 reference's gradient (the lse of such a row is that huge number,
    the row sum lost in its rounding unless kept apart)."""
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels take no float bias (they say so: test_ops)")
    B, H, Lq, Lk, D = 2, 2, 20, 24, 16
    q, k, v = _qkv(B, H, Lq, Lk, D)
    bias = torch.randn(B, 1, Lq, Lk, device=DEVICE)
    bias[:, :, 3] = torch.finfo(torch.float32).min  # every key of row 3
    bias[1, :, 7, ::2] = torch.finfo(torch.float32).min  # half the keys of row 7: the others win
    bias[0, :, 9] = torch.finfo(torch.float32).min / 2  # finite, halved: still swamps the scores
    bias[0, :, 9, :5] = torch.finfo(torch.float32).min  # ... and beats these
    do = torch.randn(B, H, Lq, D, device=DEVICE)
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, bias, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), do)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    ref = attention_ref(q, k, v, bias, upcast=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    torch.testing.assert_close(out.double(), sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, 3].double(), v.double().mean(2), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_float_bias_is_added_in_fp32(backend, dtype):
    """fp16/bf16 q with an fp32 float mask: the mask is added to the fp32 scores as it is (SDPA's
    CPU kernel and FlashAttention's reference do so): values past fp16's range stay finite and an
    ALiBi bias of hundreds keeps its precision (FlashAttention's ALiBi test shapes and rule)."""
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels take no float bias (they say so: test_ops)")
    B, H, Lq, Lk, D = 2, 2, 113, 203, 32
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    slopes = torch.tensor([0.5, 2.0], device=DEVICE)
    i, j = torch.arange(Lq, device=DEVICE)[:, None], torch.arange(Lk, device=DEVICE)[None]
    alibi = -slopes[:, None, None] * (i + Lk - Lq - j).abs()  # [H, Lq, Lk]: -0 .. -400 (fp32)
    wide = torch.randn(B, 1, Lq, Lk, generator=g).to(DEVICE) * 1e5  # past fp16's range
    for bias in (alibi, wide):
        do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE, dtype)
        with launched(backend, "attention"):
            out = vlkernels.attention(q, k, v, bias, backend=backend)
            grads = torch.autograd.grad(out, (q, k, v), do)
        ref = attention_ref(q, k, v, bias, upcast=True)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
        lowp = attention_ref(q, k, v, bias)
        lowp_grads = torch.autograd.grad(lowp, (q, k, v), do)
        for name, got, r, lp in zip(
            ("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (lowp, *lowp_grads), strict=True
        ):
            factor = 2 if name == "out" else GRAD_FACTOR
            check_against_reference(
                f"{list(bias.shape)} {name}", got, r, lp, dtype, "attention", backend, factor
            )


def test_nan_in_a_query_row_is_nan_in_that_row_only(backend):
    """NaN in a query row, or an inf that makes a score +inf, makes that row's output NaN (as
    float64 does) on every backend, with or without a mask; the other rows are unaffected. (PyTorch's
    CPU kernel gives some such rows 0, as if they had nothing to attend.) An inf that makes every
    allowed score -inf leaves the row nothing to attend: 0, as SDPA gives."""
    B, H, L, D = 2, 2, 10, 16
    g = torch.Generator().manual_seed(3)
    dense = (torch.rand(B, 1, L, L, generator=g) > 0.3).to(DEVICE)
    dense[..., 0] = True  # every row allows a key
    for mask in (None, masks.causal(), dense):
        for sign in (1.0, -1.0):
            q, k, v = _qkv(B, H, L, L, D)
            with torch.no_grad():
                q[0, 1, 2] = float("nan")
                q[1, 0, 5, 3] = float("inf")
                k[1, 0, :, 3] = sign * k[1, 0, :, 3].abs()  # the inf row's scores: all +inf or all -inf
            out = vlkernels.attention(q, k, v, mask, backend=backend)
            bad = torch.zeros(B, H, L, dtype=torch.bool, device=DEVICE)
            bad[0, 1, 2] = True
            if sign > 0:
                bad[1, 0, 5] = True
            else:
                sdpa_mask = mask if mask is None or torch.is_tensor(mask) else mask.to_dense(B, L, L)
                sdpa = torch.nn.functional.scaled_dot_product_attention(
                    *(t.detach().double() for t in (q, k, v)), attn_mask=sdpa_mask
                )
                assert out[1, 0, 5].eq(0).all() and sdpa[1, 0, 5].eq(0).all(), _describe(mask)
            assert torch.isnan(out[bad]).all(), _describe(mask)
            ref = attention_ref(q.detach(), k.detach(), v.detach(), mask, upcast=True)
            good = ~bad
            good[1, 0, 5] = False
            torch.testing.assert_close(out[good].double(), ref[good], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_scale_must_be_finite(scale):
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=f"attention: scale must be a finite float, got {scale}"):
        vlkernels.attention(q, q, q, scale=scale)


def test_triton_interpreter_rounds_bf16_as_the_gpu():
    """Under the interpreter, the kernels' fp32 -> bf16 conversions round to nearest even (the
    GPU's cvt.rn; Triton's interpreter truncates), overflow to inf and keep NaN: bit for bit
    torch's conversion."""
    import triton
    import triton.language as tl

    if DEVICE.type != "cpu":
        pytest.skip("the interpreter runs on CPU tensors")

    @triton.jit
    def cast(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))

    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    x[:4] = torch.tensor([float("nan"), float("inf"), 3.4e38, -3.4e38])
    y = torch.empty(4096, dtype=torch.bfloat16)
    cast[(1,)](x, y, N=4096)
    want = x.bfloat16()
    assert torch.isnan(y[0]) and torch.equal(y[1:].view(torch.int16), want[1:].view(torch.int16))


# ----------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, what was expected and what came
# ----------------------------------------------------------------------------------------------


def test_meta_tensors_give_shapes_as_sdpa():
    """Meta tensors (shape inference, a model built on the meta device): the torch backend's
    operations run on them and give the output's shape and its gradients', as SDPA does."""
    q = torch.randn(2, 4, 5, 8, device="meta", requires_grad=True)
    k = torch.randn(2, 2, 7, 8, device="meta", requires_grad=True)
    out = vlkernels.attention(q, k, k, masks.causal())
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize(
    "B, Bq, H, Hk, Lq, Lk",
    [(0, 0, 2, 2, 3, 5), (0, 1, 2, 2, 3, 5), (2, 2, 2, 2, 0, 5), (2, 2, 4, 2, 3, 0), (2, 1, 2, 2, 3, 0)],
)
def test_empty_batch_or_lengths_give_sdpas_answer(backend, B, Bq, H, Hk, Lq, Lk):
    """Nothing to compute, as SDPA answers it: an empty batch or query length gives an empty output,
    no keys (Lk = 0) rows of 0; gradients of 0. Every mask kind and a position bias are still checked
    and lowered at those sizes."""
    q = torch.randn(Bq, H, Lq, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, Hk, Lk, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    dense = torch.rand(B, 1, Lq, Lk, device=DEVICE) > 0.5
    bias = torch.randn(B, 1, Lq, Lk, device=DEVICE)
    t5 = vlkernels.bias.t5(torch.randn(H, 8, device=DEVICE), True, num_buckets=8, max_distance=16)
    for mask, sdpa in [
        (None, {}),
        (masks.causal(), dict(is_causal=True)),
        (dense, dict(attn_mask=dense)),
        *([] if backend == "cuda" else [(bias, dict(attn_mask=bias))]),  # (its kernels take no float bias)
        (masks.key_padding(torch.zeros(B, dtype=torch.long, device=DEVICE)), None),
        (masks.sliding_window(2), None),
        (masks.media(torch.zeros(B, Lq, dtype=torch.long, device=DEVICE), Lk or 4), None),
    ]:
        for position in (None, t5):
            out = vlkernels.attention(q, k, v, mask, position_bias=position, backend=backend, dropout_p=0.1)
            qe = q.expand(B, -1, -1, -1)
            want = torch.zeros(B, H, Lq, 16, device=DEVICE)
            if sdpa is not None and position is None:
                want = F.scaled_dot_product_attention(qe, k, v, **sdpa, enable_gqa=H != Hk)
            assert out.shape == want.shape == (B, H, Lq, 16)
            torch.testing.assert_close(out, want, atol=0, rtol=0)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v), strict=True))
            weights = vlkernels.attention_weights(q, k, mask, position_bias=position)
            assert weights.shape == (B, H, Lq, Lk) and not weights.any()


def test_seeds_named_errors():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    for seed in (None, -1, 2**63, 1.5, True):
        with pytest.raises(
            ValueError, match=r"attention_dropout_mask: seed must be an int in \[0, 2\*\*63\)"
        ):
            vlkernels.attention_dropout_mask(q, q, 0.1, seed)
        if seed is not None:
            with pytest.raises(ValueError, match=r"attention: seed must be an int in \[0, 2\*\*63\)"):
                vlkernels.attention(q, q, q, dropout_p=0.1, seed=seed)


def test_modules_and_distillation_errors():
    from vlkernels import modules

    with pytest.raises(
        ValueError, match=r"MomentumDistillation: alpha must be a float in \[0, 1\], got '0.4'"
    ):
        vlkernels.MomentumDistillation(torch.randn(4, 8), torch.randn(4, 8), alpha="0.4")
    with pytest.raises(
        TypeError, match=r"MomentumDistillation: text_features must be a torch\.Tensor, got list"
    ):
        vlkernels.MomentumDistillation(torch.randn(4, 8), [1.0], alpha=0.4)
    qa = modules.QFormerAttention(32, 4).to(DEVICE)
    h = torch.randn(2, 10, 32, device=DEVICE)
    with pytest.raises(
        TypeError, match=r"QFormerAttention: text_lengths must be an int32/int64 tensor \[B\], got list"
    ):
        qa(h, num_queries=4, mode="bidirectional", text_lengths=[1, 2])
    with pytest.raises(
        ValueError, match=r"QFormerAttention: built for self-attention .* got encoder_hidden_states"
    ):
        qa(h, torch.randn(2, 5, 32, device=DEVICE), num_queries=4)
    block = modules.GatedCrossAttentionBlock(dim=32, dim_visual=16, dim_head=8, heads=4).to(DEVICE)
    x, loc = torch.randn(2, 5, 32, device=DEVICE), torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    for media_batch in (1, 3):
        media = torch.randn(media_batch, 1, 3, 16, device=DEVICE)
        with pytest.raises(
            ValueError,
            match=rf"MaskedCrossAttention: media must be .* batch B=2, got shape \[{media_batch}, 1, 3, 16\]",
        ):
            block(x, media, loc)


# ----------------------------------------------------------------------------------------------
# The other ops: any layout of their inputs
# ----------------------------------------------------------------------------------------------


def _matrix(layout, rows, cols, g):
    """(leaf storage, storage -> [rows, cols] view)."""
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=g), lambda t: t
    if layout == "transposed":
        return torch.randn(cols, rows, generator=g), lambda t: t.t()
    if layout == "sliced":
        return torch.randn(rows + 2, cols + 3, generator=g), lambda t: t[2:, 1 : 1 + cols]
    if layout == "strided_rows":  # every other row of a buffer
        return torch.randn(2 * rows, cols, generator=g), lambda t: t[::2]
    if layout == "expanded":  # one row for all (stride 0)
        return torch.randn(1, cols, generator=g), lambda t: t.expand(rows, cols)
    raise AssertionError(layout)


MATRIX_LAYOUTS = ["contiguous", "transposed", "sliced", "strided_rows", "expanded"]


@st.composite
def contrastive_problems(draw):
    N = draw(st.integers(1, 24))
    D = draw(st.sampled_from([8, 16, 24, 40]))
    kind = draw(st.sampled_from(["clip", "siglip", "blip2"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lx, ly = draw(st.sampled_from(MATRIX_LAYOUTS)), draw(st.sampled_from(MATRIX_LAYOUTS))
    if kind == "blip2":  # image features [N, Q, D] as a view of [N, D, Q] or [Q, N, D]
        Q = draw(st.integers(1, 4))
        x_layout = draw(st.sampled_from(["ndq", "qnd", "nqd"]))
        shape = {"ndq": (N, D, Q), "qnd": (Q, N, D), "nqd": (N, Q, D)}[x_layout]
        perm = {"ndq": (0, 2, 1), "qnd": (1, 0, 2), "nqd": (0, 1, 2)}[x_layout]
        xs, xv = torch.randn(shape, generator=g) * 0.3, lambda t: t.permute(*perm)
        lx = x_layout
    else:
        xs, xv = _matrix(lx, N, D, g)
    ys, yv = _matrix(ly, N, D, g)
    scale = torch.tensor(draw(st.sampled_from([1.0, 10.0, 30.0])))
    bias = torch.tensor(-3.0) if kind == "siglip" else None
    desc = f"N={N} D={D} kind={kind} layouts=({lx}, {ly})"
    return kind, (xs, xv), (ys, yv), scale, bias, desc


def _contrastive_ref(kind, x, y, scale, bias):
    from vlkernels.reference import blip2_itc_ref, clip_loss_ref, siglip_loss_ref

    if kind == "clip":
        return clip_loss_ref(x, y, scale)
    if kind == "siglip":
        return siglip_loss_ref(x, y, scale, bias)
    return blip2_itc_ref(x, y, 1.0 / scale, label_smoothing=0.0)


@pytest.mark.parametrize("op", ["contrastive", "gated_residual"])
def test_other_ops_any_layout(backend, op):
    """Fuzz: the contrastive loss (clip, siglip, BLIP-2's [N, Q, D]) and the gated residual over
    transposed, sliced, row-strided and expanded inputs, every backend, value and gradients of
    every storage against float64."""
    from vlkernels.reference import gated_residual_ref

    tol = 1e-4 if op == "contrastive" else 1e-5

    def compare(ours, ref, leaves, leaves64):
        got = torch.autograd.grad(ours, leaves)
        want = torch.autograd.grad(ref, leaves64)
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(contrastive_problems())
    def contrastive(problem):
        kind, (xs, xv), (ys, yv), scale, bias, desc = problem
        note(desc)
        leaves = [t.to(DEVICE).requires_grad_() for t in (xs, ys)]
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        s, b = scale.to(DEVICE), None if bias is None else bias.to(DEVICE)
        with launched(backend, "contrastive"):
            ours = vlkernels.contrastive_loss(
                xv(leaves[0]),
                yv(leaves[1]),
                s,
                b,
                kind="siglip" if kind == "siglip" else "clip",
                backend=backend,
            )
            ref = _contrastive_ref(
                kind, xv(leaves64[0]), yv(leaves64[1]), s.double(), b if b is None else b.double()
            )
            compare(ours, ref, leaves, leaves64)

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(MATRIX_LAYOUTS),
        st.sampled_from(MATRIX_LAYOUTS),
        st.integers(1, 40),
        st.integers(1, 50),
        st.integers(0, 9),
    )
    def gated(lx, ly, rows, cols, seed):
        note(f"layouts=({lx}, {ly}) [{rows}, {cols}]")
        g = torch.Generator().manual_seed(seed)
        (xs, xv), (ys, yv) = _matrix(lx, rows, cols, g), _matrix(ly, rows, cols, g)
        leaves = [t.to(DEVICE).requires_grad_() for t in (xs, ys, torch.tensor([0.3]))]
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        with launched(backend, "gated_residual"):
            ours = vlkernels.gated_residual(xv(leaves[0]), yv(leaves[1]), leaves[2], backend=backend)
            ref = gated_residual_ref(xv(leaves64[0]), yv(leaves64[1]), leaves64[2])
            do = torch.randn(ref.shape, generator=g).to(DEVICE)
            got = torch.autograd.grad(ours, leaves, do)
            want = torch.autograd.grad(ref, leaves64, do.double())
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)

    (contrastive if op == "contrastive" else gated)()


_FAR_ROWS = """
import torch
import vlkernels
from vlkernels.reference import attention_ref

g = torch.Generator().manual_seed(0)
Lq, Lk, row = 5, 24, 2**29 + 64  # row 4 of the mask starts 2**31 + 256 elements in
store = torch.zeros(row * (Lq - 1) + Lk, dtype=torch.bool, device=DEVICE)
mask = store.as_strided((1, 1, Lq, Lk), (0, 0, row, 1))
pattern = torch.rand(Lq, Lk, generator=g) > 0.5
pattern[:, 0] = True
mask[0, 0].copy_(pattern)
q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (Lq, Lk, Lk))
want = attention_ref(q.double(), k.double(), v.double(), pattern, upcast=True)
for backend in BACKENDS:
    out = vlkernels.attention(*(t.to(DEVICE) for t in (q, k, v)), mask, backend=backend)
    torch.testing.assert_close(out.double().cpu(), want, atol=1e-5, rtol=1e-5, msg=backend)
print("every row read where it lies")
"""


def test_offsets_past_2_31_elements_do_not_wrap():
    """A mask view whose rows lie 2**29 + 64 elements apart, in 2 GB (row 4 starts past 2**31):
    each backend reads every row where it lies (int32 offsets wrapped: another row, garbage or a
    crash, hence a child process). The kernels build every tensor offset in int64."""
    import subprocess
    import sys

    device = torch.device(DEVICE).type
    backends = ["torch", "triton"] + (["cuda"] if device == "cuda" else [])
    code = f"DEVICE = {device!r}\nBACKENDS = {backends!r}\n" + _FAR_ROWS
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "every row read where it lies" in run.stdout
