"""Drop-in modules against the public modules they replace, with copied weights."""

import importlib.util
import pathlib

import pytest
import torch
from helpers import DEVICE, assert_launched

from vlkernels import masks
from vlkernels.modules import AttentionalPooler, GatedCrossAttentionBlock, QFormerAttention


def _open_flamingo_helpers():
    """open_flamingo's helpers.py, loaded by path (its package __init__ imports the model stack)."""
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None:
        pytest.skip("open_flamingo is not installed (pip install --no-deps open-flamingo)")
    path = pathlib.Path(spec.origin).parent / "src" / "helpers.py"
    mod_spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _compare(ours, theirs, inputs, grad_inputs, kw_ours=None, kw_theirs=None, tol=2e-5):
    """Same outputs and same gradients (inputs and every parameter) for the same weights."""
    out = ours(*inputs, **(kw_ours or {}))
    ref = theirs(*inputs, **(kw_theirs or {}))
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    do = torch.randn_like(out)
    g_ours = torch.autograd.grad(out, [*grad_inputs, *ours.parameters()], do)
    g_ref = torch.autograd.grad(ref, [*grad_inputs, *theirs.parameters()], do)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("context_dim", [48, 64])  # 64: MultiheadAttention packs in_proj_weight
def test_attentional_pooler_matches_open_clip(context_dim):
    OpenClipPooler = pytest.importorskip("open_clip.transformer").AttentionalPooler
    torch.manual_seed(0)
    theirs = OpenClipPooler(64, context_dim, n_head=4, n_queries=37).to(DEVICE)
    ours = AttentionalPooler(64, context_dim, n_head=4, n_queries=37).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 50, context_dim, device=DEVICE, requires_grad=True)
    with assert_launched("attention_fwd", "attention_bwd"):
        _compare(ours, theirs, (x,), (x,))


@pytest.mark.parametrize("only_immediate", [True, False])
@pytest.mark.parametrize("cached", [False, True])
def test_gated_cross_attention_block_matches_open_flamingo(only_immediate, cached):
    helpers = _open_flamingo_helpers()
    torch.manual_seed(0)
    kw = dict(
        dim=64, dim_visual=48, dim_head=16, heads=4, ff_mult=2, only_attend_immediate_media=only_immediate
    )
    theirs = helpers.GatedCrossAttentionBlock(**kw).to(DEVICE)
    with torch.no_grad():  # open_flamingo initialises the gates at 0: open them
        theirs.attn_gate.fill_(0.8)
        theirs.ff_gate.fill_(-0.6)
    ours = GatedCrossAttentionBlock(**kw).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    B, T_txt, T_img, n = 2, 37, 3, 8
    x = torch.randn(B, T_txt, 64, device=DEVICE, requires_grad=True)
    media = torch.randn(B, T_img, n, 48, device=DEVICE, requires_grad=True)
    loc = torch.zeros(B, T_txt, dtype=torch.bool, device=DEVICE)
    # every token follows an image (open_flamingo averages all latents for tokens that none
    # precedes when only_attend_immediate_media=False; vlkernels gives them 0 — tested below)
    loc[0, [0, 10, 30]] = True
    loc[1, [0, 2]] = True
    with assert_launched("attention_fwd", "attention_bwd", "gated_residual_fwd", "gated_residual_bwd"):
        kw = dict(use_cached_media=cached)
        _compare(ours, theirs, (x, media, loc), (x, media), kw, kw)


def test_gated_block_tokens_before_any_image():
    helpers = _open_flamingo_helpers()
    torch.manual_seed(0)
    kw = dict(dim=32, dim_visual=32, dim_head=16, heads=2, ff_mult=1, only_attend_immediate_media=True)
    theirs = helpers.GatedCrossAttentionBlock(**kw).to(DEVICE)
    ours = GatedCrossAttentionBlock(**kw).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 9, 32, device=DEVICE)
    loc = torch.zeros(1, 9, dtype=torch.bool, device=DEVICE)
    loc[0, 4] = True  # tokens 0..3 see no image: open_flamingo zeroes their attention too
    media = torch.randn(1, 2, 4, 32, device=DEVICE)
    torch.testing.assert_close(ours(x, media, loc), theirs(x, media, loc), rtol=2e-5, atol=2e-5)
    ours.attn.only_attend_immediate_media = False
    out = ours.attn(x, media, loc)
    assert torch.all(out[0, :4] == 0)


def _hf_qformer_attention(cross: bool):
    transformers = pytest.importorskip("transformers")
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerAttention

    cfg = transformers.Blip2QFormerConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        encoder_hidden_size=48,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    return Blip2QFormerAttention(cfg, is_cross_attention=cross).to(DEVICE).eval()


@pytest.mark.parametrize("mode", ["bidirectional", "multimodal_causal", "unimodal"])
def test_qformer_self_attention_matches_transformers(mode):
    torch.manual_seed(0)
    theirs = _hf_qformer_attention(cross=False)
    ours = QFormerAttention(64, 4).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    B, nq, T = 2, 8, 13
    x = torch.randn(B, nq + T, 64, device=DEVICE, requires_grad=True)
    text_lengths = torch.tensor([13, 6], device=DEVICE)
    allowed = (masks.qformer(nq, mode) & masks.key_padding(text_lengths + nq)).to_dense(B, nq + T, nq + T)
    additive = (~allowed).float() * torch.finfo(torch.float32).min  # HF's extended mask
    with assert_launched("attention_fwd", "attention_bwd"):
        _compare(
            ours,
            theirs,
            (x,),
            (x,),
            dict(num_queries=nq, mode=mode, text_lengths=text_lengths),
            dict(attention_mask=additive),
        )


def test_qformer_cross_attention_matches_transformers():
    torch.manual_seed(0)
    theirs = _hf_qformer_attention(cross=True)
    ours = QFormerAttention(64, 4, encoder_hidden_size=48).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    queries = torch.randn(3, 8, 64, device=DEVICE, requires_grad=True)
    image = torch.randn(3, 17, 48, device=DEVICE, requires_grad=True)
    with assert_launched("attention_fwd", "attention_bwd"):
        kw = dict(encoder_hidden_states=image)
        _compare(ours, theirs, (queries,), (queries, image), kw, kw)


def test_pooler_rejects_unbatched_tokens():
    pooler = AttentionalPooler(32, 24, n_head=2, n_queries=3)
    with pytest.raises(
        ValueError, match=r"x must be \[B, L, 24\] \(batch, image tokens, context_dim\), got shape \[5, 24\]"
    ):
        pooler(torch.randn(5, 24))
