"""PaLI (Chen et al., 2022): ViT tokens prepended to the text of an encoder-decoder (mT5). The
encoder attends bidirectionally over [image tokens ; task prompt] (padding masked); the decoder is
causal over the target and cross-attends to the encoder. As mT5, the self-attention has no absolute
positions but a learned relative position bias (T5's buckets: 32, up to distance 128; one table
per stack, shared by its layers; bidirectional in the encoder, causal in the decoder), which the
kernels compute (``vlkernels.bias.t5``) and eager adds as a dense tensor. Multi-task prompts
("caption en", "answer en: <question>") share one vocabulary; ``loss_lm`` is the target's
cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Block, MaskRecipe, ViT
from vlkernels import bias

NUM_BUCKETS, MAX_DISTANCE = 32, 128  # mT5's relative position bias

SIZES = {
    # paper (PaLI-3B): ViT-G/14 (1.8B) + mT5-Large (1B)
    "tiny": dict(
        image_size=32,
        patch=8,
        vis_width=64,
        vis_layers=2,
        dim=64,
        heads=4,
        enc_layers=2,
        dec_layers=2,
        vocab=100,
        prompt_len=8,
        target_len=10,
    ),
    "base": dict(
        image_size=224,
        patch=16,
        vis_width=768,
        vis_layers=12,
        dim=768,
        heads=12,
        enc_layers=12,
        dec_layers=12,
        vocab=32000,
        prompt_len=32,
        target_len=32,
    ),
    "paper": dict(
        image_size=224,
        patch=14,
        vis_width=1664,
        vis_layers=48,
        dim=1024,
        heads=16,
        enc_layers=24,
        dec_layers=24,
        vocab=250000,
        prompt_len=64,
        target_len=64,
    ),
}
PAD_ID, BOS_ID, CAPTION_ID, ANSWER_ID = 0, 1, 2, 3


class PaLI(nn.Module):
    def __init__(self, size="tiny", kernels=False):
        super().__init__()
        c = SIZES[size]
        self.cfg, self.kernels = c, kernels
        d = c["dim"]
        self.visual = ViT(c["image_size"], c["patch"], c["vis_width"], c["vis_layers"], c["heads"], kernels)
        self.vision_proj = nn.Linear(c["vis_width"], d)
        self.embed = nn.Embedding(c["vocab"], d)
        self.enc_bias = nn.Embedding(NUM_BUCKETS, c["heads"])  # [num_buckets, heads], as mT5
        self.dec_bias = nn.Embedding(NUM_BUCKETS, c["heads"])
        self.encoder = nn.ModuleList(Block(d, c["heads"], kernels=kernels) for _ in range(c["enc_layers"]))
        self.decoder = nn.ModuleList(
            Block(d, c["heads"], cross_dim=d, kernels=kernels) for _ in range(c["dec_layers"])
        )
        self.ln_enc, self.ln_dec = nn.LayerNorm(d), nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, c["vocab"], bias=False)

    def example_batch(self, batch_size=2, generator=None):
        """Half captioning ("caption en"), half VQA ("answer en: <question>") examples."""
        c = self.cfg
        g = generator or torch.Generator().manual_seed(0)
        prompt = torch.full((batch_size, c["prompt_len"]), PAD_ID)
        prompt_len = torch.empty(batch_size, dtype=torch.long)
        for b in range(batch_size):
            if b % 2 == 0:
                prompt[b, :2], prompt_len[b] = torch.tensor([CAPTION_ID, 10]), 2  # "caption en"
            else:
                n = int(torch.randint(3, c["prompt_len"] + 1, (1,), generator=g))
                prompt[b, :n] = torch.randint(4, c["vocab"], (n,), generator=g)
                prompt[b, 0], prompt_len[b] = ANSWER_ID, n
        target_len = torch.randint(2, c["target_len"] + 1, (batch_size,), generator=g)
        target = torch.randint(4, c["vocab"], (batch_size, c["target_len"]), generator=g)
        target[:, 0] = BOS_ID
        target[torch.arange(c["target_len"])[None] >= target_len[:, None]] = PAD_ID
        return {
            "images": torch.randn(batch_size, 3, c["image_size"], c["image_size"], generator=g),
            "prompt": prompt,
            "prompt_lengths": prompt_len,
            "target": target,
            "target_lengths": target_len,
        }

    def forward(self, images, prompt, prompt_lengths, target, target_lengths):
        img = self.vision_proj(self.visual(images))
        n_img = img.shape[1]
        x = torch.cat([img, self.embed(prompt)], dim=1)
        enc_len = (prompt_lengths + n_img).to(x.device)
        enc_position = bias.t5(self.enc_bias.weight, True, NUM_BUCKETS, MAX_DISTANCE)
        enc_recipe = MaskRecipe(key_lengths=enc_len, position=enc_position)  # bidirectional
        for blk in self.encoder:
            x = blk(x, recipe=enc_recipe)
        memory = self.ln_enc(x)
        y = self.embed(target)
        dec_position = bias.t5(self.dec_bias.weight, False, NUM_BUCKETS, MAX_DISTANCE)
        dec_recipe = MaskRecipe(causal=True, key_lengths=target_lengths.to(y.device), position=dec_position)
        cross_recipe = MaskRecipe(key_lengths=enc_len)
        for blk in self.decoder:
            y = blk(y, recipe=dec_recipe, context=memory, cross_recipe=cross_recipe)
        logits = self.lm_head(self.ln_dec(y))[:, :-1]
        loss_lm = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=PAD_ID
        )
        return {"loss": loss_lm, "loss_lm": loss_lm}
