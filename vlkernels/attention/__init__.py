"""Masked attention for every VLM mask pattern.

How a call flows: ``api.attention`` (checks the inputs) -> ``masks.lower`` (the mask as
``MaskArgs``) -> ``_dispatch.choose`` (the first backend whose ``not_supported_reasons`` is empty)
-> ``autograd.AttentionFunction`` -> the backend's ``forward`` / ``backward`` (``triton.py``,
``cuda.py``, ``torch.py``) -> its kernels. ``args.py`` declares the kernel arguments once.
"""

from vlkernels import _dispatch
from vlkernels.attention import cuda, torch, triton
from vlkernels.attention.api import attention, attention_dropout_mask, attention_weights
from vlkernels.attention.args import needs

for _backend in (triton.BACKEND, cuda.BACKEND, torch.BACKEND):
    _dispatch.register("attention", _backend, needs)

__all__ = ["attention", "attention_dropout_mask", "attention_weights"]
