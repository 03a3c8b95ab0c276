"""FLAVA (Singh et al., 2022): image encoder, text encoder and a multimodal encoder over
[CLS ; image states ; text states]. Losses: global contrastive, image-text matching, masked
language modelling (text encoder) and masked image modelling. FLAVA's MIM predicts the dVAE
codebook ids of masked patches; without a pretrained dVAE this reference regresses the masked
patches' normalised pixels instead (as MAE does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Block, MaskRecipe, ViT, clip_loss, image_text_batch

SIZES = {
    # paper (FLAVA): ViT-B/16 image and text encoders (12 layers, 768) + 6-layer multimodal encoder
    "tiny": dict(
        image_size=32, patch=8, width=64, layers=2, mm_layers=2, heads=4, vocab=100, text_len=12, embed=32
    ),
    "base": dict(
        image_size=224,
        patch=16,
        width=768,
        layers=6,
        mm_layers=3,
        heads=12,
        vocab=30522,
        text_len=64,
        embed=512,
    ),
    "paper": dict(
        image_size=224,
        patch=16,
        width=768,
        layers=12,
        mm_layers=6,
        heads=12,
        vocab=30522,
        text_len=512,
        embed=768,
    ),
}
PAD_ID, CLS_ID, MASK_ID = 0, 1, 2


# transformers' FlavaLayer (pre-LN, as timm's Block) -> models.common.Block
HF_LAYER_NAMES = {
    "layernorm_before": "ln1",
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.out",
    "layernorm_after": "ln2",
    "intermediate.dense": "mlp.0",
    "output.dense": "mlp.2",
}


class FLAVA(nn.Module):
    def __init__(self, size="tiny", kernels=False):
        super().__init__()
        c = SIZES[size]
        self.cfg, self.kernels = c, kernels
        w, h = c["width"], c["heads"]
        self.image_encoder = ViT(c["image_size"], c["patch"], w, c["layers"], h, kernels, mask_token=True)
        self.embed = nn.Embedding(c["vocab"], w)
        self.text_pos = nn.Parameter(torch.randn(1, c["text_len"], w) * 0.02)
        self.text_encoder = nn.ModuleList(Block(w, h, kernels=kernels, eps=1e-12) for _ in range(c["layers"]))
        self.ln_text = nn.LayerNorm(w)
        self.image_to_mm, self.text_to_mm = nn.Linear(w, w), nn.Linear(w, w)
        self.mm_cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.mm_encoder = nn.ModuleList(
            Block(w, h, kernels=kernels, eps=1e-12) for _ in range(c["mm_layers"])
        )
        self.ln_mm = nn.LayerNorm(w)
        self.image_proj, self.text_proj = nn.Linear(w, c["embed"]), nn.Linear(w, c["embed"])
        self.logit_scale = nn.Parameter(torch.tensor(2.659))
        self.itm_head = nn.Linear(w, 2)
        self.mlm_head = nn.Linear(w, c["vocab"])
        self.mim_head = nn.Linear(w, 3 * c["patch"] ** 2)

    def example_batch(self, batch_size=2, generator=None):
        c = self.cfg
        g = generator or torch.Generator().manual_seed(0)
        batch = image_text_batch(batch_size, c["image_size"], c["text_len"], c["vocab"], CLS_ID, g)
        text = batch["text"]
        text_mask = (torch.rand(batch_size, c["text_len"], generator=g) < 0.15) & (text > CLS_ID)
        text_mask[:, 1] = True  # at least one masked token per row
        n_patches = (c["image_size"] // c["patch"]) ** 2
        return {
            **batch,
            "text_mask": text_mask,
            "patch_mask": torch.rand(batch_size, n_patches, generator=g) < 0.4,
        }

    def encode_text(self, text, lengths):
        x = self.embed(text) + self.text_pos[:, : text.shape[1]]
        recipe = MaskRecipe(key_lengths=lengths)
        for blk in self.text_encoder:
            x = blk(x, recipe=recipe)
        return self.ln_text(x)

    def multimodal(self, image_states, text_states, lengths):
        B = image_states.shape[0]
        x = torch.cat(
            [self.mm_cls.expand(B, -1, -1), self.image_to_mm(image_states), self.text_to_mm(text_states)],
            dim=1,
        )
        recipe = MaskRecipe(key_lengths=lengths + 1 + image_states.shape[1])  # text padding at the end
        for blk in self.mm_encoder:
            x = blk(x, recipe=recipe)
        return self.ln_mm(x)

    def forward(self, images, text, text_lengths, text_mask, patch_mask):
        B = images.shape[0]
        lengths = text_lengths.to(text.device)
        image_states = self.image_encoder(images)
        text_states = self.encode_text(text, lengths)
        image_emb = F.normalize(self.image_proj(image_states[:, 0]), dim=-1)
        text_emb = F.normalize(self.text_proj(text_states[:, 0]), dim=-1)
        loss_contrastive = clip_loss(image_emb, text_emb, self.logit_scale.exp(), self.kernels)
        # ITM: each image with its text and with the next image's text
        neg = torch.roll(torch.arange(B, device=text.device), 1)
        mm = self.multimodal(
            torch.cat([image_states, image_states]),
            torch.cat([text_states, text_states[neg]]),
            torch.cat([lengths, lengths[neg]]),
        )
        itm_labels = torch.cat([torch.ones(B), (neg == torch.arange(B, device=neg.device)).float()]).long()
        loss_itm = F.cross_entropy(self.itm_head(mm[:, 0]), itm_labels.to(mm.device))
        # MLM: masked text tokens predicted from the text encoder
        masked_states = self.encode_text(text.masked_fill(text_mask, MASK_ID), lengths)
        loss_mlm = F.cross_entropy(self.mlm_head(masked_states[text_mask]), text[text_mask])
        # MIM: masked patches' normalised pixels regressed from the image encoder
        p = self.cfg["patch"]
        patches = F.unfold(images, p, stride=p).transpose(1, 2)  # [B, P, 3 p p]
        patches = (patches - patches.mean(-1, keepdim=True)) / (patches.std(-1, keepdim=True) + 1e-6)
        pred = self.mim_head(self.image_encoder(images, patch_mask)[:, 1:])
        loss_mim = F.mse_loss(pred[patch_mask], patches[patch_mask])
        loss = loss_contrastive + loss_itm + loss_mlm + loss_mim
        return {
            "loss": loss,
            "loss_contrastive": loss_contrastive,
            "loss_itm": loss_itm,
            "loss_mlm": loss_mlm,
            "loss_mim": loss_mim,
        }
