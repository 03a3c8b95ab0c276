"""The CUDA C++ backend of the tanh-gated residual: csrc/gated.cu through ``vlkernels._C``, as
the ops ``vlkernels::cuda_gated_residual_fwd`` / ``_bwd``."""

from __future__ import annotations

from vlkernels import _dispatch, _extension
from vlkernels.gated import args as A

_fwd_op = _extension.declare("cuda_gated_residual_fwd", A.GatedResidualArgs, A.FWD_RETURNS, A.fwd_fake)
_bwd_op = _extension.declare("cuda_gated_residual_bwd", A.GatedResidualGradArgs, A.BWD_RETURNS, A.bwd_fake)

BACKEND = _dispatch.Backend("cuda", _fwd_op, _bwd_op, _dispatch.EXTENSION)
