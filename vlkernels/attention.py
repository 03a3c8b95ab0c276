"""Fused masked attention: Triton kernels (forward, backward), launchers, torch.library ops and
the public ``attention`` entry point. The eager reference is ``vlkernels.reference.attention_ref``.

Layout is SDPA's: q [Bq, H, Lq, D], k and v [B, Hk, Lk, D], any strides. ``Bq`` is ``B`` or 1
(one set of queries shared by the batch, never expanded); ``H % Hk == 0`` (grouped keys).

Masks are lowered to a few integers per row: every analytic component allows the key interval
``[lo, hi)`` of a query row, the kernels intersect them, and iterate only over the key tiles that
the union of a query tile's intervals touches (and, backward, only over query tiles that touch
a key tile). A dense bool mask is applied on top, element by element.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlkernels import _dispatch
from vlkernels._triton_utils import LAUNCHES, autotuned, next_pow2, poisoned
from vlkernels.masks import Mask
from vlkernels.reference import attention_ref

QFORMER_MODE_IDS = {"bidirectional": 0, "multimodal_causal": 1, "unimodal": 2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Kernel signatures stay packed (the formatter would put each argument on its own line).
# fmt: off


@triton.jit
def _row_bounds(
    offs_m, b, Lq, Lk, KLEN, PREFIX, T2M, stb, stm, NQ, LAT,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, QF_MODE: tl.constexpr,
    HAS_PREFIX: tl.constexpr, MEDIA: tl.constexpr,
):
    """Allowed key interval [lo, hi) of each query row; empty rows get [Lk, 0)."""
    lo = tl.zeros_like(offs_m)
    hi = tl.zeros_like(offs_m) + Lk
    if CAUSAL:
        hi = tl.minimum(hi, offs_m + (Lk - Lq) + 1)
    if HAS_KLEN:
        hi = tl.minimum(hi, tl.load(KLEN + b))
    if QF_MODE == 1:  # multimodal causal: queries -> queries; text -> queries + text up to itself
        hi = tl.minimum(hi, tl.where(offs_m < NQ, NQ, tl.maximum(offs_m + 1, NQ)))
    if QF_MODE == 2:  # unimodal: queries -> queries; text -> text
        hi = tl.minimum(hi, tl.where(offs_m < NQ, NQ, Lk))
        lo = tl.maximum(lo, tl.where(offs_m < NQ, 0, NQ))
    if HAS_PREFIX:
        hi = tl.minimum(hi, tl.maximum(tl.load(PREFIX + b), offs_m + 1))
    if MEDIA != 0:  # 1: only the immediately preceding image, 2: all previous images
        t = tl.load(T2M + b * stb + offs_m * stm, mask=offs_m < Lq, other=0)
        hi = tl.minimum(hi, t * LAT)
        if MEDIA == 1:
            lo = tl.maximum(lo, (t - 1) * LAT)
    empty = (offs_m >= Lq) | (lo >= hi)
    return tl.where(empty, Lk, lo), tl.where(empty, 0, hi)


@triton.jit
def _allowed(offs_n, lo, hi, MASK, b, h, offs_m, smb, smh, smm, smn, Lq, Lk, HAS_MASK: tl.constexpr):
    ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
    if HAS_MASK:
        ptrs = MASK + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn
        ok = ok & (tl.load(ptrs, mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk), other=0) != 0)
    return ok


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: bf16 operands are multiplied as fp32 (exact products,
    as on tensor cores) because the Triton interpreter's bf16 dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


_MASK_FLAGS = ["CAUSAL", "HAS_KLEN", "QF_MODE", "HAS_PREFIX", "MEDIA", "HAS_MASK"]


def _configs(pairs):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs
    ]


_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
_FWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 4, 2), (32, 32, 4, 1)])
_BWD_CONFIGS = _configs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 64, 4, 1)])
_KEY = ["LQ_KEY", "LK_KEY", "BLOCK_D", "GROUP", *_MASK_FLAGS]


@autotuned(_FWD_CONFIGS, _KEY, _INTERPRET_CONFIG)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, MASK, KLEN, PREFIX, T2M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    smb, smh, smm, smn, stb, stm,
    H, GROUP, Lq, Lk, D, NQ, LAT, qk_scale, LQ_KEY, LK_KEY,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, QF_MODE: tl.constexpr,
    HAS_PREFIX: tl.constexpr, MEDIA: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    lo, hi = _row_bounds(offs_m, b, Lq, Lk, KLEN, PREFIX, T2M, stb, stm, NQ, LAT,
                         CAUSAL, HAS_KLEN, QF_MODE, HAS_PREFIX, MEDIA)
    n_start = (tl.min(lo, axis=0) // BLOCK_N) * BLOCK_N
    n_end = tl.max(hi, axis=0)

    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in tl.range(n_start, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        ok = _allowed(offs_n, lo, hi, MASK, b, h, offs_m, smb, smh, smm, smn, Lq, Lk, HAS_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    m_ok = offs_m < Lq
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Lq, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d o * do (fp32)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@autotuned(_BWD_CONFIGS, _KEY, _INTERPRET_CONFIG)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KLEN, PREFIX, T2M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smm, smn, stb, stm,
    H, Hk, GROUP, Lq, Lk, D, NQ, LAT, qk_scale, sm_scale, LQ_KEY, LK_KEY,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, QF_MODE: tl.constexpr,
    HAS_PREFIX: tl.constexpr, MEDIA: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one key tile: loops over the GROUP query heads sharing it and over the query
    tiles whose allowed intervals touch it."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hk
    hk = bhk % Hk
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for start_m in tl.range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            lo, hi = _row_bounds(offs_m, b, Lq, Lk, KLEN, PREFIX, T2M, stb, stm, NQ, LAT,
                                 CAUSAL, HAS_KLEN, QF_MODE, HAS_PREFIX, MEDIA)
            touches = tl.max(((lo < n0 + BLOCK_N) & (hi > n0)).to(tl.int32), axis=0)
            if touches > 0:
                q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
                q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                            mask=q_ok, other=0.0)
                do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                             mask=q_ok, other=0.0)
                row = (b * H + h) * Lq + offs_m
                lse = tl.load(LSE + row, mask=offs_m < Lq, other=0.0)
                delta = tl.load(DELTA + row, mask=offs_m < Lq, other=0.0)
                s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
                ok = _allowed(offs_n, lo, hi, MASK, b, h, offs_m, smb, smh, smm, smn, Lq, Lk, HAS_MASK)
                p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
                dv += _mm(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
                dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
                ds = p * (dp - delta[:, None])
                dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    dk *= sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@autotuned(_BWD_CONFIGS, [*_KEY, "B_PER_PROG"], _INTERPRET_CONFIG)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, KLEN, PREFIX, T2M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sdqc, sdqh, sdqm, sdqd, smb, smh, smm, smn, stb, stm,
    B, H, GROUP, Lq, Lk, D, NQ, LAT, qk_scale, sm_scale, B_PER_PROG, LQ_KEY, LK_KEY,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, QF_MODE: tl.constexpr,
    HAS_PREFIX: tl.constexpr, MEDIA: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one query tile, summed over the B_PER_PROG batch entries of chunk c (shared queries:
    chunk c's partial sum goes to DQ[c]; otherwise B_PER_PROG == 1 and c is the batch)."""
    pid_m = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    c = ch // H
    h = ch % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    b_end = tl.minimum(c * B_PER_PROG + B_PER_PROG, B)
    for b in tl.range(c * B_PER_PROG, b_end):
        lo, hi = _row_bounds(offs_m, b, Lq, Lk, KLEN, PREFIX, T2M, stb, stm, NQ, LAT,
                             CAUSAL, HAS_KLEN, QF_MODE, HAS_PREFIX, MEDIA)
        n_start = (tl.min(lo, axis=0) // BLOCK_N) * BLOCK_N
        n_end = tl.max(hi, axis=0)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=q_ok, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                     mask=q_ok, other=0.0)
        row = (b * H + h) * Lq + offs_m
        lse = tl.load(LSE + row, mask=offs_m < Lq, other=0.0)
        delta = tl.load(DELTA + row, mask=offs_m < Lq, other=0.0)
        Kb = K + b * skb + hk * skh
        Vb = V + b * svb + hk * svh
        for start_n in tl.range(n_start, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
            k = tl.load(Kb + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
            v = tl.load(Vb + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
            s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
            ok = _allowed(offs_n, lo, hi, MASK, b, h, offs_m, smb, smh, smm, smn, Lq, Lk, HAS_MASK)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
    dq *= sm_scale
    tl.store(DQ + c * sdqc + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=q_ok)


# fmt: on


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _mask_launch_args(
    q,
    k,
    dense_mask,
    key_lengths,
    prefix_lengths,
    text_to_media,
    causal,
    qformer_queries,
    qformer_mode,
    media_mode,
    latents_per_media,
):
    """Pointers, strides and constexpr flags of the mask; absent tensors point at ``q``."""
    B, H, Lq, Lk = k.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if dense_mask is not None:
        dense = dense_mask.expand(B, H, Lq, Lk).view(torch.uint8)
        mask_ptr, mask_strides = dense, dense.stride()
    else:
        mask_ptr, mask_strides = q, (0, 0, 0, 0)
    t2m_ptr, t2m_strides = (q, (0, 0)) if text_to_media is None else (text_to_media, text_to_media.stride())
    ptrs = (
        mask_ptr,
        key_lengths if key_lengths is not None else q,
        prefix_lengths if prefix_lengths is not None else q,
        t2m_ptr,
    )
    strides = (*mask_strides, *t2m_strides)
    flags = dict(
        CAUSAL=causal,
        HAS_KLEN=key_lengths is not None,
        QF_MODE=qformer_mode,
        HAS_PREFIX=prefix_lengths is not None,
        MEDIA=media_mode,
        HAS_MASK=dense_mask is not None,
    )
    return ptrs, strides, (qformer_queries, latents_per_media), flags


def _common(q, k):
    _, Hk, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    return dict(
        precision="ieee" if q.dtype == torch.float32 else "tf32",
        upcast=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        BLOCK_D=next_pow2(D),
        LQ_KEY=next_pow2(Lq),
        LK_KEY=next_pow2(Lk),
        GROUP=H // Hk,
    )


def _q_strides(q, B):
    """q strides with a 0 batch stride for shared queries (Bq == 1)."""
    s = q.stride()
    return (s[0] if q.shape[0] == B else 0, s[1], s[2], s[3])


def _dq_chunks(B: int, H: int, Lq: int, shared: bool, device: torch.device) -> int:
    """How many partial dq sums a shared-query backward splits the batch into: enough programs
    to fill the GPU (at least two under the interpreter so that the reduction is exercised)."""
    if not shared:
        return B
    if device.type != "cuda":
        return min(B, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(B, triton.cdiv(2 * sms, H * triton.cdiv(Lq, 64))))


# ----------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ----------------------------------------------------------------------------------------------

_MaskT = torch.Tensor | None


@torch.library.custom_op("vlkernels::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense_mask: _MaskT,
    key_lengths: _MaskT,
    prefix_lengths: _MaskT,
    text_to_media: _MaskT,
    causal: bool,
    qformer_queries: int,
    qformer_mode: int,
    media_mode: int,
    latents_per_media: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel: (out [B, H, Lq, D] stored as [B, Lq, H, D], lse [B, H, Lq] fp32 log2)."""
    B, _, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    out = poisoned(q.new_empty((B, Lq, H, D))).transpose(1, 2)
    lse = poisoned(q.new_empty((B, H, Lq), dtype=torch.float32))
    # fmt: off
    ptrs, mstrides, (nq, lat), flags = _mask_launch_args(
        q, k, dense_mask, key_lengths, prefix_lengths, text_to_media, causal, qformer_queries, qformer_mode,
        media_mode, latents_per_media,
    )
    c = _common(q, k)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _attn_fwd[grid](
        q, k, v, out, lse, *ptrs, *_q_strides(q, B), *k.stride(), *v.stride(), *out.stride(), *mstrides,
        H, c["GROUP"], Lq, Lk, D, nq, lat, scale * LOG2E, c["LQ_KEY"], c["LK_KEY"],
        **flags, PRECISION=c["precision"], UPCAST=c["upcast"], BLOCK_D=c["BLOCK_D"],
    )
    # fmt: on
    LAUNCHES["attention_fwd"] += 1
    return out, lse


@triton_attention_fwd.register_fake
def _fwd_fake(q, k, v, *args):
    B, _, _, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    out = q.new_empty((B, Lq, H, D)).transpose(1, 2)
    return out, q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("vlkernels::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dense_mask: _MaskT,
    key_lengths: _MaskT,
    prefix_lengths: _MaskT,
    text_to_media: _MaskT,
    causal: bool,
    qformer_queries: int,
    qformer_mode: int,
    media_mode: int,
    latents_per_media: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels: (dq, dk, dv) shaped like (q, k, v)."""
    B, Hk, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    # fmt: off
    ptrs, mstrides, (nq, lat), flags = _mask_launch_args(
        q, k, dense_mask, key_lengths, prefix_lengths, text_to_media, causal, qformer_queries, qformer_mode,
        media_mode, latents_per_media,
    )
    c = _common(q, k)
    qs = _q_strides(q, B)
    delta = poisoned(q.new_empty((B, H, Lq), dtype=torch.float32))
    _attn_bwd_delta[(triton.cdiv(Lq, 32), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Lq, D, BLOCK_M=32, BLOCK_D=c["BLOCK_D"]
    )

    dk = poisoned(torch.empty_like(k))
    dv = poisoned(torch.empty_like(v))
    grid_kv = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hk)
    _attn_bwd_dkdv[grid_kv](
        q, k, v, grad_out, lse, delta, dk, dv, *ptrs, *qs, *k.stride(), *v.stride(), *grad_out.stride(),
        *dk.stride(), *dv.stride(), *mstrides, H, Hk, c["GROUP"], Lq, Lk, D, nq, lat, scale * LOG2E, scale,
        c["LQ_KEY"], c["LK_KEY"], **flags, PRECISION=c["precision"], UPCAST=c["upcast"], BLOCK_D=c["BLOCK_D"],
    )

    shared = q.shape[0] == 1 and B > 1
    chunks = _dq_chunks(B, H, Lq, shared, q.device)
    per_prog = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, per_prog)
    dq = poisoned(torch.empty_like(q))
    dq_acc = poisoned(q.new_empty((chunks, H, Lq, D), dtype=torch.float32)) if shared else dq
    grid_q = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), chunks * H)
    _attn_bwd_dq[grid_q](
        q, k, v, grad_out, lse, delta, dq_acc, *ptrs, *qs, *k.stride(), *v.stride(), *grad_out.stride(),
        *dq_acc.stride(), *mstrides, B, H, c["GROUP"], Lq, Lk, D, nq, lat, scale * LOG2E, scale, per_prog,
        c["LQ_KEY"], c["LK_KEY"], **flags, PRECISION=c["precision"], UPCAST=c["upcast"], BLOCK_D=c["BLOCK_D"],
    )
    # fmt: on
    if shared:
        dq.copy_(dq_acc.sum(dim=0, keepdim=True))
    LAUNCHES["attention_bwd"] += 1
    return dq, dk, dv


@triton_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *mask_tensors = inputs[:7]
    ctx.mask_args = inputs[7:]
    ctx.save_for_backward(q, k, v, output[0], output[1], *mask_tensors)


def _backward_with(bwd_op):
    """The autograd backward of a forward op whose gradients come from ``bwd_op``."""

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *mask_tensors = ctx.saved_tensors
        dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, *mask_tensors, *ctx.mask_args)
        return (dq, dk, dv) + (None,) * 10

    return backward


