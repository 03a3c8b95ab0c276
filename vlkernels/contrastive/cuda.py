"""The CUDA C++ backend of the contrastive row passes: csrc/contrastive.cu through
``vlkernels._C``, as the ops ``vlkernels::cuda_contrastive_fwd`` / ``_bwd`` (schemas derived from
``contrastive.args``). CLIP (smoothing, negatives, distillation), SigLIP, max over queries on
mma.sync tensor cores; CUDA tensors."""

from __future__ import annotations

from vlkernels import _dispatch, _extension
from vlkernels.contrastive import args as A

_fwd_op = _extension.declare("cuda_contrastive_fwd", A.RowPass, A.FWD_RETURNS, A.fwd_fake)
_bwd_op = _extension.declare("cuda_contrastive_bwd", A.RowPassGrad, A.BWD_RETURNS, A.bwd_fake)

BACKEND = _dispatch.Backend("cuda", _fwd_op, _bwd_op)
