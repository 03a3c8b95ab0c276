"""vlkernels.patch on public models: same outputs as before the patch, and the kernels ran."""

import copy

import pytest
import torch
from helpers import (
    DEVICE,
    assert_launched,
    assert_same_output_and_grads,
    launched,
    paligemma_inputs,
    seeded_dropout,
    tiny_blip_config,
    tiny_idefics,
    tiny_paligemma,
    tiny_t5,
)

import vlkernels
from vlkernels import bias, masks
from vlkernels.reference import attention_ref


def _compare_patched(ref, run):
    """Patch a copy of ``ref``: same output, same gradients for every parameter, kernels ran."""
    ref = ref.to(DEVICE).eval()
    ours = vlkernels.patch(copy.deepcopy(ref))
    want = run(ref)
    with assert_launched("attention_fwd", "attention_bwd"):
        got = run(ours)
        go = torch.randn_like(want)
        names, params = zip(*[(n, p) for n, p in ours.named_parameters() if p.requires_grad], strict=True)
        grads = dict(zip(names, torch.autograd.grad(got, params, go, allow_unused=True), strict=True))
    ref_params = dict(ref.named_parameters())
    want_grads = torch.autograd.grad(want, [ref_params[n] for n in names], go, allow_unused=True)
    assert_same_output_and_grads(got, [grads[n] for n in names], want, want_grads, names)
    return ours


def _qformer_config(transformers, hidden, intermediate, encoder, attention_dropout):
    """A 2-layer, 4-head BLIP-2 Q-Former with its text path, hidden dropout off."""
    return transformers.Blip2QFormerConfig(
        hidden_size=hidden,
        num_attention_heads=4,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        encoder_hidden_size=encoder,
        use_qformer_text_input=True,
        attention_probs_dropout_prob=attention_dropout,
        hidden_dropout_prob=0.0,
    )


