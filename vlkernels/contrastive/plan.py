"""Every launch decision of the Triton contrastive kernels, and its cost.

Decisions (``contrastive.triton`` takes them from here): the row passes' tiles and precision
(``blocks``), the backward's autotune candidates, how a backward program multiplies its
dLoss/dlogit tiles by the columns (``out_tiles``), the fused forward's band (``band``). The cost
model (``kernels``, ``gemm_flops``) states which kernels the fused loss launches and the GEMM
FLOPs of each launch from its grid and tile loops; benchmarks/bench_budget.py reads it and
tests/test_budget.py holds it to the launches and tl.dot calls the interpreter runs.
"""

from __future__ import annotations

import torch
import triton

from vlkernels._dispatch import interpreter_on
from vlkernels._triton_utils import cdiv, next_pow2

BWD_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
BWD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in ((64, 64, 8, 3), (64, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2))
]
BWD_KEY = ["M_KEY", "D", "KIND", "OWN", "OTHER", "IN_REGS", "PRECISION"]


def blocks(t: torch.Tensor) -> dict:
    """Tile sizes and precision of the row-pass kernels for features ``t`` [.., D]."""
    interp = interpreter_on()
    return dict(
        PRECISION="ieee" if t.dtype == torch.float32 else "tf32",
        UPCAST=interp and t.dtype == torch.bfloat16,
        BLOCK_M=32 if interp else 64,
        BLOCK_N=32 if interp else 64,
        BLOCK_D=min(64, next_pow2(t.shape[-1])),
    )


def out_tiles(queries: int, D: int) -> tuple[int, bool]:
    """(BLOCK_DO, IN_REGS) of a backward row pass over rows of ``queries`` queries and D features:
    the dR columns a program multiplies at a time, and whether one row's dR stays in registers
    (one query, D <= BLOCK_DO; else it is added up in an fp32 buffer, BLOCK_DO features at a
    time)."""
    block_do = min(32 if interpreter_on() else 64, next_pow2(D))
    return block_do, queries == 1 and D <= block_do


def band(N: int) -> int:
    """Rows (and columns) per program of the fused forward: a power of two, at least 16 bands a
    side when N allows (programs for every SM), at most 2048 (the column statistics the program
    keeps in registers). Under the interpreter: 64, so that small tests span several bands."""
    if interpreter_on():
        return 64
    return min(2048, max(256, next_pow2(N // 16)))


# ----------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------


def kernels(backward: bool = False) -> tuple[str, ...]:
    """The kernels one forward (or backward) of the fused loss launches (the backward: one row
    pass per direction, then the scale's and bias's gradients)."""
    if backward:
        return ("_ctr_bwd", "_ctr_bwd", "_loss_bwd_finish")
    return ("_loss_fwd_bands", "_loss_fwd_finish")


def gemm_flops(kernel: str, a: dict) -> int:
    """Executed GEMM FLOPs of one launch of ``kernel`` with arguments ``a`` (its autotune
    config's BLOCK_M / BLOCK_N included; features as the kernels' _Features), tile waste
    included: the tiles each program's loops visit, times their GEMMs."""
    if kernel in ("_loss_fwd_finish", "_loss_bwd_finish"):  # one program adding up statistics
        return 0
    BM, BN, BD, D = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_D"], a["D"]
    tile = 2 * BM * BN * BD  # one feature chunk of a similarity tile
    d_chunks = cdiv(D, BD)
    clip = a["KIND"] == 0
    if kernel == "_loss_fwd_bands":  # per program: the row tiles of its band x the column tiles
        X, NX, NY, N, width = a["X"], a["NX"], a["NY"], a["N"], a["BAND"]
        tiles = width // BN
        row_tiles = [cdiv(min(width, N - r), BM) for r in range(0, N, width)]
        flops = 0
        for cols, q in ((N, X.q), *(((NY.n, X.q), (NX.n, 1)) if clip else ())):
            col_tiles = sum(min(tiles, cdiv(cols - c, BN)) for c in range(0, cols, width))
            flops += sum(row_tiles) * col_tiles * q * d_chunks * tile
        return flops
    R, C, NEG = a["R"], a["C"], a["NEG"]
    programs = cdiv(a["M"], BM)
    main_tiles = cdiv(C.n, BN)
    if kernel == "_ctr_fwd":
        neg_tiles = cdiv(NEG.n, BN) if clip else 0
        sims = 1 + (a["RM"] is not None and clip)  # the momentum tile too (distillation)
        return programs * sims * (main_tiles * R.q * C.q + neg_tiles * R.q) * d_chunks * tile
    if kernel == "_ctr_bwd":  # each tile once; dR over every feature chunk
        own = a["OWN"]
        neg_tiles = cdiv(NEG.n, BN) if (clip and own) else 0
        sims = 1 + (a["RM"] is not None and clip and own)
        sim = (main_tiles * R.q * C.q + neg_tiles * R.q) * d_chunks * tile * sims
        out_chunks = 1 if a["IN_REGS"] else cdiv(D, a["BLOCK_DO"])
        grad_dots = (main_tiles * C.q + neg_tiles) if R.q == 1 else (main_tiles + neg_tiles) * R.q
        return programs * (sim + out_chunks * grad_dots * 2 * BM * BN * a["BLOCK_DO"])
    raise KeyError(kernel)
