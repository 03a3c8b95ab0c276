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


def test_bad_inputs():
    q = torch.randn(2, 3)
    with pytest.raises(ValueError, match="gate must have one element"):
        vlkernels.gated_residual(q, q, torch.ones(2))
    with pytest.raises(ValueError, match="x and y must match"):
        vlkernels.gated_residual(q, q[:1], torch.ones(1))
    with pytest.raises(TypeError, match=r"y must be a torch\.Tensor"):
        vlkernels.gated_residual(q, 1.0, torch.ones(1))
