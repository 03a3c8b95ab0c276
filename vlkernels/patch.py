"""``vlkernels.patch(model)``: swap vlkernels into a public model in place (à la Liger-Kernel's
``apply_liger_kernel_to_*``).

- transformers models (BLIP-2 Q-Former self- and cross-attention, PaliGemma, Idefics, …): every
  attention that goes through transformers' attention interface runs ``vlkernels.attention`` with
  the model's own mask (bool, or additive 0 / -inf); BLIP's and FLAVA's attention modules, which
  do not use that interface, get a forward that does.
- T5, mT5, UMT5 (alone, or as the language model of BLIP-2 / InstructBLIP with Flan-T5): the
  relative position bias is ``vlkernels.bias.t5`` on the module's own table, computed in the
  kernels (once per forward, shared by the layers as transformers shares its tensor), not the
  dense [1, H, Lq, Lk] tensor; its gradient is reduced to the table in the backward.
- open_clip: each ``AttentionalPooler`` (CoCa) becomes ``vlkernels.modules.AttentionalPooler``.
- open_flamingo: each ``GatedCrossAttentionBlock`` becomes ``vlkernels.modules.GatedCrossAttentionBlock``.
The swapped modules load the originals' state_dicts, so the model's parameters keep their values.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vlkernels import bias, masks
from vlkernels.attention import api
from vlkernels.modules import AttentionalPooler, GatedCrossAttentionBlock, LayerNorm

HF_NAME = "vlkernels"


def hf_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers AttentionInterface function: query [B, H, Lq, D], key/value [B, Hk, Lk, D];
    ``attention_mask`` None, bool (True = attend) or float, added to the scores (0 = attend, very
    negative = masked, or any bias), broadcastable to [B, H, Lq, Lk]. ``softcap``: Gemma 2's logit
    soft-capping; ``sliding_window``: already in the mask transformers builds, applied here only
    when there is no mask; ``position_bias``: T5's, a ``vlkernels.bias`` bias (patched T5-family
    modules) or a dense tensor added to the scores. Returns ([B, Lq, H, D], the attention
    probabilities [B, H, Lq, Lk] after dropout when ``output_attentions`` is asked for, as
    transformers' eager attention, else None)."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("vlkernels attention does not support 's_aux' (attention sinks)")
    position = kwargs.get("position_bias")
    if isinstance(position, torch.Tensor):
        if _made_zeros(module):
            position = None
        else:  # a dense bias: added to the scores with the mask
            attention_mask = _with_dense_bias(attention_mask, position)
            position = None
    elif position is _NO_POSITION_BIAS:
        position = None
    mask = attention_mask  # bool (True = attend) or float, added to the scores (as SDPA)
    if attention_mask is None:  # causal unless told otherwise, top-left aligned: as transformers' SDPA path
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        Lq, Lk = query.shape[2], key.shape[2]
        if causal and Lq > 1:
            if Lq <= Lk:  # keys past Lq are masked for every row: drop them
                key, value = key[:, :, :Lq], value[:, :, :Lq]
                mask = masks.causal()
            else:  # query i sees keys 0..i
                mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()
        window = kwargs.get("sliding_window")
        if causal and window is not None:  # the last `window` keys of each row (as the mask builder)
            if mask is None or isinstance(mask, masks.Mask):
                mask = masks.sliding_window(window) if mask is None else mask & masks.sliding_window(window)
            else:
                i = torch.arange(Lq, device=query.device)[:, None]
                mask = mask & (torch.arange(Lk, device=query.device)[None] > i - window)
    p = dropout if module.training else 0.0
    options = dict(scale=scaling, softcap=kwargs.get("softcap"), dropout_p=p, position_bias=position)
    out, probs = _attend(query, key, value, mask, _weights_wanted(kwargs), **options)
    return out.transpose(1, 2), probs


def _with_dense_bias(mask, position: torch.Tensor) -> torch.Tensor:
    """A dense position bias and transformers' mask (None, bool, or additive) as one float mask."""
    if mask is None:
        return position
    if mask.dtype == torch.bool:
        return position.masked_fill(~mask, float("-inf"))
    return position + mask


# T5-family attention (T5, mT5, UMT5 and the models built on their code): its relative position
# bias is vlkernels.bias.t5 on the module's table. Without a table of its own a module is given
# the bias of the stack's first layer, or makes zeros: a forward with a ``position_bias``
# argument (T5, mT5) makes them only when given None, which the swapped-in forward replaces with
# _NO_POSITION_BIAS; a forward without one (UMT5) always makes them, and they are dropped.
_NO_POSITION_BIAS = object()


