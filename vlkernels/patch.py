"""``vlkernels.patch(model)``: swap vlkernels into a public model in place (à la Liger-Kernel's
``apply_liger_kernel_to_*``).

- transformers models (BLIP, BLIP-2 Q-Former self- and cross-attention, FLAVA, PaliGemma, Idefics,
  …): every attention that goes through transformers' attention interface runs
  ``vlkernels.attention``, with the model's own mask (bool, or additive 0 / -inf).
- open_clip: each ``AttentionalPooler`` (CoCa) becomes ``vlkernels.modules.AttentionalPooler``.
- open_flamingo: each ``GatedCrossAttentionBlock`` becomes ``vlkernels.modules.GatedCrossAttentionBlock``.
The swapped modules load the originals' state_dicts, so the model's parameters keep their values.
"""

from __future__ import annotations

import torch
from torch import nn

HF_NAME = "vlkernels"


def hf_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers AttentionInterface function: query [B, H, Lq, D], key/value [B, Hk, Lk, D];
    ``attention_mask`` None, bool (True = attend) or additive (0 = attend, very negative = masked)
    broadcastable to [B, H, Lq, Lk]. Returns ([B, Lq, H, D], None)."""
    from vlkernels import masks
    from vlkernels.attention import attention

    if dropout and module.training:
        raise NotImplementedError(
            "vlkernels attention has no attention dropout: set the model's attention "
            f"dropout to 0 (got {dropout})"
        )
    for unsupported in ("softcap", "position_bias", "sliding_window", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"vlkernels attention does not support {unsupported!r}")
    mask = None
    if attention_mask is not None:
        mask = (
            attention_mask
            if attention_mask.dtype == torch.bool
            else (attention_mask > torch.finfo(attention_mask.dtype).min / 2)
        )
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        if causal and query.shape[2] > 1:  # top-left aligned, as transformers' SDPA path
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
            mask = masks.causal()
    out = attention(query, key, value, mask, scale=scaling)
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


_MODULE_SWAPS = {
    ("open_clip.transformer", "AttentionalPooler"): _open_clip_pooler,
    ("open_flamingo", "GatedCrossAttentionBlock"): _open_flamingo_block,
}


def patch(model: nn.Module) -> list[str]:
    """Swap vlkernels into ``model`` in place; returns what was swapped (empty: nothing known)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    if hasattr(model, "set_attn_implementation") and type(model).__module__.startswith("transformers"):
        _register_hf()
        model.set_attn_implementation(HF_NAME)
        done.append(f"{type(model).__name__}: attention interface -> vlkernels.attention")
    for name, mod in list(model.named_modules()):
        if not name:  # the model itself cannot be replaced in place
            continue
        for (module_prefix, cls_name), make in _MODULE_SWAPS.items():
            if type(mod).__name__ == cls_name and type(mod).__module__.startswith(module_prefix):
                new = make(mod).to(device=next(mod.parameters()).device, dtype=next(mod.parameters()).dtype)
                new.load_state_dict(mod.state_dict())
                new.train(mod.training)
                _replace(model, name, new)
                done.append(f"{name}: {cls_name} -> vlkernels.modules.{cls_name}")
    return done
