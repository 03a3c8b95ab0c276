"""Shared test utilities: devices, dtype tolerances (FlashAttention's 2x rule), launch counting."""

from __future__ import annotations

import contextlib

import torch

from vlkernels._triton_utils import LAUNCHES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
LOWP = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def assert_launched(*names: str):
    """Fail unless every named kernel (``LAUNCHES`` key) was launched inside the block."""
    before = {n: LAUNCHES[n] for n in names}
    yield
    missing = [n for n in names if LAUNCHES[n] == before[n]]
    assert not missing, f"kernels not launched: {missing}"


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(name, got, ref64, ref_lowp, dtype):
    """fp32: |got - ref64| small. fp16/bf16: at most 2x the error of the same-dtype eager
    reference (+1e-5), FlashAttention's rule."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err = max_err(got, ref64)
    if dtype == torch.float32:
        bound = 2e-5 * max(1.0, ref64.abs().max().item())
    else:
        bound = 2 * max_err(ref_lowp, ref64) + 1e-5
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def padded_randn(shape, dtype, device, pad_last=8, layout_blhd=False, generator=None):
    """A view of ``shape`` [B, H, L, D] into a larger NaN-filled buffer (so any out-of-bounds read
    poisons the result); optionally stored as [B, L, H, D]."""
    B, H, L, D = shape
    buf_shape = (B, L, H, D + pad_last) if layout_blhd else (B, H, L, D + pad_last)
    buf = torch.full(buf_shape, float("nan"), dtype=dtype, device=device)
    view = buf[..., :D]
    view.copy_(torch.randn(view.shape, generator=generator).to(device=device, dtype=dtype))
    return view.transpose(1, 2) if layout_blhd else view
