"""Drop-in nn.Modules whose attention runs through ``vlkernels.attention``.

Each keeps the parameter names of the public module it replaces, so that module's state_dict
loads unchanged:
- ``AttentionalPooler``       <- open_clip.transformer.AttentionalPooler (CoCa)
- ``GatedCrossAttentionBlock`` <- open_flamingo.src.helpers.GatedCrossAttentionBlock (Flamingo)
- ``QFormerAttention``        <- transformers' Blip2QFormerAttention (BLIP-2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkernels import masks
from vlkernels.attention import attention
from vlkernels.gated import gated_residual


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, L, H*Dh] -> [B, H, L, Dh] as a view (no copy)."""
    B, L, C = x.shape
    return x.view(B, L, n_head, C // n_head).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, Dh] -> [B, L, H*Dh]; free for ``attention``'s [B, L, H, Dh] memory layout."""
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: normalises in the input's dtype, as nn.LayerNorm with a cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: ``n_queries`` learned queries, shared by the whole batch, attend
    over the image tokens. x [B, L, context_dim] -> [B, n_queries, d_model].

    The queries go to the kernel as one [1, H, n_queries, Dh] tensor (shared-query path): they
    are never expanded over the batch, and their gradient is summed over it inside the kernel.
    """

    def __init__(
        self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 256, norm_layer=LayerNorm
    ):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        # Holds the projections with nn.MultiheadAttention's parameter names (open_clip's layout).
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = norm_layer(d_model)
        self.ln_k = norm_layer(context_dim)

    def _projections(self):
        a, d = self.attn, self.attn.embed_dim
        if a._qkv_same_embed_dim:
            wq, wk, wv = a.in_proj_weight.split(d)
        else:
            wq, wk, wv = a.q_proj_weight, a.k_proj_weight, a.v_proj_weight
        bq, bk, bv = a.in_proj_bias.split(d) if a.in_proj_bias is not None else (None,) * 3
        return (wq, bq), (wk, bk), (wv, bv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.attn.kdim:
            raise ValueError(
                f"AttentionalPooler: x must be [B, L, {self.attn.kdim}] (batch, image tokens, context_dim), "
                f"got shape {list(x.shape)}"
            )
        (wq, bq), (wk, bk), (wv, bv) = self._projections()
        h = self.attn.num_heads
        x = self.ln_k(x)
        q = F.linear(self.ln_q(self.query), wq, bq).unsqueeze(0)  # [1, Nq, d]
        out = attention(_heads(q, h), _heads(F.linear(x, wk, bk), h), _heads(F.linear(x, wv, bv), h))
        return self.attn.out_proj(_merge(out))


class MaskedCrossAttention(nn.Module):
    """Flamingo's masked cross-attention from text to the resampled media latents."""

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        """x [B, T_txt, dim]; media [B, T_img, n, dim_visual]; media_locations bool [B, T_txt]."""
        B, T_txt, _ = x.shape
        if media.dim() != 4 or media.shape[0] != B:
            raise ValueError(
                f"{type(self).__name__}: media must be [B, T_img, n_latents, dim_visual] with x's batch "
                f"B={B}, got shape {list(media.shape)}"
            )
        n = media.shape[2]
        mask = None
        if media_locations is not None:
            if use_cached_media:  # every token attends to the last image seen
                text_time = media_locations.count_nonzero(dim=1).view(B, 1).expand(B, T_txt)
            else:
                if media_locations.shape[1] != T_txt:
                    raise ValueError(
                        f"{type(self).__name__}: media_locations must have shape [B, {T_txt}], got "
                        f"{list(media_locations.shape)}"
                    )
                text_time = media_locations.cumsum(dim=-1)
            mask = masks.media(text_time, n, self.only_attend_immediate_media)
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        h = self.heads
        out = attention(_heads(q, h), _heads(k, h), _heads(v, h), mask, scale=self.scale)
        return self.to_out(_merge(out))


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:  # noqa: N802 (open_flamingo's name)
    inner_dim = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block, open_flamingo's parameters and forward.

    x [B, T_txt, dim]; media [B, T_img, n_latents, dim_visual]. Both residual adds,
    ``x + tanh(gate) * branch``, run in the fused gated-residual kernel (gate read on device).
    Unlike open_flamingo, with ``only_attend_immediate_media=False`` a text token that no image
    precedes gets a zero attention output (open_flamingo averages all latents for it).
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim,
            dim_visual=dim_visual,
            dim_head=dim_head,
            heads=heads,
            only_attend_immediate_media=only_attend_immediate_media,
        )
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        attn = self.attn(x, media, media_locations=media_locations, use_cached_media=use_cached_media)
        x = gated_residual(x, attn, self.attn_gate)
        return gated_residual(x, self.ff(x), self.ff_gate)


class _Projections(nn.Module):
    def __init__(self, hidden_size: int, kv_size: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_size, hidden_size)
        self.value = nn.Linear(kv_size, hidden_size)


class _SelfOutput(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)


class QFormerAttention(nn.Module):
    """BLIP-2 Q-Former attention + output block (transformers' ``Blip2QFormerAttention``).

    Self-attention (``encoder_hidden_size=None``): ``hidden_states`` [B, Nq + T, C] is
    [learned queries ; text]; ``mode`` picks the BLIP-2 mask ("bidirectional" for ITM,
    "multimodal_causal" for ITG, "unimodal" for ITC) and ``text_lengths`` (int [B]) masks the
    padded text. Cross-attention: ``hidden_states`` [B, Nq, C] (the queries) attend to
    ``encoder_hidden_states`` [B, L_img, encoder_hidden_size]. Returns LayerNorm(dense(attn) + x).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        encoder_hidden_size: int | None = None,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.is_cross_attention = encoder_hidden_size is not None
        self.attention = _Projections(hidden_size, encoder_hidden_size or hidden_size)
        self.output = _SelfOutput(hidden_size, layer_norm_eps)

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        *,
        num_queries=None,
        mode="bidirectional",
        text_lengths=None,
    ):
        p, h = self.attention, self.num_heads
        if self.is_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError("QFormerAttention: cross-attention needs encoder_hidden_states")
            kv, mask = encoder_hidden_states, None
        else:
            if encoder_hidden_states is not None:
                raise ValueError(
                    "QFormerAttention: built for self-attention (encoder_hidden_size=None), got "
                    "encoder_hidden_states; build it with encoder_hidden_size for cross-attention"
                )
            if num_queries is None:
                raise ValueError("QFormerAttention: self-attention needs num_queries")
            kv, mask = hidden_states, masks.qformer(num_queries, mode)
            if text_lengths is not None:
                if not isinstance(text_lengths, torch.Tensor) or text_lengths.dtype not in (
                    torch.int32,
                    torch.int64,
                ):
                    got = (
                        text_lengths.dtype
                        if isinstance(text_lengths, torch.Tensor)
                        else type(text_lengths).__name__
                    )
                    raise TypeError(
                        f"QFormerAttention: text_lengths must be an int32/int64 tensor [B], got {got}"
                    )
                mask = mask & masks.key_padding(text_lengths + num_queries)
        out = attention(_heads(p.query(hidden_states), h), _heads(p.key(kv), h), _heads(p.value(kv), h), mask)
        return self.output.LayerNorm(self.output.dense(_merge(out)) + hidden_states)
