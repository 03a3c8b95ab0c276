"""Tiled contrastive losses: CLIP InfoNCE (label smoothing, feature queues, BLIP momentum
distillation), SigLIP, and BLIP-2's max over queries — Triton kernels (forward, backward), a
chunked PyTorch fallback with the same arithmetic, torch.library ops, autograd, and the ring
exchange across ranks. Eager N×N references: ``vlkernels.reference``.

Both passes work on "rows" (one side's features) against "columns" (the other side's features,
then the negatives). The forward keeps per row only: log-sum-exp, the positive logit, the sum
of logits (label smoothing), and for distillation the momentum log-sum-exp and the
target-weighted logit sum. The backward recomputes each logit tile and turns it into
dLoss/dlogit: the row's own direction (``own``, softmax over its row) plus, when the columns
are the other direction's rows, that direction's term (``other``, softmax over its column).
Nothing N×N is ever allocated.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from vlkernels import _dispatch
from vlkernels._triton_utils import LAUNCHES, next_pow2, poisoned

KINDS = ("clip", "siglip")
STATS = (
    5  # lse, positive logit, sum of logits (siglip: sum of -log sigmoid), momentum lse, target-weighted sum
)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


# Kernel signatures stay packed (the formatter would put each argument on its own line).
# fmt: off
@triton.jit
def _sim_tile(
    R, C, offs_m, offs_n, M, N, D, srm, srq, srd, scn, scq, scd, QR, QC,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sim[m, n] = max over (qr, qc) of R[m, qr, :] · C[n, qc, :] (fp32) and the arg-max index of
    whichever of QR, QC is > 1."""
    best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    for qr in range(0, QR):
        for qc in range(0, QC):
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + offs_d) < D
                r = tl.load(R + offs_m[:, None] * srm + qr * srq + (d0 + offs_d)[None, :] * srd,
                            mask=(offs_m[:, None] < M) & d_ok[None, :], other=0.0)
                c = tl.load(C + offs_n[:, None] * scn + qc * scq + (d0 + offs_d)[None, :] * scd,
                            mask=(offs_n[:, None] < N) & d_ok[None, :], other=0.0)
                if UPCAST:
                    acc += tl.dot(r.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(r, tl.trans(c), input_precision=PRECISION)
            better = acc > best
            best = tl.where(better, acc, best)
            arg = tl.where(better, qr + qc, arg)
    return best, arg


@triton.jit
def _tile(
    R, C, NEG, offs_m, start_n, n_pad, M, N, K, D, srm, srq, srd, scn, scq, scd, sqn, sqd, QR, QC,
    row_off, col_off,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The tile of columns [C ; NEG] that starts at ``start_n`` (the negatives start at n_pad):
    (sim [BLOCK_M, BLOCK_N], arg-max query index, column validity [BLOCK_N], positives)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if start_n < N:
        sim, arg = _sim_tile(R, C, offs_m, offs_n, M, N, D, srm, srq, srd, scn, scq, scd, QR, QC,
                             PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        col_ok = offs_n < N
        is_pos = (row_off + offs_m)[:, None] == (col_off + offs_n)[None, :]
    else:
        offs_k = offs_n - n_pad
        sim, arg = _sim_tile(R, NEG, offs_m, offs_k, M, K, D, srm, srq, srd, sqn, 0, sqd, QR, 1,
                             PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        col_ok = offs_k < K
        is_pos = (offs_m[:, None] < 0) & (offs_k[None, :] < 0)  # no positives among the negatives
    return sim, arg, col_ok, is_pos


@triton.jit
def _col_block(C, NEG, start_n, n_pad, N, K, qc, offs_do, D, scn, scq, scd, sqn, sqd, BLOCK_N: tl.constexpr):
    """Features [BLOCK_N, len(offs_do)] of query ``qc`` of the column tile that starts at start_n."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    d_ok = offs_do < D
    if start_n < N:
        c = tl.load(C + offs_n[:, None] * scn + qc * scq + offs_do[None, :] * scd,
                    mask=(offs_n[:, None] < N) & d_ok[None, :], other=0.0)
    else:
        offs_k = offs_n - n_pad
        c = tl.load(NEG + offs_k[:, None] * sqn + offs_do[None, :] * sqd,
                    mask=(offs_k[:, None] < K) & d_ok[None, :], other=0.0)
    return c


@triton.jit
def _ctr_fwd(
    R, RM, C, NEG, SCALE, BIAS, OUT, M, N, K, D, QR, QC,
    srm, srq, srd, smm, smq, smd, scn, scq, scd, sqn, sqd, row_off, col_off,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, DISTILL: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row statistics of rows R against columns [C ; NEG] (see STATS); KIND 0 clip, 1 siglip."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32) if HAS_BIAS else 0.0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    tot = tl.zeros([BLOCK_M], tl.float32)
    mm_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lm_i = tl.zeros([BLOCK_M], tl.float32)
    wm_i = tl.zeros([BLOCK_M], tl.float32)
    n_pad = tl.cdiv(N, BLOCK_N) * BLOCK_N  # negatives start at the next tile after the columns
    n_cols = n_pad + K if KIND == 0 else N
    for start_n in range(0, n_cols, BLOCK_N):
        sim, _, col_ok, is_pos = _tile(R, C, NEG, offs_m, start_n, n_pad, M, N, K, D, srm, srq, srd, scn, scq,
                                       scd, sqn, sqd, QR, QC, row_off, col_off, PRECISION, UPCAST, BLOCK_M,
                                       BLOCK_N, BLOCK_D)
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
            if DISTILL:  # momentum log-sum-exp and the logit sum weighted by the momentum softmax
                simm, _, _, _ = _tile(RM, C, NEG, offs_m, start_n, n_pad, M, N, K, D, smm, smq, smd, scn, scq,
                                      scd, sqn, sqd, QR, QC, row_off, col_off, PRECISION, UPCAST, BLOCK_M,
                                      BLOCK_N, BLOCK_D)
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
    R, RM, C, NEG, SCALE, BIAS, LSE_ROW, LSEM_ROW, LSE_COL, DR, DSB, M, N, K, D, QR, QC,
    srm, srq, srd, smm, smq, smd, scn, scq, scd, sqn, sqd, sdm, sdq, sdd,
    row_off, col_off, w_own, w_other, smooth, n_cls_own, n_cls_other, alpha,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, DISTILL: tl.constexpr, OWN: tl.constexpr, OTHER: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dLoss/dR for the rows of this program, for the feature slice [d0, d0 + BLOCK_DO) of
    program axis 1; per-row sums of dLoss/dlogit · sim and dLoss/dlogit over the columns and over
    the negatives into DSB [M, 4]. With QR > 1 (max over the rows' queries) DR is an fp32 buffer
    updated in place."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_ok = offs_m < M
    out_ok = row_ok[:, None] & (offs_do < D)[None, :]
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32) if HAS_BIAS else 0.0
    lse_row = tl.load(LSE_ROW + offs_m, mask=row_ok, other=0.0)
    lsem_row = tl.load(LSEM_ROW + offs_m, mask=row_ok, other=0.0) if DISTILL else lse_row
    dr = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    db = tl.zeros([BLOCK_M], tl.float32)
    ds_neg = tl.zeros([BLOCK_M], tl.float32)
    db_neg = tl.zeros([BLOCK_M], tl.float32)
    n_pad = tl.cdiv(N, BLOCK_N) * BLOCK_N
    n_cols = n_pad + K if (KIND == 0 and OWN) else N
    for start_n in range(0, n_cols, BLOCK_N):
        main = start_n < N
        sim, arg, col_ok, is_pos = _tile(R, C, NEG, offs_m, start_n, n_pad, M, N, K, D, srm, srq, srd, scn,
                                         scq, scd, sqn, sqd, QR, QC, row_off, col_off, PRECISION, UPCAST,
                                         BLOCK_M, BLOCK_N, BLOCK_D)
        ok = row_ok[:, None] & col_ok[None, :]
        logit = s * sim + b
        pos_f = is_pos.to(tl.float32)
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # dLoss/dlogit
        if KIND == 0:
            if OWN:  # softmax over the row minus the row's target
                p = tl.exp(logit - lse_row[:, None])
                if DISTILL:
                    simm, _, _, _ = _tile(RM, C, NEG, offs_m, start_n, n_pad, M, N, K, D, smm, smq, smd, scn,
                                          scq, scd, sqn, sqd, QR, QC, row_off, col_off, PRECISION, UPCAST,
                                          BLOCK_M, BLOCK_N, BLOCK_D)
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
        if QR == 1:
            q_c = 1 + (QC - 1) * main.to(tl.int32)  # negatives have one query
            for qc in range(0, q_c):
                c = _col_block(C, NEG, start_n, n_pad, N, K, qc, offs_do, D, scn, scq, scd, sqn, sqd, BLOCK_N)
                gq = tl.where(arg == qc, g, 0.0)
                if UPCAST:
                    dr += tl.dot(gq, c.to(tl.float32), input_precision="ieee")
                else:
                    dr += tl.dot(gq.to(c.dtype), c, input_precision=PRECISION)
        else:
            c = _col_block(C, NEG, start_n, n_pad, N, K, 0, offs_do, D, scn, scq, scd, sqn, sqd, BLOCK_N)
            for qr in range(0, QR):
                part = tl.dot(tl.where(arg == qr, g, 0.0), c.to(tl.float32), input_precision="ieee")
                ptrs = DR + offs_m[:, None] * sdm + qr * sdq + offs_do[None, :] * sdd
                tl.store(ptrs, tl.load(ptrs, mask=out_ok, other=0.0) + s * part, mask=out_ok)
    if QR == 1:
        tl.store(DR + offs_m[:, None] * sdm + offs_do[None, :] * sdd, (s * dr).to(DR.dtype.element_ty),
                 mask=out_ok)
    if pid_d == 0:
        tl.store(DSB + offs_m * 4, ds, mask=row_ok)
        tl.store(DSB + offs_m * 4 + 1, db, mask=row_ok)
        tl.store(DSB + offs_m * 4 + 2, ds_neg, mask=row_ok)
        tl.store(DSB + offs_m * 4 + 3, db_neg, mask=row_ok)


# fmt: on


# ----------------------------------------------------------------------------------------------
# Row passes: Triton launchers, the chunked PyTorch fallback, torch.library ops
# ----------------------------------------------------------------------------------------------

# Integer and float arguments shared by both passes, in op-signature order.
_FWD_DOC = "rows [M, QR, D], rows_m (distillation) like rows, cols [N, QC, D], neg [K, D]"


def _blocks(rows, cols):
    interp = rows.device.type == "cpu"
    return dict(
        BLOCK_M=32 if interp else 64,
        BLOCK_N=32 if interp else 64,
        BLOCK_D=min(64, next_pow2(rows.shape[-1])),
        PRECISION="ieee" if rows.dtype == torch.float32 else "tf32",
        UPCAST=interp and rows.dtype == torch.bfloat16,
    )


def _neg_or_dummy(neg, rows):
    return (neg, neg.stride(0), neg.stride(1), neg.shape[0]) if neg is not None else (rows, 0, 0, 0)


def _rows_fwd_triton(rows, rows_m, cols, neg, scale, bias, kind, row_off, col_off):
    M, QR, D = rows.shape
    N, QC, _ = cols.shape
    out = poisoned(rows.new_empty((STATS, M), dtype=torch.float32))
    negp, sqn, sqd, K = _neg_or_dummy(neg, rows)
    rm = rows_m if rows_m is not None else rows
    blk = _blocks(rows, cols)
    _ctr_fwd[(triton.cdiv(M, blk["BLOCK_M"]),)](
        rows,
        rm,
        cols,
        negp,
        scale,
        bias if bias is not None else scale,
        out,
        M,
        N,
        K,
        D,
        QR,
        QC,
        *rows.stride(),
        *rm.stride(),
        *cols.stride(),
        sqn,
        sqd,
        row_off,
        col_off,
        KIND=KINDS.index(kind),
        HAS_BIAS=bias is not None,
        DISTILL=rows_m is not None,
        **blk,
    )
    LAUNCHES["contrastive_fwd"] += 1
    return out


def _rows_bwd_triton(
    rows,
    rows_m,
    cols,
    neg,
    scale,
    bias,
    lse_row,
    lsem_row,
    lse_col,
    kind,
    own,
    other,
    row_off,
    col_off,
    w_own,
    w_other,
    smooth,
    n_cls_own,
    n_cls_other,
    alpha,
):
    M, QR, D = rows.shape
    N, QC, _ = cols.shape
    negp, sqn, sqd, K = _neg_or_dummy(neg, rows)
    rm = rows_m if rows_m is not None else rows
    blk = _blocks(rows, cols)
    block_do = min(256 if rows.device.type == "cuda" else 64, next_pow2(D))
    dr = rows.new_zeros(rows.shape, dtype=torch.float32) if QR > 1 else poisoned(torch.empty_like(rows))
    dsb = poisoned(rows.new_empty((M, 4), dtype=torch.float32))
    grid = (triton.cdiv(M, blk["BLOCK_M"]), triton.cdiv(D, block_do))
    _ctr_bwd[grid](
        rows,
        rm,
        cols,
        negp,
        scale,
        bias if bias is not None else scale,
        lse_row,
        lsem_row if lsem_row is not None else lse_row,
        lse_col if lse_col is not None else lse_row,
        dr,
        dsb,
        M,
        N,
        K,
        D,
        QR,
        QC,
        *rows.stride(),
        *rm.stride(),
        *cols.stride(),
        sqn,
        sqd,
        *dr.stride(),
        row_off,
        col_off,
        w_own,
        w_other,
        smooth,
        n_cls_own,
        n_cls_other,
        alpha,
        KIND=KINDS.index(kind),
        HAS_BIAS=bias is not None,
        DISTILL=rows_m is not None,
        OWN=own,
        OTHER=other,
        BLOCK_DO=block_do,
        **blk,
    )
    LAUNCHES["contrastive_bwd"] += 1
    return dr.to(rows.dtype), dsb.sum(0)


def _chunk_rows(M, n_cols, q):
    """Rows per chunk of the PyTorch fallback: at most 2**20 logits (4 MiB fp32) at a time."""
    return max(1, min(M, 2**20 // max(1, n_cols * q)))


def _sim_torch(r, c):
    """max over queries of r [m, QR, D] · c [n, QC, D] -> (sim [m, n] fp32, arg-max index)."""
    prod = torch.einsum("aqd,bkd->abqk", r.float(), c.float()).flatten(2)
    return prod.max(dim=-1)


def _logits_torch(rows, cols, neg, s, b, i0, i1):
    sim, arg = _sim_torch(rows[i0:i1], cols)
    parts = [(sim, arg)]
    if neg is not None:
        parts.append(_sim_torch(rows[i0:i1], neg[:, None]))
    sims = torch.cat([p[0] for p in parts], dim=1)
    args = torch.cat([p[1] for p in parts], dim=1)
    return sims, args, s * sims + b


def _rows_fwd_torch(rows, rows_m, cols, neg, scale, bias, kind, row_off, col_off):
    """The fallback of ``_rows_fwd_triton``: the same statistics, a chunk of rows at a time."""
    M, N = rows.shape[0], cols.shape[0]
    K = 0 if neg is None else neg.shape[0]
    out = rows.new_empty((STATS, M), dtype=torch.float32)
    s = scale.float()
    b = bias.float() if bias is not None else 0.0
    chunk = _chunk_rows(M, N + K, max(rows.shape[1], cols.shape[1]))
    for i0 in range(0, M, chunk):
        i1 = min(M, i0 + chunk)
        _, _, logit = _logits_torch(rows, cols, neg if kind == "clip" else None, s, b, i0, i1)
        pos = _positives(i0, i1, row_off, col_off, N, logit.shape[1], rows.device)
        if kind == "clip":
            out[0, i0:i1] = torch.logsumexp(logit, dim=1)
            out[1, i0:i1] = (logit * pos).sum(1)
            out[2, i0:i1] = logit.sum(1)
            if rows_m is not None:
                mlog = s * _logits_torch(rows_m, cols, neg, 1.0, 0.0, i0, i1)[0]
                out[3, i0:i1] = torch.logsumexp(mlog, dim=1)
                out[4, i0:i1] = (torch.softmax(mlog, dim=1) * logit).sum(1)
            else:
                out[3:, i0:i1] = 0.0
        else:
            eps = pos * 2.0 - 1.0
            out[2, i0:i1] = torch.nn.functional.softplus(-eps * logit).sum(1)
            out[[0, 1, 3, 4], i0:i1] = 0.0
    return out


def _positives(i0, i1, row_off, col_off, N, n_cols, device):
    """Float [i1 - i0, n_cols]: 1 where global row index == global column index (main columns)."""
    r = torch.arange(i0, i1, device=device)[:, None] + row_off
    c = torch.arange(n_cols, device=device)[None, :]
    return ((c < N) & (c + col_off == r)).float()


def _rows_bwd_torch(
    rows,
    rows_m,
    cols,
    neg,
    scale,
    bias,
    lse_row,
    lsem_row,
    lse_col,
    kind,
    own,
    other,
    row_off,
    col_off,
    w_own,
    w_other,
    smooth,
    n_cls_own,
    n_cls_other,
    alpha,
):
    """The fallback of ``_rows_bwd_triton``, a chunk of rows at a time."""
    M, QR, _ = rows.shape
    N, QC = cols.shape[0], cols.shape[1]
    use_neg = neg if (kind == "clip" and own) else None
    K = 0 if use_neg is None else use_neg.shape[0]
    s = scale.float()
    b = bias.float() if bias is not None else 0.0
    dr = rows.new_zeros(rows.shape, dtype=torch.float32)
    dsb = rows.new_zeros(4, dtype=torch.float32)
    chunk = _chunk_rows(M, N + K, max(QR, QC))
    for i0 in range(0, M, chunk):
        i1 = min(M, i0 + chunk)
        sim, arg, logit = _logits_torch(rows, cols, use_neg, s, b, i0, i1)
        pos = _positives(i0, i1, row_off, col_off, N, logit.shape[1], rows.device)
        g = torch.zeros_like(logit)
        if kind == "clip":
            if own:
                p = torch.exp(logit - lse_row[i0:i1, None])
                if rows_m is not None:
                    mlog = s * _logits_torch(rows_m, cols, use_neg, 1.0, 0.0, i0, i1)[0]
                    target = alpha * torch.exp(mlog - lsem_row[i0:i1, None]) + (1 - alpha) * pos
                else:
                    target = (1 - smooth) * pos + smooth / n_cls_own
                g += w_own * (p - target)
            if other:
                q = torch.exp(logit[:, :N] - lse_col[None, :])
                g[:, :N] += w_other * (q - ((1 - smooth) * pos[:, :N] + smooth / n_cls_other))
        else:
            eps = pos * 2.0 - 1.0
            g = w_own * (-eps * torch.sigmoid(-eps * logit))
        dsb[0] += (g[:, :N] * sim[:, :N]).sum()
        dsb[1] += g[:, :N].sum()
        dsb[2] += (g[:, N:] * sim[:, N:]).sum()
        dsb[3] += g[:, N:].sum()
        if QR > 1:  # gradient to the arg-max query of each (row, column) pair
            c = cols[:, 0].float() if use_neg is None else torch.cat([cols[:, 0], use_neg]).float()
            for qr in range(QR):
                dr[i0:i1, qr] = s * (g * (arg == qr)) @ c
        else:
            for qc in range(QC):
                c = cols[:, qc].float()
                gq = g[:, :N] * (arg[:, :N] == qc) if QC > 1 else g[:, :N]
                dr[i0:i1, 0] += s * gq @ c
            if K:
                dr[i0:i1, 0] += s * g[:, N:] @ use_neg.float()
    return dr.to(rows.dtype), dsb


_OptT = torch.Tensor | None


@torch.library.custom_op("vlkernels::triton_contrastive_fwd", mutates_args=())
def triton_contrastive_fwd(
    rows: torch.Tensor,
    rows_m: _OptT,
    cols: torch.Tensor,
    neg: _OptT,
    scale: torch.Tensor,
    bias: _OptT,
    kind: str,
    row_off: int,
    col_off: int,
) -> torch.Tensor:
    """Per-row statistics [5, M] fp32 of ``rows`` against [cols ; neg]; """ + _FWD_DOC
    return _rows_fwd_triton(rows, rows_m, cols, neg, scale, bias, kind, row_off, col_off)


@triton_contrastive_fwd.register_fake
def _fwd_fake(rows, *args):
    return rows.new_empty((STATS, rows.shape[0]), dtype=torch.float32)


@torch.library.custom_op("vlkernels::triton_contrastive_bwd", mutates_args=())
def triton_contrastive_bwd(
    rows: torch.Tensor,
    rows_m: _OptT,
    cols: torch.Tensor,
    neg: _OptT,
    scale: torch.Tensor,
    bias: _OptT,
    lse_row: torch.Tensor,
    lsem_row: _OptT,
    lse_col: _OptT,
    kind: str,
    own: bool,
    other: bool,
    row_off: int,
    col_off: int,
    w_own: float,
    w_other: float,
    smooth: float,
    n_cls_own: int,
    n_cls_other: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dLoss/drows, [ds_cols, db_cols, ds_neg, db_neg]) for the rows' dLoss/dlogit tiles."""
    return _rows_bwd_triton(
        rows,
        rows_m,
        cols,
        neg,
        scale,
        bias,
        lse_row,
        lsem_row,
        lse_col,
        kind,
        own,
        other,
        row_off,
        col_off,
        w_own,
        w_other,
        smooth,
        n_cls_own,
        n_cls_other,
        alpha,
    )


@triton_contrastive_bwd.register_fake
def _bwd_fake(rows, *args):
    return torch.empty_like(rows), rows.new_empty(4, dtype=torch.float32)


def register_cuda_ops(ns: str) -> None:
    """Fake kernels of the CUDA C++ row passes ``{ns}::contrastive_fwd`` / ``contrastive_bwd``
    (csrc/contrastive.cu; same schemas and outputs as the Triton ops)."""
    torch.library.register_fake(f"{ns}::contrastive_fwd")(_fwd_fake)
    torch.library.register_fake(f"{ns}::contrastive_bwd")(_bwd_fake)


def rows_fwd(backend, *args):
    if backend == "triton":
        return triton_contrastive_fwd(*args)
    if backend == "cuda":
        return _dispatch.cuda_ops().contrastive_fwd(*args)
    return _rows_fwd_torch(*args)


def rows_bwd(backend, *args):
    if backend == "triton":
        return triton_contrastive_bwd(*args)
    if backend == "cuda":
        return _dispatch.cuda_ops().contrastive_bwd(*args)
    return _rows_bwd_torch(*args)


# ----------------------------------------------------------------------------------------------
# Losses from row statistics; autograd on one device and across ranks
# ----------------------------------------------------------------------------------------------


def _row_losses(stats, kind, smooth, n_cls, alpha, distill):
    """Per-row loss from the statistics: cross-entropy (clip) or sum of -log sigmoid (siglip)."""
    lse, pos, tot, _, wm = stats
    if kind == "siglip":
        return tot
    if distill:
        return lse - alpha * wm - (1 - alpha) * pos
    return lse - (1 - smooth) * pos - smooth * tot / n_cls


def _as3(t):
    return None if t is None else (t if t.dim() == 3 else t[:, None])


def _scale_grads(ds, db, scale, bias):
    d_scale = ds.to(scale.dtype).reshape(scale.shape)
    d_bias = None if bias is None else db.to(bias.dtype).reshape(bias.shape)
    return d_scale, d_bias


class _OneDevice(torch.autograd.Function):
    """Loss on one device: both directions' row passes forward, two fused row passes backward."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, neg_x, neg_y, xm, ym, kind, smooth, alpha, backend):
        x3, y3, xm3, ym3 = _as3(x), _as3(y), _as3(xm), _as3(ym)
        N = x.shape[0]
        distill = xm is not None
        if kind == "siglip":
            st = rows_fwd(backend, x3, None, y3, None, scale, bias, "siglip", 0, 0)
            loss = st[2].sum() / N
            ctx.save_for_backward(x3, y3, scale, bias, st)
        else:
            kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
            st_i = rows_fwd(backend, x3, xm3, ym3 if distill else y3, neg_y, scale, bias, "clip", 0, 0)
            st_t = rows_fwd(backend, y3, ym3, xm3 if distill else x3, neg_x, scale, bias, "clip", 0, 0)
            loss = 0.5 * (
                _row_losses(st_i, kind, smooth, N + ky, alpha, distill).mean()
                + _row_losses(st_t, kind, smooth, N + kx, alpha, distill).mean()
            )
            ctx.save_for_backward(x3, y3, scale, bias, neg_x, neg_y, xm3, ym3, st_i, st_t)
        ctx.conf = (kind, smooth, alpha, backend, x.shape, y.shape)
        return loss

    @staticmethod
    def backward(ctx, gout):
        kind, smooth, alpha, backend, x_shape, y_shape = ctx.conf
        if kind == "siglip":
            x3, y3, scale, bias, st = ctx.saved_tensors
            w = 1.0 / x3.shape[0]
            dx, dsb = rows_bwd(
                backend,
                x3,
                None,
                y3,
                None,
                scale,
                bias,
                st[0],
                None,
                None,
                "siglip",
                True,
                False,
                0,
                0,
                w,
                0.0,
                0.0,
                1,
                1,
                0.0,
            )
            dy, _ = rows_bwd(
                backend,
                y3,
                None,
                x3,
                None,
                scale,
                bias,
                st[0],
                None,
                None,
                "siglip",
                True,
                False,
                0,
                0,
                w,
                0.0,
                0.0,
                1,
                1,
                0.0,
            )
            ds, db = dsb[0], dsb[1]
        else:
            x3, y3, scale, bias, neg_x, neg_y, xm3, ym3, st_i, st_t = ctx.saved_tensors
            N = x3.shape[0]
            kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
            w = 0.5 / N
            if xm3 is not None:  # distillation: columns are momentum features, no "other" term
                dx, dsb1 = rows_bwd(
                    backend,
                    x3,
                    xm3,
                    ym3,
                    neg_y,
                    scale,
                    bias,
                    st_i[0],
                    st_i[3],
                    None,
                    "clip",
                    True,
                    False,
                    0,
                    0,
                    w,
                    0.0,
                    0.0,
                    N + ky,
                    1,
                    alpha,
                )
                dy, dsb2 = rows_bwd(
                    backend,
                    y3,
                    ym3,
                    xm3,
                    neg_x,
                    scale,
                    bias,
                    st_t[0],
                    st_t[3],
                    None,
                    "clip",
                    True,
                    False,
                    0,
                    0,
                    w,
                    0.0,
                    0.0,
                    N + kx,
                    1,
                    alpha,
                )
                ds, db = dsb1[0] + dsb1[2] + dsb2[0] + dsb2[2], dsb1[1] + dsb1[3] + dsb2[1] + dsb2[3]
            else:  # the N x N block carries both directions' terms: count it once for the scale
                dx, dsb1 = rows_bwd(
                    backend,
                    x3,
                    None,
                    y3,
                    neg_y,
                    scale,
                    bias,
                    st_i[0],
                    None,
                    st_t[0],
                    "clip",
                    True,
                    True,
                    0,
                    0,
                    w,
                    w,
                    smooth,
                    N + ky,
                    N + kx,
                    0.0,
                )
                dy, dsb2 = rows_bwd(
                    backend,
                    y3,
                    None,
                    x3,
                    neg_x,
                    scale,
                    bias,
                    st_t[0],
                    None,
                    st_i[0],
                    "clip",
                    True,
                    True,
                    0,
                    0,
                    w,
                    w,
                    smooth,
                    N + kx,
                    N + ky,
                    0.0,
                )
                ds, db = dsb1[0] + dsb1[2] + dsb2[2], dsb1[1] + dsb1[3] + dsb2[3]
        d_scale, d_bias = _scale_grads(ds * gout, db * gout, scale, bias)
        return (
            (dx * gout.to(dx.dtype)).reshape(x_shape),
            (dy * gout.to(dy.dtype)).reshape(y_shape),
            d_scale,
            d_bias,
            *(None,) * 8,
        )


def _ring_pass(tensors, group):
    """Send ``tensors`` to the next rank of the ring and receive the previous rank's; returns the
    received tensors and the requests to wait on (the caller computes meanwhile)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, prv, group) for t in received]
    return received, dist.batch_isend_irecv(ops)


class _Ring(torch.autograd.Function):
    """Loss of this rank across a process group, as open_clip's ClipLoss(local_loss=True,
    gather_with_grad=True) / SigLipLoss: the other ranks' feature blocks travel around a ring
    (the next block is in flight while the current one is computed), and in the backward the
    gradients of a visiting block travel with it back to its owner. Memory is O(n·D) per rank."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, neg_x, neg_y, kind, smooth, backend, group):
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        sizes = torch.tensor([n, -n], device=x.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
        if sizes[0].item() != -sizes[1].item():
            raise ValueError(
                f"contrastive_loss: every rank must pass the same number of rows; this rank "
                f"has {n}, others between {-sizes[1].item()} and {sizes[0].item()}"
            )
        x3, y3 = _as3(x).contiguous(), _as3(y).contiguous()
        kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
        xb, yb = x3, y3
        st_i = st_t = None
        for t in range(world):
            p = (rank - t) % world
            if t + 1 < world:
                (xn, yn), reqs = _ring_pass([xb, yb], group)
            a = rows_fwd(backend, x3, None, yb, neg_y if t == 0 else None, scale, bias, kind, rank * n, p * n)
            st_i = a if st_i is None else _merge_stats(st_i, a)
            if kind == "clip":
                b = rows_fwd(
                    backend, y3, None, xb, neg_x if t == 0 else None, scale, bias, kind, rank * n, p * n
                )
                st_t = b if st_t is None else _merge_stats(st_t, b)
            if t + 1 < world:
                for r in reqs:
                    r.wait()
                xb, yb = xn, yn
        N = world * n
        if kind == "siglip":
            loss = st_i[2].sum() / n
            ctx.save_for_backward(x3, y3, scale, bias, st_i)
        else:
            loss = 0.5 * (
                _row_losses(st_i, kind, smooth, N + ky, 0.0, False).mean()
                + _row_losses(st_t, kind, smooth, N + kx, 0.0, False).mean()
            )
            ctx.save_for_backward(x3, y3, scale, bias, neg_x, neg_y, st_i, st_t)
        ctx.conf = (kind, smooth, backend, group, x.shape, y.shape)
        return loss

    @staticmethod
    def backward(ctx, gout):
        import torch.distributed as dist

        kind, smooth, backend, group, x_shape, y_shape = ctx.conf
        if kind == "siglip":
            x3, y3, scale, bias, st_i = ctx.saved_tensors
            neg_x = neg_y = st_t = None
        else:
            x3, y3, scale, bias, neg_x, neg_y, st_i, st_t = ctx.saved_tensors
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x3.shape[0]
        N = world * n
        kx, ky = (0 if t is None else t.shape[0] for t in (neg_x, neg_y))
        w = 1.0 / n if kind == "siglip" else 0.5 / n
        dx = torch.zeros_like(x3, dtype=torch.float32)
        dy = torch.zeros_like(y3, dtype=torch.float32)
        dsb = torch.zeros(4, device=x3.device, dtype=torch.float32)
        xb, yb = x3, y3
        dxb = torch.zeros_like(x3, dtype=torch.float32)
        dyb = torch.zeros_like(y3, dtype=torch.float32)
        for t in range(world):
            p = (rank - t) % world
            if t + 1 < world:
                (xn, yn), reqs = _ring_pass([xb, yb], group)
            # this rank's own rows against the visiting block
            g, part = rows_bwd(
                backend,
                x3,
                None,
                yb,
                neg_y if t == 0 else None,
                scale,
                bias,
                st_i[0],
                None,
                None,
                kind,
                True,
                False,
                rank * n,
                p * n,
                w,
                0.0,
                smooth,
                N + ky,
                1,
                0.0,
            )
            dx += g
            dsb += part
            # the visiting block's rows against this rank's: this rank's loss terms, sent back
            if kind == "siglip":
                g, _ = rows_bwd(
                    backend,
                    yb,
                    None,
                    x3,
                    None,
                    scale,
                    bias,
                    st_i[0],
                    None,
                    None,
                    kind,
                    True,
                    False,
                    p * n,
                    rank * n,
                    w,
                    0.0,
                    0.0,
                    1,
                    1,
                    0.0,
                )
                dyb += g
            else:
                g, part = rows_bwd(
                    backend,
                    y3,
                    None,
                    xb,
                    neg_x if t == 0 else None,
                    scale,
                    bias,
                    st_t[0],
                    None,
                    None,
                    kind,
                    True,
                    False,
                    rank * n,
                    p * n,
                    w,
                    0.0,
                    smooth,
                    N + kx,
                    1,
                    0.0,
                )
                dy += g
                dsb += part
                g, _ = rows_bwd(
                    backend,
                    yb,
                    None,
                    x3,
                    None,
                    scale,
                    bias,
                    st_t[0],
                    None,
                    st_i[0],
                    kind,
                    False,
                    True,
                    p * n,
                    rank * n,
                    0.0,
                    w,
                    smooth,
                    1,
                    N + ky,
                    0.0,
                )
                dyb += g
                g, _ = rows_bwd(
                    backend,
                    xb,
                    None,
                    y3,
                    None,
                    scale,
                    bias,
                    st_i[0],
                    None,
                    st_t[0],
                    kind,
                    False,
                    True,
                    p * n,
                    rank * n,
                    0.0,
                    w,
                    smooth,
                    1,
                    N + kx,
                    0.0,
                )
                dxb += g
            # pass the block's gradients on (after the last step they arrive at their owner)
            (dxb, dyb), greqs = _ring_pass([dxb, dyb], group)
            for r in greqs:
                r.wait()
            if t + 1 < world:
                for r in reqs:
                    r.wait()
                xb, yb = xn, yn
        gx = (dx + dxb) * gout
        gy = (dy + dyb) * gout
        d_scale, d_bias = _scale_grads((dsb[0] + dsb[2]) * gout, (dsb[1] + dsb[3]) * gout, scale, bias)
        return (
            gx.to(x3.dtype).reshape(x_shape),
            gy.to(y3.dtype).reshape(y_shape),
            d_scale,
            d_bias,
            *(None,) * 6,
        )


def _merge_stats(a, b):
    """Statistics of rows over two disjoint column sets (log-sum-exps merge, sums add)."""
    out = a + b
    out[0] = torch.logaddexp(a[0], b[0])
    return out


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class MomentumDistillation:
    """BLIP's momentum distillation (``blip_pretrain.py``).

    ``image_features``/``text_features``: the momentum encoders' features [N, D]. With it, the
    columns of image-to-text are [text_features ; text_negatives] (the momentum features and the
    queue) and of text-to-image [image_features ; image_negatives], and the targets are
    ``alpha * softmax(logit_scale * momentum_row · columns) + (1 - alpha) * one_hot``.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    alpha: float


def _check_features(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"contrastive_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"contrastive_loss: {name} must be {want}, got shape {list(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"contrastive_loss: {name} must be float16, bfloat16 or float32, got {t.dtype}")


def _validate(x, y, scale, bias, kind, smooth, neg_x, neg_y, distill, device):
    if kind not in KINDS:
        raise ValueError(f"contrastive_loss: kind must be one of {KINDS}, got {kind!r}")
    _check_features("image_features", x, (2, 3))
    _check_features("text_features", y, (2,))
    if x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(
            f"contrastive_loss: image_features and text_features must have the same N >= 1, "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"contrastive_loss: feature dims differ: image {x.shape[-1]}, text {y.shape[-1]}")
    if x.dtype != y.dtype:
        raise TypeError(
            f"contrastive_loss: image and text features must share a dtype, got {x.dtype}, {y.dtype}"
        )
    for name, t in (("logit_scale", scale), ("logit_bias", bias)):
        if t is None and name == "logit_bias":
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.dtype.is_floating_point:
            got = f"shape {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"contrastive_loss: {name} must be a one-element float tensor, got {got}")
    if not isinstance(smooth, (int, float)) or not 0.0 <= smooth <= 1.0:
        raise ValueError(f"contrastive_loss: label_smoothing must be in [0, 1], got {smooth!r}")
    for name, t in (("image_negatives", neg_x), ("text_negatives", neg_y)):
        if t is None:
            continue
        if kind != "clip":
            raise ValueError(f"contrastive_loss: {name} are only used by kind='clip'")
        _check_features(name, t, (2,))
        if t.shape[1] != y.shape[-1] or t.dtype != y.dtype:
            raise ValueError(
                f"contrastive_loss: {name} must be [K, {y.shape[-1]}] {y.dtype}, got "
                f"{list(t.shape)} {t.dtype}"
            )
    if neg_x is not None and x.dim() == 3:
        raise ValueError("contrastive_loss: image_negatives are not defined for [N, Q, D] image features")
    if distill is not None:
        if not isinstance(distill, MomentumDistillation):
            raise TypeError(
                f"contrastive_loss: distill must be a MomentumDistillation, got {type(distill).__name__}"
            )
        if kind != "clip" or smooth or x.dim() == 3:
            raise ValueError(
                "contrastive_loss: distill needs kind='clip', 2-D image features and no label_smoothing"
            )
        for name, t, ref in (
            ("distill.image_features", distill.image_features, x),
            ("distill.text_features", distill.text_features, y),
        ):
            _check_features(name, t, (2,))
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"contrastive_loss: {name} must match the online features {list(ref.shape)} "
                    f"{ref.dtype}, got {list(t.shape)} {t.dtype}"
                )
        if not 0.0 <= distill.alpha <= 1.0:
            raise ValueError(f"contrastive_loss: distill.alpha must be in [0, 1], got {distill.alpha}")
    tensors = [x, y, scale, bias, neg_x, neg_y]
    if distill is not None:
        tensors += [distill.image_features, distill.text_features]
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"contrastive_loss: every tensor must be on {device}, got one on {t.device}")


def contrastive_loss(
    image_features,
    text_features,
    logit_scale,
    logit_bias=None,
    *,
    kind="clip",
    label_smoothing=0.0,
    image_negatives=None,
    text_negatives=None,
    distill=None,
    group=None,
    backend=None,
):
    """Image-text contrastive loss without an N×N buffer. Returns a scalar.

    image_features [N, D] (or [N, Q, D]: similarity = max over the Q query embeddings, BLIP-2);
    text_features [N, D]; logit_scale: one-element tensor, already exponentiated; logit_bias
    optional. ``kind="clip"``: ½[CE(logits, arange) + CE(logitsᵀ, arange)] with ``label_smoothing``
    and optional negatives [K, D] appended as extra columns (BLIP's queues); ``distill`` adds BLIP
    momentum distillation. ``kind="siglip"``: −Σ log σ(ε_ij·logit_ij) / N. ``group``: a
    torch.distributed process group; each rank passes its own n rows and gets open_clip's
    ``local_loss=True, gather_with_grad=True`` loss and gradients.
    """
    device = image_features.device if isinstance(image_features, torch.Tensor) else None
    _validate(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        kind,
        label_smoothing,
        image_negatives,
        text_negatives,
        distill,
        device,
    )
    chosen = _dispatch.choose(backend, device, "contrastive_loss")
    smooth = float(label_smoothing)
    # copies of the queues: BLIP updates them in place right after the loss, before the backward
    neg_x = None if image_negatives is None else image_negatives.detach().clone()
    neg_y = None if text_negatives is None else text_negatives.detach().clone()
    if group is not None:
        import torch.distributed as dist

        if dist.get_world_size(group) > 1:
            if distill is not None:
                raise ValueError("contrastive_loss: distill is not supported with a process group yet")
            args = (image_features, text_features, logit_scale, logit_bias, neg_x, neg_y)
            return _Ring.apply(*args, kind, smooth, chosen, group)
    xm = ym = None
    alpha = 0.0
    if distill is not None:
        xm, ym, alpha = distill.image_features.detach(), distill.text_features.detach(), float(distill.alpha)
    return _OneDevice.apply(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        neg_x,
        neg_y,
        xm,
        ym,
        kind,
        smooth,
        alpha,
        chosen,
    )