def test_patch_hf_blip2_qformer_tester_config_head_dim_8():
    """transformers' own Blip2QFormer tester sizes (hidden 32, 4 heads: head dim 8)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = _qformer_config(transformers, 32, 37, 32, attention_dropout=0.0)
    B, nq, T = 2, 6, 7
    embeds = torch.randn(B, nq + T, 32, device=DEVICE)
    image = torch.randn(B, 9, 32, device=DEVICE)
    mask4d = masks.qformer(nq, "multimodal_causal").to_dense(B, nq + T, nq + T)
    kw = dict(query_embeds=embeds, query_length=nq, attention_mask=mask4d, encoder_hidden_states=image)
    _compare_patched(transformers.Blip2QFormerModel(cfg), lambda m: m(**kw).last_hidden_state)


@pytest.mark.parametrize("mode", ["bidirectional", "multimodal_causal", "unimodal"])
def test_patch_hf_blip2_qformer_three_masks(mode):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = _qformer_config(transformers, 64, 128, 48, attention_dropout=0.0)
    ref = transformers.Blip2QFormerModel(cfg)
    B, nq, T = 2, 8, 11
    embeds = torch.randn(B, nq + T, 64, device=DEVICE)  # [queries ; embedded text]
    image = torch.randn(B, 17, 48, device=DEVICE)
    allowed = masks.qformer(nq, mode) & masks.key_padding(torch.tensor([nq + T, nq + 5], device=DEVICE))
    mask4d = allowed.to_dense(B, nq + T, nq + T)
    kw = dict(query_embeds=embeds, query_length=nq, attention_mask=mask4d, encoder_hidden_states=image)
    ours = _compare_patched(ref, lambda m: m(**kw).last_hidden_state)
    assert "attention interface" in ours.vlkernels_patched[0]


def test_patch_open_clip_coca_poolers_and_open_flamingo_blocks():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import AttentionalPooler

    torch.manual_seed(0)
    model = torch.nn.Sequential(AttentionalPooler(64, 48, n_head=4, n_queries=9))
    x = torch.randn(3, 20, 48, device=DEVICE)
    ours = _compare_patched(model, lambda m: m(x))
    assert ours.vlkernels_patched == ["0: AttentionalPooler -> vlkernels.modules.AttentionalPooler"]
    assert open_clip is not None


def test_patch_rejects_non_modules_and_unsupported_models():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        vlkernels.patch("blip2")
    with pytest.raises(ValueError, match="nothing in Linear can be swapped"):
        vlkernels.patch(torch.nn.Linear(2, 2))


def test_patch_open_flamingo_gated_blocks():
    from test_modules import _open_flamingo_helpers

    helpers = _open_flamingo_helpers()
    torch.manual_seed(0)
    block = helpers.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=16, heads=2, ff_mult=2)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    model = torch.nn.ModuleDict({"xattn": block})
    x = torch.randn(2, 10, 32, device=DEVICE)
    media = torch.randn(2, 2, 4, 24, device=DEVICE)
    loc = torch.zeros(2, 10, dtype=torch.bool, device=DEVICE)
    loc[:, [0, 6]] = True
    with assert_launched("gated_residual_fwd", "gated_residual_bwd"):
        ours = _compare_patched(model, lambda m: m["xattn"](x, media, loc))
    assert ours.vlkernels_patched == [
        "xattn: GatedCrossAttentionBlock -> vlkernels.modules.GatedCrossAttentionBlock"
    ]


def test_patch_swaps_a_module_under_every_name_it_has():
    """A module held under two names (open_flamingo's Flamingo keeps each gated block in its LM's
    list and in the decoder layer that calls it) is swapped under both, for one new module."""
    from open_clip.transformer import AttentionalPooler
    from test_modules import _open_flamingo_helpers

    pooler = AttentionalPooler(32, 24, n_head=4, n_queries=5)
    block = _open_flamingo_helpers().GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=16, heads=2)
    model = torch.nn.ModuleDict({"a": pooler, "b": pooler, "c": torch.nn.ModuleList([block, block])})
    ours = vlkernels.patch(model)
    assert isinstance(ours["a"], vlkernels.modules.AttentionalPooler) and ours["b"] is ours["a"]
    assert (
        isinstance(ours["c"][0], vlkernels.modules.GatedCrossAttentionBlock) and ours["c"][1] is ours["c"][0]
    )
    assert [line.split(":")[0] for line in ours.vlkernels_patched] == ["a", "b", "c.0", "c.1"]


def _tiny_open_flamingo():
    """open_flamingo's Flamingo as its factory builds it, at test size: an open_clip ViT (16-pixel
    images) and a two-layer OPT with a gated cross-attention block before each layer, gates
    opened to 0.5."""
    import open_clip
    import transformers
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    vision = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=dict(layers=1, width=32, heads=2, vocab_size=100, context_length=8),
    )
    vision.visual.output_tokens = True
    lm = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=102,
            word_embed_proj_dim=32, max_position_embeddings=64,
        )
    )  # fmt: skip
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.decoder.layers")
    model = Flamingo(
        vision, lm, eoc_token_id=100, media_token_id=101, vis_dim=32, cross_attn_every_n_layers=1
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
    return model


def test_patch_open_flamingo_model():
    """open_flamingo's whole Flamingo (its LM's decoder layers call the gated blocks), patched:
    logits and every parameter gradient equal the unpatched model's, the gated kernels ran, no
    open_flamingo block is left. (Its generate() passes the attention mask positionally to
    FlamingoLMMixin.forward, which transformers 5's generation loop does not: it runs with
    neither model there.)"""
    pytest.importorskip("open_flamingo")
    torch.manual_seed(0)
    model = _tiny_open_flamingo()
    vision_x = torch.randn(2, 2, 1, 3, 16, 16, device=DEVICE)
    ids = torch.randint(3, 99, (2, 12), device=DEVICE)
    ids[:, [0, 6]] = 101  # two images, each before its text
    am = torch.ones_like(ids)
    am[1, 10:] = 0
    with assert_launched("gated_residual_fwd", "gated_residual_bwd"):
        ours = _compare_patched(model, lambda m: m(vision_x=vision_x, lang_x=ids, attention_mask=am).logits)
    names = [type(m).__module__ for m in ours.modules() if type(m).__name__ == "GatedCrossAttentionBlock"]
    assert names == ["vlkernels.modules"] * 2


def test_patch_paligemma_prefix_lm(monkeypatch):
    """PaliGemma (SigLIP + Gemma with grouped keys): same logits after the patch, and the mask its
    Gemma layers hand to vlkernels is exactly masks.prefix_lm(prefix lengths)."""
    transformers = pytest.importorskip("transformers")
    import importlib

    patch_mod = importlib.import_module("vlkernels.patch")
    torch.manual_seed(0)
    text = transformers.GemmaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=120,
    )
    ref = tiny_paligemma(text)
    n_img, n_prompt = 4, 6
    kw = paligemma_inputs(2, n_img, n_prompt, n_suffix=5)
    ids = kw["input_ids"]
    seen = []
    original = patch_mod.hf_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        if type(module).__name__ == "GemmaAttention":
            seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(patch_mod, "hf_attention_forward", spy)
    _compare_patched(ref, lambda m: m(**kw).logits)
    L = ids.shape[1]
    expect = masks.prefix_lm(torch.full((2,), n_img + n_prompt, device=DEVICE)).to_dense(2, L, L)
    assert len(seen) == 2 and all(torch.equal(m.expand(2, 1, L, L), expect) for m in seen)


def test_patch_hf_blip_flava_idefics_outputs_and_gradients():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=32, image_size=16, patch_size=8, **layer)
    ids = torch.randint(5, 99, (2, 7), device=DEVICE)
    am = torch.ones_like(ids)
    am[1, 5:] = 0  # padded text
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)

    blip = T.BlipForImageTextRetrieval(tiny_blip_config())
    ours = _compare_patched(blip, lambda m: m(input_ids=ids, pixel_values=pix, attention_mask=am).itm_score)
    assert any("BlipTextSelfAttention" in s for s in ours.vlkernels_patched)

    flava = T.FlavaModel(
        T.FlavaConfig(
            image_config=vision,
            text_config=dict(hidden_size=32, vocab_size=100, **layer),
            multimodal_config=dict(hidden_size=32, **layer),
            projection_dim=16,
        )
    )
    _compare_patched(
        flava, lambda m: m(input_ids=ids, pixel_values=pix, attention_mask=am).multimodal_embeddings
    )

    idefics = tiny_idefics()
    ids9 = torch.randint(5, 99, (2, 9), device=DEVICE)
    _compare_patched(
        idefics,
        lambda m: (
            m(
                input_ids=ids9,
                attention_mask=torch.ones_like(ids9),
                pixel_values=pix[:, None],  # one image per sample
                image_attention_mask=torch.ones(2, 9, 1, dtype=torch.long, device=DEVICE),
            ).logits
        ),
    )


@pytest.mark.parametrize("Lq, Lk", [(7, 7), (5, 12), (12, 5)])
@pytest.mark.parametrize("is_causal", [None, True, False])
def test_hf_attention_function_causal_as_transformers_sdpa(backend, Lq, Lk, is_causal):
    """No mask: causal unless the call or the module says otherwise (a module without ``is_causal``
    is causal), aligned top-left, as transformers' own SDPA attention function."""
    sdpa = pytest.importorskip("transformers.integrations.sdpa_attention").sdpa_attention_forward
    from vlkernels.patch import hf_attention_forward

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, Lq, 16, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(2, 2, Lk, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    do = torch.randn(2, Lq, 2, 16, generator=g).to(DEVICE)
    module = torch.nn.Module()  # no is_causal attribute
    want, _ = sdpa(module, q, k, v, None, is_causal=is_causal)
    with launched(backend, "attention"), vlkernels.use_backend(backend):
        got, _ = hf_attention_forward(module, q, k, v, None, is_causal=is_causal)
        grads = torch.autograd.grad(got, (q, k, v), do)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), do), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hf_attention_function_float_mask_is_added(backend):
    """A float attention_mask is a bias added to the scores (as transformers' SDPA path), not a
    binarised mask: a -10000 padding mask (MarkupLM builds one) and a real-valued bias."""
    sdpa = pytest.importorskip("transformers.integrations.sdpa_attention").sdpa_attention_forward
    from vlkernels.patch import hf_attention_forward

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    padding = torch.zeros(2, 1, 1, 9)
    padding[1, ..., 6:] = -10000.0
    bias = torch.randn(2, 2, 9, 9, generator=g)
    module = torch.nn.Module()
    if backend == "cuda":
        with pytest.raises(vlkernels.BackendUnavailableError, match="take no float bias"):
            with vlkernels.use_backend(backend):
                hf_attention_forward(module, q, k, v, padding.to(DEVICE))
        return
    for mask in (padding.to(DEVICE), (padding + bias).to(DEVICE)):
        want, _ = sdpa(module, q, k, v, mask)
        with launched(backend, "attention"), vlkernels.use_backend(backend):
            got, _ = hf_attention_forward(module, q, k, v, mask)
            grads = torch.autograd.grad(got.sum(), (q, k, v))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, torch.autograd.grad(want.sum(), (q, k, v)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_patch_paligemma2_softcap_and_sliding_window(monkeypatch):
    """PaliGemma 2 (SigLIP + Gemma 2): logit soft-capping and alternating sliding-window layers,
    with a window shorter than the sequence and a cap that bends the scores; same logits and
    parameter gradients after the patch, and the cap reaches vlkernels.attention."""
    transformers = pytest.importorskip("transformers")
    import importlib

    patch_mod = importlib.import_module("vlkernels.patch")
    torch.manual_seed(0)
    text = transformers.Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=120,
        sliding_window=5,
        attn_logit_softcapping=2.0,
        query_pre_attn_scalar=16,
    )
    ref = tiny_paligemma(text)
    # transformers' eager attention: the definition (transformers 5.17 defaults Gemma 2 to SDPA,
    # which drops the soft-capping: its gradients differ from eager's by 3e-5, vlkernels' agree)
    ref.set_attn_implementation("eager")
    kw = paligemma_inputs(2, n_img=4, n_prompt=6, n_suffix=9)
    caps = []
    original = patch_mod.hf_attention_forward

    def spy(module, *args, **kwargs):
        if type(module).__name__ == "Gemma2Attention":
            caps.append(kwargs.get("softcap"))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(patch_mod, "hf_attention_forward", spy)
    _compare_patched(ref, lambda m: m(**kw).logits)
    assert caps == [2.0, 2.0]


