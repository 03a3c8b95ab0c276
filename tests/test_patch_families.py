"""Every patched model family through its public code, beyond one forward: a whole patched model
saved with torch.save loads in a fresh process and computes the same outputs with the kernels;
``output_attentions=True`` returns transformers' eager probabilities; patching twice is patching
once. (Outputs and gradients: test_patch.py; generate(): test_generate.py.)"""

import copy
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    DEVICE,
    assert_launched,
    assert_same_output_and_grads,
    paligemma_inputs,
    seeded_dropout,
    tiny_blip_config,
    tiny_gemma_config,
    tiny_idefics,
    tiny_paligemma,
    tiny_t5,
)

import vlkernels
from vlkernels import masks

T = pytest.importorskip("transformers")

LAYER = dict(intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
VISION = dict(hidden_size=32, image_size=16, patch_size=8, **LAYER)


def _blip():
    cfg = tiny_blip_config()
    ids = torch.randint(5, 99, (2, 7))
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(2, 3, 16, 16))
    return T.BlipForImageTextRetrieval(cfg), inputs, "itm_score"


def _blip2_qformer():
    cfg = T.Blip2QFormerConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=37,
        num_hidden_layers=2,
        encoder_hidden_size=32,
        use_qformer_text_input=True,
    )
    B, nq, L = 2, 4, 9
    padding = torch.ones(B, L, dtype=torch.long)
    padding[1, 6:] = 0  # (a 2-D mask: transformers' eager Q-Former adds a 4-D bool mask as 0 / 1)
    inputs = dict(
        query_embeds=torch.randn(B, L, 32),
        query_length=nq,
        attention_mask=padding,
        encoder_hidden_states=torch.randn(B, 5, 32),
    )
    return T.Blip2QFormerModel(cfg), inputs, "last_hidden_state"


def _flava():
    cfg = T.FlavaConfig(
        image_config=VISION,
        text_config=dict(hidden_size=32, vocab_size=100, **LAYER),
        multimodal_config=dict(hidden_size=32, **LAYER),
        projection_dim=16,
    )
    ids = torch.randint(5, 99, (2, 7))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 16, 16))
    return T.FlavaModel(cfg), inputs, "multimodal_embeddings"


def _paligemma():
    return tiny_paligemma(tiny_gemma_config()), paligemma_inputs(2, n_img=4, n_prompt=5, n_suffix=3), "logits"


def _idefics():
    ids = torch.randint(5, 99, (2, 7))
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(2, 1, 3, 16, 16),
        image_attention_mask=torch.ones(2, 7, 1, dtype=torch.long),
    )
    return tiny_idefics(), inputs, "logits"


def _t5(family="T5"):
    inputs = dict(input_ids=torch.randint(3, 99, (2, 30)), decoder_input_ids=torch.randint(3, 99, (2, 25)))
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, 22:] = 0
    return tiny_t5(family), inputs, "logits"


def _coca_pooler():
    from open_clip.transformer import AttentionalPooler

    return torch.nn.Sequential(AttentionalPooler(32, 24, n_head=4, n_queries=5)), torch.randn(3, 11, 24), None


def _open_flamingo_block():
    from test_modules import _open_flamingo_helpers

    block = _open_flamingo_helpers().GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=16, heads=2)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    loc = torch.zeros(2, 10, dtype=torch.bool)
    loc[:, [0, 6]] = True
    inputs = dict(x=torch.randn(2, 10, 32), media=torch.randn(2, 2, 4, 24), media_locations=loc)
    return torch.nn.ModuleDict({"xattn": block}), inputs, None


FAMILIES = {
    "blip": _blip,
    "blip2_qformer": _blip2_qformer,
    "flava": _flava,
    "paligemma": _paligemma,
    "idefics": _idefics,
    "t5": _t5,
    "umt5": lambda: _t5("UMT5"),
    "coca_pooler": _coca_pooler,
    "open_flamingo_block": _open_flamingo_block,
}