def _t5_compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
    """T5Attention.compute_bias as ``vlkernels.bias.t5`` (query row i at key position i +
    past_seen_tokens, as transformers places it)."""
    return bias.t5(
        self.relative_attention_bias.weight,
        bidirectional=not self.is_decoder,
        num_buckets=self.relative_attention_num_buckets,
        max_distance=self.relative_attention_max_distance,
        query_offset=int(past_seen_tokens),
    )


def _t5_forward(self, *args, **kwargs):
    """The module's forward, given _NO_POSITION_BIAS where it would make a zero bias."""
    i = _position_arg(type(self))
    if len(args) > i:
        if args[i] is None:
            args = (*args[:i], _NO_POSITION_BIAS, *args[i + 1 :])
    elif kwargs.get("position_bias") is None:
        kwargs["position_bias"] = _NO_POSITION_BIAS
    return type(self).forward(self, *args, **kwargs)


def _position_arg(cls) -> int | None:
    """Where ``cls.forward`` takes ``position_bias`` among its arguments after self (None: it
    takes none)."""
    if cls not in _POSITION_ARG:
        params = list(inspect.signature(cls.forward).parameters)[1:]
        _POSITION_ARG[cls] = params.index("position_bias") if "position_bias" in params else None
    return _POSITION_ARG[cls]


_POSITION_ARG: dict = {}


def _made_zeros(module) -> bool:
    """Whether a dense ``position_bias`` given to ``module``'s attention is the zeros its forward
    made (a patched T5-family module without a table whose forward takes no position_bias)."""
    return (
        isinstance(module.__dict__.get("compute_bias"), _Patched)
        and not module.has_relative_attention_bias
        and _position_arg(type(module)) is None
    )


def _is_t5_family(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("transformers") and all(
        hasattr(mod, a)
        for a in ("compute_bias", "has_relative_attention_bias", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "is_decoder")
    )  # fmt: skip


def _t5_bias_is_ours(mod: nn.Module) -> bool:
    """Whether ``mod``'s own compute_bias gives what ``_t5_compute_bias`` does, bucket for bucket:
    both computed on the table's device for a table of distinct entries (distinct up to 256 in
    bf16), over relative positions past max_distance both ways."""
    weight = mod.relative_attention_bias.weight
    md = mod.relative_attention_max_distance
    probe = torch.arange(weight.numel(), dtype=torch.float32).view(weight.shape)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.copy_(probe)
            q_len, k_len, offset = 2 * md + 3, 2 * md + 6, 2
            theirs = type(mod).compute_bias(mod, q_len, k_len, device=weight.device, past_seen_tokens=offset)
            ours = _t5_compute_bias(mod, q_len, k_len, weight.device, offset).dense(q_len, k_len)
            return theirs.shape == ours.shape and torch.equal(theirs.float(), ours.float())
    except (TypeError, ValueError, AttributeError):  # another signature or rule: not ours
        return False
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _attend(q, k, v, mask, weights: bool, dropped: bool = True, **options):
    """(vlkernels.attention's output [B, H, Lq, D], and with ``weights`` its probabilities [B, H,
    Lq, Lk], after dropout when ``dropped`` (before when not, as BLIP's text attention returns
    them), else None)."""
    if weights and options.get("dropout_p"):
        options["seed"] = api.draw_seed(q.device)  # one seed: the probabilities drop what the output did
    out = api.attention(q, k, v, mask, **options)
    probs = None
    if weights:
        probs = api.attention_weights(q, k, mask, **(options if dropped else {**options, "dropout_p": 0.0}))
    return out, probs


def _weights_wanted(kwargs) -> bool:
    """Whether the model asked for attention probabilities: ``output_attentions`` given to the
    module, or transformers collecting them (its output recorder, which takes them from modules
    given no such argument, or given False: T5's cross-attention in transformers 5.17)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # (releases that pass output_attentions to every module)
        return False
    collected = _active_collector.get() or {}
    return "attentions" in collected or "cross_attentions" in collected


def _register_hf() -> None:
    """Register the attention function, and SDPA's mask builder (bool masks, None when plain
    causal) so that models build their masks (prefix-LM, padding) for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(HF_NAME, hf_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HF_NAME, sdpa_mask)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _open_clip_pooler(mod):
    n_queries, d_model = mod.query.shape
    return AttentionalPooler(
        d_model,
        mod.attn.kdim,
        n_head=mod.attn.num_heads,
        n_queries=n_queries,
        norm_layer=lambda d: LayerNorm(d, eps=mod.ln_q.eps),
    )


