"""Public models with and without ``vlkernels.patch``: forward and forward + backward time and peak
memory of the same model, inputs and output gradient, for each mission model's public code, two
layers per stack at its paper width:

- transformers: BLIP (image-text matching: ViT + BERT with cross-attention), BLIP-2's
  ``Blip2QFormerModel`` (multimodal-causal mask, cross-attention to 257 image tokens), BLIP-2 with
  OPT, FLAVA, Idefics (Flamingo: each text token sees the image before it), PaliGemma (SigLIP +
  Gemma with one key head, prefix-LM mask), mT5 (T5's relative position bias: dense in
  transformers, ``vlkernels.bias.t5`` patched);
- open_clip's CoCa (the attentional pooler over the image tokens);
- open_flamingo's gated cross-attention blocks.

Unpatched providers: transformers' SDPA path and its eager path where the model has both (BLIP's
and FLAVA's attention is written out in the model: eager only), the library's own code otherwise.
Patched: vlkernels (on CPU its torch backend). The providers' calls alternate, so drift of a
shared machine reaches all alike. float32 on CPU, bfloat16 on a GPU."""

from __future__ import annotations

import copy
import time

import torch

import vlkernels
from vlkernels import masks

# a BERT-base / ViT-B encoder with two layers: the width, heads and MLP of the papers' towers
_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12)


def _padded_ids(g, B, L, padded, low=5):
    """Token ids [B, L] below 1024 and their attention mask, the last ``padded`` of every other
    row padded."""
    ids = torch.randint(low, 1024, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, L - padded :] = 0
    return ids, mask


def _text_and_image(device, dtype, B, L, padded):
    """The inputs of an image-text encoder: ``_padded_ids`` and a 224-pixel image per row."""
    g = torch.Generator().manual_seed(0)
    ids, mask = _padded_ids(g, B, L, padded)
    return dict(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        pixel_values=torch.randn(B, 3, 224, 224, generator=g).to(device, dtype),
    )


