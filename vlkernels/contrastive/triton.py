"""The Triton backend of the contrastive losses (see ``contrastive.args``): kernels, launchers and
the ops ``vlkernels::triton_contrastive_loss_fwd`` / ``_bwd`` (the loss on one device, fused) and
``vlkernels::triton_contrastive_fwd`` / ``_bwd`` (row passes: the ring, distillation). CLIP
(smoothing, negatives, distillation), SigLIP, max over queries; CUDA tensors, or CPU tensors under
the interpreter. Each logit tile lives in registers; nothing N×N is allocated.

The fused loss: forward, one pass over the logits in (row band, column band) programs gives both
directions' log-sum-exps (2·N²·D GEMM FLOPs) and a second, one-program kernel the loss; backward,
one pass per direction computes each logit tile once and multiplies it by the columns over the
whole feature dim (4·N²·D per pass), and a one-program kernel the scale's and bias's gradients.
Five launches, 10·N²·D FLOPs, no N×N buffer."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vlkernels import _dispatch, _schema
from vlkernels._triton_utils import LAUNCHES, autotuned, cdiv, next_pow2, poisoned
from vlkernels.contrastive import args as A
from vlkernels.contrastive import plan as P
from vlkernels.contrastive import rows


class _Features(NamedTuple):
    """A [n, Q, D] feature matrix as the kernels see it (a [K, D] one has Q = 1). Flat: Triton
    3.6 miscompiles a NamedTuple holding a tuple when both have fields specialised to constants."""

    ptr: torch.Tensor
    n: int
    q: int
    s_n: int
    s_q: int
    s_d: int


def _features(t: torch.Tensor | None, like: torch.Tensor) -> _Features:
    """``t`` for the kernels; an absent one is an empty matrix (n = 0) pointing at ``like``."""
    if t is None:
        return _Features(like, 0, 1, 0, 0, 0)
    t3 = t if t.dim() == 3 else t[:, None]
    return _Features(t3, t3.shape[0], t3.shape[1], *t3.stride())


_CLIP = tl.constexpr(int(A.LossKind.CLIP))  # the KIND the kernels compare with
# the rows of args.RowStats and the columns of args.ScaleBiasSums, by field name, as the kernels
# index them
_LSE, _POS, _TOT, _LSE_M, _WEIGHTED = (
    tl.constexpr(A.RowStats._fields.index(f)) for f in ("lse", "pos", "tot", "lse_m", "weighted")
)
_N_STATS = tl.constexpr(len(A.RowStats._fields))
_DS_COLS, _DB_COLS, _DS_NEG, _DB_NEG = (
    tl.constexpr(A.ScaleBiasSums._fields.index(f)) for f in ("ds_cols", "db_cols", "ds_neg", "db_neg")
)
_N_SUMS = tl.constexpr(len(A.ScaleBiasSums._fields))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Kernel signatures stay packed (the formatter would put each argument on its own line).
# fmt: off


@triton.jit
def _load(F, offs, qi, offs_d, D):
    """F[offs, qi, offs_d] ([len(offs), len(offs_d)]), 0 outside the matrix."""
    ptrs = F.ptr + offs[:, None] * F.s_n + qi * F.s_q + offs_d[None, :] * F.s_d
    return tl.load(ptrs, mask=(offs[:, None] < F.n) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _sim_tile(R, C, offs_m, offs_n, D, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sim[m, n] = max over (qr, qc) of R[m, qr, :] · C[n, qc, :] (fp32) and the arg-max index of
    whichever of R.q, C.q is > 1."""
    best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    for qr in range(0, R.q):
        for qc in range(0, C.q):
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                r = _load(R, offs_m, qr, d0 + offs_d, D)
                c = _load(C, offs_n, qc, d0 + offs_d, D)
                if UPCAST:
                    acc += tl.dot(r.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(r, tl.trans(c), input_precision=PRECISION)
            better = acc > best
            best = tl.where(better, acc, best)
            arg = tl.where(better, qr + qc, arg)
    return best, arg


@triton.jit
def _tile(R, C, NEG, offs_m, start_n, n_pad, D, row_off, col_off, PRECISION: tl.constexpr,
          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of columns [C ; NEG] that starts at ``start_n`` (the negatives start at n_pad):
    (sim [BLOCK_M, BLOCK_N], arg-max query index, column validity [BLOCK_N], positives)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if start_n < C.n:
        sim, arg = _sim_tile(R, C, offs_m, offs_n, D, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        col_ok = offs_n < C.n
        is_pos = (row_off + offs_m)[:, None] == (col_off + offs_n)[None, :]
    else:
        offs_k = offs_n - n_pad
        sim, arg = _sim_tile(R, NEG, offs_m, offs_k, D, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        col_ok = offs_k < NEG.n
        is_pos = (offs_m[:, None] < 0) & (offs_k[None, :] < 0)  # no positives among the negatives
    return sim, arg, col_ok, is_pos


@triton.jit
def _ctr_fwd(
    R, RM, C, NEG, SCALE, BIAS, OUT, M, D, row_off, col_off, KIND: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row statistics (args.RowStats) of rows R against columns [C ; NEG]; KIND an args.LossKind;
    RM (momentum rows) and BIAS may be None."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32) if BIAS is not None else 0.0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    tot = tl.zeros([BLOCK_M], tl.float32)
    mm_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lm_i = tl.zeros([BLOCK_M], tl.float32)
    wm_i = tl.zeros([BLOCK_M], tl.float32)
    n_pad = tl.cdiv(C.n, BLOCK_N) * BLOCK_N  # negatives start at the next tile after the columns
    n_cols = n_pad + NEG.n if KIND == _CLIP else C.n
    for start_n in range(0, n_cols, BLOCK_N):
        sim, _, col_ok, is_pos = _tile(R, C, NEG, offs_m, start_n, n_pad, D, row_off, col_off, PRECISION,
                                       UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        ok = row_ok[:, None] & col_ok[None, :]
        logit = s * sim + b
        if KIND == _CLIP:  # online log-sum-exp, sum of logits, positive logit
            m_i, l_i = _online(m_i, l_i, tl.where(ok, logit, float("-inf")), 1)
            tot += tl.sum(tl.where(ok, logit, 0.0), axis=1)
            pos += tl.sum(tl.where(ok & is_pos, logit, 0.0), axis=1)
            if RM is not None:  # momentum log-sum-exp and the logit sum weighted by the momentum softmax
                # (_online's update written out: its rescaling and terms also weight the logit sum)
                simm, _, _, _ = _tile(RM, C, NEG, offs_m, start_n, n_pad, D, row_off, col_off, PRECISION,
                                      UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
                mlog = tl.where(ok, s * simm, float("-inf"))
                mm_new = tl.maximum(mm_i, tl.max(mlog, axis=1))
                mm_safe = tl.where(mm_new == float("-inf"), 0.0, mm_new)
                alpha = tl.exp(mm_i - mm_safe)
                e = tl.exp(mlog - mm_safe[:, None])
                lm_i = lm_i * alpha + tl.sum(e, axis=1)
                wm_i = wm_i * alpha + tl.sum(tl.where(ok, e * logit, 0.0), axis=1)
                mm_i = mm_new
        else:  # -log sigmoid(eps * logit) = softplus(-eps * logit)
            z = tl.where(is_pos, -logit, logit)
            sp = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            tot += tl.sum(tl.where(ok, sp, 0.0), axis=1)
    lse = _lse(m_i, l_i)
    lsem = _lse(mm_i, lm_i)
    wm = wm_i / tl.where(lm_i > 0, lm_i, 1.0)
    tl.store(OUT + _LSE * M + offs_m, lse, mask=row_ok)
    tl.store(OUT + _POS * M + offs_m, pos, mask=row_ok)
    tl.store(OUT + _TOT * M + offs_m, tot, mask=row_ok)
    tl.store(OUT + _LSE_M * M + offs_m, lsem, mask=row_ok)
    tl.store(OUT + _WEIGHTED * M + offs_m, wm, mask=row_ok)


@triton.jit
def _dot_g(g, c, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """g [BLOCK_M, BLOCK_N] fp32 (dLoss/dlogit) @ c [BLOCK_N, d], fp32 accumulation."""
    if UPCAST:
        return tl.dot(g, c.to(tl.float32), input_precision="ieee")
    return tl.dot(g.to(c.dtype), c, input_precision=PRECISION)


@triton.jit
def _add_to(ACC, offs_m, qr, Q, offs_do, D, part, keep, ok):
    """ACC[rows, qr, offs_do] = part, plus what it held when ``keep`` (not on the first tile): an
    fp32 [M, Q, D] scratch. (A masked load, not a branch: Triton 3.6's pipeliner fails on the
    branch.)"""
    ptrs = ACC + (offs_m[:, None] * Q + qr) * D + offs_do[None, :]
    prev = tl.load(ptrs, mask=ok & keep, other=0.0)
    tl.store(ptrs, prev + part, mask=ok)


@triton.jit
def _bwd_columns(R, RM, C, ACC, dr, sums, offs_m, row_ok, start_n, s, b, lse_row, lsem_row, LSE_COL, D,
                 row_off, col_off, w_own, w_other, smooth, n_cls_own, n_cls_other, alpha, KIND: tl.constexpr,
                 OWN: tl.constexpr, OTHER: tl.constexpr, WHICH: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DO: tl.constexpr, IN_REGS: tl.constexpr):
    """The column tile of C (WHICH 0: the columns, 1: the negatives) that starts at ``start_n``: its
    logits once, dLoss/dlogit g, the sums of g · sim and of g into ``sums`` [BLOCK_M, 4]
    (args.ScaleBiasSums: ds, db of the columns or of the negatives), and g @ C into dR (``dr`` in
    registers, or ACC). Returns (dr, sums)."""
    MAIN: tl.constexpr = WHICH == 0
    keep = (start_n > 0) if MAIN else True  # ACC holds earlier tiles' sums
    offs_n = start_n + tl.arange(0, BLOCK_N)
    ok = row_ok[:, None] & (offs_n < C.n)[None, :]
    sim, arg = _sim_tile(R, C, offs_m, offs_n, D, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    logit = s * sim + b
    if MAIN:
        pos_f = ((row_off + offs_m)[:, None] == (col_off + offs_n)[None, :]).to(tl.float32)
    else:  # no positives among the negatives
        pos_f = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if KIND == _CLIP:
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if OWN:  # softmax over the row minus the row's target
            if RM is not None:
                simm, _ = _sim_tile(RM, C, offs_m, offs_n, D, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
                target = alpha * tl.exp(s * simm - lsem_row[:, None]) + (1.0 - alpha) * pos_f
            else:
                target = (1.0 - smooth) * pos_f + smooth / n_cls_own
            g += w_own * (tl.exp(logit - lse_row[:, None]) - target)
        if OTHER and MAIN:  # the other direction's term: softmax over the column (columns only)
            lse_col = tl.load(LSE_COL + offs_n, mask=offs_n < C.n, other=0.0)
            target = (1.0 - smooth) * pos_f + smooth / n_cls_other
            g += w_other * (tl.exp(logit - lse_col[None, :]) - target)
    else:
        eps = 2.0 * pos_f - 1.0
        g = w_own * (-eps * tl.sigmoid(-eps * logit))
    g = tl.where(ok, g, 0.0)
    col = tl.arange(0, _N_SUMS)[None, :]
    sums += tl.where(col == (_DS_COLS if MAIN else _DS_NEG), tl.sum(g * sim, axis=1)[:, None], 0.0)
    sums += tl.where(col == (_DB_COLS if MAIN else _DB_NEG), tl.sum(g, axis=1)[:, None], 0.0)
    # dR += g @ C, each (row, column) pair's gradient to the arg-max query of whichever side has several
    if IN_REGS:
        offs_do = tl.arange(0, BLOCK_DO)
        for qc in range(0, C.q):
            c = _load(C, offs_n, qc, offs_do, D)
            dr += _dot_g(tl.where(arg == qc, g, 0.0), c, PRECISION, UPCAST)
    else:
        for d0 in range(0, D, BLOCK_DO):
            offs_do = d0 + tl.arange(0, BLOCK_DO)
            out_ok = row_ok[:, None] & (offs_do < D)[None, :]
            if R.q == 1:
                part = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
                for qc in range(0, C.q):
                    c = _load(C, offs_n, qc, offs_do, D)
                    part += _dot_g(tl.where(arg == qc, g, 0.0), c, PRECISION, UPCAST)
                _add_to(ACC, offs_m, 0, 1, offs_do, D, part, keep, out_ok)
            else:
                c = _load(C, offs_n, 0, offs_do, D)
                for qr in range(0, R.q):
                    part = _dot_g(tl.where(arg == qr, g, 0.0), c, PRECISION, UPCAST)
                    _add_to(ACC, offs_m, qr, R.q, offs_do, D, part, keep, out_ok)
    return dr, sums


@autotuned(P.BWD_CONFIGS, P.BWD_KEY, P.BWD_INTERPRET)
@triton.jit
def _ctr_bwd(
    R, RM, C, NEG, SCALE, BIAS, GOUT, LSE_ROW, LSEM_ROW, LSE_COL, DR, sdr, ACC, DSB, M, D, row_off, col_off,
    w_own, w_other, smooth, n_cls_own, n_cls_other, alpha, M_KEY, KIND: tl.constexpr, OWN: tl.constexpr,
    OTHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, IN_REGS: tl.constexpr,
):
    """dLoss/dR of this program's rows. Each logit tile of [C ; NEG] is computed once, turned into
    dLoss/dlogit and multiplied by the columns over the whole feature dim: in registers when
    IN_REGS (one query per row, D <= BLOCK_DO), else added up, BLOCK_DO features at a time, in
    ACC, an fp32 [M, R.q, D] scratch whose rows belong to this program. Per-row sums of
    dLoss/dlogit · sim and of dLoss/dlogit, over the columns and over the negatives, go to DSB
    [M, 4]. The gradients are scaled by the loss's gradient GOUT, when given (DSB is not)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32) if BIAS is not None else 0.0
    lse_row = tl.load(LSE_ROW + offs_m, mask=row_ok, other=0.0)
    lsem_row = tl.load(LSEM_ROW + offs_m, mask=row_ok, other=0.0) if RM is not None else lse_row
    dr = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    sums = tl.zeros([BLOCK_M, _N_SUMS], tl.float32)
    for which in tl.static_range(2):  # the columns, then the negatives (CLIP's own direction only)
        if which == 0 or (KIND == _CLIP and OWN):
            COLS = C if which == 0 else NEG
            for start_n in range(0, COLS.n, BLOCK_N):
                dr, sums = _bwd_columns(R, RM, COLS, ACC, dr, sums, offs_m, row_ok, start_n, s, b, lse_row,
                                        lsem_row, LSE_COL, D, row_off, col_off, w_own, w_other, smooth,
                                        n_cls_own, n_cls_other, alpha, KIND, OWN, OTHER, which, PRECISION,
                                        UPCAST, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO, IN_REGS)
    gs = s * tl.load(GOUT).to(tl.float32) if GOUT is not None else s
    if IN_REGS:
        offs_do = tl.arange(0, BLOCK_DO)
        out_ok = row_ok[:, None] & (offs_do < D)[None, :]
        tl.store(DR + offs_m[:, None] * sdr[0] + offs_do[None, :] * sdr[2], (gs * dr).to(DR.dtype.element_ty),
                 mask=out_ok)
    else:
        for qr in range(0, R.q):
            for d0 in range(0, D, BLOCK_DO):
                offs_do = d0 + tl.arange(0, BLOCK_DO)
                out_ok = row_ok[:, None] & (offs_do < D)[None, :]
                acc_ptrs = ACC + (offs_m[:, None] * R.q + qr) * D + offs_do[None, :]
                acc = tl.load(acc_ptrs, mask=out_ok, other=0.0)
                tl.store(DR + offs_m[:, None] * sdr[0] + qr * sdr[1] + offs_do[None, :] * sdr[2],
                         (gs * acc).to(DR.dtype.element_ty), mask=out_ok)
    tl.store(DSB + offs_m[:, None] * _N_SUMS + tl.arange(0, _N_SUMS)[None, :], sums, mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# The loss on one device, fused: one pass over the logits forward, one per direction backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lse(m, l):
    return tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))


@triton.jit
def _online(m, l, x, axis: tl.constexpr):
    """The online log-sum-exp (m, l) of a block of logits x (-inf: absent) merged along ``axis``."""
    m_new = tl.maximum(m, tl.max(x, axis=axis))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if axis == 1:
        l_new = l * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
    else:
        l_new = l * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[None, :]), axis=0)
    return m_new, l_new


@triton.jit
def _rows_against(R, C, S, TOT, slot, row0, row_end, col0, col_end, s, b, D, N, SMOOTH: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, TILES: tl.constexpr):
    """Rows [row0, row_end) of R against columns [col0, col_end) of C (a band of negatives): the
    log-sum-exp (and with SMOOTH the sum) of each row's logits into S[slot] (TOT[slot]), [*, N]."""
    for r0 in range(row0, row_end, BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_end
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        t_i = tl.zeros([BLOCK_M], tl.float32)
        for t in range(0, TILES):
            offs_n = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
            if col0 + t * BLOCK_N < col_end:
                ok = row_ok[:, None] & (offs_n < col_end)[None, :]
                sim, _ = _sim_tile(R, C, offs_m, offs_n, D, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
                logit = s * sim + b
                m_i, l_i = _online(m_i, l_i, tl.where(ok, logit, float("-inf")), 1)
                if SMOOTH:
                    t_i += tl.sum(tl.where(ok, logit, 0.0), axis=1)
        tl.store(S + slot * N + offs_m, _lse(m_i, l_i), mask=row_ok)
        if SMOOTH:
            tl.store(TOT + slot * N + offs_m, t_i, mask=row_ok)


_BANDS_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
_BANDS_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in ((64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3))
]


@autotuned(_BANDS_CONFIGS, ["N_KEY", "D", "KIND", "SMOOTH"], _BANDS_INTERPRET)
@triton.jit
def _loss_fwd_bands(
    X, Y, NX, NY, SCALE, BIAS, PX, PY, TX, TY, POS, SIGP, N, D, N_BANDS, N_NX, N_NY, N_KEY,
    KIND: tl.constexpr, SMOOTH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One pass over the logits s·sim(x_i, y_j) + b of both directions. Program (rb, cb) of the
    first N_BANDS² takes rows [rb·BAND, ...) of X against columns [cb·BAND, ...) of Y: the
    log-sum-exp of each row over the band into PX[cb] and, kept in registers across the rows, of
    each column into PY[rb] (the text direction's rows); the positives into POS; SigLIP: the sum
    of -log sigmoid(±logit) into SIGP[program]. The programs after them take rows of X against a
    band of NY (PX[N_BANDS + band]) and rows of Y against a band of NX (PY[N_BANDS + band])."""
    TILES: tl.constexpr = BAND // BLOCK_N
    pid = tl.program_id(0)
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32) if BIAS is not None else 0.0
    n_main = N_BANDS * N_BANDS
    if pid < n_main:
        rb = pid // N_BANDS
        cb = pid % N_BANDS
        row_end = tl.minimum(rb * BAND + BAND, N)
        tsel = tl.arange(0, TILES)
        cm = tl.full([TILES, BLOCK_N], float("-inf"), tl.float32)
        cl = tl.zeros([TILES, BLOCK_N], tl.float32)
        ct = tl.zeros([TILES, BLOCK_N], tl.float32)
        sig = tl.zeros([BLOCK_M], tl.float32)
        for r0 in range(rb * BAND, row_end, BLOCK_M):
            offs_m = r0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            t_i = tl.zeros([BLOCK_M], tl.float32)
            for t in range(0, TILES):
                offs_n = cb * BAND + t * BLOCK_N + tl.arange(0, BLOCK_N)
                if cb * BAND + t * BLOCK_N < N:
                    ok = row_ok[:, None] & (offs_n < N)[None, :]
                    sim, _ = _sim_tile(X, Y, offs_m, offs_n, D, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
                    logit = s * sim + b
                    diag = ok & (offs_m[:, None] == offs_n[None, :])
                    if KIND == _CLIP:
                        lm = tl.where(ok, logit, float("-inf"))
                        m_i, l_i = _online(m_i, l_i, lm, 1)
                        sel = tsel[:, None] == t  # this tile's columns among the band's
                        cm_t, cl_t = _online(tl.max(tl.where(sel, cm, float("-inf")), axis=0),
                                             tl.sum(tl.where(sel, cl, 0.0), axis=0), lm, 0)
                        cm = tl.where(sel, cm_t[None, :], cm)
                        cl = tl.where(sel, cl_t[None, :], cl)
                        if SMOOTH:
                            zl = tl.where(ok, logit, 0.0)
                            t_i += tl.sum(zl, axis=1)
                            ct = tl.where(sel, ct + tl.sum(zl, axis=0)[None, :], ct)
                        has = tl.max(diag.to(tl.int32), axis=1) > 0
                        tl.store(POS + offs_m, tl.sum(tl.where(diag, logit, 0.0), axis=1), mask=has)
                    else:  # -log sigmoid(eps * logit) = softplus(-eps * logit)
                        z = tl.where(diag, -logit, logit)
                        sp = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
                        sig += tl.sum(tl.where(ok, sp, 0.0), axis=1)
            if KIND == _CLIP:
                tl.store(PX + cb * N + offs_m, _lse(m_i, l_i), mask=row_ok)
                if SMOOTH:
                    tl.store(TX + cb * N + offs_m, t_i, mask=row_ok)
        if KIND == _CLIP:
            offs_c = cb * BAND + tsel[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tl.store(PY + rb * N + offs_c, _lse(cm, cl), mask=offs_c < N)
            if SMOOTH:
                tl.store(TY + rb * N + offs_c, ct, mask=offs_c < N)
        else:
            tl.store(SIGP + pid, tl.sum(sig, axis=0))
    elif pid < n_main + N_BANDS * N_NY:  # image rows against a band of the text queue
        j = pid - n_main
        rb = j // N_NY
        nb = j % N_NY
        _rows_against(X, NY, PX, TX, N_BANDS + nb, rb * BAND, tl.minimum(rb * BAND + BAND, N), nb * BAND,
                      tl.minimum(nb * BAND + BAND, NY.n), s, b, D, N, SMOOTH, PRECISION, UPCAST, BLOCK_M,
                      BLOCK_N, BLOCK_D, TILES)
    else:  # text rows against a band of the image queue
        j = pid - n_main - N_BANDS * N_NY
        rb = j // N_NX
        nb = j % N_NX
        _rows_against(Y, NX, PY, TY, N_BANDS + nb, rb * BAND, tl.minimum(rb * BAND + BAND, N), nb * BAND,
                      tl.minimum(nb * BAND + BAND, NX.n), s, b, D, N, SMOOTH, PRECISION, UPCAST, BLOCK_M,
                      BLOCK_N, BLOCK_D, TILES)


@triton.jit
def _lse_of_slots(P, slots, N, offs, ok):
    """log-sum-exp over the partial log-sum-exps P[0..slots) of the rows ``offs``."""
    m = tl.full(offs.shape, float("-inf"), tl.float32)
    l = tl.zeros(offs.shape, tl.float32)
    for k in range(0, slots):
        p = tl.load(P + k * N + offs, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, p)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - safe) + tl.exp(p - safe)
        m = m_new
    return _lse(m, l)


@triton.jit
def _sum_of_slots(P, slots, N, offs, ok):
    acc = tl.zeros(offs.shape, tl.float32)
    for k in range(0, slots):
        acc += tl.load(P + k * N + offs, mask=ok, other=0.0)
    return acc


@triton.jit
def _store_stats(STATS, direction, N, offs, ok, lse, pos, tot):
    """RowStats (lse, pos, tot, lse_m = 0, weighted = 0) of one direction's rows into STATS [2, 5, N]."""
    base = STATS + direction * _N_STATS * N + offs
    tl.store(base + _LSE * N, lse, mask=ok)
    tl.store(base + _POS * N, pos, mask=ok)
    tl.store(base + _TOT * N, tot, mask=ok)
    tl.store(base + _LSE_M * N, tl.zeros_like(lse), mask=ok)
    tl.store(base + _WEIGHTED * N, tl.zeros_like(lse), mask=ok)


@triton.jit
def _loss_fwd_finish(PX, PY, TX, TY, POS, SIGP, STATS, LOSS, N, SX, SY, n_sig, n_cls_x, n_cls_y, smooth,
                     KIND: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    """One program: each row's statistics from the partials (STATS [2, 5, N]: RowStats of the image
    rows, then of the text rows) and the loss, summed in a fixed order (deterministic)."""
    acc = tl.zeros([BLOCK], tl.float32)
    if KIND == _CLIP:
        for r0 in range(0, N, BLOCK):
            offs = r0 + tl.arange(0, BLOCK)
            ok = offs < N
            pos = tl.load(POS + offs, mask=ok, other=0.0)
            lse_x = _lse_of_slots(PX, SX, N, offs, ok)
            lse_y = _lse_of_slots(PY, SY, N, offs, ok)
            tot_x = _sum_of_slots(TX, SX, N, offs, ok) if SMOOTH else tl.zeros([BLOCK], tl.float32)
            tot_y = _sum_of_slots(TY, SY, N, offs, ok) if SMOOTH else tl.zeros([BLOCK], tl.float32)
            loss_x = lse_x - (1.0 - smooth) * pos - smooth * tot_x / n_cls_x
            loss_y = lse_y - (1.0 - smooth) * pos - smooth * tot_y / n_cls_y
            acc += tl.where(ok, loss_x + loss_y, 0.0)
            _store_stats(STATS, 0, N, offs, ok, lse_x, pos, tot_x)
            _store_stats(STATS, 1, N, offs, ok, lse_y, pos, tot_y)
        tl.store(LOSS, 0.5 * tl.sum(acc, axis=0) / N)
    else:
        for k0 in range(0, n_sig, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            acc += tl.load(SIGP + offs, mask=offs < n_sig, other=0.0)
        tl.store(LOSS, tl.sum(acc, axis=0) / N)


@triton.jit
def _loss_bwd_finish(DSBX, DSBY, GOUT, DS, DB, N, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the scale's and bias's gradients from both backward passes' per-row sums. The
    N x N block's terms are counted once (the first pass has both directions'); the negatives'
    of each pass count."""
    ds = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    for r0 in range(0, N, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        ok = offs < N
        ds += tl.load(DSBX + offs * _N_SUMS + _DS_COLS, mask=ok, other=0.0)
        db += tl.load(DSBX + offs * _N_SUMS + _DB_COLS, mask=ok, other=0.0)
        ds += tl.load(DSBX + offs * _N_SUMS + _DS_NEG, mask=ok, other=0.0)
        db += tl.load(DSBX + offs * _N_SUMS + _DB_NEG, mask=ok, other=0.0)
        if KIND == _CLIP:
            ds += tl.load(DSBY + offs * _N_SUMS + _DS_NEG, mask=ok, other=0.0)
            db += tl.load(DSBY + offs * _N_SUMS + _DB_NEG, mask=ok, other=0.0)
    g = tl.load(GOUT).to(tl.float32)
    tl.store(DS, (g * tl.sum(ds, axis=0)).to(DS.dtype.element_ty))
    tl.store(DB, (g * tl.sum(db, axis=0)).to(DB.dtype.element_ty))


# fmt: on


# ----------------------------------------------------------------------------------------------
# Launchers and ops
# ----------------------------------------------------------------------------------------------


def _operands(a: A.RowPass) -> dict:
    """The kernel arguments both row passes share, from the row pass's arguments."""
    return dict(
        R=_features(a.rows, a.rows),
        RM=None if a.rows_m is None else _features(a.rows_m, a.rows),
        C=_features(a.cols, a.rows),
        NEG=_features(a.neg, a.rows),
        SCALE=a.scale,
        BIAS=a.bias,
        M=a.rows.shape[0],
        D=a.rows.shape[-1],
        row_off=a.row_off,
        col_off=a.col_off,
        KIND=int(A.LossKind[a.kind.upper()]),
        **P.blocks(a.rows),
    )


def _forward(a: A.RowPass) -> torch.Tensor:
    op = _operands(a)
    out = poisoned(A.fwd_fake(a))
    _ctr_fwd[(cdiv(op["M"], op["BLOCK_M"]),)](OUT=out, **op)
    LAUNCHES["contrastive_fwd"] += 1
    return out


def _row_grad(g: A.RowPassGrad, dr: torch.Tensor, gout: torch.Tensor | None) -> torch.Tensor:
    """Launch the backward row pass: dLoss/drows into ``dr`` [M, QR, D] (times ``gout`` when given);
    returns the per-row scale/bias sums [M, 4]."""
    a = g.fwd
    op = {k: v for k, v in _operands(a).items() if k not in ("BLOCK_M", "BLOCK_N")}  # autotuned
    M, QR, D = a.rows.shape
    block_do, in_regs = P.out_tiles(QR, D)
    acc = a.rows if in_regs else a.rows.new_empty(a.rows.shape, dtype=torch.float32)
    dsb = poisoned(a.rows.new_empty((M, len(A.ScaleBiasSums._fields)), dtype=torch.float32))
    _ctr_bwd[lambda meta: (cdiv(M, meta["BLOCK_M"]),)](
        GOUT=gout,
        LSE_ROW=g.lse_row,
        LSEM_ROW=g.lsem_row,
        LSE_COL=g.lse_col,
        DR=dr,
        sdr=dr.stride(),
        ACC=acc,
        DSB=dsb,
        w_own=g.w_own,
        w_other=g.w_other,
        smooth=g.smooth,
        n_cls_own=g.n_cls_own,
        n_cls_other=g.n_cls_other,
        alpha=g.alpha,
        OWN=g.own,
        OTHER=g.other,
        M_KEY=next_pow2(M),
        BLOCK_DO=block_do,
        IN_REGS=in_regs,
        **op,
    )
    return dsb


def _backward(g: A.RowPassGrad) -> tuple[torch.Tensor, torch.Tensor]:
    dr = poisoned(torch.empty_like(g.fwd.rows))
    dsb = _row_grad(g, dr, None)
    LAUNCHES["contrastive_bwd"] += 1
    return dr, dsb.sum(0)


_fwd_op = _schema.python_op(
    "vlkernels::triton_contrastive_fwd", A.RowPass, A.FWD_RETURNS, _forward, A.fwd_fake
)
_bwd_op = _schema.python_op(
    "vlkernels::triton_contrastive_bwd", A.RowPassGrad, A.BWD_RETURNS, _backward, A.bwd_fake
)

ROWS = _dispatch.Backend("triton", _fwd_op, _bwd_op, _dispatch.TRITON)


def _loss_forward(a: A.LossArgs) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = a.y.shape
    clip = a.kind == "clip"
    smooth = clip and a.smooth > 0
    X, Y = _features(a.x, a.y), _features(a.y, a.y)
    NX, NY = _features(a.neg_x, a.y), _features(a.neg_y, a.y)
    band = P.band(N)
    n_bands, n_nx, n_ny = (cdiv(n, band) for n in (N, NX.n, NY.n))
    f32 = dict(dtype=torch.float32)
    px = a.y.new_empty((n_bands + n_ny, N), **f32)
    py = a.y.new_empty((n_bands + n_nx, N), **f32)
    tx, ty = (torch.empty_like(p) for p in (px, py)) if smooth else (px, py)
    pos = a.y.new_empty(N, **f32)
    sigp = a.y.new_empty(n_bands * n_bands, **f32)
    stats, loss = (poisoned(t) for t in A.loss_fwd_fake(a)[::-1])
    kind = int(A.LossKind[a.kind.upper()])
    blocks = {k: v for k, v in P.blocks(a.y).items() if k in ("PRECISION", "UPCAST", "BLOCK_D")}
    programs = n_bands * n_bands + (n_bands * (n_nx + n_ny) if clip else 0)
    # fmt: off
    _loss_fwd_bands[(programs,)](
        X, Y, NX, NY, a.scale, a.bias, px, py, tx, ty, pos, sigp, N, D, n_bands, n_nx, n_ny,
        N_KEY=next_pow2(N), KIND=kind, SMOOTH=smooth, BAND=band, **blocks,
    )
    _loss_fwd_finish[(1,)](
        px, py, tx, ty, pos, sigp, stats, loss, N, n_bands + n_ny, n_bands + n_nx, n_bands * n_bands,
        N + NY.n, N + NX.n, float(a.smooth), KIND=kind, SMOOTH=smooth, BLOCK=1024,
    )
    # fmt: on
    LAUNCHES["contrastive_fwd"] += 1
    return loss, stats


def _loss_backward(g: A.LossGradArgs) -> tuple[torch.Tensor, ...]:
    a = g.fwd
    N = a.y.shape[0]
    clip = a.kind == "clip"
    w = 0.5 / N if clip else 1.0 / N
    x3, y3 = _features(a.x, a.y).ptr, _features(a.y, a.y).ptr
    lse_x, lse_y = g.stats[0, 0], g.stats[1, 0]
    kx, ky = (0 if t is None else t.shape[0] for t in (a.neg_x, a.neg_y))
    dx, dy = (poisoned(torch.empty_like(t)) for t in (a.x, a.y))
    terms = dict(other=clip, w_own=w, w_other=w if clip else 0.0, smooth=a.smooth if clip else 0.0)
    img = A.RowPass(x3, y3, a.scale, a.bias, neg=a.neg_y, kind=a.kind)
    txt = A.RowPass(y3, x3, a.scale, a.bias, neg=a.neg_x, kind=a.kind)
    img_grad = A.RowPassGrad(img, lse_x, lse_col=lse_y, n_cls_own=N + ky, n_cls_other=N + kx, **terms)
    txt_grad = A.RowPassGrad(txt, lse_y, lse_col=lse_x, n_cls_own=N + kx, n_cls_other=N + ky, **terms)
    dsb_x = _row_grad(img_grad, dx if dx.dim() == 3 else dx[:, None], g.grad_loss)
    dsb_y = _row_grad(txt_grad, dy[:, None], g.grad_loss)
    d_scale = torch.empty_like(a.scale)
    d_bias = torch.empty_like(a.bias if a.bias is not None else a.scale)
    _loss_bwd_finish[(1,)](
        dsb_x, dsb_y, g.grad_loss, d_scale, d_bias, N, KIND=int(A.LossKind[a.kind.upper()]), BLOCK=1024
    )
    LAUNCHES["contrastive_bwd"] += 1
    return dx, dy, d_scale, d_bias


_loss_fwd_op = _schema.python_op(
    "vlkernels::triton_contrastive_loss_fwd", A.LossArgs, A.LOSS_FWD_RETURNS, _loss_forward, A.loss_fwd_fake
)
_loss_bwd_op = _schema.python_op(
    "vlkernels::triton_contrastive_loss_bwd",
    A.LossGradArgs,
    A.LOSS_BWD_RETURNS,
    _loss_backward,
    A.loss_bwd_fake,
)


def _forward_loss(a: A.LossArgs):
    """The fused kernels; with distillation, the row passes (the fused kernels have no momentum
    targets)."""
    return rows.loss_forward(ROWS, a) if a.xm is not None else _loss_fwd_op(a)


def _backward_loss(g: A.LossGradArgs):
    return rows.loss_backward(ROWS, g) if g.fwd.xm is not None else _loss_bwd_op(g)


BACKEND = _dispatch.Backend("triton", _forward_loss, _backward_loss, _dispatch.TRITON)
