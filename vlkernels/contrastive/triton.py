"""The Triton backend of the contrastive row passes (see ``contrastive.args``): kernels, launchers
and the ``vlkernels::triton_contrastive_fwd`` / ``_bwd`` ops. CLIP (smoothing, negatives,
distillation), SigLIP, max over queries; CUDA tensors, or CPU tensors under the interpreter. Each
logit tile lives in registers; nothing N×N is allocated."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vlkernels import _dispatch, _schema
from vlkernels._triton_utils import LAUNCHES, next_pow2, poisoned
from vlkernels.contrastive import args as A


class _Features(NamedTuple):
    """A [n, Q, D] feature matrix as the kernels see it (a [K, D] one has Q = 1)."""

    ptr: torch.Tensor
    n: int
    q: int
    stride: tuple


def _features(t: torch.Tensor | None, like: torch.Tensor) -> _Features:
    """``t`` for the kernels; an absent one is an empty matrix (n = 0) pointing at ``like``."""
    if t is None:
        return _Features(like, 0, 1, (0, 0, 0))
    t3 = t if t.dim() == 3 else t[:, None]
    return _Features(t3, t3.shape[0], t3.shape[1], t3.stride())


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Kernel signatures stay packed (the formatter would put each argument on its own line).
# fmt: off


@triton.jit
def _load(F, offs, qi, offs_d, D):
    """F[offs, qi, offs_d] ([len(offs), len(offs_d)]), 0 outside the matrix."""
    ptrs = F.ptr + offs[:, None] * F.stride[0] + qi * F.stride[1] + offs_d[None, :] * F.stride[2]
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
def _col_block(C, NEG, start_n, n_pad, qc, offs_do, D, BLOCK_N: tl.constexpr):
    """Features [BLOCK_N, len(offs_do)] of query ``qc`` of the column tile that starts at start_n."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if start_n < C.n:
        c = _load(C, offs_n, qc, offs_do, D)
    else:
        c = _load(NEG, offs_n - n_pad, 0, offs_do, D)
    return c


