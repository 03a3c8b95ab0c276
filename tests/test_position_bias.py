"""Analytic position biases (vlkernels.bias: T5's learned buckets, ALiBi) on every backend: out, dq,
dk, dv and the table's / slopes' gradient against float64 autograd through the dense bias, with
masks, soft-capping, dropout, shared queries, grouped keys, decoding and low precision."""

import pytest
import torch
from helpers import (
    DEVICE,
    GRAD_FACTOR,
    LOWP_SLACK,
    assert_launched,
    assert_ops_ran,
    check_against_reference,
    launched,
    max_err,
)

import vlkernels
from vlkernels import _extension, bias, masks
from vlkernels.reference import attention_ref


def _table(kind, B, H, g):
    if kind == "t5":
        return torch.randn(32, H, generator=g).to(DEVICE)  # nn.Embedding(num_buckets, H).weight
    if kind == "t5_heads_first":
        return torch.randn(H, 32, generator=g).to(DEVICE)
    if kind == "alibi":
        return (torch.rand(H, generator=g) * 0.3).to(DEVICE)
    return (torch.rand(B, H, generator=g) * 0.3).to(DEVICE)  # alibi_batch


def _bias(kind, table, bidirectional=True, offset=None):
    if kind.startswith("t5"):
        return bias.t5(table, bidirectional, num_buckets=32, max_distance=24, query_offset=offset)
    return bias.alibi(table, query_offset=offset)


def _mask(name, B, Lq, Lk, g):
    if name == "none":
        return None
    if name == "causal":
        return masks.causal()
    if name == "padding":
        return masks.key_padding(torch.randint(1, Lk + 1, (B,), generator=g).to(DEVICE))
    if name == "dense":
        m = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        m[:, :, 2] = False  # a row with nothing to attend
        return m.to(DEVICE)
    f = torch.randn(B, 1, Lq, Lk, generator=g)  # "float": a float bias too
    f[:, :, :, 4] = float("-inf")
    return f.to(DEVICE).requires_grad_()


def _compare(backend, q, k, v, mask, kind, table, dtype=torch.float32, bidirectional=True, offset=None,
             **kw):  # fmt: skip
    """The backend's out and gradients (q, k, v, the table, a float mask) against float64 autograd
    through the dense bias (``check_against_reference``: fp32 tolerance, or the 2x / 3x rule)."""
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    table = table.to(dtype).requires_grad_()
    inputs = [q, k, v, table] + ([mask] if isinstance(mask, torch.Tensor) and mask.requires_grad else [])
    do = torch.randn(k.shape[0], q.shape[1], q.shape[2], q.shape[3], device=DEVICE).to(dtype)
    ran = launched(backend, "attention")
    if backend == "triton":
        ran = assert_launched("attention_fwd", "attention_bwd", "attention_position_grad")
    if backend == "cuda":
        ns = _extension.get().ns
        ran = assert_ops_ran(*(f"{ns}::cuda_attention_{op}" for op in ("fwd", "bwd", "position_grad")))
    with ran:
        out = vlkernels.attention(
            q, k, v, mask, backend=backend, position_bias=_bias(kind, table, bidirectional, offset), **kw
        )
        grads = torch.autograd.grad(out, inputs, do)
    ref_kw = {n: kw[n] for n in ("scale", "softcap") if n in kw}
    if kw.get("dropout_p"):
        ref_kw.update(dropout_p=kw["dropout_p"], dropout_keep=vlkernels.attention_dropout_mask(
            q, k, kw["dropout_p"], kw["seed"]))  # fmt: skip
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_mask = ref_in[4] if len(inputs) > 4 else mask
    ref_bias = _bias(kind, ref_in[3], bidirectional, offset)
    ref = attention_ref(*ref_in[:3], ref_mask, upcast=True, position_bias=ref_bias, **ref_kw)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    # the same-dtype eager reference (fp32 too: the table's gradient sums Lq·Lk terms, ALiBi's
    # weighted by distances up to Lk, so its fp32 rounding error is relative to that sum, not to
    # the result: within the fp32 tolerance, or 3x eager fp32's error, by the low-precision rule)
    eager = attention_ref(q, k, v, mask, position_bias=_bias(kind, table, bidirectional, offset), **ref_kw)
    eager_grads = torch.autograd.grad(eager, inputs, do)
    names = ("out", "dq", "dk", "dv", "dtable", "dmask")
    for i, (name, got, want) in enumerate(zip(names, (out, *grads), (ref, *ref_grads), strict=False)):
        assert got.shape == want.shape, name
        lp = (eager, *eager_grads)[i]
        if dtype == torch.float32 and name == "dtable":
            bound = max(
                GRAD_FACTOR * max_err(lp, want) + LOWP_SLACK, 1e-5 * max(1.0, want.abs().max().item())
            )
            assert max_err(got, want) <= bound, f"{kind} dtable: {max_err(got, want):.3e} > {bound:.3e}"
            continue
        check_against_reference(f"{kind} {name}", got, want, lp, dtype, "attention", backend,
                                2 if name == "out" else GRAD_FACTOR)  # fmt: skip
    return out, grads


