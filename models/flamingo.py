"""Flamingo (Alayrac et al., 2022): a frozen vision encoder, a Perceiver resampler, and frozen
decoder-only LM blocks interleaved with gated cross-attention dense blocks; interleaved
image/text sequences where an ``<image>`` token marks where each image appears.

Each text token attends only to the resampled latents of the image that most recently precedes
it (``only_attend_immediate_media``); the cross-attention and feed-forward branches enter the
residual through tanh(gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Block, MaskRecipe, ViT, attend

SIZES = {
    # paper (Flamingo-3B): NFNet-F6 vision, 64 latents, 6-layer resampler, 1.4B LM, xattn every layer
    "tiny": dict(
        image_size=32,
        patch=8,
        vis_width=64,
        vis_layers=2,
        dim=64,
        heads=4,
        lm_layers=4,
        cross_every=2,
        latents=8,
        resampler_layers=2,
        vocab=100,
        text_len=24,
        images=2,
    ),
    "base": dict(
        image_size=224,
        patch=16,
        vis_width=512,
        vis_layers=6,
        dim=512,
        heads=8,
        lm_layers=8,
        cross_every=2,
        latents=64,
        resampler_layers=2,
        vocab=32000,
        text_len=256,
        images=5,
    ),
    "paper": dict(
        image_size=320,
        patch=16,
        vis_width=1024,
        vis_layers=24,
        dim=2048,
        heads=16,
        lm_layers=24,
        cross_every=1,
        latents=64,
        resampler_layers=6,
        vocab=32000,
        text_len=2048,
        images=5,
    ),
}
PAD_ID, IMAGE_ID = 0, 1


def FeedForward(dim, mult=4):  # noqa: N802 (open_flamingo's name and parameter layout)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to [media ; latents] (open_flamingo's parameter names)."""

    def __init__(self, dim, heads, dim_head, kernels):
        super().__init__()
        self.heads, self.scale, self.kernels = heads, dim_head**-0.5, kernels
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, latents):
        """x [N, n_media_tokens, dim], latents [N, n_latents, dim] -> [N, n_latents, dim]."""
        x, lat = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(lat)
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
        N, h = q.shape[0], self.heads

        def split(t):
            return t.view(N, t.shape[1], h, -1).transpose(1, 2)

        o = attend(split(q), split(k), split(v), None, self.kernels, scale=self.scale)
        return self.to_out(o.transpose(1, 2).reshape(N, lat.shape[1], -1))


class PerceiverResampler(nn.Module):
    """open_flamingo's Perceiver resampler (single frame per image): media [B, T, n, dim] ->
    [B, T, num_latents, dim]; loads its state_dict."""

    def __init__(self, dim, depth, heads, dim_head, num_latents, max_num_media, kernels):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head, kernels), FeedForward(dim)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        B, T, n, d = x.shape
        x = (x + self.media_time_embs[:T]).reshape(B * T, n, d)
        lat = self.latents.expand(B * T, -1, -1)
        for attn, ff in self.layers:
            lat = attn(x, lat) + lat
            lat = ff(lat) + lat
        return self.norm(lat).view(B, T, -1, d)


class GatedCrossAttention(nn.Module):
    """open_flamingo's GatedCrossAttentionBlock (same parameter names as vlkernels.modules')."""

    def __init__(self, dim, heads, kernels, dim_head=16):
        super().__init__()
        self.kernels, self.heads, self.scale = kernels, heads, dim_head**-0.5
        inner = dim_head * heads
        self.attn = nn.Module()
        self.attn.norm = nn.LayerNorm(dim)
        self.attn.to_q = nn.Linear(dim, inner, bias=False)
        self.attn.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.attn.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, 4 * dim, bias=False),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def _gate(self, x, y, gate):
        if self.kernels:
            import vlkernels

            return vlkernels.gated_residual(x, y, gate)
        return x + torch.tanh(gate) * y

    def forward(self, x, media, text_to_media):
        B, T, _ = x.shape
        h, a = self.heads, self.attn
        q = a.to_q(a.norm(x))
        k, v = a.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)

        def split(t):
            return t.view(B, t.shape[1], h, -1).transpose(1, 2)

        recipe = MaskRecipe(media=(text_to_media, media.shape[2], True))
        o = attend(split(q), split(k), split(v), recipe, self.kernels, scale=self.scale)
        x = self._gate(x, a.to_out(o.transpose(1, 2).reshape(B, T, -1)), self.attn_gate)
        return self._gate(x, self.ff(x), self.ff_gate)


class Flamingo(nn.Module):
    def __init__(self, size="tiny", kernels=False):
        super().__init__()
        c = SIZES[size]
        self.cfg, self.kernels = c, kernels
        d = c["dim"]
        self.vision = ViT(c["image_size"], c["patch"], c["vis_width"], c["vis_layers"], c["heads"], kernels)
        self.vision_proj = nn.Linear(c["vis_width"], d)
        self.resampler = PerceiverResampler(
            d, c["resampler_layers"], c["heads"], d // c["heads"], c["latents"], c["images"], kernels
        )
        self.embed = nn.Embedding(c["vocab"], d)
        self.pos = nn.Parameter(torch.randn(1, c["text_len"], d) * 0.02)
        self.lm = nn.ModuleList(Block(d, c["heads"], kernels=kernels) for _ in range(c["lm_layers"]))
        self.xattn = nn.ModuleList(
            GatedCrossAttention(d, c["heads"], kernels) for _ in range(c["lm_layers"] // c["cross_every"])
        )
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, c["vocab"], bias=False)
        for p in [*self.vision.parameters(), *self.lm.parameters(), *self.embed.parameters()]:
            p.requires_grad_(False)  # frozen, as in the paper
        with torch.no_grad():  # gates start at 0 in the paper; open them a little so the test sees them
            for blk in self.xattn:
                blk.attn_gate.fill_(0.1)
                blk.ff_gate.fill_(0.1)

    def example_batch(self, batch_size=2, generator=None):
        c = self.cfg
        g = generator or torch.Generator().manual_seed(0)
        T, n_img = c["text_len"], c["images"]
        text = torch.randint(2, c["vocab"], (batch_size, T), generator=g)
        for b in range(batch_size):  # <image> tokens at increasing positions; text before the first sees none
            pos = torch.randperm(T - 2, generator=g)[:n_img].sort().values + 2
            text[b, pos] = IMAGE_ID
        return {
            "images": torch.randn(batch_size, n_img, 3, c["image_size"], c["image_size"], generator=g),
            "text": text,
        }

    def forward(self, images, text):
        """images [B, T_img, 3, H, W]; text [B, T] with IMAGE_ID where each image appears."""
        B, n_img = images.shape[:2]
        with torch.no_grad():
            feats = self.vision(images.flatten(0, 1))
        media = self.resampler(self.vision_proj(feats).view(B, n_img, *feats.shape[1:-1], -1))
        text_to_media = (text == IMAGE_ID).cumsum(dim=-1)
        x = self.embed(text) + self.pos[:, : text.shape[1]]
        causal = MaskRecipe(causal=True)
        for i, blk in enumerate(self.lm):
            if i % self.cfg["cross_every"] == 0:
                x = self.xattn[i // self.cfg["cross_every"]](x, media, text_to_media)
            x = blk(x, recipe=causal)
        logits = self.lm_head(self.ln(x))
        targets = text[:, 1:].masked_fill(text[:, 1:] == IMAGE_ID, PAD_ID)
        loss_lm = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD_ID
        )
        return {"loss": loss_lm, "loss_lm": loss_lm}
