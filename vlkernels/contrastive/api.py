"""The public ``contrastive_loss``: input checks, backend choice, and the loss on one device or
across the ranks of a process group."""

from __future__ import annotations

import dataclasses

import torch

from vlkernels import _dispatch
from vlkernels.contrastive.args import KINDS, LossArgs, RowPass
from vlkernels.contrastive.autograd import ContrastiveLoss, RingContrastiveLoss

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class MomentumDistillation:
    """BLIP's momentum distillation (``blip_pretrain.py``).

    ``image_features``/``text_features``: the momentum encoders' features [N, D]. With it, the
    columns of image-to-text are [text_features ; text_negatives] (the momentum features and the
    queue) and of text-to-image [image_features ; image_negatives], and the targets are
    ``alpha * softmax(logit_scale * momentum_row · columns) + (1 - alpha) * one_hot``.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    alpha: float

    def __post_init__(self):
        for name in ("image_features", "text_features"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"MomentumDistillation: {name} must be a torch.Tensor, got {type(t).__name__}"
                )
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"MomentumDistillation: alpha must be a float in [0, 1], got {a!r}")


def _check_features(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"contrastive_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"contrastive_loss: {name} must be {want}, got shape {list(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"contrastive_loss: {name} must be float16, bfloat16 or float32, got {t.dtype}")


def _validate(x, y, scale, bias, kind, smooth, neg_x, neg_y, distill, device):
    if kind not in KINDS:
        raise ValueError(f"contrastive_loss: kind must be one of {KINDS}, got {kind!r}")
    _check_features("image_features", x, (2, 3))
    _check_features("text_features", y, (2,))
    if x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(
            f"contrastive_loss: image_features and text_features must have the same N >= 1, "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"contrastive_loss: feature dims differ: image {x.shape[-1]}, text {y.shape[-1]}")
    if x.dtype != y.dtype:
        raise TypeError(
            f"contrastive_loss: image and text features must share a dtype, got {x.dtype}, {y.dtype}"
        )
    for name, t in (("logit_scale", scale), ("logit_bias", bias)):
        if t is None and name == "logit_bias":
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.dtype.is_floating_point:
            got = f"shape {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"contrastive_loss: {name} must be a one-element float tensor, got {got}")
    if not isinstance(smooth, (int, float)) or not 0.0 <= smooth <= 1.0:
        raise ValueError(f"contrastive_loss: label_smoothing must be in [0, 1], got {smooth!r}")
    if smooth and kind != "clip":
        raise ValueError(f"contrastive_loss: label_smoothing is only used by kind='clip', got kind={kind!r}")
    for name, t in (("image_negatives", neg_x), ("text_negatives", neg_y)):
        if t is None:
            continue
        if kind != "clip":
            raise ValueError(f"contrastive_loss: {name} are only used by kind='clip'")
        _check_features(name, t, (2,))
        if t.shape[1] != y.shape[-1] or t.dtype != y.dtype:
            raise ValueError(
                f"contrastive_loss: {name} must be [K, {y.shape[-1]}] {y.dtype}, got "
                f"{list(t.shape)} {t.dtype}"
            )
    if neg_x is not None and x.dim() == 3:
        raise ValueError("contrastive_loss: image_negatives are not defined for [N, Q, D] image features")
    if distill is not None:
        if not isinstance(distill, MomentumDistillation):
            raise TypeError(
                f"contrastive_loss: distill must be a MomentumDistillation, got {type(distill).__name__}"
            )
        if kind != "clip" or smooth or x.dim() == 3:
            raise ValueError(
                "contrastive_loss: distill needs kind='clip', 2-D image features and no label_smoothing"
            )
        for name, t, ref in (
            ("distill.image_features", distill.image_features, x),
            ("distill.text_features", distill.text_features, y),
        ):
            _check_features(name, t, (2,))
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"contrastive_loss: {name} must match the online features {list(ref.shape)} "
                    f"{ref.dtype}, got {list(t.shape)} {t.dtype}"
                )
    tensors = [x, y, scale, bias, neg_x, neg_y]
    if distill is not None:
        tensors += [distill.image_features, distill.text_features]
    constants = (("image_negatives", neg_x), ("text_negatives", neg_y))
    if distill is not None:
        constants += (("distill.image_features", distill.image_features),)
        constants += (("distill.text_features", distill.text_features),)
    for name, t in constants:
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"contrastive_loss: {name} requires grad, but the loss treats it as a constant (a queue "
                f"or momentum features, as in BLIP) and gives it no gradient; pass {name}.detach()"
            )
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"contrastive_loss: every tensor must be on {device}, got one on {t.device}")


def contrastive_loss(
    image_features,
    text_features,
    logit_scale,
    logit_bias=None,
    *,
    kind="clip",
    label_smoothing=0.0,
    image_negatives=None,
    text_negatives=None,
    distill=None,
    group=None,
    backend=None,
):
    """Image-text contrastive loss without an N×N buffer. Returns a scalar.

    image_features [N, D] (or [N, Q, D]: similarity = max over the Q query embeddings, BLIP-2);
    text_features [N, D]; logit_scale: one-element tensor, already exponentiated; logit_bias
    optional. ``kind="clip"``: ½[CE(logits, arange) + CE(logitsᵀ, arange)] with ``label_smoothing``
    and optional negatives [K, D] appended as extra columns (BLIP's queues); ``distill`` adds BLIP
    momentum distillation. ``kind="siglip"``: −Σ log σ(ε_ij·logit_ij) / N. ``group``: a
    torch.distributed process group; each rank passes its own n rows and gets open_clip's
    ``local_loss=True, gather_with_grad=True`` loss and gradients.
    """
    device = image_features.device if isinstance(image_features, torch.Tensor) else None
    _validate(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        kind,
        label_smoothing,
        image_negatives,
        text_negatives,
        distill,
        device,
    )
    smooth = float(label_smoothing)
    # under autocast the features are multiplied in its lower precision (as open_clip's matmuls)
    image_features, text_features, image_negatives, text_negatives = _dispatch.autocast_inputs(
        image_features, text_features, image_negatives, text_negatives
    )
    if distill is not None:
        distill = MomentumDistillation(
            *_dispatch.autocast_inputs(distill.image_features, distill.text_features), distill.alpha
        )
    # copies of the queues: BLIP updates them in place right after the loss, before the backward
    neg_x = None if image_negatives is None else image_negatives.detach().clone()
    neg_y = None if text_negatives is None else text_negatives.detach().clone()
    if group is not None:
        import torch.distributed as dist

        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"contrastive_loss: group must be a torch.distributed process group or None, got "
                f"{type(group).__name__}"
            )
        if dist.get_world_size(group) > 1:
            if distill is not None:
                raise ValueError("contrastive_loss: distill is not supported with a process group yet")
            rows = image_features if image_features.dim() == 3 else image_features[:, None]
            problem = RowPass(rows, text_features[:, None], logit_scale, logit_bias, kind=kind)
            chosen = _dispatch.choose("contrastive_rows", backend, problem).name
            args = (image_features, text_features, logit_scale, logit_bias, neg_x, neg_y)
            return RingContrastiveLoss.apply(chosen, *args, kind, smooth, group)
    chosen = _dispatch.choose(
        "contrastive", backend, LossArgs(image_features, text_features, logit_scale)
    ).name
    xm = ym = None
    alpha = 0.0
    if distill is not None:
        xm, ym, alpha = distill.image_features.detach(), distill.text_features.detach(), float(distill.alpha)
    return ContrastiveLoss.apply(
        chosen,
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        neg_x,
        neg_y,
        xm,
        ym,
        kind,
        smooth,
        alpha,
    )
