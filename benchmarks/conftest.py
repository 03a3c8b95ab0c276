"""Without a GPU, the Triton kernels run under the interpreter (set before vlkernels is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
