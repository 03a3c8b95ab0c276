"""``vlkernels.patch(model)``: swap vlkernels into a public model in place (à la Liger-Kernel's
``apply_liger_kernel_to_*``).

- transformers models (BLIP-2 Q-Former self- and cross-attention, PaliGemma, Idefics, …): every
  attention that goes through transformers' attention interface runs ``vlkernels.attention`` with
  the model's own mask (bool, or additive 0 / -inf); BLIP's and FLAVA's attention modules, which
  do not use that interface, get a forward that does.
- open_clip: each ``AttentionalPooler`` (CoCa) becomes ``vlkernels.modules.AttentionalPooler``.
- open_flamingo: each ``GatedCrossAttentionBlock`` becomes ``vlkernels.modules.GatedCrossAttentionBlock``.
The swapped modules load the originals' state_dicts, so the model's parameters keep their values.
"""

from __future__ import annotations

import types

import torch
from torch import nn

HF_NAME = "vlkernels"


def hf_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers AttentionInterface function: query [B, H, Lq, D], key/value [B, Hk, Lk, D];
    ``attention_mask`` None, bool (True = attend) or float, added to the scores (0 = attend, very
    negative = masked, or any bias), broadcastable to [B, H, Lq, Lk]. ``softcap``: Gemma 2's logit
    soft-capping; ``sliding_window``: already in the mask transformers builds, applied here only
    when there is no mask. Returns ([B, Lq, H, D], None)."""
    from vlkernels import masks
    from vlkernels.attention import attention

    for unsupported in ("position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"vlkernels attention does not support {unsupported!r}")
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
    out = attention(query, key, value, mask, scale=scaling, softcap=kwargs.get("softcap"), dropout_p=p)
    return out.transpose(1, 2), None


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
    from vlkernels.modules import AttentionalPooler, LayerNorm

    n_queries, d_model = mod.query.shape
    return AttentionalPooler(
        d_model,
        mod.attn.kdim,
        n_head=mod.attn.num_heads,
        n_queries=n_queries,
        norm_layer=lambda d: LayerNorm(d, eps=mod.ln_q.eps),
    )


def _open_flamingo_block(mod):
    from vlkernels.modules import GatedCrossAttentionBlock

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
    from vlkernels.attention import attention

    if output_attentions:
        raise NotImplementedError("vlkernels attention does not return attention probabilities")
    q, k, v = (_heads(self, hidden_states, lin) for lin in (self.query, self.key, self.value))
    return (_merged(attention(q, k, v, _bool_mask(attention_mask), dropout_p=_dropout_p(self))),)


def _blip_text_self_attention(
    self,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    past_key_values=None,
    **kwargs,
):
    """BlipTextSelfAttention.forward through vlkernels.attention (decoding with a KV cache keeps
    transformers' own path)."""
    from vlkernels.attention import attention

    if past_key_values is not None:
        return self._vlkernels_original_forward(
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            past_key_values,
            **kwargs,
        )
    cross = encoder_hidden_states is not None
    ctx = encoder_hidden_states if cross else hidden_states
    mask = encoder_attention_mask if cross else attention_mask
    q = _heads(self, hidden_states, self.query)
    k, v = _heads(self, ctx, self.key), _heads(self, ctx, self.value)
    return _merged(attention(q, k, v, _bool_mask(mask), dropout_p=_dropout_p(self))), None


def _blip_vision_attention(self, hidden_states, **kwargs):
    """BlipAttention.forward (vision) through vlkernels.attention."""
    from vlkernels.attention import attention

    B, L, C = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    return self.projection(
        _merged(attention(qkv[0], qkv[1], qkv[2], scale=self.scale, dropout_p=_dropout_p(self)))
    ), None


# transformers modules that do not go through the attention interface: their forward is replaced
_FORWARD_SWAPS = {
    ("transformers.models.flava", "FlavaSelfAttention"): _flava_self_attention,
    ("transformers.models.blip", "BlipTextSelfAttention"): _blip_text_self_attention,
    ("transformers.models.blip", "BlipAttention"): _blip_vision_attention,
}


_MODULE_SWAPS = {
    ("open_clip.transformer", "AttentionalPooler"): _open_clip_pooler,
    ("open_flamingo", "GatedCrossAttentionBlock"): _open_flamingo_block,
}


def patch(
    model: nn.Module, *, attention: bool = True, pooler: bool = True, gated_xattn: bool = True
) -> nn.Module:
    """Swap vlkernels into ``model`` in place and return it; ``model.vlkernels_patched`` lists
    what was swapped. Flags: ``attention`` (transformers' attention interface), ``pooler``
    (open_clip AttentionalPooler), ``gated_xattn`` (open_flamingo GatedCrossAttentionBlock). The
    contrastive / CoCa losses live outside the models: use ``vlkernels.losses``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    if (
        attention
        and hasattr(model, "set_attn_implementation")
        and type(model).__module__.startswith("transformers")
    ):
        _register_hf()
        model.set_attn_implementation(HF_NAME)
        done.append(f"{type(model).__name__}: attention interface -> vlkernels.attention")
    wanted = {"AttentionalPooler": pooler, "GatedCrossAttentionBlock": gated_xattn}
    for name, mod in list(model.named_modules()):
        for (module_prefix, cls_name), fn in _FORWARD_SWAPS.items():
            cls = type(mod)
            if attention and cls.__name__ == cls_name and cls.__module__.startswith(module_prefix):
                if not hasattr(mod, "_vlkernels_original_forward"):
                    mod._vlkernels_original_forward = mod.forward
                    mod.forward = types.MethodType(fn, mod)
                    done.append(f"{name}: {cls_name}.forward -> vlkernels.attention")
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
                _replace(model, name, new)
                done.append(f"{name}: {cls_name} -> vlkernels.modules.{cls_name}")
    if not done:
        raise ValueError(
            f"patch: nothing in {type(model).__name__} can be swapped (with these flags). Supported: "
            "transformers models (BLIP, BLIP-2, FLAVA, Idefics, PaliGemma, and others whose attention goes "
            "through the attention interface), open_clip AttentionalPooler (CoCa), open_flamingo "
            "GatedCrossAttentionBlock"
        )
    model.vlkernels_patched = [*getattr(model, "vlkernels_patched", []), *done]
    return model