@triton.jit
def _ctr_fwd(
    R, RM, C, NEG, SCALE, BIAS, OUT, M, D, row_off, col_off, KIND: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row statistics (args.RowStats) of rows R against columns [C ; NEG]; KIND 0 clip, 1 siglip;
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
    n_cols = n_pad + NEG.n if KIND == 0 else C.n
    for start_n in range(0, n_cols, BLOCK_N):
        sim, _, col_ok, is_pos = _tile(R, C, NEG, offs_m, start_n, n_pad, D, row_off, col_off, PRECISION,
                                       UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        ok = row_ok[:, None] & col_ok[None, :]
        logit = s * sim + b
        if KIND == 0:  # online log-sum-exp, sum of logits, positive logit
            lm = tl.where(ok, logit, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(lm, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(lm - m_safe[:, None]), axis=1)
            m_i = m_new
            tot += tl.sum(tl.where(ok, logit, 0.0), axis=1)
            pos += tl.sum(tl.where(ok & is_pos, logit, 0.0), axis=1)
            if RM is not None:  # momentum log-sum-exp and the logit sum weighted by the momentum softmax
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
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    lsem = tl.where(lm_i > 0, mm_i + tl.log(tl.where(lm_i > 0, lm_i, 1.0)), float("-inf"))
    wm = wm_i / tl.where(lm_i > 0, lm_i, 1.0)
    tl.store(OUT + 0 * M + offs_m, lse, mask=row_ok)
    tl.store(OUT + 1 * M + offs_m, pos, mask=row_ok)
    tl.store(OUT + 2 * M + offs_m, tot, mask=row_ok)
    tl.store(OUT + 3 * M + offs_m, lsem, mask=row_ok)
    tl.store(OUT + 4 * M + offs_m, wm, mask=row_ok)


@triton.jit
def _ctr_bwd(
    R, RM, C, NEG, SCALE, BIAS, LSE_ROW, LSEM_ROW, LSE_COL, DR, sdr, DSB, M, D, row_off, col_off,
    w_own, w_other, smooth, n_cls_own, n_cls_other, alpha, KIND: tl.constexpr, OWN: tl.constexpr,
    OTHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dLoss/dR for the rows of this program, for the feature slice [d0, d0 + BLOCK_DO) of
    program axis 1; per-row sums of dLoss/dlogit · sim and dLoss/dlogit over the columns and over
    the negatives into DSB [M, 4]. With R.q > 1 (max over the rows' queries) DR is an fp32 buffer
    updated in place."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_ok = offs_m < M
    out_ok = row_ok[:, None] & (offs_do < D)[None, :]
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32) if BIAS is not None else 0.0
    lse_row = tl.load(LSE_ROW + offs_m, mask=row_ok, other=0.0)
    lsem_row = tl.load(LSEM_ROW + offs_m, mask=row_ok, other=0.0) if RM is not None else lse_row
    dr = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    db = tl.zeros([BLOCK_M], tl.float32)
    ds_neg = tl.zeros([BLOCK_M], tl.float32)
    db_neg = tl.zeros([BLOCK_M], tl.float32)
    N = C.n
    n_pad = tl.cdiv(N, BLOCK_N) * BLOCK_N
    n_cols = n_pad + NEG.n if (KIND == 0 and OWN) else N
    for start_n in range(0, n_cols, BLOCK_N):
        main = start_n < N
        sim, arg, col_ok, is_pos = _tile(R, C, NEG, offs_m, start_n, n_pad, D, row_off, col_off, PRECISION,
                                         UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        ok = row_ok[:, None] & col_ok[None, :]
        logit = s * sim + b
        pos_f = is_pos.to(tl.float32)
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # dLoss/dlogit
        if KIND == 0:
            if OWN:  # softmax over the row minus the row's target
                p = tl.exp(logit - lse_row[:, None])
                if RM is not None:
                    simm, _, _, _ = _tile(RM, C, NEG, offs_m, start_n, n_pad, D, row_off, col_off, PRECISION,
                                          UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
                    target = alpha * tl.exp(s * simm - lsem_row[:, None]) + (1.0 - alpha) * pos_f
                else:
                    target = (1.0 - smooth) * pos_f + smooth / n_cls_own
                g += w_own * (p - target)
            if OTHER:  # the other direction's term: softmax over the column (columns only)
                offs_n = start_n + tl.arange(0, BLOCK_N)
                lse_col = tl.load(LSE_COL + offs_n, mask=offs_n < N, other=0.0)
                q = tl.exp(logit - lse_col[None, :])
                target = (1.0 - smooth) * pos_f + smooth / n_cls_other
                g += tl.where(main, w_other * (q - target), 0.0)
        else:
            eps = tl.where(is_pos, 1.0, -1.0)
            g = w_own * (-eps * tl.sigmoid(-eps * logit))
        g = tl.where(ok, g, 0.0)
        if main:
            ds += tl.sum(g * sim, axis=1)
            db += tl.sum(g, axis=1)
        else:
            ds_neg += tl.sum(g * sim, axis=1)
            db_neg += tl.sum(g, axis=1)
        # dR += g @ columns (of the arg-max query)
        if R.q == 1:
            q_c = 1 + (C.q - 1) * main.to(tl.int32)  # negatives have one query
            for qc in range(0, q_c):
                c = _col_block(C, NEG, start_n, n_pad, qc, offs_do, D, BLOCK_N)
                gq = tl.where(arg == qc, g, 0.0)
                if UPCAST:
                    dr += tl.dot(gq, c.to(tl.float32), input_precision="ieee")
                else:
                    dr += tl.dot(gq.to(c.dtype), c, input_precision=PRECISION)
        else:
            c = _col_block(C, NEG, start_n, n_pad, 0, offs_do, D, BLOCK_N)
            for qr in range(0, R.q):
                part = tl.dot(tl.where(arg == qr, g, 0.0), c.to(tl.float32), input_precision="ieee")
                ptrs = DR + offs_m[:, None] * sdr[0] + qr * sdr[1] + offs_do[None, :] * sdr[2]
                tl.store(ptrs, tl.load(ptrs, mask=out_ok, other=0.0) + s * part, mask=out_ok)
    if R.q == 1:
        tl.store(DR + offs_m[:, None] * sdr[0] + offs_do[None, :] * sdr[2], (s * dr).to(DR.dtype.element_ty),
                 mask=out_ok)
    if pid_d == 0:
        tl.store(DSB + offs_m * 4, ds, mask=row_ok)
        tl.store(DSB + offs_m * 4 + 1, db, mask=row_ok)
        tl.store(DSB + offs_m * 4 + 2, ds_neg, mask=row_ok)
        tl.store(DSB + offs_m * 4 + 3, db_neg, mask=row_ok)


# fmt: on


# ----------------------------------------------------------------------------------------------
# Launchers and ops
# ----------------------------------------------------------------------------------------------


def _operands(a: A.RowPass) -> dict:
    """The kernel arguments both passes share, from the row pass's arguments."""
    interp = a.rows.device.type == "cpu"
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
        KIND=A.KINDS.index(a.kind),
        PRECISION="ieee" if a.rows.dtype == torch.float32 else "tf32",
        UPCAST=interp and a.rows.dtype == torch.bfloat16,
        BLOCK_M=32 if interp else 64,
        BLOCK_N=32 if interp else 64,
        BLOCK_D=min(64, next_pow2(a.rows.shape[-1])),
    )


def _forward(a: A.RowPass) -> torch.Tensor:
    op = _operands(a)
    out = poisoned(A.fwd_fake(a))
    _ctr_fwd[(triton.cdiv(op["M"], op["BLOCK_M"]),)](OUT=out, **op)
    LAUNCHES["contrastive_fwd"] += 1
    return out


def _backward(g: A.RowPassGrad) -> tuple[torch.Tensor, torch.Tensor]:
    a = g.fwd
    op = _operands(a)
    M, QR, D = a.rows.shape
    block_do = min(256 if a.rows.device.type == "cuda" else 64, next_pow2(D))
    dr = a.rows.new_zeros(a.rows.shape, dtype=torch.float32) if QR > 1 else poisoned(torch.empty_like(a.rows))
    dsb = poisoned(a.rows.new_empty((M, len(A.ScaleBiasSums._fields)), dtype=torch.float32))
    grid = (triton.cdiv(M, op["BLOCK_M"]), triton.cdiv(D, block_do))
    _ctr_bwd[grid](
        LSE_ROW=g.lse_row,
        LSEM_ROW=g.lsem_row,
        LSE_COL=g.lse_col,
        DR=dr,
        sdr=dr.stride(),
        DSB=dsb,
        w_own=g.w_own,
        w_other=g.w_other,
        smooth=g.smooth,
        n_cls_own=g.n_cls_own,
        n_cls_other=g.n_cls_other,
        alpha=g.alpha,
        OWN=g.own,
        OTHER=g.other,
        BLOCK_DO=block_do,
        **op,
    )
    LAUNCHES["contrastive_bwd"] += 1
    return dr.to(a.rows.dtype), dsb.sum(0)


_fwd_op = _schema.python_op(
    "vlkernels::triton_contrastive_fwd", A.RowPass, A.FWD_RETURNS, _forward, A.fwd_fake
)
_bwd_op = _schema.python_op(
    "vlkernels::triton_contrastive_bwd", A.RowPassGrad, A.BWD_RETURNS, _backward, A.bwd_fake
)

BACKEND = _dispatch.Backend("triton", _fwd_op, _bwd_op)