def _qformer(device, dtype, B):
    """(model, inputs, output, shape) of transformers' Blip2QFormerModel at BLIP-2's size."""
    import transformers

    cfg = transformers.Blip2QFormerConfig(
        **_BASE,
        encoder_hidden_size=1408,
        use_qformer_text_input=True,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    nq, T = 32, 32
    g = torch.Generator().manual_seed(0)
    kw = dict(
        query_embeds=torch.randn(B, nq + T, 768, generator=g).to(device, dtype),
        query_length=nq,
        attention_mask=masks.qformer(nq, "multimodal_causal").to_dense(B, nq + T, nq + T).to(device),
        encoder_hidden_states=torch.randn(B, 257, 1408, generator=g).to(device, dtype),
    )
    shape = f"B{B} {nq}q+{T}t x257img 768w 12h 2L"
    return transformers.Blip2QFormerModel(cfg), kw, lambda out: out.last_hidden_state, shape


def _blip(device, dtype, B):
    """(model, inputs, output, shape) of BLIP's image-text matching: ViT-B/16 at 224 pixels (197
    tokens) and BERT-base text (35 tokens, 9 padded in every other row) cross-attending to them."""
    import transformers

    cfg = transformers.BlipConfig(
        text_config=dict(vocab_size=1024, encoder_hidden_size=768, **_BASE),
        vision_config=dict(image_size=224, patch_size=16, **_BASE),
    )
    kw = _text_and_image(device, dtype, B, 35, padded=9)
    shape = f"B{B} 197img + 35tok (padded) 768w 12h 2+2L"
    return transformers.BlipForImageTextRetrieval(cfg), kw, lambda out: out.itm_score, shape


def _blip2_opt(device, dtype, B):
    """(model, inputs, output, shape) of BLIP-2 with OPT: ViT (257 tokens), the Q-Former's 32
    queries, OPT (512 wide) over the 32 query outputs and 32 text tokens, causal."""
    import transformers

    cfg = transformers.Blip2Config(
        vision_config=dict(image_size=224, patch_size=14, **_BASE),
        qformer_config=dict(encoder_hidden_size=768, **_BASE),
        text_config=transformers.OPTConfig(
            hidden_size=512, ffn_dim=2048, num_hidden_layers=2, num_attention_heads=8, vocab_size=1024,
            word_embed_proj_dim=512,
        ).to_dict(),
        num_query_tokens=32,
        image_token_index=1000,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 999, (B, 64), generator=g)
    ids[:, :32] = 1000
    kw = dict(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        pixel_values=torch.randn(B, 3, 224, 224, generator=g).to(device, dtype),
    )
    shape = f"B{B} 257img -> 32q + 32tok, OPT 512w 8h 2+2+2L"
    return transformers.Blip2ForConditionalGeneration(cfg), kw, lambda out: out.logits, shape


def _flava(device, dtype, B):
    """(model, inputs, output, shape) of FLAVA: ViT-B/16 (197 tokens), text (32 tokens, 8 padded
    in every other row) and the multimodal encoder over both, 768 wide."""
    import transformers

    cfg = transformers.FlavaConfig(
        image_config=dict(image_size=224, patch_size=16, **_BASE),
        text_config=dict(vocab_size=1024, **_BASE),
        multimodal_config=_BASE,
    )
    kw = _text_and_image(device, dtype, B, 32, padded=8)
    shape = f"B{B} 197img + 32tok (padded) 768w 12h 2+2+2L"
    return transformers.FlavaModel(cfg), kw, lambda out: out.multimodal_embeddings, shape


def _idefics(device, dtype, B):
    """(model, inputs, output, shape) of Idefics (Flamingo): 128 text tokens, two images of 65
    tokens each; tokens 0-63 see the first image, 64-127 the second, through the gated
    cross-attention in both layers."""
    import transformers

    cfg = transformers.IdeficsConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        vocab_size=1024,
        additional_vocab_size=2,
        alpha_initializer="zeros",
        cross_layer_interval=1,
        vision_config=dict(
            embed_dim=256, image_size=64, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=1024,
        ),
        perceiver_config=dict(use_resampler=False),
    )  # fmt: skip
    model = transformers.IdeficsForVisionText2Text(cfg)
    with torch.no_grad():  # the gates start closed (tanh(0)): open them so cross-attention counts
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.fill_(0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (B, 128), generator=g)
    image_mask = torch.zeros(B, 128, 2, dtype=torch.long)
    image_mask[:, :64, 0] = 1
    image_mask[:, 64:, 1] = 1
    kw = dict(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        pixel_values=torch.randn(B, 2, 3, 64, 64, generator=g).to(device, dtype),
        image_attention_mask=image_mask.to(device),
    )
    shape = f"B{B} 128tok x 2 images of 65 512w 8h 2L"
    return model, kw, lambda out: out.logits, shape


def _paligemma(device, dtype, B):
    """(model, inputs, output, shape) of a small PaliGemma: 64 image tokens, 32 prompt, 32 suffix."""
    import transformers

    vision = transformers.SiglipVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    )
    text = transformers.GemmaConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=1024,
    )
    cfg = transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=1000, projection_dim=512
    )
    n_img, n_prompt, n_suffix = 64, 32, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 999, (B, n_img + n_prompt + n_suffix), generator=g)
    ids[:, :n_img] = 1000
    token_type = torch.zeros_like(ids)
    token_type[:, n_img + n_prompt :] = 1
    kw = dict(
        input_ids=ids.to(device),
        pixel_values=torch.randn(B, 3, 64, 64, generator=g).to(device, dtype),
        token_type_ids=token_type.to(device),
        attention_mask=torch.ones_like(ids).to(device),
    )
    shape = f"B{B} {n_img}img+{n_prompt}+{n_suffix}tok 512w 8h/1kv 2L"
    return transformers.PaliGemmaForConditionalGeneration(cfg), kw, lambda out: out.logits, shape


