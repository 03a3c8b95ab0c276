"""Building blocks shared by the reference models.

Every block takes ``kernels``: False runs plain eager PyTorch (dense masks built here, no
vlkernels call at all); True routes attention and the contrastive loss through vlkernels. Both
build the same parameters, so a state_dict moves between them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------
# Masks: one recipe, two forms (dense bool for eager, analytic for the kernels)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MaskRecipe:
    """Which keys each query may attend to. Any subset of the fields (intersected):
    causal; key_lengths int [B]; qformer (num_queries, mode); prefix_lengths int [B];
    media (text_to_media int [B, Lq], latents_per_media, only_immediate). ``position``: a
    ``vlkernels.bias`` position bias added to the scores (eager: its ``dense`` tensor)."""

    causal: bool = False
    key_lengths: torch.Tensor | None = None
    qformer: tuple[int, str] | None = None
    prefix_lengths: torch.Tensor | None = None
    media: tuple[torch.Tensor, int, bool] | None = None
    position: object | None = None

    def dense(self, B: int, Lq: int, Lk: int, device) -> torch.Tensor:
        """Bool [B, 1, Lq, Lk], True = may attend (eager PyTorch)."""
        i = torch.arange(Lq, device=device).view(1, Lq, 1)
        j = torch.arange(Lk, device=device).view(1, 1, Lk)
        ok = torch.ones(B, Lq, Lk, dtype=torch.bool, device=device)
        if self.causal:
            ok = ok & (j <= i + (Lk - Lq))
        if self.key_lengths is not None:
            ok = ok & (j < self.key_lengths.view(B, 1, 1))
        if self.qformer is not None:
            nq, mode = self.qformer
            if mode == "multimodal_causal":
                ok = ok & ((j < nq) | ((i >= nq) & (j <= i)))
            elif mode == "unimodal":
                ok = ok & ((i < nq) == (j < nq))
        if self.prefix_lengths is not None:
            ok = ok & ((j < self.prefix_lengths.view(B, 1, 1)) | (j <= i))
        if self.media is not None:
            t2m, lat, immediate = self.media
            t = t2m.view(B, Lq, 1)
            img = j // lat + 1
            ok = ok & (t >= 1) & ((img == t) if immediate else (img <= t))
        return ok.unsqueeze(1)

    def analytic(self):
        """The same mask as a ``vlkernels.masks`` object (None: no mask)."""
        from vlkernels import masks

        parts = []
        if self.causal:
            parts.append(masks.causal())
        if self.key_lengths is not None:
            parts.append(masks.key_padding(self.key_lengths))
        if self.qformer is not None:
            parts.append(masks.qformer(*self.qformer))
        if self.prefix_lengths is not None:
            parts.append(masks.prefix_lm(self.prefix_lengths))
        if self.media is not None:
            parts.append(masks.media(*self.media))
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return out


def eager_attention(q, k, v, allowed=None, scale=None, dropout_p=0.0, bias=None):
    """Softmax attention in eager PyTorch; rows with no allowed key give 0. q [B|1, H, Lq, D];
    ``bias``: float, broadcastable to [B, H, Lq, Lk], added to the scaled scores.
    ``dropout_p``: attention dropout with the keep mask vlkernels draws at this point of the run
    (a seed from torch's generator, ``vlkernels.attention_dropout_mask``), so that the eager and
    the kernel models drop the same entries."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if allowed is None:
        p = torch.softmax(s, dim=-1)
    else:
        any_ok = allowed.any(dim=-1, keepdim=True)
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(~any_ok, 0.0)
        p = torch.softmax(s, dim=-1) * any_ok
    if dropout_p > 0:
        import vlkernels
        from vlkernels.attention.api import draw_seed

        seed = draw_seed(q.device)  # the draw vlkernels.attention makes for seed=None
        p = p * vlkernels.attention_dropout_mask(q, k, dropout_p, seed) / (1.0 - dropout_p)
    return torch.matmul(p, v)


def attend(q, k, v, recipe: MaskRecipe | None, kernels: bool, scale=None, dropout_p=0.0):
    """[B, H, Lq, D] attention with ``recipe``, through vlkernels or eager."""
    if kernels:
        import vlkernels

        mask = None if recipe is None else recipe.analytic()
        position = None if recipe is None else recipe.position
        return vlkernels.attention(q, k, v, mask, scale=scale, dropout_p=dropout_p, position_bias=position)
    allowed = bias = None
    if recipe is not None:
        allowed = recipe.dense(k.shape[0], q.shape[2], k.shape[2], q.device)
        bias = None if recipe.position is None else recipe.position.dense(q.shape[2], k.shape[2])
    return eager_attention(q, k, v, allowed, scale, dropout_p, bias)


def clip_loss(image_emb, text_emb, logit_scale, kernels: bool, label_smoothing=0.0):
    """CLIP InfoNCE, through vlkernels (no N×N) or eager (N×N logits, open_clip's formula)."""
    if kernels:
        import vlkernels

        return vlkernels.contrastive_loss(image_emb, text_emb, logit_scale, label_smoothing=label_smoothing)
    if image_emb.dim() == 3:  # BLIP-2: max over query embeddings
        sim = torch.einsum("iqd,jd->ijq", image_emb, text_emb).amax(-1)
    else:
        sim = image_emb @ text_emb.T
    logits = logit_scale * sim
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (
        F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    ) / 2


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections. x [B, L, dim] -> [B, L, dim];
    ``dropout``: attention dropout in training."""

    def __init__(
        self, dim: int, heads: int, kv_dim: int | None = None, kernels: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        self.heads, self.kernels, self.dropout = heads, kernels, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None, recipe: MaskRecipe | None = None):
        """x [B or 1, Lq, dim] (1: queries shared by the batch of ``context`` [B, Lk, kv_dim])."""
        ctx = x if context is None else context
        h = self.heads

        def split(t):
            B, L, C = t.shape
            return t.view(B, L, h, C // h).transpose(1, 2)

        q = split(self.q(x))
        p = self.dropout if self.training else 0.0
        o = attend(q, split(self.k(ctx)), split(self.v(ctx)), recipe, self.kernels, dropout_p=p)
        B, H, L, D = o.shape
        return self.out(o.transpose(1, 2).reshape(B, L, H * D))


class MLP(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(
        self,
        dim: int,
        heads: int,
        cross_dim: int | None = None,
        kernels: bool = False,
        eps: float = 1e-5,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, kernels=kernels, dropout=attn_dropout)
        self.cross = None
        if cross_dim is not None:
            self.ln_x = nn.LayerNorm(dim, eps=eps)
            self.cross = Attention(dim, heads, kv_dim=cross_dim, kernels=kernels, dropout=attn_dropout)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim)

    def forward(self, x, recipe=None, context=None, cross_recipe=None):
        x = x + self.attn(self.ln1(x), recipe=recipe)
        if self.cross is not None:
            x = x + self.cross(self.ln_x(x), context=context, recipe=cross_recipe)
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Vision transformer: patches + class token + learned positions -> tokens [B, 1 + P, width]."""

    def __init__(
        self,
        image_size: int,
        patch: int,
        width: int,
        layers: int,
        heads: int,
        kernels: bool,
        mask_token: bool = False,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if mask_token else None
        n = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, kernels=kernels) for _ in range(layers))
        self.ln = nn.LayerNorm(width)

    def forward(self, images, patch_mask=None):
        """images [B, 3, H, W]; patch_mask bool [B, P]: patches replaced by the mask token (MIM)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


def block_state_from_public(sd: dict, names: dict, fused_qkv: str | None = None) -> dict:
    """A public pre-LN transformer layer's state_dict renamed for ``Block``: ``names`` maps the
    public module prefixes to Block's; ``fused_qkv`` names a fused [q; k; v] projection to split."""
    out = {}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        if fused_qkv and key.startswith(fused_qkv):  # "self_attn.qkv.weight", "attn.in_proj_weight"
            leaf = key[len(fused_qkv) :].lstrip("._")
            for part, chunk in zip(("attn.q", "attn.k", "attn.v"), value.chunk(3), strict=True):
                out[f"{part}.{leaf}"] = chunk
        elif prefix in names:
            out[f"{names[prefix]}.{leaf}"] = value
        else:
            raise KeyError(f"unexpected parameter {key!r}")
    return out


@torch.no_grad()
def hard_negatives(sim: torch.Tensor) -> torch.Tensor:
    """BLIP / BLIP-2 ITM: for each row of ``sim`` [B, B] one column index drawn with probability
    softmax(sim) off the diagonal (with B == 1 the only "negative" is the pair itself)."""
    B = sim.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    weights = torch.softmax(sim, dim=1).masked_fill(eye, 0) + (1e-6 * ~eye if B > 1 else 1.0)
    return torch.multinomial(weights, 1).squeeze(1)


def image_text_batch(batch_size, image_size, text_len, vocab, first_id, generator, low=3, pad_id=0):
    """images [B, 3, H, W]; text [B, T]: ``first_id``, then tokens in [low, vocab), padded with
    ``pad_id`` after random lengths (>= 3); text_lengths [B]."""
    g = generator or torch.Generator().manual_seed(0)
    lengths = torch.randint(3, text_len + 1, (batch_size,), generator=g)
    text = torch.randint(low, vocab, (batch_size, text_len), generator=g)
    text[:, 0] = first_id
    text[torch.arange(text_len)[None] >= lengths[:, None]] = pad_id
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    return {"images": images, "text": text, "text_lengths": lengths}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
