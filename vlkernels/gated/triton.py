"""The Triton backend of the tanh-gated residual: one kernel forward, two backward (launch
decisions: ``plan.py``); the gate is read on the device (no host synchronisation). The backward
writes dy and per-program partial sums of ``Σ dout·y``; a one-program kernel reduces them into the
gate's gradient, ``Σ·(1 − tanh²)``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlkernels import _dispatch, _schema
from vlkernels._triton_utils import LAUNCHES, poisoned, tanh
from vlkernels.gated import args as A
from vlkernels.gated import plan as P


@triton.jit
def _gated_fwd(X, Y, G, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t = tanh(tl.load(G).to(tl.float32))
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x + t * y).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gated_bwd(DOUT, Y, G, DY, PARTIAL, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t = tanh(tl.load(G).to(tl.float32))
    do = tl.load(DOUT + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DY + offs, (t * do).to(DY.dtype.element_ty), mask=ok)
    tl.store(PARTIAL + pid, tl.sum(do * y, axis=0))


@triton.jit
def _gated_dgate(PARTIAL, G, DG, N_PARTIAL, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(0, N_PARTIAL, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(PARTIAL + offs, mask=offs < N_PARTIAL, other=0.0)
    t = tanh(tl.load(G).to(tl.float32))
    tl.store(DG, (tl.sum(acc, axis=0) * (1.0 - t * t)).to(DG.dtype.element_ty))


def _forward(a: A.GatedResidualArgs) -> torch.Tensor:
    xf, yf = a.x.contiguous().view(-1), a.y.contiguous().view(-1)
    out = poisoned(torch.empty_like(xf))
    n = xf.numel()
    _gated_fwd[(P.programs(n),)](xf, yf, a.gate, out, n, BLOCK=P.BLOCK)
    LAUNCHES["gated_residual_fwd"] += 1
    return out.view(a.x.shape)


def _backward(g: A.GatedResidualGradArgs) -> tuple[torch.Tensor, torch.Tensor]:
    gf, yf = g.grad_out.contiguous().view(-1), g.y.contiguous().view(-1)
    n = gf.numel()
    programs = P.programs(n)
    dy = poisoned(torch.empty_like(yf))
    partial = poisoned(g.y.new_empty(programs, dtype=torch.float32))
    dgate = poisoned(torch.empty_like(g.gate))
    _gated_bwd[(programs,)](gf, yf, g.gate, dy, partial, n, BLOCK=P.BLOCK)
    _gated_dgate[(1,)](partial, g.gate, dgate, programs, BLOCK=P.BLOCK)
    LAUNCHES["gated_residual_bwd"] += 1
    return dy.view(g.y.shape), dgate


_fwd_op = _schema.python_op(
    "vlkernels::triton_gated_residual_fwd", A.GatedResidualArgs, A.FWD_RETURNS, _forward, A.fwd_fake
)
_bwd_op = _schema.python_op(
    "vlkernels::triton_gated_residual_bwd", A.GatedResidualGradArgs, A.BWD_RETURNS, _backward, A.bwd_fake
)

BACKEND = _dispatch.Backend("triton", _fwd_op, _bwd_op, _dispatch.TRITON)