CASES = [  # kind, mask, (Bq, B, H, Hk, Lq, Lk, D), extra arguments
    ("t5", "none", (2, 2, 3, 3, 37, 37, 24), {}),
    ("t5", "causal", (2, 2, 3, 3, 37, 53, 33), {"bidirectional": False}),
    ("t5_heads_first", "padding", (2, 2, 4, 2, 29, 45, 16), {"softcap": 3.0}),
    ("t5", "dense", (1, 2, 3, 3, 19, 70, 40), {}),  # shared queries, a dense mask
    ("t5", "float", (2, 2, 2, 2, 23, 31, 16), {"bidirectional": False, "offset": 5}),
    ("t5", "causal", (2, 2, 4, 1, 1, 150, 32), {"bidirectional": False}),  # decoding one token
    ("alibi", "padding", (2, 2, 4, 2, 1, 300, 32), {}),  # decoding: heads packed, keys split
    ("alibi", "causal", (2, 2, 3, 3, 41, 41, 24), {}),
    ("alibi", "none", (2, 2, 4, 2, 33, 57, 16), {"scale": 0.3}),
    ("alibi_batch", "padding", (2, 2, 3, 3, 30, 47, 59), {"offset": -3}),
    ("alibi_batch", "dense", (1, 2, 2, 2, 17, 40, 16), {"softcap": 2.0}),
    ("t5", "causal", (2, 2, 2, 2, 33, 33, 16), {"dropout_p": 0.2, "seed": 7}),
    ("alibi", "none", (2, 2, 2, 2, 26, 35, 16), {"dropout_p": 0.3, "seed": 3}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-Lq{c[2][4]}-Lk{c[2][5]}")
def test_position_bias_and_its_gradient(backend, case):
    kind, mask_name, (Bq, B, H, Hk, Lq, Lk, D), extra = case
    if backend == "cuda":  # its head dims: multiples of 8 in [16, 256]; no float bias
        D = max(16, D + -D % 8)
        mask_name = "padding" if mask_name == "float" else mask_name
    g = torch.Generator().manual_seed(Lq * Lk + D)
    q = torch.randn(Bq, H, Lq, D, generator=g).to(DEVICE)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g).to(DEVICE) for _ in range(2))
    mask = _mask(mask_name, B, Lq, Lk, g)
    extra = dict(extra)
    if not kind.startswith("t5"):
        extra.pop("bidirectional", None)
    scale = extra.pop("scale", 1.0)
    out, grads = _compare(backend, q, k, v, mask, kind, _table(kind, B, H, g), scale=scale, **extra)
    if mask_name == "dense":  # its row 2 has nothing to attend: 0, and 0 gradient
        assert torch.all(out[:, :, 2] == 0) and torch.all(grads[0][:, :, 2] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["t5", "alibi_batch"])
def test_position_bias_low_precision_two_x_rule(backend, kind, dtype):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 45, 64, generator=g).to(DEVICE) for _ in range(3))
    _compare(backend, q, k, v, masks.causal(), kind, _table(kind, 2, 4, g), dtype, scale=0.125)


