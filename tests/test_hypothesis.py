"""Randomised shapes and masks (hypothesis) against the float64 reference."""

import pytest
import torch
from helpers import DEVICE, assert_launched, tolerance

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlkernels
from vlkernels import masks
from vlkernels.reference import attention_ref


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    Hk = draw(st.integers(1, 2))
    H = Hk * draw(st.integers(1, 2))
    Bq = draw(st.sampled_from([B, 1]))
    D = draw(st.sampled_from([16, 24, 40, 64, 72, 96]))
    kind = draw(st.sampled_from(["none", "dense", "causal", "padding", "qformer", "prefix", "media"]))
    lat = draw(st.integers(1, 9))
    if kind in ("qformer", "prefix"):
        Lq = Lk = draw(st.integers(1, 80))
    elif kind == "media":
        Lq, Lk = draw(st.integers(1, 70)), lat * draw(st.integers(1, 5))
    else:
        Lq, Lk = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def lengths():
        return torch.randint(0, Lk + 1, (B,), generator=g).to(DEVICE)

    if kind == "dense":
        mask = (torch.rand(B, 1, Lq, Lk, generator=g) > draw(st.floats(0.0, 1.0))).to(DEVICE)
    elif kind == "causal":
        mask = masks.causal()
    elif kind == "padding":
        mask = masks.key_padding(lengths())
    elif kind == "qformer":
        mode = draw(st.sampled_from(["bidirectional", "multimodal_causal", "unimodal"]))
        mask = masks.qformer(draw(st.integers(0, Lk)), mode)
        if draw(st.booleans()):
            mask = mask & masks.key_padding(lengths())
    elif kind == "prefix":
        mask = masks.prefix_lm(lengths())
        if draw(st.booleans()):
            mask = mask & masks.causal()
    elif kind == "media":
        t2m = torch.randint(0, Lk // lat + 1, (B, Lq), generator=g).sort(dim=1).values
        mask = masks.media(t2m.to(DEVICE), lat, draw(st.booleans()))
    else:
        mask = None
    q, k, v = (
        torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
        for s in ((Bq, H, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D))
    )
    return q, k, v, mask


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(problems())
def test_random_problems_match_reference(problem):
    q, k, v, mask = problem
    with assert_launched("attention_fwd", "attention_bwd"):
        out = vlkernels.attention(q, k, v, mask, backend="triton")
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    ref = attention_ref(q, k, v, mask, upcast=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    tol = tolerance("attention", "triton")
    for got, r in zip((out, *grads), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(got.double(), r.double(), rtol=tol, atol=tol)