def test_hf_attention_function_sliding_window_without_mask():
    """No mask (transformers skipped building one): causal + the last `window` keys, as the
    sliding-window mask transformers would build; decoding (one query) sees the last `window`."""
    from vlkernels.patch import hf_attention_forward

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g).to(DEVICE) for _ in range(3))
    module = torch.nn.Module()
    got, _ = hf_attention_forward(module, q, k, v, None, is_causal=True, sliding_window=4)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    want = attention_ref(q, k, v, ((j <= i) & (j > i - 4)).to(DEVICE))
    torch.testing.assert_close(got.transpose(1, 2), want, rtol=1e-5, atol=1e-5)
    got1, _ = hf_attention_forward(module, q[:, :, -1:], k, v, None, is_causal=True, sliding_window=4)
    want1 = attention_ref(q[:, :, -1:], k[:, :, -4:], v[:, :, -4:])
    torch.testing.assert_close(got1.transpose(1, 2), want1, rtol=1e-5, atol=1e-5)


def _compare_train_mode_dropout(ref, run, monkeypatch, n_attentions):
    """Patch a copy of ``ref`` (train mode, attention dropout > 0, hidden dropout 0); ``run(model)``
    -> (output, parameter gradients) after seeding torch. The unpatched model runs with
    ``F.dropout`` of the attention probabilities replaced by the keep mask vlkernels draws at the
    same point of the run (``seeded_dropout``): outputs and every parameter gradient match, the
    kernels ran, ``n_attentions`` attention calls dropped, and dropout did act."""
    ref = ref.to(DEVICE).train()
    ours = vlkernels.patch(copy.deepcopy(ref))
    with assert_launched("attention_fwd", "attention_bwd"):
        got, got_grads = run(ours)
    drawn = seeded_dropout(monkeypatch)
    want, want_grads = run(ref)
    monkeypatch.undo()
    assert len(drawn) == n_attentions
    assert_same_output_and_grads(got, got_grads, want, want_grads)
    assert not torch.allclose(got, run(ours.eval())[0])  # dropout did act