def _to_device(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(DEVICE)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def call(model, inputs, field):
    """A family's output (the child process of the save/load test imports this)."""
    if isinstance(model, torch.nn.ModuleDict):  # a block kept in a container, called by name
        model = model["xattn"]
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if field is None else getattr(out, field)


def test_whole_patched_models_save_and_load_in_a_fresh_process(tmp_path):
    """torch.save of each patched model; a new interpreter, where only vlkernels (and this file's
    ``call``) is imported, loads them (the swapped forwards and modules unpickle, the transformers
    attention function is registered again) and computes the saved outputs, its kernels running."""
    expected = {}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)
        model, inputs, field = build()
        ours = vlkernels.patch(model.to(DEVICE).eval())
        inputs = _to_device(inputs)
        expected[name] = (inputs, field, call(ours, inputs, field))
        torch.save(ours, tmp_path / f"{name}.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch, vlkernels
        from vlkernels._triton_utils import LAUNCHES
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_patch_families import call
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=False)
        for name, (inputs, field, want) in expected.items():
            model = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=False)
            before = sum(LAUNCHES.values())
            out = call(model, inputs, field)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=name)
            if {DEVICE.type!r} == "cpu" and vlkernels.get_backend() is None:
                assert sum(LAUNCHES.values()) > before, name + ": no kernel ran"
        print("loaded", len(expected))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"loaded {len(FAMILIES)}" in run.stdout


ATTENTION_FAMILIES = ["blip", "blip2_qformer", "flava", "paligemma", "idefics", "t5", "umt5"]


def _eager(model):
    """``model`` on transformers' eager attention, its stacks' copies of the config included (T5's
    stacks keep copies, which transformers 5.17's setter misses)."""
    model.set_attn_implementation("eager")
    for m in model.modules():
        if hasattr(getattr(m, "config", None), "_attn_implementation"):
            m.config._attn_implementation = "eager"
    return model


def _skip_a_non_causal_umt5_decoder(name, model):
    if name == "umt5" and not model.decoder.block[0].layer[0].SelfAttention.is_causal:
        pytest.skip(
            "this transformers' UMT5 decoder self-attention says is_causal=False (5.17): its SDPA path, "
            "which the patched one follows, is then not causal, its eager one is"
        )


@pytest.mark.parametrize("name", ATTENTION_FAMILIES)
def test_output_attentions_are_eager_probabilities(name):
    """``output_attentions=True`` on a patched model returns what transformers' eager attention
    returns (every layer's probabilities, self- and cross-attention), not an empty tuple; the
    outputs are still the kernels'."""
    torch.manual_seed(0)
    model, inputs, field = FAMILIES[name]()
    _skip_a_non_causal_umt5_decoder(name, model)
    eager = _eager(model.to(DEVICE).eval())
    ours = vlkernels.patch(copy.deepcopy(eager))
    inputs = dict(_to_device(inputs), output_attentions=True)
    with torch.no_grad():
        want, got = eager(**inputs), ours(**inputs)
    compared = 0
    keys = ("attentions", "cross_attentions", "encoder_attentions", "decoder_attentions")
    for key in (*keys, "text_output", "image_output", "multimodal_output"):
        w, g = getattr(want, key, None), getattr(got, key, None)
        if key.endswith("output"):  # FLAVA: one output per encoder
            w, g = getattr(w, "attentions", None), getattr(g, "attentions", None)
        if w is None:
            continue
        assert g is not None and len(g) == len(w) > 0, key
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            compared += 1
    if name == "blip":  # its text and vision attentions come through vision_model / text_encoder outputs
        compared += _compare_blip_attentions(eager, ours, inputs)
    assert compared > 0
    torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=2e-5, atol=2e-5)