triton_attention_fwd.register_autograd(
    _backward_with(torch.ops.vlkernels.triton_attention_bwd), setup_context=_setup_context
)


def register_cuda_ops(ns: str) -> None:
    """Fake kernels and autograd of the CUDA C++ ops ``{ns}::attention_fwd`` / ``attention_bwd``
    (csrc/attention.cu; same schemas and outputs as the Triton ops)."""
    torch.library.register_fake(f"{ns}::attention_fwd")(_fwd_fake)
    torch.library.register_fake(f"{ns}::attention_bwd")(_bwd_fake)
    bwd = getattr(torch.ops, ns).attention_bwd
    torch.library.register_autograd(f"{ns}::attention_fwd", _backward_with(bwd), setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


def _shape(t) -> str:
    return str(list(t.shape))


def _check_inputs(q, k, v, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, L, D], got shape {_shape(t)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"attention: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {_shape(k)} and {_shape(v)}")
    B, Hk, Lk, D = k.shape
    Bq, H, Lq, Dq = q.shape
    if Bq not in (B, 1):
        raise ValueError(f"attention: q batch must be {B} (the batch of k) or 1, got {Bq}")
    if Dq != D:
        raise ValueError(f"attention: q head dim must equal k's ({D}), got {Dq}")
    if H % Hk:
        raise ValueError(f"attention: q heads ({H}) must be a multiple of k/v heads ({Hk})")
    if not (16 <= D <= 256 and D % 8 == 0):
        raise ValueError(f"attention: head dim must be a multiple of 8 in [16, 256], got {D}")
    if Lq < 1 or Lk < 1 or B < 1:
        raise ValueError(f"attention: batch and lengths must be >= 1, got q {_shape(q)}, k {_shape(k)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")


def _check_dense_mask(mask, B, H, Lq, Lk, device) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"attention: a tensor mask must be bool (True = may attend), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"attention: mask is on {mask.device}, the inputs are on {device}")
    full = (B, H, Lq, Lk)
    ok = mask.dim() <= 4 and all(m in (1, f) for m, f in zip(mask.shape[::-1], full[::-1], strict=False))
    if not ok:
        raise ValueError(
            f"attention: mask must broadcast to [B, H, Lq, Lk] = {list(full)}, got shape {_shape(mask)}"
        )


def _lower(mask, B, H, Lq, Lk, device):
    """The kernel arguments of ``mask``: 4 optional tensors and 5 integers."""
    if mask is None:
        return (None, None, None, None, False, 0, 0, 0, 1)
    if isinstance(mask, torch.Tensor):
        _check_dense_mask(mask, B, H, Lq, Lk, device)
        return (mask, None, None, None, False, 0, 0, 0, 1)
    if not isinstance(mask, Mask):
        raise TypeError(
            "attention: mask must be None, a bool tensor or a vlkernels.masks mask, "
            f"got {type(mask).__name__}"
        )
    mask.check(B, Lq, Lk, device)

    def i32(t):
        return None if t is None else t.to(torch.int32)

    nq, mode = mask.qformer if mask.qformer is not None else (0, "bidirectional")
    t2m, lat, immediate = mask.media if mask.media is not None else (None, 1, True)
    media_mode = 0 if t2m is None else (1 if immediate else 2)
    return (
        None,
        i32(mask.key_lengths),
        i32(mask.prefix_lengths),
        i32(t2m),
        mask.causal,
        nq,
        QFORMER_MODE_IDS[mode],
        media_mode,
        lat,
    )


def attention(q, k, v, mask=None, *, scale=None, backend=None):
    """Masked multi-head attention, SDPA layout. q [Bq, H, Lq, D]; k, v [B, Hk, Lk, D].

    Returns [B, H, Lq, D] (memory laid out as [B, Lq, H, D], so merging heads is free).
    ``mask``: None, bool broadcastable to [B, H, Lq, Lk] (True = may attend), or a mask from
    ``vlkernels.masks``. Rows with no allowed key give 0 and receive 0 gradient.
    ``scale`` defaults to 1/sqrt(D). ``backend``: None (automatic), "triton", "cuda", "torch".
    """
    _check_inputs(q, k, v, scale)
    B, _, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    lowered = _lower(mask, B, H, Lq, Lk, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    chosen = _dispatch.choose(backend, q.device, "attention")
    if chosen == "torch":
        return attention_ref(q, k, v, mask, scale)
    fwd = _dispatch.cuda_ops().attention_fwd if chosen == "cuda" else triton_attention_fwd
    out, _ = fwd(q, k, v, *lowered, scale)
    return out