def _output_and_grads(forward, go):
    def run(model):
        torch.manual_seed(1)
        out = forward(model)
        params = [p for p in model.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out, params, go, allow_unused=True)

    return run


@pytest.mark.parametrize("mode", ["bidirectional", "multimodal_causal"])
def test_patch_hf_blip2_qformer_train_mode_attention_dropout(mode, monkeypatch):
    """BLIP-2's official Q-Former config trains with attention dropout 0.1: the patched model in
    train mode equals transformers' eager attention dropping the same entries."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = _qformer_config(transformers, 64, 128, 48, attention_dropout=0.1)
    ref = transformers.Blip2QFormerModel(cfg)
    ref.set_attn_implementation("eager")
    B, nq, T = 2, 8, 11
    embeds = torch.randn(B, nq + T, 64, device=DEVICE)
    image = torch.randn(B, 17, 48, device=DEVICE)
    allowed = masks.qformer(nq, mode) & masks.key_padding(torch.tensor([nq + T, nq + 5], device=DEVICE))
    # additive 0 / finfo.min (what transformers builds for eager attention, which adds the mask)
    additive = torch.zeros(B, 1, nq + T, nq + T, device=DEVICE)
    additive.masked_fill_(~allowed.to_dense(B, nq + T, nq + T), torch.finfo(torch.float32).min)
    kw = dict(query_embeds=embeds, query_length=nq, attention_mask=additive, encoder_hidden_states=image)
    run = _output_and_grads(lambda m: m(**kw).last_hidden_state, torch.randn(B, nq + T, 64, device=DEVICE))
    # self-attention in 2 layers, cross-attention in 1 (cross_attention_frequency 2)
    _compare_train_mode_dropout(ref, run, monkeypatch, n_attentions=3)


def test_patch_hf_blip_train_mode_attention_dropout(monkeypatch):
    """BLIP's text encoder (BERT, attention dropout 0.1) through the swapped
    BlipTextSelfAttention forward, in train mode, with padded text and cross-attention."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    blip = T.BlipForImageTextRetrieval(
        tiny_blip_config(attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.0)
    )
    ids = torch.randint(5, 99, (2, 7), device=DEVICE)
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)
    run = _output_and_grads(
        lambda m: m(input_ids=ids, pixel_values=pix, attention_mask=am).itm_score,
        torch.randn(2, 2, device=DEVICE),
    )
    _compare_train_mode_dropout(blip, run, monkeypatch, n_attentions=2)  # text self- and cross-attention


