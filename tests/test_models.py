"""Reference models: kernels=True and kernels=False on the same weights and batch give the same
losses and parameter gradients, the kernels ran, and short training runs agree step by step."""

import pytest
import torch
from helpers import DEVICE, assert_launched

from models import MODEL_NAMES, build_model
from models.common import count_parameters


def _pair(name):
    torch.manual_seed(0)
    eager = build_model(name, "tiny", kernels=False).to(DEVICE)
    fused = build_model(name, "tiny", kernels=True).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _batch(model, B=3):
    return {k: v.to(DEVICE) for k, v in model.example_batch(B, torch.Generator().manual_seed(1)).items()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_kernels_change_nothing_but_speed(name):
    eager, fused = _pair(name)
    batch = _batch(eager)
    torch.manual_seed(2)  # same hard-negative sampling (BLIP-2 ITM) in both runs
    out_e = eager(**batch)
    torch.manual_seed(2)
    kernels = ["attention_fwd", "attention_bwd"] + (["attention_position_grad"] if name == "pali" else [])
    with assert_launched(*kernels):  # PaLI: mT5's relative bias, its tables' gradients
        out_f = fused(**batch)
        params_f = [p for p in fused.parameters() if p.requires_grad]
        grads_f = torch.autograd.grad(out_f["loss"], params_f)
    params_e = [p for p in eager.parameters() if p.requires_grad]
    grads_e = torch.autograd.grad(out_e["loss"], params_e)
    assert set(out_e) == set(out_f) and "loss" in out_e
    for k in out_e:
        torch.testing.assert_close(out_f[k], out_e[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    for (n, _), a, b in zip(
        ((n, p) for n, p in fused.named_parameters() if p.requires_grad), grads_f, grads_e, strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=f"{name} grad {n}")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_curves_agree_step_by_step(name):
    eager, fused = _pair(name)
    losses = {}
    for tag, model in (("eager", eager), ("fused", fused)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        curve = []
        for step in range(4):
            torch.manual_seed(100 + step)  # same hard-negative sampling in both runs
            batch = {
                k: v.to(DEVICE)
                for k, v in model.example_batch(2, torch.Generator().manual_seed(step)).items()
            }
            loss = model(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[tag] = curve
    for a, b in zip(losses["eager"], losses["fused"], strict=True):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (losses["eager"], losses["fused"])


def test_sizes_and_bad_names():
    for name in MODEL_NAMES:
        assert count_parameters(build_model(name, "tiny")) < 2_000_000
    with pytest.raises(ValueError, match="name must be one of"):
        build_model("gpt2")
    with pytest.raises(ValueError, match="size must be one of"):
        build_model("coca", size="huge")


@pytest.mark.parametrize("kernels", [False, True])
def test_flamingo_blocks_match_open_flamingo(kernels):
    """Where the architectures coincide: open_flamingo's resampler and gated cross-attention block
    load into models/flamingo.py's and give the same outputs (eager and with the kernels)."""
    from test_modules import _open_flamingo_helpers

    from models.flamingo import GatedCrossAttention, PerceiverResampler

    helpers = _open_flamingo_helpers()
    torch.manual_seed(0)
    theirs = helpers.PerceiverResampler(dim=64, depth=2, dim_head=16, heads=4, num_latents=8, max_num_media=3)
    theirs = theirs.to(DEVICE)
    ours = PerceiverResampler(64, 2, 4, 16, 8, 3, kernels).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 10, 64, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x[:, :, None]), rtol=2e-5, atol=2e-5)

    block = helpers.GatedCrossAttentionBlock(dim=64, dim_visual=64, dim_head=16, heads=4)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
    block = block.to(DEVICE)
    ours = GatedCrossAttention(64, 4, kernels, dim_head=16).to(DEVICE)
    ours.load_state_dict(block.state_dict())
    text = torch.randn(2, 12, 64, device=DEVICE)
    media = torch.randn(2, 3, 8, 64, device=DEVICE)
    loc = torch.zeros(2, 12, dtype=torch.bool, device=DEVICE)
    loc[:, [1, 5, 9]] = True
    torch.testing.assert_close(
        ours(text, media, loc.cumsum(-1)), block(text, media, loc), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize("kernels", [False, True])
def test_coca_pooler_matches_open_clip(kernels):
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    from models.coca import AttentionalPooler

    torch.manual_seed(0)
    theirs = open_clip_transformer.AttentionalPooler(64, 48, n_head=4, n_queries=5).to(DEVICE)
    ours = AttentionalPooler(64, 4, 5, kernels, context_dim=48).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 17, 48, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["bidirectional", "multimodal_causal", "unimodal"])
@pytest.mark.parametrize("kernels", [False, True])
def test_blip2_qformer_layers_match_transformers(mode, kernels):
    """transformers' Blip2QFormerEncoder (eager) and models/blip2.py's layers, same weights, same
    [queries ; text] states, the BLIP-2 mask of each mode with padded text."""
    transformers = pytest.importorskip("transformers")
    from models.blip2 import QFormerLayer, qformer_layer_state_from_hf
    from models.common import MaskRecipe

    torch.manual_seed(0)
    cfg = transformers.Blip2QFormerConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=256,
        num_hidden_layers=2,
        encoder_hidden_size=32,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    cfg.use_qformer_text_input = True  # the text feed-forward networks (intermediate / output)
    cfg._attn_implementation = "eager"
    hf = transformers.models.blip_2.modeling_blip_2.Blip2QFormerEncoder(cfg).to(DEVICE).eval()
    ours = (
        torch.nn.ModuleList(QFormerLayer(64, 4, 32, i % 2 == 0, kernels) for i in range(2)).to(DEVICE).eval()
    )
    for layer, hf_layer in zip(ours, hf.layer, strict=True):
        layer.load_state_dict(qformer_layer_state_from_hf(hf_layer.state_dict()))
    B, nq, T = 2, 6, 9
    lengths = torch.tensor([T, 4], device=DEVICE)
    recipe = MaskRecipe(qformer=(nq, mode), key_lengths=lengths + nq)
    allowed = recipe.dense(B, nq + T, nq + T, DEVICE)
    additive = (~allowed).float() * torch.finfo(torch.float32).min
    x = torch.randn(B, nq + T, 64, device=DEVICE)
    image = torch.randn(B, 13, 32, device=DEVICE)
    want = hf(x, attention_mask=additive, encoder_hidden_states=image, query_length=nq).last_hidden_state
    got = x
    for layer in ours:
        got = layer(got, nq, recipe, image)
    valid = allowed[:, 0].any(-1)
    torch.testing.assert_close(got[valid], want[valid], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernels", [False, True])
def test_flava_and_blip_vision_layers_match_transformers(kernels):
    """FLAVA's encoder layer and BLIP's vision layer are pre-LN blocks like models.common.Block:
    transformers' weights load into it and give the same outputs (FLAVA with padded text)."""
    T = pytest.importorskip("transformers")
    from models import blip, flava
    from models.common import Block, MaskRecipe, block_state_from_public

    torch.manual_seed(0)
    cfg = T.FlavaTextConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = T.models.flava.modeling_flava.FlavaLayer(cfg).to(DEVICE).eval()
    ours = Block(64, 4, kernels=kernels, eps=cfg.layer_norm_eps).to(DEVICE)
    ours.load_state_dict(block_state_from_public(hf.state_dict(), flava.HF_LAYER_NAMES))
    x = torch.randn(2, 9, 64, device=DEVICE)
    lengths = torch.tensor([9, 4], device=DEVICE)
    recipe = MaskRecipe(key_lengths=lengths)
    additive = (~recipe.dense(2, 9, 9, DEVICE)).float() * torch.finfo(torch.float32).min
    torch.testing.assert_close(
        ours(x, recipe=recipe), hf(x, attention_mask=additive)[0], rtol=2e-5, atol=2e-5
    )

    vcfg = T.BlipVisionConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=256, attention_dropout=0.0
    )
    hf = T.models.blip.modeling_blip.BlipEncoderLayer(vcfg).to(DEVICE).eval()
    ours = Block(64, 4, kernels=kernels, eps=vcfg.layer_norm_eps).to(DEVICE)
    ours.load_state_dict(
        block_state_from_public(hf.state_dict(), blip.HF_VISION_LAYER_NAMES, "self_attn.qkv")
    )
    torch.testing.assert_close(ours(x), hf(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernels", [False, True])
def test_coca_text_block_matches_open_clip(kernels):
    """open_clip's ResidualAttentionBlock (CoCa's unimodal text decoder layer, causal) loads into
    models.common.Block and gives the same outputs. (open_clip's multimodal decoder splits each layer
    into a self-attention block and a cross-attention block with its own MLP: not the same layout.)"""
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    from models import coca
    from models.common import Block, MaskRecipe, block_state_from_public

    torch.manual_seed(0)
    theirs = open_clip_transformer.ResidualAttentionBlock(64, 4).to(DEVICE).eval()
    ours = Block(64, 4, kernels=kernels).to(DEVICE)
    ours.load_state_dict(
        block_state_from_public(theirs.state_dict(), coca.OPEN_CLIP_BLOCK_NAMES, "attn.in_proj")
    )
    x = torch.randn(2, 11, 64, device=DEVICE)
    causal = torch.full((11, 11), float("-inf"), device=DEVICE).triu(1)  # open_clip's additive causal mask
    torch.testing.assert_close(
        ours(x, recipe=MaskRecipe(causal=True)), theirs(x, attn_mask=causal), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize("name", ["blip", "blip2"])
def test_attention_dropout_as_the_papers_train(name, monkeypatch):
    """BLIP's text encoder and BLIP-2's Q-Former are BERT-base: attention dropout 0.1 reaches the
    kernels in training (the kernel and eager models drop the same entries:
    test_kernels_change_nothing_but_speed), none in eval."""
    from models import common

    _, fused = _pair(name)
    batch = _batch(fused)
    seen = []
    attend = common.attend
    monkeypatch.setattr(common, "attend", lambda *a, **kw: seen.append(kw["dropout_p"]) or attend(*a, **kw))
    with torch.no_grad():
        fused(**batch)
        assert 0.1 in seen
        seen.clear()
        fused.eval()(**batch)
        assert set(seen) == {0.0}
