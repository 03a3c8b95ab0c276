"""Generation with a KV cache: greedy ``generate()`` of patched tiny public models (BLIP-2 with
OPT, PaliGemma, Idefics) gives the tokens of the unpatched model, and the kernels ran, decoding
steps included (one query row over the cache)."""

import copy

import pytest
import torch
from helpers import DEVICE, assert_launched, paligemma_inputs, tiny_idefics, tiny_paligemma

import vlkernels
from vlkernels.attention import triton as attn_triton

T = pytest.importorskip("transformers")


def _same_tokens(ref, inputs, new_tokens, *, decode_split=False):
    """Greedy generate with the unpatched and the patched model: equal token ids. The Triton
    forward ran once per step at least (decode_split: flash-decoding's split path ran too)."""
    ref = ref.to(DEVICE).eval()
    ours = vlkernels.patch(copy.deepcopy(ref))
    kw = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    with torch.no_grad():
        want = ref.generate(**inputs, **kw)
        names = ["attention_fwd"] + (["attention_fwd_split"] if decode_split else [])
        before = attn_triton.LAUNCHES["attention_fwd"]
        with assert_launched(*names):
            got = ours.generate(**inputs, **kw)
    assert torch.equal(got, want), (got, want)
    if DEVICE == "cpu" and vlkernels.get_backend() is None:
        assert attn_triton.LAUNCHES["attention_fwd"] - before >= new_tokens
    return got


def test_generate_blip2_opt():
    torch.manual_seed(0)
    cfg = T.Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=100,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
        num_query_tokens=4,
        image_token_index=99,
    )
    model = T.Blip2ForConditionalGeneration(cfg)
    ids = torch.randint(5, 90, (2, 6), device=DEVICE)
    ids[:, :4] = 99  # the query tokens' places
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(2, 3, 16, 16, device=DEVICE),
    )
    _same_tokens(model, inputs, 6)


def test_generate_paligemma_with_a_long_prompt_splits_the_keys():
    """Prompt of 280 tokens: every decoding step's single query row attends over more than 256
    cached keys, which the forward splits across programs."""
    torch.manual_seed(0)
    text = T.GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=120,
    )
    model = tiny_paligemma(text)
    inputs = paligemma_inputs(1, n_img=4, n_prompt=276, n_suffix=0)
    _same_tokens(model, inputs, 4, decode_split=DEVICE == "cpu")


def test_generate_idefics():
    torch.manual_seed(0)
    model = tiny_idefics()
    ids = torch.randint(5, 99, (2, 7), device=DEVICE)
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(2, 1, 3, 16, 16, device=DEVICE),
        image_attention_mask=torch.ones(2, 7, 1, dtype=torch.long, device=DEVICE),
    )
    _same_tokens(model, inputs, 5)