def _open_flamingo_block(mod):
    a = mod.attn
    dim = a.norm.normalized_shape[0]
    return GatedCrossAttentionBlock(
        dim=dim,
        dim_visual=a.to_kv.in_features,
        dim_head=a.to_q.out_features // a.heads,
        heads=a.heads,
        ff_mult=mod.ff[1].out_features / dim,
        only_attend_immediate_media=a.only_attend_immediate_media,
    )


def _bool_mask(mask):
    """transformers' masks (bool, or additive 0 / very negative) as bool, True = attend."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _dropout_p(module) -> float:
    """The attention dropout of a BLIP / FLAVA attention module: its ``dropout`` in training."""
    return module.dropout.p if module.training else 0.0


def _heads(module, x, linear):
    B, L, _ = x.shape
    return linear(x).view(B, L, -1, module.attention_head_size).transpose(1, 2)


def _merged(out):
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def _flava_self_attention(self, hidden_states, attention_mask=None, output_attentions=False):
    """FlavaSelfAttention.forward through vlkernels.attention."""
    q, k, v = (_heads(self, hidden_states, lin) for lin in (self.query, self.key, self.value))
    out, probs = _attend(q, k, v, _bool_mask(attention_mask), output_attentions, dropout_p=_dropout_p(self))
    return (_merged(out), probs) if output_attentions else (_merged(out),)


_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")  # the KV cache's keyword across releases


def _blip_text_self_attention(
    self,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    *args,
    **kw,
):
    """BlipTextSelfAttention.forward through vlkernels.attention, KV cache included (a transformers
    ``Cache``, under whichever keyword the installed release passes it; any other kind of cache
    keeps transformers' own forward). Returns (context [B, L, hidden], the probabilities before
    dropout when the model collects them, else None)."""
    from transformers.cache_utils import Cache, EncoderDecoderCache

    cache = args[0] if args else next((kw.pop(n) for n in _CACHE_NAMES if kw.get(n) is not None), None)
    for n in _CACHE_NAMES:
        kw.pop(n, None)
    if cache is not None and not isinstance(cache, Cache):
        forward = type(self).forward.__get__(self)
        return forward(
            hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache, **kw
        )
    cross = encoder_hidden_states is not None
    q = _heads(self, hidden_states, self.query)
    layer = cache
    if isinstance(cache, EncoderDecoderCache):
        layer = cache.cross_attention_cache if cross else cache.self_attention_cache
    if cross and isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(self.layer_idx):
        k, v = layer.layers[self.layer_idx].keys, layer.layers[self.layer_idx].values  # the image's, kept
    else:
        ctx = encoder_hidden_states if cross else hidden_states
        k, v = _heads(self, ctx, self.key), _heads(self, ctx, self.value)
        if cache is not None:
            k, v = layer.update(k, v, self.layer_idx)
            if cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
    mask = _bool_mask(encoder_attention_mask if cross else attention_mask)
    out, probs = _attend(q, k, v, mask, _weights_wanted(kw), dropped=False, dropout_p=_dropout_p(self))
    return _merged(out), probs


def _blip_vision_attention(self, hidden_states, **kwargs):
    """BlipAttention.forward (vision) through vlkernels.attention."""
    B, L, C = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    out, probs = _attend(
        qkv[0], qkv[1], qkv[2], None, _weights_wanted(kwargs), scale=self.scale, dropout_p=_dropout_p(self)
    )
    return self.projection(_merged(out)), probs


class _Patched:
    """A swapped-in method of one module: ``_SWAPPED[name](module, ...)``. An instance attribute
    that pickles by name (``torch.save`` of a whole patched model; a bound method of a function
    the module's class does not have would not load)."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    def __call__(self, *args, **kwargs):
        return _SWAPPED[self.name](self.module, *args, **kwargs)


# transformers modules that do not go through the attention interface: their forward is replaced
_FORWARD_SWAPS = {
    ("transformers.models.flava", "FlavaSelfAttention"): _flava_self_attention,
    ("transformers.models.blip", "BlipTextSelfAttention"): _blip_text_self_attention,
    ("transformers.models.blip", "BlipAttention"): _blip_vision_attention,
}


_SWAPPED = {
    **{cls: fn for (_, cls), fn in _FORWARD_SWAPS.items()},
    "t5_compute_bias": _t5_compute_bias,
    "t5_forward": _t5_forward,
}

_MODULE_SWAPS = {
    ("open_clip.transformer", "AttentionalPooler"): _open_clip_pooler,
    ("open_flamingo", "GatedCrossAttentionBlock"): _open_flamingo_block,
}


def _patch_t5(name: str, mod: nn.Module, model: nn.Module) -> list[str]:
    """Swap the analytic T5 bias into ``mod``, a T5-family attention, where its class computes what
    ``vlkernels.bias.t5`` does (checked on the first module of the class that has a table)."""
    cls = type(mod)
    key = (cls, mod.relative_attention_num_buckets, mod.relative_attention_max_distance, mod.is_decoder)
    if key not in _T5_CHECKED:
        tabled = next((m for m in model.modules() if type(m) is cls and m.has_relative_attention_bias), None)
        _T5_CHECKED[key] = tabled is not None and _t5_bias_is_ours(tabled)
    if not _T5_CHECKED[key]:
        return []
    # the module's stack's copy of the config (transformers 5.17's set_attn_implementation does not
    # reach it)
    _register_hf()
    mod.config._attn_implementation = HF_NAME
    mod.compute_bias = _Patched("t5_compute_bias", mod)
    if not mod.has_relative_attention_bias:
        if _position_arg(cls) is not None:
            mod.forward = _Patched("t5_forward", mod)
        return []
    return [f"{name}: {cls.__name__}.compute_bias -> vlkernels.bias.t5"]


_T5_CHECKED: dict = {}  # (class, its bias's configuration) -> whether it is vlkernels.bias.t5's


class PatchRecord(list):
    """``model.vlkernels_patched``: what ``patch`` swapped, one line each. Loading a pickled patched
    model (``torch.load`` of a whole model) registers vlkernels with transformers' attention
    interface again when the model uses it, as ``patch`` did in the process that saved it."""

    def __reduce__(self):
        return _loaded_record, (list(self),)


def _loaded_record(entries: list) -> PatchRecord:
    if any(_INTERFACE in e for e in entries):
        _register_hf()
    return PatchRecord(entries)


_INTERFACE = "attention interface -> vlkernels.attention"


def patch(
    model: nn.Module, *, attention: bool = True, pooler: bool = True, gated_xattn: bool = True
) -> nn.Module:
    """Swap vlkernels into ``model`` in place and return it; ``model.vlkernels_patched`` lists
    what was swapped. Flags: ``attention`` (transformers' attention interface), ``pooler``
    (open_clip AttentionalPooler), ``gated_xattn`` (open_flamingo GatedCrossAttentionBlock). The
    contrastive / CoCa losses live outside the models: use ``vlkernels.losses``. Patching a patched
    model again swaps only what is new (nothing, with the same flags) and returns it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    if (
        attention
        and hasattr(model, "set_attn_implementation")
        and type(model).__module__.startswith("transformers")
    ):
        _register_hf()
        line = f"{type(model).__name__}: {_INTERFACE}"
        if line not in getattr(model, "vlkernels_patched", []):
            model.set_attn_implementation(HF_NAME)
            done.append(line)
    wanted = {"AttentionalPooler": pooler, "GatedCrossAttentionBlock": gated_xattn}
    paths = {}  # every name of each module: open_flamingo's Flamingo holds its blocks under two
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
    for name, mod in list(model.named_modules()):
        for key in _FORWARD_SWAPS:
            module_prefix, cls_name = key
            cls = type(mod)
            if attention and cls.__name__ == cls_name and cls.__module__.startswith(module_prefix):
                if not isinstance(mod.__dict__.get("forward"), _Patched):
                    mod.forward = _Patched(cls_name, mod)
                    done.append(f"{name}: {cls_name}.forward -> vlkernels.attention")
        if attention and _is_t5_family(mod) and not isinstance(mod.__dict__.get("compute_bias"), _Patched):
            done += _patch_t5(name, mod, model)
        if not name:  # the model itself cannot be replaced in place
            continue
        for (module_prefix, cls_name), make in _MODULE_SWAPS.items():
            if (
                wanted[cls_name]
                and type(mod).__name__ == cls_name
                and type(mod).__module__.startswith(module_prefix)
            ):
                new = make(mod).to(device=next(mod.parameters()).device, dtype=next(mod.parameters()).dtype)
                new.load_state_dict(mod.state_dict())
                new.train(mod.training)
                for path in paths[id(mod)]:
                    _replace(model, path, new)
                    done.append(f"{path}: {cls_name} -> vlkernels.modules.{cls_name}")
    before = getattr(model, "vlkernels_patched", [])
    if not done and not before:
        raise ValueError(
            f"patch: nothing in {type(model).__name__} can be swapped (with these flags). Supported: "
            "transformers models (BLIP, BLIP-2, FLAVA, Idefics, PaliGemma, and others whose attention goes "
            "through the attention interface), open_clip AttentionalPooler (CoCa), open_flamingo "
            "GatedCrossAttentionBlock"
        )
    model.vlkernels_patched = PatchRecord([*before, *done])
    return model
