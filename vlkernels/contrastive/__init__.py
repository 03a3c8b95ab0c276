"""Image-text contrastive losses that never build the N×N logits: CLIP InfoNCE (label smoothing,
feature queues, BLIP's momentum distillation), SigLIP, BLIP-2's max over queries; on one device
or across the ranks of a process group.

How a call flows: ``api.contrastive_loss`` (checks) -> ``_dispatch.choose`` ->
``autograd.ContrastiveLoss`` -> the backend's loss (``triton.py``: fused kernels; ``cuda.py``,
``torch.py`` and distillation: composed from row passes in ``rows.py``). Across ranks:
``autograd.RingContrastiveLoss`` -> the backend's row passes (the ``contrastive_rows`` family).
``args.py`` declares the kernel arguments once.
"""

from vlkernels import _dispatch
from vlkernels.contrastive import cuda, torch, triton
from vlkernels.contrastive.api import MomentumDistillation, contrastive_loss

for _module in (triton, cuda, torch):
    _dispatch.register("contrastive", _module.BACKEND)
    _dispatch.register("contrastive_rows", _module.ROWS)

__all__ = ["MomentumDistillation", "contrastive_loss"]
