"""Test setup: without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which
must be set before vlkernels (and its @triton.jit kernels) is imported. Kernel outputs are
poisoned with NaN (VLK_POISON=1) so that unwritten elements show."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["VLK_POISON"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
