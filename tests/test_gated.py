"""vlkernels.gated_residual, every backend, against the float64 reference."""

import pytest
import torch
from helpers import DEVICE, LOWP, check_against_reference, launched

import vlkernels
from vlkernels.reference import gated_residual_ref


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP], ids=str)
@pytest.mark.parametrize("shape", [(3, 1000, 7), (3, 1001)])
def test_gated_residual_matches_reference(backend, dtype, shape):
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    gate = torch.tensor([0.7], device=DEVICE, requires_grad=True)
    do = torch.randn(shape, generator=g).to(DEVICE, dtype)
    with launched(backend, "gated_residual"):
        out = vlkernels.gated_residual(x, y, gate, backend=backend)
        grads = torch.autograd.grad(out, (x, y, gate), do)
    assert out.shape == x.shape and out.dtype == dtype
    x64, y64, g64 = (t.detach().double().requires_grad_() for t in (x, y, gate))
    ref = gated_residual_ref(x64, y64, g64)
    ref_grads = torch.autograd.grad(ref, (x64, y64, g64), do.double())
    lowp = gated_residual_ref(x, y, gate.to(dtype))
    lowp_grads = torch.autograd.grad(lowp, (x, y, gate), do)
    for name, got, r, lp in zip(
        ("out", "dx", "dy", "dgate"), (out, *grads), (ref, *ref_grads), (lowp, *lowp_grads), strict=True
    ):
        check_against_reference(f"gated {name}", got, r, lp, dtype, "gated_residual", backend)


def test_gate_broadcasts_like_the_expression(backend):
    """A [1, 1, 1, 1] gate on [B, L, D] activations gives what x + tanh(gate) * y gives: [1, B, L, D]."""
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(2, 33, 8, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    gate = torch.full((1, 1, 1, 1), 0.4, device=DEVICE, requires_grad=True)
    do = torch.randn(1, 2, 33, 8, generator=g).to(DEVICE)
    with launched(backend, "gated_residual"):
        out = vlkernels.gated_residual(x, y, gate, backend=backend)
        got = torch.autograd.grad(out, (x, y, gate), do)
    ref = gated_residual_ref(x, y, gate)
    assert out.shape == ref.shape == do.shape
    want = torch.autograd.grad(ref, (x, y, gate), do)
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_float64_in_float64_on_the_torch_backend():
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(3, 17, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    gate = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    out = vlkernels.gated_residual(x, y, gate, backend="torch")
    ref = gated_residual_ref(x, y, gate)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    got, want = torch.autograd.grad(out.sum(), (x, y, gate)), torch.autograd.grad(ref.sum(), (x, y, gate))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_bad_inputs():
    q = torch.randn(2, 3)
    with pytest.raises(ValueError, match="gate must have one element"):
        vlkernels.gated_residual(q, q, torch.ones(2))
    with pytest.raises(ValueError, match="x and y must match"):
        vlkernels.gated_residual(q, q[:1], torch.ones(1))
    with pytest.raises(TypeError, match=r"y must be a torch\.Tensor"):
        vlkernels.gated_residual(q, 1.0, torch.ones(1))