def _blip2_t5():
    """A tiny BLIP-2 with a Flan-T5-style language model (T5 encoder-decoder)."""
    import transformers as T

    layer = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = T.Blip2Config(
        vision_config=dict(hidden_size=32, image_size=16, patch_size=8, **layer),
        qformer_config=dict(hidden_size=32, encoder_hidden_size=32, **layer),
        text_config=dict(
            model_type="t5", d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=100,
            relative_attention_num_buckets=16, relative_attention_max_distance=10, decoder_start_token_id=0,
            pad_token_id=0, dropout_rate=0.0,
        ),
        num_query_tokens=4,
        image_token_index=99,
    )  # fmt: skip
    return T.Blip2ForConditionalGeneration(cfg)


def _blip2_t5_inputs(**extra):
    ids = torch.randint(5, 90, (2, 27), device=DEVICE)
    ids[:, :4] = 99  # the query tokens' places
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 16, 16,
                device=DEVICE), **extra)  # fmt: skip


@pytest.mark.parametrize("family", ["T5", "MT5", "UMT5", "BLIP-2 + T5"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_t5_family_relative_bias_in_the_kernels(family, backend, monkeypatch):
    """T5, mT5, UMT5 and BLIP-2 with a T5 language model: the patched model's logits and every
    parameter's gradient (the relative bias tables included) equal the unpatched model's, with a
    padded encoder row and sequences past max_distance; each attention is given the analytic
    ``vlkernels.bias.t5`` (self-attention) or no bias (cross-attention), never a dense float
    tensor, made once per stack (T5, mT5: the first layer's table, shared) or once per layer (UMT5:
    a table each); with Triton the tables' gradients are reduced by its kernel."""
    import importlib

    patch_module = importlib.import_module("vlkernels.patch")
    torch.manual_seed(0)
    if family == "BLIP-2 + T5":
        ref = _blip2_t5().to(DEVICE).eval()
        inputs = _blip2_t5_inputs(labels=torch.randint(3, 90, (2, 25), device=DEVICE))
    else:
        ref = tiny_t5(family).to(DEVICE).eval()
        inputs = {
            "input_ids": torch.randint(3, 99, (2, 30), device=DEVICE),
            "labels": torch.randint(3, 99, (2, 25), device=DEVICE),
        }
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][1, 22:] = 0
    ours = vlkernels.patch(copy.deepcopy(ref))
    given, made, attend, t5 = [], [], patch_module._attend, bias.t5

    def spy(q, k, v, mask, weights, dropped=True, **options):
        given.append((mask, options.get("position_bias")))
        return attend(q, k, v, mask, weights, dropped, **options)

    monkeypatch.setattr(patch_module, "_attend", spy)
    monkeypatch.setattr(bias, "t5", lambda *a, **kw: made.append(1) or t5(*a, **kw))
    want = ref(**inputs)
    want.loss.backward()
    vlkernels.set_backend(backend)
    try:
        ran = (
            assert_launched("attention_position_grad")
            if backend == "triton"
            else launched("torch", "attention")
        )
        with ran:
            got = ours(**inputs)
            got.loss.backward()
    finally:
        vlkernels.set_backend(None)
    torch.testing.assert_close(got.logits, want.logits, rtol=2e-5, atol=2e-5)
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        w = theirs[n].grad
        if w is None:
            assert p.grad is None, n
            continue
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()), msg=n)
    assert all(not (isinstance(m, torch.Tensor) and m.is_floating_point()) for m, _ in given), "a dense bias"
    kinds = [type(pb).__name__ for _, pb in given]
    assert kinds.count("PositionBias") == 4 and kinds.count("NoneType") >= 2, kinds
    assert len(made) == (4 if family == "UMT5" else 2)


def test_patch_t5_keeps_a_dense_bias_given_by_the_caller():
    """A T5 attention module called with a dense ``position_bias`` of the caller's still adds it
    (only the zeros a module makes for itself are dropped)."""
    torch.manual_seed(0)
    model = vlkernels.patch(tiny_t5().to(DEVICE).eval())
    attn = model.decoder.block[1].layer[1].EncDecAttention  # no table of its own
    x, mem = torch.randn(2, 7, 32, device=DEVICE), torch.randn(2, 9, 32, device=DEVICE)
    dense = torch.randn(1, 4, 7, 9, device=DEVICE)
    got = attn(x, key_value_states=mem, position_bias=dense)[0]
    none = attn(x, key_value_states=mem)[0]
    model.set_attn_implementation("eager")
    want = type(attn).forward(attn, x, key_value_states=mem, position_bias=dense)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, none)