def _compare_blip_attentions(eager, ours, inputs):
    n = 0
    with torch.no_grad():
        for part, kw in (
            ("vision_model", dict(pixel_values=inputs["pixel_values"], output_attentions=True)),
            (
                "text_encoder",
                dict(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    encoder_hidden_states=torch.randn(2, 5, 32, device=DEVICE),
                    output_attentions=True,
                ),
            ),
        ):
            want, got = getattr(eager, part)(**kw), getattr(ours, part)(**kw)
            for key in ("attentions", "cross_attentions"):
                w, g = getattr(want, key, None), getattr(got, key, None)
                if w:
                    assert g is not None and len(g) == len(w), (part, key)
                    for a, b in zip(g, w, strict=True):
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                        n += 1
    return n


def test_patching_twice_is_patching_once():
    for name in ("blip", "blip2_qformer", "t5", "coca_pooler"):
        torch.manual_seed(0)
        model, inputs, field = FAMILIES[name]()
        ours = vlkernels.patch(model.to(DEVICE).eval())
        record = list(ours.vlkernels_patched)
        inputs = _to_device(inputs)
        want = call(ours, inputs, field)
        assert vlkernels.patch(ours) is ours
        assert list(ours.vlkernels_patched) == record, name
        torch.testing.assert_close(call(ours, inputs, field), want)


def test_attention_weights_are_what_the_output_averages(backend):
    """vlkernels.attention_weights: the probabilities the forward multiplies v by, dropout
    included (same seed), on every backend: weights @ v equals the output."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, L, 16, generator=g).to(DEVICE) for L in (9, 13, 13))
    k, v = k[:, :2], v[:, :2]  # grouped keys
    mask = masks.causal() & masks.key_padding(torch.tensor([13, 6], device=DEVICE))
    for p, seed in ((0.0, None), (0.3, 1234)):
        out = vlkernels.attention(q, k, v, mask, dropout_p=p, seed=seed, backend=backend)
        w = vlkernels.attention_weights(q, k, mask, dropout_p=p, seed=seed)
        assert w.shape == (2, 4, 9, 13) and w.dtype == q.dtype
        torch.testing.assert_close(w @ v.repeat_interleave(2, 1), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dropout_p > 0 needs the seed given to attention"):
        vlkernels.attention_weights(q, k, mask, dropout_p=0.1)


def test_transformers_is_in_the_supported_range():
    """The transformers these tests run with is one setup.py admits (`make test` runs them with
    the newest and the oldest of the range)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    (spec,) = [Requirement(r).specifier for r in requires("vlkernels") if r.startswith("transformers")]
    assert spec.contains(T.__version__), (T.__version__, str(spec))


def _cast(inputs, dtype):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype)
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_low_precision_patched_models_within_twice_the_eager_error(name, backend, dtype):
    """A patched model in bf16 / fp16 is as accurate as the unpatched one in that dtype, by
    FlashAttention's rule: its output's largest error against the unpatched model in float64 is
    at most twice the unpatched model's own (plus 1e-6)."""
    from vlkernels._triton_utils import LAUNCHES

    torch.manual_seed(0)
    model, inputs, field = FAMILIES[name]()
    model = model.to(DEVICE).eval()
    inputs = _to_device(inputs)
    want = call(copy.deepcopy(model).double(), _cast(inputs, torch.float64), field)
    eager = call(copy.deepcopy(model).to(dtype), _cast(inputs, dtype), field)
    ours = vlkernels.patch(copy.deepcopy(model)).to(dtype)
    before = sum(LAUNCHES.values())
    vlkernels.set_backend(backend)
    try:
        got = call(ours, _cast(inputs, dtype), field)
    finally:
        vlkernels.set_backend(None)
    assert got.dtype == dtype
    if backend == "triton":
        assert sum(LAUNCHES.values()) > before, "no kernel ran"
    ours_err = (got.double() - want).abs().max().item()
    eager_err = (eager.double() - want).abs().max().item()
    assert ours_err <= 2 * eager_err + 1e-6, f"{ours_err:.3g} > 2 x {eager_err:.3g}"


# (open_clip's AttentionalPooler and open_flamingo's gated cross-attention have no dropout)
WITH_DROPOUT = [name for name in FAMILIES if name not in ("coca_pooler", "open_flamingo_block")]


