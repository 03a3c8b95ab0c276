"""The CUDA C++ backend of the contrastive losses: the row passes of csrc/contrastive.cu through
``vlkernels._C``, as the ops ``vlkernels::cuda_contrastive_fwd`` / ``_bwd`` (schemas derived from
``contrastive.args``), and the loss composed from them (``contrastive/rows.py``). CLIP (smoothing,
negatives, distillation), SigLIP, max over queries on mma.sync tensor cores; CUDA tensors."""

from __future__ import annotations

from vlkernels import _dispatch, _extension
from vlkernels.contrastive import args as A
from vlkernels.contrastive import rows

_fwd_op = _extension.declare("cuda_contrastive_fwd", A.RowPass, A.FWD_RETURNS, A.fwd_fake)
_bwd_op = _extension.declare("cuda_contrastive_bwd", A.RowPassGrad, A.BWD_RETURNS, A.bwd_fake)

ROWS = _dispatch.Backend("cuda", _fwd_op, _bwd_op, _dispatch.EXTENSION)
BACKEND = _dispatch.Backend(
    "cuda", lambda a: rows.loss_forward(ROWS, a), lambda g: rows.loss_backward(ROWS, g), _dispatch.EXTENSION
)
