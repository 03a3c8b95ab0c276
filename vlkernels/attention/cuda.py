"""The CUDA C++ backend of attention: csrc/attention.cu through ``vlkernels._C``, as the ops
``vlkernels::cuda_attention_fwd`` / ``_bwd`` (schemas derived from ``attention.args``). Every mask,
shared queries, grouped keys on mma.sync tensor cores; fp16, bf16, fp32; CUDA tensors."""

from __future__ import annotations

from vlkernels import _dispatch, _extension
from vlkernels.attention import args as A

_fwd_op = _extension.declare("cuda_attention_fwd", A.AttentionArgs, A.FWD_RETURNS, A.fwd_fake)
_bwd_op = _extension.declare("cuda_attention_bwd", A.AttentionGradArgs, A.BWD_RETURNS, A.bwd_fake)

BACKEND = _dispatch.Backend("cuda", _fwd_op, _bwd_op)
