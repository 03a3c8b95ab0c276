"""Drop-in replacements for open_clip's ``ClipLoss``, ``SigLipLoss`` and ``CoCaLoss``: same
constructor arguments, same ``forward``, same values and gradients, computed by
``vlkernels.contrastive_loss`` (no N×N logits; across ranks through a ring exchange).
"""

from __future__ import annotations

import torch
from torch import nn

from vlkernels.contrastive import contrastive_loss


def _group(world_size: int, use_horovod: bool):
    if use_horovod:
        raise ValueError("vlkernels losses: use_horovod=True is not supported (torch.distributed only)")
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError(f"vlkernels losses: world_size={world_size} needs torch.distributed initialised")
        if dist.get_world_size() != world_size:
            raise ValueError(
                f"vlkernels losses: world_size={world_size} but the default process group "
                f"has {dist.get_world_size()} ranks"
            )
        return dist.group.WORLD
    return None


def _tensor(value, like: torch.Tensor):
    """open_clip takes logit_scale and logit_bias as tensors or Python numbers: the number as a
    one-element fp32 tensor on the features' device."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), device=like.device)


def _open_clip_dtype(loss: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The loss in the dtype open_clip returns: the features' (its logits are), fp32 under autocast
    (its cross-entropy runs in fp32 there)."""
    return loss if torch.is_autocast_enabled(features.device.type) else loss.to(features.dtype)


class ClipLoss(nn.Module):
    """open_clip's ClipLoss. With ``world_size > 1`` the configuration that scales,
    ``local_loss=True, gather_with_grad=True``, is computed by the ring; the other combinations
    change what each rank's gradient means in open_clip and are rejected."""

    def __init__(
        self,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
    ):
        super().__init__()
        if world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError(
                "vlkernels ClipLoss: with world_size > 1 only local_loss=True, "
                "gather_with_grad=True is supported (open_clip's scalable setting)"
            )
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.group = _group(world_size, use_horovod)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        scale, bias = _tensor(logit_scale, image_features), _tensor(logit_bias, image_features)
        loss = contrastive_loss(image_features, text_features, scale, bias, kind="clip", group=self.group)
        loss = _open_clip_dtype(loss, image_features)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip's SigLipLoss (sigmoid loss; across ranks every text block meets every image).
    open_clip's ``dist_impl`` ('bidir', 'shift', 'reduce', 'gather') and ``chunk_size`` (logits in
    row chunks) change how open_clip computes the same loss and gradients: every choice is
    accepted, and the kernel (which never holds the N×N logits) with its ring computes them."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0):
        super().__init__()
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"vlkernels SigLipLoss: unknown dist_impl {dist_impl!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"vlkernels SigLipLoss: chunk_size must be an int >= 0, got {chunk_size!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.chunk_size = dist_impl or "bidir", chunk_size
        self.group = _group(world_size, False)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        scale, bias = _tensor(logit_scale, image_features), _tensor(logit_bias, image_features)
        loss = contrastive_loss(image_features, text_features, scale, bias, kind="siglip", group=self.group)
        loss = _open_clip_dtype(loss, image_features)
        return {"contrastive_loss": loss} if output_dict else loss


class CoCaLoss(ClipLoss):
    """open_clip's CoCaLoss: clip_loss_weight · contrastive + caption_loss_weight · caption CE
    (``caption_loss``: cross-entropy ignoring ``pad_id``, as open_clip's attribute)."""

    def __init__(
        self,
        caption_loss_weight,
        clip_loss_weight,
        pad_id=0,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
    ):
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
            use_horovod=use_horovod,
        )
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict=False):
        """logits [B, L, vocab], labels [B, L]."""
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss
