"""Reference vision-language models at reduced size, kernels swapped in by a flag.

    from models import build_model, MODEL_NAMES
    model = build_model("coca", size="tiny", kernels=True)
    out = model(**model.example_batch(batch_size=2))      # {"loss": ..., "loss_<name>": ...}

``kernels=False`` is plain eager PyTorch; ``kernels=True`` routes every attention, pooling and
contrastive loss through vlkernels; both build the same parameters.
"""

from __future__ import annotations

import importlib

_CLASSES = {
    "blip": ("models.blip", "BLIP"),
    "blip2": ("models.blip2", "BLIP2"),
    "coca": ("models.coca", "CoCa"),
    "flamingo": ("models.flamingo", "Flamingo"),
    "flava": ("models.flava", "FLAVA"),
    "pali": ("models.pali", "PaLI"),
}
MODEL_NAMES = tuple(_CLASSES)
SIZES = ("tiny", "base", "paper")


def build_model(name: str, size: str = "tiny", kernels: bool = False):
    if name not in _CLASSES:
        raise ValueError(f"build_model: name must be one of {MODEL_NAMES}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"build_model: size must be one of {SIZES}, got {size!r}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)(size=size, kernels=kernels)
