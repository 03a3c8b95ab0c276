"""vlkernels: fused Triton (and CUDA C++) kernels for vision-language models.

out = vlkernels.attention(q, k, v, mask=vlkernels.masks.qformer(32, "unimodal"))
"""

from vlkernels import bias, losses, masks, modules, reference
from vlkernels._dispatch import BackendUnavailableError, get_backend, set_backend, use_backend
from vlkernels.attention import attention, attention_dropout_mask, attention_weights
from vlkernels.contrastive import MomentumDistillation, contrastive_loss
from vlkernels.gated import gated_residual
from vlkernels.patch import patch

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MomentumDistillation",
    "attention",
    "attention_dropout_mask",
    "attention_weights",
    "bias",
    "contrastive_loss",
    "gated_residual",
    "get_backend",
    "losses",
    "masks",
    "modules",
    "patch",
    "reference",
    "set_backend",
    "use_backend",
]