@pytest.mark.parametrize(
    "shape", [(113, 203, 59, False), (108, 256, 111, True), (128, 217, 32, False)], ids=str
)
def test_flash_attention_alibi_shapes(shape):
    """FlashAttention's test_flash_attn_output ALiBi cases (slopes torch.rand(batch, nheads) * 0.3,
    its sequence-length pairs and odd head dims, causal or not), fp16, on the Triton kernels."""
    Lq, Lk, D, causal = shape
    g = torch.Generator().manual_seed(Lq + D)
    q = torch.randn(2, 3, Lq, D, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 3, Lk, D, generator=g).to(DEVICE) for _ in range(2))
    slopes = (torch.rand(2, 3, generator=g) * 0.3).to(DEVICE)
    mask = masks.causal() if causal else None
    _compare("triton", q, k, v, mask, "alibi_batch", slopes, torch.float16)


def test_table_gradient_is_deterministic(backend):
    """Two backward passes give the same table gradient, bit for bit (per-tile partial sums added
    in a fixed order, no atomics)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 45, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    table = torch.randn(32, 2, generator=g).to(DEVICE).requires_grad_()
    grads = []
    for _ in range(2):
        out = vlkernels.attention(q, k, v, scale=1.0, position_bias=bias.t5(table, True), backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), table)[0])
    assert torch.equal(grads[0], grads[1])


def test_bucket_table_covers_every_relative_position():
    """``bucket_table`` clamped to its ends gives ``t5_bucket`` of every relative position, for
    T5's and other configurations, both directions."""
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (32, 24), (8, 5), (64, 300)):
            table = bias.bucket_table(bidirectional, nb, md, DEVICE)
            rel = torch.arange(-4 * md, 4 * md + 1, device=DEVICE)
            want = bias.t5_bucket(rel, bidirectional, nb, md)
            assert torch.equal(table.long()[rel.clamp(-md, md) + md], want), (bidirectional, nb, md)
            assert int(want.min()) >= 0 and int(want.max()) < nb


def test_attention_weights_with_position_bias():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, 21, 16, generator=g).to(DEVICE) for _ in range(2))
    table = torch.randn(32, 3, generator=g).to(DEVICE)
    pb = bias.t5(table, False)
    got = vlkernels.attention_weights(q, k, masks.causal(), scale=1.0, position_bias=pb)
    s = (q @ k.transpose(-1, -2)).double() + pb.dense(21, 21).double()
    s = s.masked_fill(~masks.causal().to_dense(2, 21, 21), float("-inf"))
    torch.testing.assert_close(got.double(), torch.softmax(s, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t: bias.t5(t, True, num_buckets=16), "num_buckets = 16"),
        (lambda t: bias.t5(t.long(), True), "floating-point"),
        (lambda t: bias.t5(t, True, num_buckets=32, max_distance=4), "max_distance"),
        (lambda t: bias.t5(t[:, :2], True), "H = 3"),
        (lambda t: bias.alibi(t[0, :2]), "H = 3"),
        (lambda t: bias.alibi(torch.ones(3, 3)), r"B = 2"),
        (lambda t: bias.alibi(t[0, :3], query_offset=1.5), "query_offset"),
        (lambda t: "t5", "position_bias must be"),
    ],
)
def test_bad_position_bias_raises_clearly(make, match):
    q = torch.randn(2, 3, 5, 8, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        vlkernels.attention(q, q, q, position_bias=make(torch.randn(32, 3, device=DEVICE)))


def test_torch_compile_fullgraph_with_a_t5_bias():
    """A compiled step that builds the bias from its table (as a T5 layer does) has no graph break
    and gives eager's gradients, the table's included."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 2, 20, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    table = torch.randn(32, 2, generator=g).to(DEVICE).requires_grad_()

    def step(q, k, table):
        out = vlkernels.attention(q, k, k, masks.causal(), scale=1.0, position_bias=bias.t5(table, False))
        return out.square().sum()

    with assert_launched("attention_fwd", "attention_bwd", "attention_position_grad"):
        grads = torch.autograd.grad(torch.compile(step, fullgraph=True)(q, k, table), (q, k, table))
    for got, want in zip(grads, torch.autograd.grad(step(q, k, table), (q, k, table)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
