"""Public transformers models with and without ``vlkernels.patch``: forward and forward + backward
time and peak memory of the same model, inputs and output gradient. transformers'
``Blip2QFormerModel`` at BLIP-2's size (multimodal-causal mask, cross-attention to 257 image
tokens), a small ``PaliGemmaForConditionalGeneration`` (SigLIP + Gemma with one key head,
prefix-LM mask) and a small ``MT5ForConditionalGeneration`` (T5's relative position bias: dense in
transformers, ``vlkernels.bias.t5`` patched). Unpatched, they run transformers' SDPA path;
patched, vlkernels (on CPU its torch backend). The two models' calls alternate, so drift of a
shared machine reaches both alike. float32 on CPU, bfloat16 on a GPU."""

from __future__ import annotations

import copy
import time

import torch

import vlkernels
from vlkernels import masks


def _qformer(device, dtype, B):
    """(model, inputs, output, shape) of transformers' Blip2QFormerModel at BLIP-2's size."""
    import transformers

    cfg = transformers.Blip2QFormerConfig(
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        num_hidden_layers=2,
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
    ids = torch.randint(1, 1024, (B, 288), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, -12:] = 0
    kw = dict(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        decoder_input_ids=torch.randint(1, 1024, (B, 32), generator=g).to(device),
    )
    shape = f"B{B} 288 enc (padded) + 32 dec 512w 8h 2+2L"
    return transformers.MT5ForConditionalGeneration(cfg), kw, lambda out: out.logits, shape


MODELS = {  # factory, batch
    "hf_blip2_qformer": (_qformer, 8),
    "hf_paligemma": (_paligemma, 4),
    "hf_mt5": (_mt5, 4),
}


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


def run(quick: bool, progress=print, rows=None) -> list[dict]:
    from benchmarks.common import environment

    try:
        import transformers  # noqa: F401
    except ImportError:
        progress("skip: transformers is not installed")
        return []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = dict(environment(), dtype=str(dtype).replace("torch.", ""))
    rounds = 3 if quick else 11
    rows = [] if rows is None else rows  # benchmarks.run passes a StreamedRows
    for name, (make, batch) in MODELS.items():
        torch.manual_seed(0)
        model, kw, output, shape = make(device, dtype, 2 if quick else batch)
        model = model.to(device, dtype).eval()
        models = {"transformers-sdpa": model, "vlkernels": vlkernels.patch(copy.deepcopy(model))}
        progress(f"{name}: {', '.join(models)} (alternating, {rounds} rounds)")
        times, mem = _measure(models, kw, output, rounds, device)
        for (p, mode), t in times.items():
            pick = lambda f, t=t: t[round(f * (len(t) - 1))]
            base = dict(env, op=name, provider=p, mode=mode, shape=shape)
            rows.append(dict(base, metric="ms", p20=pick(0.2), p50=pick(0.5), p80=pick(0.8)))
            if mode == "full":
                rows.append(dict(base, metric="peak_MiB", p20=mem[p], p50=mem[p], p80=mem[p]))
    return rows
