"""CoCa (Yu et al., 2022): image encoder with attentional poolers, unimodal text decoder,
multimodal text decoder with cross-attention; contrastive + captioning losses.

Image tokens go through two poolers whose learned queries are shared by the batch: one query for
the contrastive embedding, ``n_queries`` for the captioning tokens the multimodal decoder reads.
The unimodal decoder is causal over the text with a CLS token appended; its output at CLS is the
text embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Block, MaskRecipe, ViT, attend, clip_loss

SIZES = {
    # paper (CoCa-Base): ViT-B/18 at 288 px, 12 unimodal + 12 multimodal decoder layers, width 768
    "tiny": dict(
        image_size=32,
        patch=8,
        width=64,
        vit_layers=2,
        heads=4,
        text_layers=2,
        vocab=100,
        context=12,
        n_queries=8,
    ),
    "base": dict(
        image_size=224,
        patch=16,
        width=512,
        vit_layers=6,
        heads=8,
        text_layers=4,
        vocab=32000,
        context=64,
        n_queries=64,
    ),
    "paper": dict(
        image_size=288,
        patch=18,
        width=768,
        vit_layers=12,
        heads=12,
        text_layers=12,
        vocab=64000,
        context=64,
        n_queries=256,
    ),
}
PAD_ID = 0


# open_clip's ResidualAttentionBlock (the unimodal text decoder's layers) -> models.common.Block
OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "ln1",
    "attn.out_proj": "attn.out",
    "ln_2": "ln2",
    "mlp.c_fc": "mlp.0",
    "mlp.c_proj": "mlp.2",
}


class AttentionalPooler(nn.Module):
    """n_queries learned queries, shared by the batch, attend over the image tokens; open_clip's
    parameter layout (query, nn.MultiheadAttention's projections, ln_q, ln_k), so its
    AttentionalPooler's state_dict loads."""

    def __init__(self, width, heads, n_queries, kernels, context_dim=None):
        super().__init__()
        self.kernels = kernels
        self.query = nn.Parameter(torch.randn(n_queries, width) * 0.02)
        ctx = context_dim or width
        self.attn = nn.MultiheadAttention(width, heads, kdim=ctx, vdim=ctx, batch_first=True)
        self.ln_q, self.ln_k = nn.LayerNorm(width), nn.LayerNorm(ctx)

    def forward(self, tokens):
        a, d, h = self.attn, self.attn.embed_dim, self.attn.num_heads
        if a._qkv_same_embed_dim:
            wq, wk, wv = a.in_proj_weight.split(d)
        else:
            wq, wk, wv = a.q_proj_weight, a.k_proj_weight, a.v_proj_weight
        bq, bk, bv = a.in_proj_bias.split(d)
        x = self.ln_k(tokens)

        def split(t):
            return t.view(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

        q = split(F.linear(self.ln_q(self.query), wq, bq)[None])  # [1, H, n_queries, Dh]: shared
        o = attend(q, split(F.linear(x, wk, bk)), split(F.linear(x, wv, bv)), None, self.kernels)
        return a.out_proj(o.transpose(1, 2).reshape(tokens.shape[0], -1, d))


class CoCa(nn.Module):
    def __init__(self, size="tiny", kernels=False):
        super().__init__()
        c = SIZES[size]
        self.cfg, self.kernels = c, kernels
        w, h = c["width"], c["heads"]
        self.visual = ViT(c["image_size"], c["patch"], w, c["vit_layers"], h, kernels)
        self.pool_contrastive = AttentionalPooler(w, h, 1, kernels)
        self.pool_caption = AttentionalPooler(w, h, c["n_queries"], kernels)
        self.token_embedding = nn.Embedding(c["vocab"], w)
        self.text_pos = nn.Parameter(torch.randn(1, c["context"] + 1, w) * 0.02)
        self.cls_emb = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.unimodal = nn.ModuleList(Block(w, h, kernels=kernels) for _ in range(c["text_layers"]))
        self.multimodal = nn.ModuleList(
            Block(w, h, cross_dim=w, kernels=kernels) for _ in range(c["text_layers"])
        )
        self.ln_text, self.ln_mm = nn.LayerNorm(w), nn.LayerNorm(w)
        self.image_proj = nn.Linear(w, w, bias=False)
        self.text_proj = nn.Linear(w, w, bias=False)
        self.lm_head = nn.Linear(w, c["vocab"], bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07)

    def example_batch(self, batch_size=2, generator=None):
        c = self.cfg
        g = generator or torch.Generator().manual_seed(0)
        lengths = torch.randint(3, c["context"] + 1, (batch_size,), generator=g)
        text = torch.randint(1, c["vocab"], (batch_size, c["context"]), generator=g)
        text[torch.arange(c["context"])[None] >= lengths[:, None]] = PAD_ID
        return {
            "images": torch.randn(batch_size, 3, c["image_size"], c["image_size"], generator=g),
            "text": text,
            "text_lengths": lengths,
        }

    def forward(self, images, text, text_lengths):
        """images [B, 3, H, W]; text [B, T] padded with PAD_ID after text_lengths."""
        B = text.shape[0]
        tokens = self.visual(images)
        image_emb = F.normalize(self.image_proj(self.pool_contrastive(tokens)[:, 0]), dim=-1)
        caption_tokens = self.pool_caption(tokens)
        x = torch.cat([self.token_embedding(text), self.cls_emb.expand(B, -1, -1)], dim=1) + self.text_pos
        # causal over the text, padding attended by nobody: the CLS (last) sees every real token
        text_recipe = MaskRecipe(causal=True, key_lengths=text_lengths.to(text.device))
        for blk in self.unimodal:
            x = blk(x, recipe=text_recipe)
        x = self.ln_text(x)
        text_emb = F.normalize(self.text_proj(x[:, -1]), dim=-1)
        y = x[:, :-1]
        mm_recipe = MaskRecipe(causal=True)
        for blk in self.multimodal:
            y = blk(y, recipe=mm_recipe, context=caption_tokens)
        logits = self.lm_head(self.ln_mm(y))
        loss_contrastive = clip_loss(image_emb, text_emb, self.logit_scale.exp(), self.kernels)
        loss_caption = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1), ignore_index=PAD_ID
        )
        return {
            "loss": loss_contrastive + 2.0 * loss_caption,
            "loss_contrastive": loss_contrastive,
            "loss_caption": loss_caption,
        }
