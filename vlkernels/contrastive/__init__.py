"""Image-text contrastive losses that never build the N×N logits: CLIP InfoNCE (label smoothing,
feature queues, BLIP's momentum distillation), SigLIP, BLIP-2's max over queries; on one device
or across the ranks of a process group.

How a call flows: ``api.contrastive_loss`` (checks) -> ``_dispatch.choose`` ->
``autograd.ContrastiveLoss`` (or ``RingContrastiveLoss`` across ranks), which turns per-row
statistics into the loss -> the backend's row passes ``forward`` / ``backward``
(``triton.py``, ``cuda.py``, ``torch.py``). ``args.py`` declares the kernel arguments once.
"""

from vlkernels import _dispatch
from vlkernels.contrastive import cuda, torch, triton
from vlkernels.contrastive.api import MomentumDistillation, contrastive_loss

for _backend in (triton.BACKEND, cuda.BACKEND, torch.BACKEND):
    _dispatch.register("contrastive", _backend)

__all__ = ["MomentumDistillation", "contrastive_loss"]
