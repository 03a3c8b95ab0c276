"""BLIP (Li et al., 2022): ViT image encoder; BERT-style text encoder (unimodal for ITC,
image-grounded through cross-attention for ITM) and image-grounded causal decoder (LM).
ITC uses momentum encoders, feature queues and momentum distillation (``blip_pretrain.py``);
ITM uses hard negatives sampled from the contrastive similarity. The decoder here has its own
weights (BLIP shares all but the self-attention with the encoder).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Block, MaskRecipe, ViT, hard_negatives, image_text_batch

SIZES = {
    # paper (BLIP, ViT-B): ViT-B/16 + BERT-base encoder and decoder, queue 57 600, momentum 0.995
    "tiny": dict(
        image_size=32,
        patch=8,
        width=64,
        vis_layers=2,
        heads=4,
        text_layers=2,
        vocab=100,
        text_len=12,
        embed=32,
        queue=24,
        momentum=0.995,
        alpha=0.4,
    ),
    "base": dict(
        image_size=224,
        patch=16,
        width=768,
        vis_layers=12,
        heads=12,
        text_layers=6,
        vocab=30524,
        text_len=35,
        embed=256,
        queue=4096,
        momentum=0.995,
        alpha=0.4,
    ),
    "paper": dict(
        image_size=224,
        patch=16,
        width=768,
        vis_layers=12,
        heads=12,
        text_layers=12,
        vocab=30524,
        text_len=35,
        embed=256,
        queue=57600,
        momentum=0.995,
        alpha=0.4,
    ),
}
PAD_ID, CLS_ID, ENC_ID, DEC_ID = 0, 1, 2, 3


# transformers' BlipEncoderLayer (vision, pre-LN, fused qkv) -> models.common.Block
HF_VISION_LAYER_NAMES = {
    "layer_norm1": "ln1",
    "self_attn.projection": "attn.out",
    "layer_norm2": "ln2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.2",
}


ATTN_DROPOUT = 0.1  # BLIP's BERT text encoder (med_config: attention_probs_dropout_prob 0.1)


class TextEncoder(nn.Module):
    """Token + position embeddings and layers; cross-attention to the image when given one."""

    def __init__(self, c, causal, kernels):
        super().__init__()
        w = c["width"]
        self.causal = causal
        self.embed = nn.Embedding(c["vocab"], w)
        self.pos = nn.Parameter(torch.randn(1, c["text_len"], w) * 0.02)
        self.layers = nn.ModuleList(
            Block(w, c["heads"], cross_dim=w, kernels=kernels, attn_dropout=ATTN_DROPOUT)
            for _ in range(c["text_layers"])
        )
        self.ln = nn.LayerNorm(w)

    def forward(self, text, lengths, image=None):
        x = self.embed(text) + self.pos[:, : text.shape[1]]
        recipe = MaskRecipe(causal=self.causal, key_lengths=lengths)
        for blk in self.layers:
            if image is None:  # unimodal: skip the cross-attention sub-layer
                x = x + blk.attn(blk.ln1(x), recipe=recipe)
                x = x + blk.mlp(blk.ln2(x))
            else:
                x = blk(x, recipe=recipe, context=image)
        return self.ln(x)


class BLIP(nn.Module):
    def __init__(self, size="tiny", kernels=False):
        super().__init__()
        c = SIZES[size]
        self.cfg, self.kernels = c, kernels
        w = c["width"]
        self.visual = ViT(c["image_size"], c["patch"], w, c["vis_layers"], c["heads"], kernels)
        self.text_encoder = TextEncoder(c, causal=False, kernels=kernels)
        self.text_decoder = TextEncoder(c, causal=True, kernels=kernels)
        self.vision_proj = nn.Linear(w, c["embed"])
        self.text_proj = nn.Linear(w, c["embed"])
        self.itm_head = nn.Linear(w, 2)
        self.lm_head = nn.Linear(w, c["vocab"], bias=False)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # momentum encoders (EMA copies, no gradient) and the feature queues
        self.visual_m = copy.deepcopy(self.visual)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for m in self._momentum_pairs():
            for p in m[1].parameters():
                p.requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        self.register_buffer(
            "image_queue", F.normalize(torch.randn(c["embed"], c["queue"], generator=g), dim=0)
        )
        self.register_buffer(
            "text_queue", F.normalize(torch.randn(c["embed"], c["queue"], generator=g), dim=0)
        )
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _momentum_pairs(self):
        return [
            (self.visual, self.visual_m),
            (self.text_encoder, self.text_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def _momentum_update(self):
        m = self.cfg["momentum"]
        for online, ema in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), ema.parameters(), strict=True):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def _enqueue(self, image_feat_m, text_feat_m):
        K, n = self.image_queue.shape[1], image_feat_m.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % K
        self.image_queue[:, idx] = image_feat_m.T
        self.text_queue[:, idx] = text_feat_m.T
        self.queue_ptr.copy_((self.queue_ptr + n) % K)

    def example_batch(self, batch_size=2, generator=None):
        c = self.cfg
        return image_text_batch(
            batch_size, c["image_size"], c["text_len"], c["vocab"], CLS_ID, generator, low=4
        )

    def _itc(self, image_feat, text_feat, image_feat_m, text_feat_m):
        s, alpha = 1 / self.temp, self.cfg["alpha"]
        if self.kernels:
            import vlkernels

            return vlkernels.contrastive_loss(
                image_feat,
                text_feat,
                s,
                image_negatives=self.image_queue.T,
                text_negatives=self.text_queue.T,
                distill=vlkernels.MomentumDistillation(image_feat_m, text_feat_m, alpha),
            )
        # BLIP's blip_pretrain.py, literally
        with torch.no_grad():
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_targets = torch.zeros(image_feat.shape[0], text_feat_all.shape[1], device=image_feat.device)
            sim_targets.fill_diagonal_(1)
            i2t_targets = (
                alpha * F.softmax(image_feat_m @ text_feat_all * s, dim=1) + (1 - alpha) * sim_targets
            )
            t2i_targets = (
                alpha * F.softmax(text_feat_m @ image_feat_all * s, dim=1) + (1 - alpha) * sim_targets
            )
        loss_i2t = -torch.sum(
            F.log_softmax(image_feat @ text_feat_all * s, dim=1) * i2t_targets, dim=1
        ).mean()
        loss_t2i = -torch.sum(
            F.log_softmax(text_feat @ image_feat_all * s, dim=1) * t2i_targets, dim=1
        ).mean()
        return (loss_i2t + loss_t2i) / 2

    def forward(self, images, text, text_lengths):
        B = images.shape[0]
        lengths = text_lengths.to(text.device)
        image = self.visual(images)
        image_feat = F.normalize(self.vision_proj(image[:, 0]), dim=-1)
        text_out = self.text_encoder(text, lengths)
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)
        with torch.no_grad():
            if self.training:
                self._momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_m(images)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(text, lengths)[:, 0]), dim=-1)
        loss_itc = self._itc(image_feat, text_feat, image_feat_m, text_feat_m)
        # ITM: image-grounded encoder; one hard negative text per image and image per text
        enc = text.clone()
        enc[:, 0] = ENC_ID
        with torch.no_grad():
            sim = image_feat @ text_feat.T / self.temp
            neg_text, neg_image = hard_negatives(sim), hard_negatives(sim.T)
        itm_out = self.text_encoder(
            torch.cat([enc, enc[neg_text], enc]),
            torch.cat([lengths, lengths[neg_text], lengths]),
            image=torch.cat([image, image, image[neg_image]]),
        )
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(text.device)
        loss_itm = F.cross_entropy(self.itm_head(itm_out[:, 0]), itm_labels)
        # LM: image-grounded causal decoder
        dec = text.clone()
        dec[:, 0] = DEC_ID
        logits = self.lm_head(self.text_decoder(dec, lengths, image=image))[:, :-1]
        loss_lm = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            text[:, 1:].reshape(-1),
            ignore_index=PAD_ID,
            label_smoothing=0.1,
        )
        if self.training:
            self._enqueue(image_feat_m, text_feat_m)
        return {
            "loss": loss_itc + loss_itm + loss_lm,
            "loss_itc": loss_itc,
            "loss_itm": loss_itm,
            "loss_lm": loss_lm,
        }
