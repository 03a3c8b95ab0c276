"""Flamingo's tanh-gated residual ``x + tanh(gate) * y``, one kernel each way.

How a call flows: ``api.gated_residual`` (checks) -> ``_dispatch.choose`` ->
``autograd.GatedResidualFunction`` -> the backend's ``forward`` / ``backward`` (``triton.py``,
``cuda.py``, ``torch.py``). ``args.py`` declares the kernel arguments once.
"""

from vlkernels import _dispatch
from vlkernels.gated import cuda, torch, triton
from vlkernels.gated.api import gated_residual

for _backend in (triton.BACKEND, cuda.BACKEND, torch.BACKEND):
    _dispatch.register("gated_residual", _backend)

__all__ = ["gated_residual"]
