"""Eager PyTorch references: the oracle every backend (``"torch"`` included) is tested against.

They materialise everything (dense masks from ``Mask.to_dense``, full score matrices, N×N
logits) and are written from the definitions, independently of the backends and of the mask
lowering; ``upcast=True`` computes in float64.
"""

from __future__ import annotations

import math

import torch

from vlkernels.masks import Mask


def attention_ref(
    q,
    k,
    v,
    mask=None,
    scale=None,
    upcast=False,
    softcap=None,
    dropout_keep=None,
    dropout_p=0.0,
    position_bias=None,
):
    """Masked attention, eager. q [Bq, H, Lq, D]; k, v [B, Hk, Lk, D] -> [B, H, Lq, D].

    ``mask``: None, bool broadcastable to [B, H, Lq, Lk] (True = may attend), float (added to the
    scaled scores in the wider of the two dtypes, as FlashAttention's reference adds its fp32
    ALiBi bias; -inf = may not attend) or a ``Mask``. Rows with no allowed key give 0 and pass 0
    gradient. ``upcast`` computes in float64. ``softcap``: the scaled scores become softcap ·
    tanh(scores / softcap) before a float mask is added (Gemma 2). ``dropout_keep``: bool
    [B, H, Lq, Lk], the probabilities kept by attention dropout (scaled by 1 / (1 - dropout_p)).
    ``position_bias``: a ``vlkernels.bias`` bias, added as its ``dense`` tensor after the cap (in
    float64 with ``upcast``, else in the wider of its dtype and the scores').
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    B, Hk, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if H != Hk:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # q broadcasts over B when Bq == 1
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if position_bias is not None:
        dense = position_bias.dense(Lq, Lk)
        s = s + (dense.double() if upcast else dense)
    if mask is not None and not isinstance(mask, Mask) and mask.dtype.is_floating_point:
        s, mask = s + mask, mask != float("-inf")
    if mask is not None:
        allowed = mask.to_dense(B, Lq, Lk) if isinstance(mask, Mask) else mask
        allowed = allowed.expand(B, H, Lq, Lk)
        any_allowed = allowed.any(dim=-1, keepdim=True)
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(~any_allowed, 0.0)
        p = torch.softmax(s, dim=-1) * any_allowed
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)
    return out if upcast else out.to(dtype)


def gated_residual_ref(x, y, gate):
    """x + tanh(gate) * y, eager; ``gate`` a one-element tensor."""
    return (x + torch.tanh(gate) * y).to(x.dtype)


def clip_loss_ref(
    image_features,
    text_features,
    logit_scale,
    logit_bias=None,
    label_smoothing=0.0,
    image_negatives=None,
    text_negatives=None,
):
    """open_clip's ClipLoss (one device), with negatives appended as extra columns. N×N."""
    cols_t = text_features if text_negatives is None else torch.cat([text_features, text_negatives])
    cols_i = image_features if image_negatives is None else torch.cat([image_features, image_negatives])
    logits_per_image = logit_scale * image_features @ cols_t.T
    logits_per_text = logit_scale * text_features @ cols_i.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    ce = torch.nn.functional.cross_entropy
    return (
        ce(logits_per_image, labels, label_smoothing=label_smoothing)
        + ce(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2


def siglip_loss_ref(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip's SigLipLoss._loss (one device): -sum log sigmoid(labels * logits) / N."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n = image_features.shape[0]
    labels = 2 * torch.eye(n, device=image_features.device, dtype=logits.dtype) - 1
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / n


def blip2_itc_ref(image_feats, text_feat, temp, label_smoothing=0.1):
    """LAVIS blip2_qformer.py ITC (one rank): image_feats [N, Q, D], text_feat [N, D]."""
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1)  # [N, N, Q]
    sim_i2t, _ = sim_q2t.max(-1)
    sim_i2t = sim_i2t / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2)
    sim_t2i, _ = sim_t2q.max(-1)
    sim_t2i = sim_t2i / temp
    bs = image_feats.size(0)
    targets = torch.linspace(0, bs - 1, bs, dtype=int).to(image_feats.device)
    ce = torch.nn.functional.cross_entropy
    return (
        ce(sim_i2t, targets, label_smoothing=label_smoothing)
        + ce(sim_t2i, targets, label_smoothing=label_smoothing)
    ) / 2


def blip_itc_ref(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha):
    """BLIP blip_pretrain.py ITC with momentum distillation; queues are [D, K] as in BLIP."""
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size()).to(image_feat.device)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * torch.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * torch.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(torch.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(torch.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2
