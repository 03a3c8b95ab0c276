"""Flamingo's tanh-gated residual add ``x + tanh(gate) * y`` as one Triton kernel each way.

The gate is read on the device (no host synchronisation); the backward produces dy and the
gate's gradient (per-program partial sums, reduced on the device) in one pass. The eager
reference is ``vlkernels.reference.gated_residual_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlkernels import _dispatch
from vlkernels._triton_utils import LAUNCHES, poisoned
from vlkernels.reference import gated_residual_ref

BLOCK = 1024


@triton.jit
def _tanh(g):
    return 2.0 * tl.sigmoid(2.0 * g) - 1.0


@triton.jit
def _gated_fwd(X, Y, G, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t = _tanh(tl.load(G).to(tl.float32))
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x + t * y).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gated_bwd(DOUT, Y, G, DY, PARTIAL, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t = _tanh(tl.load(G).to(tl.float32))
    do = tl.load(DOUT + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DY + offs, (t * do).to(DY.dtype.element_ty), mask=ok)
    tl.store(PARTIAL + pid, tl.sum(do * y, axis=0))


@torch.library.custom_op("vlkernels::triton_gated_residual_fwd", mutates_args=())
def triton_gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + tanh(gate) * y for same-shape x, y and a one-element gate."""
    xf, yf = x.contiguous().view(-1), y.contiguous().view(-1)
    out = poisoned(torch.empty_like(xf))
    n = xf.numel()
    _gated_fwd[(triton.cdiv(n, BLOCK),)](xf, yf, gate, out, n, BLOCK=BLOCK)
    LAUNCHES["gated_residual_fwd"] += 1
    return out.view(x.shape)


@triton_gated_residual_fwd.register_fake
def _fwd_fake(x, y, gate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("vlkernels::triton_gated_residual_bwd", mutates_args=())
def triton_gated_residual_bwd(
    grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dgate) of x + tanh(gate) * y."""
    gf, yf = grad_out.contiguous().view(-1), y.contiguous().view(-1)
    n = gf.numel()
    programs = triton.cdiv(n, BLOCK)
    dy = poisoned(torch.empty_like(yf))
    partial = poisoned(y.new_empty(programs, dtype=torch.float32))
    _gated_bwd[(programs,)](gf, yf, gate, dy, partial, n, BLOCK=BLOCK)
    LAUNCHES["gated_residual_bwd"] += 1
    t = torch.tanh(gate.float())
    dgate = (partial.sum() * (1 - t * t)).to(gate.dtype).view(gate.shape)
    return dy.view(y.shape), dgate


@triton_gated_residual_bwd.register_fake
def _bwd_fake(grad_out, y, gate):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device), torch.empty_like(gate)


def _setup_context(ctx, inputs, output):
    _, y, gate = inputs
    ctx.save_for_backward(y, gate)


def _backward_with(bwd_op):
    def backward(ctx, grad_out):
        y, gate = ctx.saved_tensors
        dy, dgate = bwd_op(grad_out, y, gate)
        return grad_out, dy, dgate

    return backward


triton_gated_residual_fwd.register_autograd(
    _backward_with(torch.ops.vlkernels.triton_gated_residual_bwd), setup_context=_setup_context
)


def register_cuda_ops(ns: str) -> None:
    """Fake kernels and autograd of the CUDA C++ ops ``{ns}::attention_gated_residual_fwd/_bwd``
    (csrc/gated.cu)."""
    torch.library.register_fake(f"{ns}::attention_gated_residual_fwd")(_fwd_fake)
    torch.library.register_fake(f"{ns}::attention_gated_residual_bwd")(_bwd_fake)
    bwd = getattr(torch.ops, ns).attention_gated_residual_bwd
    torch.library.register_autograd(
        f"{ns}::attention_gated_residual_fwd", _backward_with(bwd), setup_context=_setup_context
    )


def gated_residual(x, y, gate, *, backend=None):
    """``x + tanh(gate) * y`` (Flamingo's gated residual). x, y [...] same shape; gate: one element."""
    for name, t in (("x", x), ("y", y), ("gate", gate)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gated_residual: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"gated_residual: {name} must be floating point, got {t.dtype}")
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(
            f"gated_residual: x and y must match, got {list(x.shape)} {x.dtype} and {list(y.shape)} {y.dtype}"
        )
    if gate.numel() != 1:
        raise ValueError(f"gated_residual: gate must have one element, got shape {list(gate.shape)}")
    if not (x.device == y.device == gate.device):
        raise ValueError(
            f"gated_residual: x, y, gate must be on one device, got {x.device}, {y.device}, {gate.device}"
        )
    chosen = _dispatch.choose(backend, x.device, "gated_residual")
    if chosen == "torch":
        return gated_residual_ref(x, y, gate)
    if chosen == "cuda":
        return _dispatch.cuda_ops().attention_gated_residual_fwd(x, y, gate)
    return triton_gated_residual_fwd(x, y, gate)
