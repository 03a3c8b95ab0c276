"""Every launch decision of the tanh-gated residual's Triton kernels, and its cost.

The kernels are elementwise over the flattened, contiguous tensors: ``BLOCK`` elements per program,
``programs(n)`` programs; the backward's programs each write one partial sum of ``Σ dout·y`` that a
one-program kernel reduces. The cost model (``kernels``, ``hbm_bytes``) states which kernels a
forward or backward launches and the bytes they move; benchmarks/bench_budget.py reads it and
holds it to the launches that ran.
"""

from __future__ import annotations

from vlkernels._triton_utils import cdiv

BLOCK = 1024  # elements per program (and partial sums per step of the reduction)


def programs(n: int) -> int:
    """Programs of the forward and of the backward's first kernel over ``n`` elements."""
    return cdiv(n, BLOCK)


def kernels(backward: bool = False) -> tuple[str, ...]:
    """The kernels one forward (or backward) launches."""
    return ("_gated_bwd", "_gated_dgate") if backward else ("_gated_fwd",)


def hbm_bytes(n: int, element_size: int) -> tuple[int, int]:
    """HBM bytes of a forward and a backward over ``n`` elements of ``element_size`` bytes: x and y
    read, out written; dout and y read, dy written, the fp32 partial sums written and read back
    (the gate's few bytes left out)."""
    return 3 * n * element_size, 3 * n * element_size + 2 * 4 * programs(n)
