"""BLIP-2 (Li et al., 2023): a frozen image encoder, the Q-Former (learned queries, BERT-style
layers whose self-attention runs over [queries ; text] with the three masks of the paper's
Figure 2, cross-attention from the queries to the image every other layer, separate feed-forward
networks for queries and text), stage-1 losses ITC / ITM / ITG, and the stage-2 generative path:
queries projected into a small frozen decoder-only LM as a soft prompt (``loss_lm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Attention, Block, MaskRecipe, ViT, clip_loss, hard_negatives, image_text_batch

SIZES = {
    # paper: ViT-g/14 (frozen), Q-Former = BERT-base (12 layers, 768, 12 heads), 32 queries, OPT-2.7B
    "tiny": dict(
        image_size=32,
        patch=8,
        vis_width=64,
        vis_layers=2,
        hidden=64,
        heads=4,
        layers=2,
        queries=8,
        vocab=100,
        text_len=12,
        embed=32,
        lm_dim=64,
        lm_layers=2,
    ),
    "base": dict(
        image_size=224,
        patch=14,
        vis_width=768,
        vis_layers=12,
        hidden=768,
        heads=12,
        layers=12,
        queries=32,
        vocab=30522,
        text_len=32,
        embed=256,
        lm_dim=768,
        lm_layers=12,
    ),
    "paper": dict(
        image_size=224,
        patch=14,
        vis_width=1408,
        vis_layers=39,
        hidden=768,
        heads=12,
        layers=12,
        queries=32,
        vocab=30522,
        text_len=32,
        embed=256,
        lm_dim=2560,
        lm_layers=32,
    ),
}
PAD_ID, CLS_ID, DEC_ID = 0, 1, 2
ATTN_DROPOUT = 0.1  # the Q-Former is BERT-base: attention_probs_dropout_prob 0.1 (LAVIS / transformers)


class QFormerLayer(nn.Module):
    """Post-LN BERT layer over [queries ; text]; queries also cross-attend to the image."""

    def __init__(self, hidden, heads, vis_width, cross, kernels, attn_dropout=ATTN_DROPOUT):
        super().__init__()
        self.self_attn = Attention(hidden, heads, kernels=kernels, dropout=attn_dropout)
        self.ln_self = nn.LayerNorm(hidden, eps=1e-12)
        self.cross = (
            Attention(hidden, heads, kv_dim=vis_width, kernels=kernels, dropout=attn_dropout)
            if cross
            else None
        )
        self.ln_cross = nn.LayerNorm(hidden, eps=1e-12) if cross else None
        self.ffn_query = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        )
        self.ffn_text = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.ln_query = nn.LayerNorm(hidden, eps=1e-12)
        self.ln_text = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, nq, recipe, image):
        x = self.ln_self(x + self.self_attn(x, recipe=recipe))
        q, t = x[:, :nq], x[:, nq:]
        if self.cross is not None:
            q = self.ln_cross(q + self.cross(q, context=image))
        q = self.ln_query(q + self.ffn_query(q))
        t = self.ln_text(t + self.ffn_text(t))
        return torch.cat([q, t], dim=1)


# transformers' Blip2QFormerLayer parameter names -> QFormerLayer's
HF_LAYER_NAMES = {
    "attention.attention.query": "self_attn.q",
    "attention.attention.key": "self_attn.k",
    "attention.attention.value": "self_attn.v",
    "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "ln_self",
    "crossattention.attention.query": "cross.q",
    "crossattention.attention.key": "cross.k",
    "crossattention.attention.value": "cross.v",
    "crossattention.output.dense": "cross.out",
    "crossattention.output.LayerNorm": "ln_cross",
    "intermediate_query.dense": "ffn_query.0",
    "output_query.dense": "ffn_query.2",
    "output_query.LayerNorm": "ln_query",
    "intermediate.dense": "ffn_text.0",
    "output.dense": "ffn_text.2",
    "output.LayerNorm": "ln_text",
}


def qformer_layer_state_from_hf(hf_state: dict) -> dict:
    """A transformers ``Blip2QFormerLayer`` state_dict renamed for ``QFormerLayer``."""
    out = {}
    for key, value in hf_state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in HF_LAYER_NAMES:
            raise KeyError(f"unexpected Blip2QFormerLayer parameter {key!r}")
        out[f"{HF_LAYER_NAMES[prefix]}.{leaf}"] = value
    return out


class BLIP2(nn.Module):
    def __init__(self, size="tiny", kernels=False):
        super().__init__()
        c = SIZES[size]
        self.cfg, self.kernels = c, kernels
        h = c["hidden"]
        self.visual = ViT(c["image_size"], c["patch"], c["vis_width"], c["vis_layers"], 4, kernels)
        self.query_tokens = nn.Parameter(torch.randn(1, c["queries"], h) * 0.02)
        self.word_emb = nn.Embedding(c["vocab"], h)
        self.pos_emb = nn.Parameter(torch.randn(1, c["text_len"], h) * 0.02)
        self.ln_emb = nn.LayerNorm(h, eps=1e-12)
        self.layers = nn.ModuleList(
            QFormerLayer(h, c["heads"], c["vis_width"], i % 2 == 0, kernels) for i in range(c["layers"])
        )
        self.vision_proj = nn.Linear(h, c["embed"])
        self.text_proj = nn.Linear(h, c["embed"])
        self.itm_head = nn.Linear(h, 2)
        self.itg_head = nn.Linear(h, c["vocab"])
        self.temp = nn.Parameter(torch.tensor(0.07))
        # stage 2: queries -> soft prompt of a frozen decoder-only LM
        self.lm_proj = nn.Linear(h, c["lm_dim"])
        self.lm_embed = nn.Embedding(c["vocab"], c["lm_dim"])
        self.lm_pos = nn.Parameter(torch.randn(1, c["queries"] + c["text_len"], c["lm_dim"]) * 0.02)
        self.lm = nn.ModuleList(Block(c["lm_dim"], 4, kernels=kernels) for _ in range(c["lm_layers"]))
        self.lm_ln = nn.LayerNorm(c["lm_dim"])
        self.lm_head = nn.Linear(c["lm_dim"], c["vocab"], bias=False)
        frozen = [self.visual, self.lm_embed, self.lm, self.lm_ln, self.lm_head]
        for p in (p for m in frozen for p in m.parameters()):
            p.requires_grad_(False)
        self.lm_pos.requires_grad_(False)

    def example_batch(self, batch_size=2, generator=None):
        c = self.cfg
        return image_text_batch(
            batch_size, c["image_size"], c["text_len"], c["vocab"], CLS_ID, generator, low=3
        )

    def qformer(self, image, text, text_lengths, mode):
        """[queries ; text] through the Q-Former with the BLIP-2 ``mode`` mask -> (queries, text)."""
        nq = self.query_tokens.shape[1]
        B = image.shape[0]
        emb = self.ln_emb(self.word_emb(text) + self.pos_emb[:, : text.shape[1]])
        x = torch.cat([self.query_tokens.expand(B, -1, -1), emb], dim=1)
        recipe = MaskRecipe(qformer=(nq, mode), key_lengths=text_lengths + nq)
        for layer in self.layers:
            x = layer(x, nq, recipe, image)
        return x[:, :nq], x[:, nq:]

    def forward(self, images, text, text_lengths):
        B = images.shape[0]
        text_lengths = text_lengths.to(text.device)
        with torch.no_grad():
            image = self.visual(images)
        # ITC: queries and text see only themselves (unimodal); max over queries, label smoothing 0.1
        q, t = self.qformer(image, text, text_lengths, "unimodal")
        image_feats = F.normalize(self.vision_proj(q), dim=-1)
        text_feat = F.normalize(self.text_proj(t[:, 0]), dim=-1)
        loss_itc = clip_loss(image_feats, text_feat, 1 / self.temp, self.kernels, label_smoothing=0.1)
        # ITM: hard negatives sampled from the similarity, bidirectional mask
        with torch.no_grad():
            sim = torch.einsum("iqd,jd->ijq", image_feats, text_feat).amax(-1) / self.temp
            neg_text, neg_image = hard_negatives(sim), hard_negatives(sim.T)
        itm_image = torch.cat([image, image, image[neg_image]])
        itm_text = torch.cat([text, text[neg_text], text])
        itm_len = torch.cat([text_lengths, text_lengths[neg_text], text_lengths])
        q_itm, _ = self.qformer(itm_image, itm_text, itm_len, "bidirectional")
        itm_logits = self.itm_head(q_itm).mean(dim=1)
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(itm_logits.device)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        # ITG: multimodal causal mask, [DEC] first token, next-token prediction on the text
        dec = text.clone()
        dec[:, 0] = DEC_ID
        _, t_itg = self.qformer(image, dec, text_lengths, "multimodal_causal")
        itg_logits = self.itg_head(t_itg[:, :-1])
        loss_itg = F.cross_entropy(
            itg_logits.reshape(-1, itg_logits.shape[-1]),
            text[:, 1:].reshape(-1),
            ignore_index=PAD_ID,
            label_smoothing=0.1,
        )
        # stage 2: queries (from the unimodal pass) as a soft prompt for the frozen LM
        prompt = self.lm_proj(q)
        nq = prompt.shape[1]
        x = torch.cat([prompt, self.lm_embed(text)], dim=1) + self.lm_pos[:, : nq + text.shape[1]]
        recipe = MaskRecipe(causal=True, key_lengths=text_lengths + nq)
        for blk in self.lm:
            x = blk(x, recipe=recipe)
        lm_logits = self.lm_head(self.lm_ln(x))[:, nq:-1]
        loss_lm = F.cross_entropy(
            lm_logits.reshape(-1, lm_logits.shape[-1]), text[:, 1:].reshape(-1), ignore_index=PAD_ID
        )
        loss = loss_itc + loss_itm + loss_itg + loss_lm
        return {
            "loss": loss,
            "loss_itc": loss_itc,
            "loss_itm": loss_itm,
            "loss_itg": loss_itg,
            "loss_lm": loss_lm,
        }