def _mt5(device, dtype, B):
    """(model, inputs, output, shape) of a small mT5 as PaLI uses it: an encoder over 288 tokens
    (256 image tokens' places and a prompt of 32, the last 12 padded in every other row), a decoder
    over 32; T5's relative position bias (32 buckets up to 128) in both stacks."""
    import transformers

    cfg = transformers.MT5Config(
        vocab_size=1024, d_model=512, d_kv=64, d_ff=1024, num_layers=2, num_decoder_layers=2, num_heads=8,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids, mask = _padded_ids(g, B, 288, padded=12, low=1)
    kw = dict(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        decoder_input_ids=torch.randint(1, 1024, (B, 32), generator=g).to(device),
    )
    shape = f"B{B} 288 enc (padded) + 32 dec 512w 8h 2+2L"
    return transformers.MT5ForConditionalGeneration(cfg), kw, lambda out: out.logits, shape


def _coca(device, dtype, B):
    """(model, inputs, output, shape) of open_clip's CoCa ViT-B/32 with two layers per tower: the
    attentional pooler's 256 learned queries (and the contrastive one's 1) over 50 image tokens,
    the captioning decoder's logits over 76 text tokens."""
    import open_clip

    cfg = open_clip.get_model_config("coca_ViT-B-32")
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        cfg[tower]["layers"] = 2
    for tower in ("text_cfg", "multimodal_cfg"):
        cfg[tower]["vocab_size"] = 1024
    cfg.pop("custom_text", None)
    g = torch.Generator().manual_seed(0)
    kw = dict(
        image=torch.randn(B, 3, 224, 224, generator=g).to(device, dtype),
        text=torch.randint(1, 1024, (B, 76), generator=g).to(device),
    )
    shape = f"B{B} 50img -> 256+1 queries, 76tok 768/512w 2+2+2L"
    return open_clip.CoCa(**cfg), kw, lambda out: out["logits"], shape


class _FlamingoBlocks(torch.nn.Module):
    """open_flamingo's GatedCrossAttentionBlock stacked as its LM interleaves them."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x, media, media_locations):
        for block in self.blocks:
            x = block(x, media, media_locations=media_locations)
        return x


def _open_flamingo(device, dtype, B):
    """(model, inputs, output, shape) of two open_flamingo gated cross-attention blocks (1024 wide,
    8 heads of 64): 128 text tokens, three images of 64 resampler latents; each token sees the
    latents of the image before it."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("open_flamingo")
    if spec is None:
        raise ImportError("open_flamingo is not installed")
    path = pathlib.Path(spec.origin).parent / "src" / "helpers.py"  # its __init__ imports the LM stack
    helpers_spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
    helpers = importlib.util.module_from_spec(helpers_spec)
    helpers_spec.loader.exec_module(helpers)
    blocks = [
        helpers.GatedCrossAttentionBlock(dim=1024, dim_visual=1024, dim_head=64, heads=8) for _ in range(2)
    ]
    for block in blocks:
        with torch.no_grad():  # the gates start closed (tanh(0)): open them
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    g = torch.Generator().manual_seed(0)
    loc = torch.zeros(B, 128, dtype=torch.bool)
    loc[:, [0, 40, 90]] = True
    kw = dict(
        x=torch.randn(B, 128, 1024, generator=g).to(device, dtype),
        media=torch.randn(B, 3, 64, 1024, generator=g).to(device, dtype),
        media_locations=loc.to(device),
    )
    shape = f"B{B} 128tok x 3 images of 64 latents 1024w 8h 2 blocks"
    return _FlamingoBlocks(blocks), kw, lambda out: out, shape


MODELS = {  # factory, batch, the library whose code it is
    "hf_blip": (_blip, 8, "transformers"),
    "hf_blip2_qformer": (_qformer, 8, "transformers"),
    "hf_blip2_opt": (_blip2_opt, 4, "transformers"),
    "hf_flava": (_flava, 8, "transformers"),
    "hf_idefics": (_idefics, 4, "transformers"),
    "hf_paligemma": (_paligemma, 4, "transformers"),
    "hf_mt5": (_mt5, 4, "transformers"),
    "open_clip_coca": (_coca, 8, "open_clip"),
    "open_flamingo": (_open_flamingo, 4, "open_flamingo"),
}


def _unpatched(model, library: str) -> dict:
    """{provider: model}: transformers' SDPA and eager paths where the model has both, its eager
    path where its attention is written out in the model (BLIP, FLAVA), the library's own code for
    open_clip and open_flamingo."""
    if library != "transformers":
        return {library: model}
    if not model._supports_sdpa:
        return {"transformers-eager": model}
    eager = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    eager.set_attn_implementation("eager")
    return {"transformers-sdpa": model, "transformers-eager": eager}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(models: dict, kw: dict, output, rounds: int, device) -> dict:
    """{(provider, mode): sorted ms} and {provider: peak MiB of forward + backward}."""
    from benchmarks.common import cpu_peak_mib, peak_mib

    grad = torch.randn_like(output(next(iter(models.values()))(**kw)))

    def calls(m):
        params = [t for t in m.parameters() if t.requires_grad]
        return {
            "forward": lambda: output(m(**kw)),
            "full": lambda: torch.autograd.grad(output(m(**kw)), params, grad, allow_unused=True),
        }

    fns = {p: calls(m) for p, m in models.items()}
    times = {}
    for mode in ("forward", "full"):
        for p in models:
            fns[p][mode]()
            times[p, mode] = []
        for _ in range(rounds):
            for p in models:
                _sync(device)
                t0 = time.perf_counter()
                fns[p][mode]()
                _sync(device)
                times[p, mode].append((time.perf_counter() - t0) * 1e3)
    peak = peak_mib if device.type == "cuda" else cpu_peak_mib
    return {k: sorted(t) for k, t in times.items()}, {p: peak(fns[p]["full"]) for p in models}


def run(quick: bool, progress=print, rows=None, rounds: int | None = None) -> list[dict]:
    """Rows of each model's time (``rounds`` alternating rounds: 3 quick, else 11) and peak memory."""
    from benchmarks.common import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = dict(environment(), dtype=str(dtype).replace("torch.", ""))
    rounds = rounds or (3 if quick else 11)
    rows = [] if rows is None else rows  # benchmarks.run passes a StreamedRows
    # Gradients that reach the image towers of freshly initialised models are partly subnormal
    # floats, which a CPU computes many times slower: flushed to zero on CPU while this runs
    # (BLIP's forward + backward at batch 2: 2.7 s with them, 1.2 s flushed).
    torch.set_flush_denormal(device.type == "cpu")
    try:
        _run(quick, progress, rows, device, dtype, env, rounds)
    finally:
        torch.set_flush_denormal(False)
    return rows


def _run(quick, progress, rows, device, dtype, env, rounds) -> None:
    for name, (make, batch, library) in MODELS.items():
        torch.manual_seed(0)
        try:
            model, kw, output, shape = make(device, dtype, 1 if quick else batch)
        except ImportError as e:
            progress(f"skip {name}: {e}")
            continue
        model = model.to(device, dtype).eval()
        models = {**_unpatched(model, library), "vlkernels": vlkernels.patch(copy.deepcopy(model))}
        progress(f"{name}: {', '.join(models)} (alternating, {rounds} rounds)")
        times, mem = _measure(models, kw, output, rounds, device)
        for (p, mode), t in times.items():
            pick = lambda f, t=t: t[round(f * (len(t) - 1))]
            base = dict(env, op=name, provider=p, mode=mode, shape=shape)
            rows.append(dict(base, metric="ms", p20=pick(0.2), p50=pick(0.5), p80=pick(0.8)))
            if mode == "full":
                rows.append(dict(base, metric="peak_MiB", p20=mem[p], p50=mem[p], p80=mem[p]))