def _with_dropout(model, p=0.1):
    """``model`` with every dropout at ``p``: its attention modules' (a float ``attention_dropout``
    or ``dropout``) and every ``nn.Dropout`` (hidden states and, in BLIP / FLAVA, probabilities)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = p
        for attr in ("attention_dropout", "dropout"):
            if type(getattr(mod, attr, None)) is float:
                setattr(mod, attr, p)
    return model


def _train_step(model, inputs, field, dtype):
    """(output as float64, every parameter's gradient as float64) of one training forward and
    backward of ``model`` in ``dtype``, torch seeded, a fixed output gradient."""
    torch.manual_seed(1)
    if isinstance(model, torch.nn.ModuleDict):
        model = model["xattn"]
    out = model(**_cast(inputs, dtype))
    out = out if field is None else getattr(out, field)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params, go, allow_unused=True)
    return out.double(), [g if g is None else g.double() for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", WITH_DROPOUT)
def test_train_mode_with_the_models_dropout(name, dtype, monkeypatch):
    """A patched model in train mode, every dropout at 0.1, equals the unpatched one (transformers'
    eager attention, dropping the same probabilities and hidden states): output and every
    parameter gradient. fp32: equal within 2e-5 (gradients 1e-4); bf16 / fp16: FlashAttention's
    rule against the unpatched model in float64, 2x its same-dtype error for the output, 3x for
    each gradient (plus that gradient's own rounding to the dtype). A family whose unpatched
    gradients overflow in a dtype is skipped there (FLAVA in fp16)."""
    torch.manual_seed(0)
    model, inputs, field = FAMILIES[name]()
    _skip_a_non_causal_umt5_decoder(name, model)
    model = _with_dropout(model.to(DEVICE).train())
    if model._supports_sdpa:
        model = _eager(model)  # (SDPA draws its own dropout mask)
    inputs = _to_device(inputs)
    step = functools.partial(_train_step, inputs=inputs, field=field)
    ours = vlkernels.patch(copy.deepcopy(model)).to(dtype)
    drawn = seeded_dropout(monkeypatch)
    with vlkernels.use_backend("triton"), assert_launched("attention_fwd", "attention_bwd"):
        got, got_grads = step(ours, dtype=dtype)
    assert not drawn  # the patched model dropped its probabilities in the kernels
    eager, eager_grads = step(copy.deepcopy(model).to(dtype), dtype=dtype)
    if not all(g.isfinite().all() for g in eager_grads if g is not None):
        pytest.skip(f"{name} does not train in {dtype} unscaled: the unpatched model's gradients overflow")
    assert drawn, "the unpatched model dropped no attention probabilities"
    n = len(drawn)
    assert not torch.allclose(got, step(ours.eval(), dtype=dtype)[0])  # dropout acted
    if dtype == torch.float32:
        assert_same_output_and_grads(got, got_grads, eager, eager_grads)
        return
    drawn.clear()
    want, want_grads = step(copy.deepcopy(model).double(), dtype=torch.float64)
    assert len(drawn) == n  # the same probabilities dropped in float64
    err = lambda a, b: (a - b).abs().max().item()
    assert err(got, want) <= 2 * err(eager, want) + 1e-6, (err(got, want), err(eager, want))
    scale = max(w.abs().max().item() for w in want_grads if w is not None)
    for i, (g, e, w) in enumerate(zip(got_grads, eager_grads, want_grads, strict=True)):
        if w is None:
            assert g is None and e is None
        elif w.abs().max() <= 1e-9 * scale:  # zero but for rounding (a key bias: softmax ignores it)
            assert g.abs().max() <= torch.finfo(dtype).eps * scale, (i, g.abs().max().item(), scale)
        else:
            # (plus the rounding of the gradient itself to the dtype: a one-element gradient, such as
            # a tanh gate's, can otherwise be luckier in eager by any factor)
            tol = 3 * err(e, w) + torch.finfo(dtype).eps * w.abs().max().item()
            assert err(g, w) <= tol, (i, err(g, w), err(e, w))
