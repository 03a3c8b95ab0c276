"""Every op's forward and backward can be captured in a CUDA graph and replayed: no host
synchronisation, no allocation that depends on values, every launch on the current stream.

Needs a GPU. The CPU counterpart is tests/test_budget.py: it records each paper workload on fake
CUDA tensors and holds its host synchronisations at 0 (each workload's Budget.host_syncs in
benchmarks/workloads.py)."""

import pytest
import torch
from helpers import ON_GPU

import vlkernels
from vlkernels import _extension, masks

pytestmark = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (CPU counterpart: test_budget)")


def _attention(backend):
    def inputs():
        q = torch.randn(1, 4, 32, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(3, 4, 77, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return [q, k, v]

    mask = masks.key_padding(torch.tensor([77, 40, 1], device="cuda"))
    return inputs, lambda q, k, v: vlkernels.attention(q, k, v, mask, backend=backend).float().square().sum()


def _qformer(backend):
    def inputs():
        return [torch.randn(2, 4, 50, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    mask = masks.qformer(32, "multimodal_causal")
    return inputs, lambda q, k, v: vlkernels.attention(q, k, v, mask, backend=backend).float().square().sum()


def _contrastive(kind):
    def run(backend):
        def inputs():
            x, y = (torch.randn(300, 96, device="cuda") for _ in range(2))
            return [x, y]

        scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-5.0, device="cuda")
        return inputs, lambda x, y: vlkernels.contrastive_loss(x, y, scale, bias, kind=kind, backend=backend)

    return run


def _gated(backend):
    def inputs():
        x = torch.randn(4, 100, 64, device="cuda")
        return [x, torch.randn_like(x), torch.tensor([0.3], device="cuda")]

    return inputs, lambda x, y, g: vlkernels.gated_residual(x, y, g, backend=backend).square().sum()


CASES = {
    "attention shared queries": _attention,
    "qformer itg": _qformer,
    "contrastive clip": _contrastive("clip"),
    "contrastive siglip": _contrastive("siglip"),
    "gated residual": _gated,
}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_replay_in_a_cuda_graph(case, backend):
    if backend == "cuda" and _extension.get() is None:
        pytest.skip("vlkernels._C was not built")
    inputs, fn = CASES[case](backend)
    static = [t.requires_grad_() for t in inputs()]

    def step():
        out = fn(*static)
        return (out, *torch.autograd.grad(out, static))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotuning and first compilation happen outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fresh = inputs()
    with torch.no_grad():
        for s, f in zip(static, fresh, strict=True):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for name, got, want in zip(
        ["output", *(f"grad {i}" for i in range(len(static)))], captured, expected, strict=True
    ):
        torch.testing.assert_close(got, want, msg=f"{case} ({backend}): {name} differs after replay")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_reduce_overhead_compile_replays_dropout_with_fresh_masks(backend):
    """torch.compile(mode="reduce-overhead") runs a training step with attention dropout in CUDA
    graphs: dropout's seed is a device tensor drawn by the generator, so each replay drops other
    entries (CPU counterpart: test_ops' compiled dropout step, one graph, fresh masks)."""
    if backend == "cuda" and _extension.get() is None:
        pytest.skip("vlkernels._C was not built")
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return vlkernels.attention(q, k, v, masks.causal(), dropout_p=0.2, backend=backend).square().sum()

    compiled = torch.compile(step, mode="reduce-overhead")
    losses = []
    for _ in range(5):
        loss = compiled(q, k, v)
        loss.backward()  # the backward graph is captured too
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 5
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
