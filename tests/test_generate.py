"""Generation with a KV cache: greedy ``generate()`` of patched tiny public models (BLIP
captioning, BLIP-2 with OPT and with T5, T5 / mT5 / UMT5, PaliGemma, Idefics) gives the tokens of
the unpatched model, and the kernels ran, decoding steps included (one query row over the
cache). (open_clip's CoCa.generate imports transformers 4's beam-search classes and is
unavailable beside transformers 5.)"""

import copy

import pytest
import torch
from helpers import (
    DEVICE,
    assert_launched,
    paligemma_inputs,
    tiny_blip_config,
    tiny_gemma_config,
    tiny_idefics,
    tiny_paligemma,
    tiny_t5,
)

import vlkernels
from vlkernels.attention import triton as attn_triton

T = pytest.importorskip("transformers")


def _same_tokens(ref, inputs, new_tokens, *, decode_split=False):
    """Greedy generate with the unpatched and the patched model: equal token ids, and equal logits
    at every step (a step that ignored the KV cache could still pick the same token). The Triton
    forward ran once per step at least (decode_split: flash-decoding's split path ran too)."""
    ref = ref.to(DEVICE).eval()
    ours = vlkernels.patch(copy.deepcopy(ref))
    kw = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        min_new_tokens=new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        want = ref.generate(**inputs, **kw)
        names = ["attention_fwd"] + (["attention_fwd_split"] if decode_split else [])
        before = attn_triton.LAUNCHES["attention_fwd"]
        with assert_launched(*names):
            got = ours.generate(**inputs, **kw)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == new_tokens
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"logits of step {step}")
    if DEVICE == "cpu" and vlkernels.get_backend() is None:
        assert attn_triton.LAUNCHES["attention_fwd"] - before >= new_tokens
    return got.sequences


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


@pytest.mark.parametrize("family", ["T5", "MT5", "UMT5"])
def test_generate_t5_family(family):
    """Encoder-decoder generation with T5's relative bias in the kernels: each decoding step's
    query sits past the cached keys (the bias's query offset), beyond max_distance by the end."""
    torch.manual_seed(0)
    ids = torch.randint(3, 99, (2, 20), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    _same_tokens(tiny_t5(family), dict(input_ids=ids, attention_mask=mask), 12)


def test_generate_blip2_t5():
    from test_patch import _blip2_t5, _blip2_t5_inputs

    torch.manual_seed(0)
    _same_tokens(_blip2_t5(), _blip2_t5_inputs(), 6)


def test_generate_paligemma_with_a_long_prompt_splits_the_keys():
    """Prompt of 280 tokens: every decoding step's single query row attends over more than 256
    cached keys, which the forward splits across programs."""
    torch.manual_seed(0)
    model = tiny_paligemma(tiny_gemma_config())
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


def test_generate_blip_captioning():
    """BLIP's text decoder keeps its own attention modules (not the attention interface): the
    patched forward must feed the KV cache under the keyword the installed transformers uses."""
    torch.manual_seed(0)
    config = tiny_blip_config(layers=2, bos_token_id=1, sep_token_id=2, eos_token_id=3, pad_token_id=0)
    model = T.BlipForConditionalGeneration(config)
    ids = torch.randint(5, 90, (2, 3), device=DEVICE)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 16, 16))
    _same_tokens(model, {k: v.to(DEVICE) for k, v in inputs.items()}, 6)
