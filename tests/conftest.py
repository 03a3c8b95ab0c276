"""Test setup: without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which
must be set before vlkernels (and its @triton.jit kernels) is imported. Kernel outputs are
poisoned with NaN (VLK_POISON=1) so that unwritten elements show. Each test starts from its own
seed (a hash of its id): inputs differ from test to test, and a run here repeats on CI.

The ``backend`` fixture runs a test once per backend of every op: "triton" (the interpreter
without a GPU), "cuda" (vlkernels._C on a GPU, the CPU emulation of csrc/ elsewhere), "torch"."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["VLK_POISON"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import BACKENDS, use_cuda_backend

if os.environ.get("VLK_RECORD_COMPILES"):  # the GPU run's compile count (benchmarks/gpu_estimate.py)
    from benchmarks import static

    static.record_compiles(os.environ["VLK_RECORD_COMPILES"])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cuda":
        use_cuda_backend(monkeypatch)
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
