"""FlashAttention's own test parameterization (its test_flash_attn_output: sequence-length pairs,
head dims, causal and local windows, ALiBi (its slopes [B, H]), soft-capping, dropout, MQA/GQA) on
every backend, fp16 and bf16, by its rule: the error against float64 at most 2x the same-dtype
eager reference's for the output, 3x for dq, dk, dv. A fixed, spread selection of the product
(the whole product is thousands of cases; on CPU the Triton interpreter gets the shorter
sequences)."""

import itertools
import random
import zlib

import pytest
import torch
from helpers import DEVICE, GRAD_FACTOR, ON_GPU, check_against_reference, launched

import vlkernels
from vlkernels import bias, masks
from vlkernels.reference import attention_ref

SEQLENS = [(1, 147), (113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256), (1, 239),
           (339, 1024), (799, 3), (1023, 1024), (1024, 1023)]  # fmt: skip
HEAD_DIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
FEATURES = ["none", "causal", "local", "alibi", "alibi+causal", "softcap", "dropout", "causal+local"]
HEADS = ["mha", "mqa", "gqa"]
DTYPES = [torch.float16, torch.bfloat16]


def _selection(count, longest, seed):
    """``count`` cases of the product, drawn once with a fixed seed (every feature and head layout
    appears; sequences up to ``longest`` keys and queries)."""
    rng = random.Random(seed)
    product = [
        c for c in itertools.product(SEQLENS, HEAD_DIMS, FEATURES, HEADS, DTYPES) if max(c[0]) <= longest
    ]
    return rng.sample(product, count)


CASES = {  # without a GPU the interpreter and the emulation of csrc/ take the shorter sequences
    "torch": _selection(36, 1024, 0),
    "triton": _selection(48 if ON_GPU else 8, 1024 if ON_GPU else 217, 1),
    "cuda": _selection(48 if ON_GPU else 4, 1024 if ON_GPU else 217, 2),
}


def _ids(case):
    (lq, lk), d, feature, heads, dtype = case
    return f"{lq}x{lk}-d{d}-{feature}-{heads}-{str(dtype)[6:]}"


def _case(backend, case):
    (Lq, Lk), D, feature, heads, dtype = case
    if backend == "cuda" and D % 8:
        pytest.skip("the CUDA C++ kernels take head dims that are multiples of 8 (test_ops)")
    H, Hk = {"mha": (4, 4), "mqa": (4, 1), "gqa": (6, 2)}[heads]
    B = 2
    g = torch.Generator().manual_seed(zlib.crc32(_ids(case).encode()))
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(DEVICE, dtype).requires_grad_() for h, L in
               ((H, Lq), (Hk, Lk), (Hk, Lk)))  # fmt: skip
    mask, kw = None, {}
    if "causal" in feature:
        mask = masks.causal()
    if "local" in feature:  # FlashAttention's window (left, right) = (w, 0) with causal, (w, w) alone
        w = int(torch.randint(1, Lk + 1, (1,), generator=g))
        local = masks.sliding_window(w)
        mask = local if mask is None else mask & local
        if "causal" not in feature:  # the right edge as a bool mask: |i + Lk - Lq - j| <= w
            i, j = torch.arange(Lq, device=DEVICE)[:, None], torch.arange(Lk, device=DEVICE)[None]
            mask = (j - (i + Lk - Lq)).abs() < w
    position = None
    if "alibi" in feature:  # FlashAttention's alibi_slopes [B, H], computed in the kernels
        position = bias.alibi(torch.rand(B, H, generator=g).to(DEVICE) * 0.3)
    if feature == "softcap":
        kw["softcap"] = 5.0
    keep, p = None, 0.0
    if feature == "dropout":
        p, kw["seed"] = 0.17, 1234
        kw["dropout_p"] = p
        keep = vlkernels.attention_dropout_mask(q, k, p, 1234)
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE, dtype)
    with launched(backend, "attention"):
        out = vlkernels.attention(q, k, v, mask, backend=backend, position_bias=position, **kw)
        grads = torch.autograd.grad(out, (q, k, v), do)
    ref_kw = dict(softcap=kw.get("softcap"), dropout_keep=keep, dropout_p=p, position_bias=position)
    ref = attention_ref(q, k, v, mask, upcast=True, **ref_kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    lowp = attention_ref(q, k, v, mask, **ref_kw)
    lowp_grads = torch.autograd.grad(lowp, (q, k, v), do)
    for name, got, r, lp in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (lowp, *lowp_grads), strict=True
    ):
        factor = 2 if name == "out" else GRAD_FACTOR
        check_against_reference(f"{_ids(case)} {name}", got, r, lp, dtype, "attention", backend, factor)


@pytest.mark.parametrize("case", CASES["torch"], ids=_ids)
def test_flash_attn_cases_torch(case):
    _case("torch", case)


@pytest.mark.parametrize("case", CASES["triton"], ids=_ids)
def test_flash_attn_cases_triton(case):
    _case("triton", case)


@pytest.mark.parametrize("case", CASES["cuda"], ids=_ids)
def test_flash_attn_cases_cuda(case, monkeypatch):
    from helpers import use_cuda_backend

    use_cuda_backend(monkeypatch)
    _case("cuda", case)
