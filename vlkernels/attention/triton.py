"""The Triton backend of attention: flash-attention kernels (forward, backward), their launchers
and the ``vlkernels::triton_attention_fwd`` / ``_bwd`` ops. Every mask, shared queries, grouped
keys; fp16, bf16, fp32; CUDA tensors, or CPU tensors under the interpreter.

Masks arrive lowered (``masks.MaskArgs``): every analytic part allows a query row one key
interval ``[lo, hi)`` (``_row_bounds``, the Triton statement of ``MaskArgs.intervals``); the
kernels iterate only over the key tiles that a query tile's intervals touch (backward: only over
the query tiles that touch a key tile) and apply a dense bool mask on top, element by element.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vlkernels import _dispatch, _schema
from vlkernels._dispatch import interpreter_on
from vlkernels._triton_utils import LAUNCHES, LOG2E, autotuned, cdiv, launch, next_pow2, poisoned, tanh
from vlkernels.attention import args as A
from vlkernels.attention import dropout
from vlkernels.attention import plan as P
from vlkernels.masks import MaskArgs, MediaMode, QFormerMode


class _View(NamedTuple):
    """A tensor as a kernel sees it: its pointer and the strides of its dims."""

    ptr: torch.Tensor
    stride: tuple


class _Buckets(NamedTuple):
    """T5's bucket table (``bias.bucket_table``) as a kernel sees it: the bucket of relative
    position r at ptr[r + max_distance], r clamped to [-max_distance, max_distance]."""

    ptr: torch.Tensor
    max_distance: int


def _kernel_mask(m: MaskArgs, B: int, H: int, Lq: int, Lk: int) -> MaskArgs:
    """``m`` as the kernels take it: its tensors as [B, H, Lq, Lk]-indexed views (None when absent:
    their code is compiled out) and the flags and modes as compile-time constants."""
    dense = m.dense_mask
    if dense is not None:
        dense = dense.expand(B, H, Lq, Lk).view(torch.uint8)
        dense = _View(dense, dense.stride())
    t2m = m.text_to_media
    if t2m is not None:
        t2m = _View(t2m, t2m[:, None, :, None].stride())
    bias = m.bias
    if bias is not None:
        bias = bias.expand(B, H, Lq, Lk)
        bias = _View(bias, bias.stride())
    position, buckets = m.position_bias, m.position_buckets
    if position is not None:
        if buckets is None:  # ALiBi's slopes [B or 1, H]
            position = position.expand(B, H)
        position = _View(position, position.stride())
    if buckets is not None:
        buckets = _Buckets(buckets, (buckets.numel() - 1) // 2)
    return m._replace(
        dense_mask=dense,
        text_to_media=t2m,
        bias=bias,
        position_bias=position,
        position_buckets=buckets,
        causal=tl.constexpr(m.causal),
        qformer_mode=tl.constexpr(int(m.qformer_mode)),
        media_mode=tl.constexpr(int(m.media_mode)),
    )


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Kernel signatures stay packed (the formatter would put each argument on its own line).
# fmt: off


@triton.jit
def _block(P, stride, b, h, rows, cols):
    """Pointers to P[b, h, rows, cols], [len(rows), len(cols)]; ``h`` one head or one per row.
    ``b`` and ``h`` are int64 (or 0), rows and cols become int64: an offset past 2**31 elements (a
    [B, L, H, D] view with L·H·D >= 2**31, a dense mask with Lq·Lk >= 2**31) does not wrap."""
    rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    return P + b * stride[0] + (h * stride[1] + rows * stride[2])[:, None] + cols[None, :] * stride[3]


@triton.jit
def _clamped(x, low, high):
    """A mask value (int32 or int64) as int32 in [low, high], where it gives the same intervals:
    the interval arithmetic stays in int32 (loop bounds the pipeliner takes), any length is safe."""
    return tl.minimum(tl.maximum(x, low), high).to(tl.int32)


# the mask modes as the kernels compare them
_MULTIMODAL_CAUSAL = tl.constexpr(int(QFormerMode.MULTIMODAL_CAUSAL))
_UNIMODAL = tl.constexpr(int(QFormerMode.UNIMODAL))
_NO_MEDIA = tl.constexpr(int(MediaMode.NONE))
_IMMEDIATE = tl.constexpr(int(MediaMode.IMMEDIATE))


@triton.jit
def _row_bounds(offs_m, b, Lq, Lk, m):
    """Allowed key interval [lo, hi) of each query row (masks.MaskArgs.intervals); empty rows
    get [Lk, 0)."""
    lo = tl.zeros_like(offs_m)
    hi = tl.zeros_like(offs_m) + Lk
    nq = m.qformer_queries
    if m.causal:
        hi = tl.minimum(hi, offs_m + (Lk - Lq) + 1)
    if m.key_lengths is not None:
        hi = tl.minimum(hi, _clamped(tl.load(m.key_lengths + b), -1, Lk))
    if m.qformer_mode == _MULTIMODAL_CAUSAL:  # queries -> queries; text -> queries + text up to itself
        hi = tl.minimum(hi, tl.where(offs_m < nq, nq, tl.maximum(offs_m + 1, nq)))
    if m.qformer_mode == _UNIMODAL:  # queries -> queries; text -> text
        hi = tl.minimum(hi, tl.where(offs_m < nq, nq, Lk))
        lo = tl.maximum(lo, tl.where(offs_m < nq, 0, nq))
    if m.prefix_lengths is not None:
        hi = tl.minimum(hi, tl.maximum(_clamped(tl.load(m.prefix_lengths + b), -1, Lk), offs_m + 1))
    if m.media_mode != _NO_MEDIA:
        t2m = m.text_to_media
        t = tl.load(t2m.ptr + b * t2m.stride[0] + offs_m * t2m.stride[2], mask=offs_m < Lq, other=0)
        t = _clamped(t, -1, Lk // m.latents_per_media + 1)
        hi = tl.minimum(hi, t * m.latents_per_media)
        if m.media_mode == _IMMEDIATE:
            lo = tl.maximum(lo, (t - 1) * m.latents_per_media)
    if m.window > 0:
        lo = tl.maximum(lo, offs_m + (Lk - Lq) - m.window + 1)
    if m.row_lo is not None:  # per-row bounds: a document's run, a dense mask's span
        row = b * Lq + offs_m
        lo = tl.maximum(lo, _clamped(tl.load(m.row_lo + row, mask=offs_m < Lq, other=0), 0, Lk))
        hi = tl.minimum(hi, _clamped(tl.load(m.row_hi + row, mask=offs_m < Lq, other=0), 0, Lk))
    empty = (offs_m >= Lq) | (lo >= hi)
    return tl.where(empty, Lk, lo), tl.where(empty, 0, hi)


@triton.jit
def _allowed(offs_m, offs_n, lo, hi, m, b, h, Lq, Lk):
    ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
    if m.dense_mask is not None:  # (outside [0, Lq) x [0, Lk) the intervals allow nothing)
        need = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if m.row_run is not None:  # rows whose mask is their span: no element loaded
            run = tl.load(m.row_run + b * Lq + offs_m, mask=offs_m < Lq, other=1)
            need = need & (run == 0)[:, None]
        ptrs = _block(m.dense_mask.ptr, m.dense_mask.stride, b, h, offs_m, offs_n)
        ok = ok & (tl.load(ptrs, mask=need, other=1) != 0)
    return ok


@triton.jit
def _position(m, b, h, offs_m, offs_n, Lq, Lk):
    """The position bias of a tile (``bias``: fp32, natural units) and what its gradient is reduced
    by: T5, each element's bucket (int32); ALiBi, the bias's derivative in the slope, -|i - j|.
    ``h`` one head or one per row."""
    rel = offs_n[None, :] - (offs_m[:, None] + (Lk - Lq + m.position_shift))  # key - query position
    hh = (h + offs_m.to(tl.int64) * 0)[:, None]
    t = m.position_bias
    if m.position_buckets is not None:  # T5: table [H, num_buckets]
        md = m.position_buckets.max_distance
        by = tl.load(m.position_buckets.ptr + (tl.minimum(tl.maximum(rel, -md), md) + md))
        value = tl.load(t.ptr + hh * t.stride[0] + by * t.stride[1]).to(tl.float32)
    else:  # ALiBi: slopes [B, H]
        by = -tl.abs(rel).to(tl.float32)
        value = tl.load(t.ptr + b * t.stride[0] + hh * t.stride[1]).to(tl.float32) * by
    return value, by


@triton.jit
def _scores(q, k, qk_scale, softcap, m, offs_m, offs_n, b, h, Lq, Lk, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr, CAP: tl.constexpr):
    """Scores of a tile in log2 units, fp32: q kᵀ · scale, capped (CAP: softcap · tanh(· / softcap)),
    + the position bias + the float bias; and the cap's derivative 1 - tanh² (1.0 without CAP)."""
    s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    dcap = 1.0
    if CAP:
        t = tanh(s * (1.0 / (softcap * LOG2E)))
        s = t * (softcap * LOG2E)
        dcap = 1.0 - t * t
    if m.position_bias is not None:
        position, _ = _position(m, b, h, offs_m, offs_n, Lq, Lk)
        s += position * LOG2E
    if m.bias is not None:
        ptrs = _block(m.bias.ptr, m.bias.stride, b, h, offs_m, offs_n)
        ok = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        bias = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        # log2 units; a finite bias stays finite (finfo.min · log2(e) would overflow to -inf)
        finite = tl.maximum(bias * LOG2E, -3.4028234663852886e38)
        s += tl.where(bias == float("-inf"), bias, finite)
    return s, dcap


@triton.jit
def _lse_pair(m, log2_l):
    """A row's log-sum-exp m + log2_l (log2 units; m the row maximum) as the pair (its fp32
    rounding hi, the rest lo = m + log2_l - hi). Only a float bias makes |m| so large (finfo.min
    swamps the scores) that hi alone loses the row sum; hi - m is exact (the two are close)."""
    hi = m + log2_l
    return hi, (m - hi) + log2_l


@triton.jit
def _row_lse(LSE, row, ok):
    """The log-sum-exp of some rows, stored as ``_lse_pair`` at LSE[2 · row] and LSE[2 · row + 1],
    as (hi, 2^-lo): p = 2^(s - hi) · 2^-lo."""
    hi = tl.load(LSE + 2 * row, mask=ok, other=0.0)
    lo = tl.load(LSE + 2 * row + 1, mask=ok, other=0.0)
    return hi, tl.exp2(-lo)


@triton.jit
def _probs(q, k, qk_scale, softcap, m, offs_m, offs_n, lo, hi, lse, b, h, Lq, Lk, PRECISION: tl.constexpr,
           UPCAST: tl.constexpr, CAP: tl.constexpr):
    """The softmax of a tile from the saved log-sum-exp (``_row_lse``'s pair, log2 units), 0 where
    not allowed, and the cap's derivative (``_scores``)."""
    s, dcap = _scores(q, k, qk_scale, softcap, m, offs_m, offs_n, b, h, Lq, Lk, PRECISION, UPCAST, CAP)
    lse_hi, factor = lse
    p = tl.exp2(s - lse_hi[:, None])
    if m.bias is not None:  # (without a bias the scores are small enough for lse_hi alone)
        p *= factor[:, None]
    return tl.where(_allowed(offs_m, offs_n, lo, hi, m, b, h, Lq, Lk), p, 0.0), dcap


@triton.jit
def _kept(drop, b, h, H, offs_m, offs_n, DROPOUT: tl.constexpr):
    """Attention dropout's keep indicator for a tile: 1.0 where kept, 0.0 where dropped (1.0
    without DROPOUT). ``drop`` = (the seed's pointer, threshold, scale); the keep rule is
    attention/dropout.py's."""
    z = 1.0
    if DROPOUT:  # (one return: the compiler wants one type per function)
        seed_ptr, thresh, _ = drop
        seed = tl.load(seed_ptr)
        zero = offs_m[:, None] * 0 + offs_n[None, :] * 0
        bh = (b * H + h + offs_m * 0).to(tl.int32)[:, None]  # one head or one per row
        r, _, _, _ = tl.philox(seed, offs_n[None, :] + zero, offs_m[:, None] + zero, bh + zero, zero)
        z = tl.where((r >> 8).to(tl.int32) >= thresh, 1.0, 0.0)
    return z


@triton.jit
def _rescale(drop, DROPOUT: tl.constexpr):
    """Dropout's 1 / (1 - p) (1.0 without DROPOUT). It multiplies fp32 values (the output, dV, dP),
    never probabilities about to be rounded to 16 bits for a GEMM: there the row maximum of P (1
    before normalisation) would round the same way in every row, bf16's 1 / 0.9 being 1.109, a
    bias of -0.16% in the output."""
    s = 1.0
    if DROPOUT:
        _, _, s = drop
    return s


@triton.jit
def _keep(drop, b, h, H, offs_m, offs_n, DROPOUT: tl.constexpr):
    """Attention dropout's factor for a tile, for fp32 arithmetic: 1 / (1 - p) where kept, 0 where
    dropped (1.0 without DROPOUT)."""
    return _kept(drop, b, h, H, offs_m, offs_n, DROPOUT) * _rescale(drop, DROPOUT)


@triton.jit
def _rows(Q, DO, LSE, sq, sdo, b, h, H, offs_m, offs_d, q_ok, Lq):
    """The query rows of a backward tile: q, do and lse (``_row_lse``)."""
    q = tl.load(_block(Q, sq, b, h, offs_m, offs_d), mask=q_ok, other=0.0)
    do = tl.load(_block(DO, sdo, b, h, offs_m, offs_d), mask=q_ok, other=0.0)
    lse = _row_lse(LSE, (b * H + h) * Lq + offs_m, offs_m < Lq)
    return q, do, lse


@triton.jit
def _grad_rows(Q, DO, O, LSE, DELTA, sq, sdo, so, b, h, H, offs_m, offs_d, q_ok, Lq, FUSED: tl.constexpr):
    """The query rows of a backward tile: q, do, lse (``_row_lse``) and delta (FUSED: rowsum(o · do)
    computed here, DELTA not read)."""
    q, do, lse = _rows(Q, DO, LSE, sq, sdo, b, h, H, offs_m, offs_d, q_ok, Lq)
    row = (b * H + h) * Lq + offs_m
    if FUSED:
        o = tl.load(_block(O, so, b, h, offs_m, offs_d), mask=q_ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    else:
        delta = tl.load(DELTA + row, mask=offs_m < Lq, other=0.0)
    return q, do, lse, delta


@triton.jit
def _query_tile(GROUP, tile, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query tile ``tile`` of this program (grid axis 1: the head, axis 2: the outer index, a batch
    entry or a dq chunk; each within CUDA's 65,535): (outer, head, key head, query rows, feature
    columns)."""
    h = tl.program_id(1).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.program_id(2).to(tl.int64), h, h // GROUP, offs_m, tl.arange(0, BLOCK_D)


@triton.jit
def _packed_query_tile(GROUP, Lq, tile, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query tile ``tile`` of a program of the packed forward (grouped keys, a few query rows: axis
    1 is the key head, axis 2 the batch entry): its rows are the (head, query row) pairs of the
    GROUP query heads of one key head, head-major, so that they read the key head's K and V once.
    (outer, the rows' heads, key head, the rows' query rows (Lq past GROUP·Lq), feature columns)."""
    hk = tl.program_id(1).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    h = hk * GROUP + tl.minimum(rows // Lq, GROUP - 1)
    offs_m = tl.where(rows < GROUP * Lq, rows % Lq, Lq)
    return tl.program_id(2).to(tl.int64), h, hk, offs_m, tl.arange(0, BLOCK_D)


@triton.jit
def _key_tile(K, V, sk, sv, b, hk, start_n, offs_d, d_ok, k_lo, k_hi, BLOCK_N: tl.constexpr):
    """The key tile that starts at ``start_n``: (its key indices, k, v). Only keys in [k_lo, k_hi)
    are read (the span of the rows' intervals, within [0, Lk)): others are 0, so that a key no row
    may attend never reaches a result, whatever it holds."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = ((offs_n >= k_lo) & (offs_n < k_hi))[:, None] & d_ok[None, :]
    k = tl.load(_block(K, sk, b, hk, offs_n, offs_d), mask=kv_ok, other=0.0)
    v = tl.load(_block(V, sv, b, hk, offs_n, offs_d), mask=kv_ok, other=0.0)
    return offs_n, k, v


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: bf16 operands are multiplied as fp32 (exact products,
    as on tensor cores) because the Triton interpreter's bf16 dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@autotuned(P.FWD_CONFIGS, [*P.AUTOTUNE_KEY, "SPLIT", "PACK"], P.INTERPRET_CONFIG, prune=P.fwd_prune)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, sq, sk, sv, so, mask, H, GROUP, Lq, Lk, D, qk_scale, softcap, drop, KEYS_PER_SPLIT,
    so_split, LQ_KEY, LK_KEY, MASK_KEY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    CAP: tl.constexpr, DROPOUT: tl.constexpr, SPLIT: tl.constexpr, PACK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile over its allowed keys. SPLIT (flash-decoding: few queries, many keys): axis 0
    also numbers the splits of KEYS_PER_SPLIT keys (a multiple of BLOCK_N), split-major; the program
    writes its fp32 partial output (normalised over its keys) at O + split · so_split and its
    partial lse (log2; -inf for none) at LSE + split · B·H·Lq, for _attn_fwd_combine. PACK: the
    tile's rows are the query rows of the GROUP heads that share a key head
    (``_packed_query_tile``)."""
    tile = tl.program_id(0)
    if SPLIT:
        tiles = tl.cdiv(GROUP * Lq if PACK else Lq, BLOCK_M)
        split = tile // tiles
        tile = tile % tiles
    if PACK:
        b, h, hk, offs_m, offs_d = _packed_query_tile(GROUP, Lq, tile, BLOCK_M, BLOCK_D)
    else:
        b, h, hk, offs_m, offs_d = _query_tile(GROUP, tile, BLOCK_M, BLOCK_D)
    lo, hi = _row_bounds(offs_m, b, Lq, Lk, mask)
    k_lo, k_hi = tl.min(lo, axis=0), tl.max(hi, axis=0)  # the keys any of the rows may attend
    n_start = (k_lo // BLOCK_N) * BLOCK_N
    n_end = k_hi
    if SPLIT:
        n_start = tl.maximum(n_start, split * KEYS_PER_SPLIT)
        n_end = tl.minimum(n_end, split * KEYS_PER_SPLIT + KEYS_PER_SPLIT)
        O += split.to(tl.int64) * so_split
        LSE += split.to(tl.int64) * (2 * tl.num_programs(2) * H * Lq)  # 2·B·H·Lq

    d_ok = offs_d < D
    q = tl.load(_block(Q, sq, b, h, offs_m, offs_d), mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for it in tl.range(0, tl.cdiv(n_end - n_start, BLOCK_N)):  # from 0: Triton pipelines such loops
        n0 = n_start + it * BLOCK_N
        offs_n, k, v = _key_tile(K, V, sk, sv, b, hk, n0, offs_d, d_ok, k_lo, k_hi, BLOCK_N)
        s, _ = _scores(q, k, qk_scale, softcap, mask, offs_m, offs_n, b, h, Lq, Lk, PRECISION, UPCAST, CAP)
        s = tl.where(_allowed(offs_m, offs_n, lo, hi, mask, b, h, Lq, Lk), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p *= _kept(drop, b, h, H, offs_m, offs_n, DROPOUT)  # after the sum: the softmax is dropout's input
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    out = acc * (_rescale(drop, DROPOUT) / tl.where(empty, 1.0, l_i))[:, None]
    hi, lo = _lse_pair(m_i, tl.log2(tl.where(empty, 1.0, l_i)))
    hi = tl.where(empty, float("-inf") if SPLIT else float("inf"), hi)
    lo = tl.where(empty, 0.0, lo)
    m_ok = offs_m < Lq
    o_ok = m_ok[:, None] & d_ok[None, :]
    tl.store(_block(O, so, b, h, offs_m, offs_d), out.to(O.dtype.element_ty), mask=o_ok)
    row = (b * H + h) * Lq + offs_m
    tl.store(LSE + 2 * row, hi, mask=m_ok)
    tl.store(LSE + 2 * row + 1, lo, mask=m_ok)


@triton.jit
def _attn_fwd_combine(PO, PLSE, O, LSE, spo_split, spo, so, SPLITS, H, Lq, D, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Flash-decoding's second pass: out and lse of each query row from the SPLITS partial outputs
    PO [SPLITS, B, H, Lq, D] fp32 and partial lse PLSE [SPLITS, B·H·Lq, 2] (``_lse_pair``, log2,
    -inf: no key in the split); a row with no key anywhere gets 0 and lse +inf. Axis 1: the head,
    axis 2: the batch entry."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    ok = m_ok[:, None] & (offs_d[None, :] < D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_rows = tl.num_programs(2) * H * Lq
    for split in tl.range(0, SPLITS):
        s = tl.cast(split, tl.int64)
        row = s * n_rows + bh * Lq + offs_m
        hi_s = tl.load(PLSE + 2 * row, mask=m_ok, other=float("-inf"))
        lo_s = tl.load(PLSE + 2 * row + 1, mask=m_ok, other=0.0)
        o_s = tl.load(_block(PO + s * spo_split, spo, b, h, offs_m, offs_d), mask=ok, other=0.0)
        m_new = tl.maximum(m_i, hi_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2((hi_s - m_safe) + lo_s)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    hi, lo = _lse_pair(m_i, tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(_block(O, so, b, h, offs_m, offs_d), out.to(O.dtype.element_ty), mask=ok)
    tl.store(LSE + 2 * (bh * Lq + offs_m), tl.where(empty, float("inf"), hi), mask=m_ok)
    tl.store(LSE + 2 * (bh * Lq + offs_m) + 1, tl.where(empty, 0.0, lo), mask=m_ok)


@triton.jit
def _attn_mask_span(M, LO, HI, RUN, sm, HM, Lq, Lk, BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Per query row of batch entry b, the span [lo, hi) of the keys a dense mask allows (BIAS: a
    float mask, allowed where not -inf) over its HM heads: LO, HI [B, Lq] int64, [Lk, 0) for none;
    RUN (a bool mask's) [B, Lq] uint8: 1 where every head allows every key of the span (the
    allowed count is HM times the span's length), or none."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lo = tl.zeros([BLOCK_M], tl.int32) + Lk
    hi = tl.zeros([BLOCK_M], tl.int32)
    count = tl.zeros([BLOCK_M], tl.int32)
    for h in tl.range(0, HM):
        for n0 in tl.range(0, Lk, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
            x = tl.load(_block(M, sm, b, tl.cast(h, tl.int64), offs_m, offs_n), mask=ok, other=0)
            live = ok & ((x != float("-inf")) if BIAS else (x != 0))
            lo = tl.minimum(lo, tl.min(tl.where(live, offs_n[None, :], Lk), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(live, offs_n[None, :] + 1, 0), axis=1))
            count += tl.sum(live.to(tl.int32), axis=1)
    row = b * Lq + offs_m
    tl.store(LO + row, lo.to(tl.int64), mask=offs_m < Lq)
    tl.store(HI + row, hi.to(tl.int64), mask=offs_m < Lq)
    if RUN is not None:
        run = (count == HM * (hi - lo)) | (hi <= lo)
        tl.store(RUN + row, run.to(tl.uint8), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, so, sdo, H, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d o * do (fp32); axis 1: the head, axis 2: the batch entry."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(_block(O, so, b, h, offs_m, offs_d), mask=ok, other=0.0)
    do = tl.load(_block(DO, sdo, b, h, offs_m, offs_d), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@autotuned(
    P.BWD_CONFIGS, [*P.AUTOTUNE_KEY, "FUSED"], P.INTERPRET_CONFIG, prune=P.bwd_prune("dkdv", "BLOCK_N", "Lk")
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, sq, sk, sv, so, sdo, sdq, sdk, sdv, mask, H, Hk, GROUP, Lq, Lk, D,
    qk_scale, sm_scale, softcap, drop, LQ_KEY, LK_KEY, MASK_KEY: tl.constexpr, FUSED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, CAP: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one key tile: loops over the GROUP query heads sharing it and over the query
    tiles from the first to the last whose allowed intervals touch it (found first, so that the
    main loop has no branch and Triton pipelines it; a tile between them that does not touch the
    key tile contributes zeros). FUSED (the tile holds every key, queries not shared): the whole
    backward in one pass, FlashAttention's five GEMMs: delta from O and DO, and DQ of every query
    tile, complete since no other program has keys; DELTA is not read."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)  # axis 2: the batch entry
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_first = 0 if FUSED else Lq  # FUSED: every query tile, for its dq (zeros where nothing is allowed)
    m_last = (Lq - 1) // BLOCK_M * BLOCK_M if FUSED else -BLOCK_M
    k_lo = Lk  # the span of every row's interval: keys outside it are not read
    k_hi = 0
    for start_m in tl.range(0, Lq, BLOCK_M):  # the masks are per batch entry: the same for every head
        lo, hi = _row_bounds(start_m + tl.arange(0, BLOCK_M), b, Lq, Lk, mask)
        k_lo = tl.minimum(k_lo, tl.min(lo, axis=0))
        k_hi = tl.maximum(k_hi, tl.max(hi, axis=0))
        if not FUSED:
            touches = tl.max(((lo < n0 + BLOCK_N) & (hi > n0)).to(tl.int32), axis=0) > 0
            m_first = tl.where(touches, tl.minimum(m_first, start_m), m_first)
            m_last = tl.where(touches, start_m, m_last)
    kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]  # the tile's stores
    live = ((offs_n >= k_lo) & (offs_n < k_hi))[:, None] & d_ok[None, :]
    rescale = _rescale(drop, DROPOUT)
    k = tl.load(_block(K, sk, b, hk, offs_n, offs_d), mask=live, other=0.0)
    v = tl.load(_block(V, sv, b, hk, offs_n, offs_d), mask=live, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for it in tl.range(0, (m_last - m_first) // BLOCK_M + 1):
            offs_m = m_first + it * BLOCK_M + tl.arange(0, BLOCK_M)
            lo, hi = _row_bounds(offs_m, b, Lq, Lk, mask)
            q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
            q, do, lse, delta = _grad_rows(
                Q, DO, O, LSE, DELTA, sq, sdo, so, b, h, H, offs_m, offs_d, q_ok, Lq, FUSED
            )
            p, dcap = _probs(q, k, qk_scale, softcap, mask, offs_m, offs_n, lo, hi, lse, b, h, Lq, Lk,
                             PRECISION, UPCAST, CAP)
            kept = _kept(drop, b, h, H, offs_m, offs_n, DROPOUT)
            dv += _mm(tl.trans((p * kept).to(do.dtype)), do, PRECISION, UPCAST)
            dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp * (kept * rescale) - delta[:, None]) * dcap
            dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
            if FUSED:
                dq = _mm(ds.to(k.dtype), k, PRECISION, UPCAST) * sm_scale
                tl.store(_block(DQ, sdq, b, h, offs_m, offs_d), dq.to(DQ.dtype.element_ty), mask=q_ok)
    dk *= sm_scale
    dv *= rescale
    tl.store(_block(DK, sdk, b, hk, offs_n, offs_d), dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(_block(DV, sdv, b, hk, offs_n, offs_d), dv.to(DV.dtype.element_ty), mask=kv_ok)


@autotuned(
    P.BWD_CONFIGS,
    [*P.AUTOTUNE_KEY, "B_PER_PROG", "FUSED"],
    P.INTERPRET_CONFIG,
    prune=P.bwd_prune("dq", "BLOCK_M", "Lq"),
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, sq, sk, sv, so, sdo, sdq, sdk, sdv, mask, B, H, GROUP, Lq, Lk, D,
    qk_scale, sm_scale, softcap, drop, B_PER_PROG, LQ_KEY, LK_KEY, MASK_KEY: tl.constexpr,
    FUSED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, CAP: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one query tile, summed over the B_PER_PROG batch entries of chunk c (shared queries:
    chunk c's partial sum goes to DQ[c]; otherwise B_PER_PROG == 1 and c is the batch). FUSED (the
    tile holds every query; one query head per key head, queries not shared): the whole backward
    in one pass, FlashAttention's five GEMMs: delta from O and DO, and DK, DV of every key tile,
    complete since no other program has queries (zeros for the tiles no query may attend);
    DELTA is not read."""
    c, h, hk, offs_m, offs_d = _query_tile(GROUP, tl.program_id(0), BLOCK_M, BLOCK_D)
    d_ok = offs_d < D
    q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rescale = _rescale(drop, DROPOUT)
    b_end = tl.minimum(c * B_PER_PROG + B_PER_PROG, B)
    for b in tl.range(c * B_PER_PROG, b_end):
        lo, hi = _row_bounds(offs_m, b, Lq, Lk, mask)
        k_lo, k_hi = tl.min(lo, axis=0), tl.max(hi, axis=0)
        n_start = (k_lo // BLOCK_N) * BLOCK_N
        n_tiles = tl.maximum(tl.cdiv(k_hi - n_start, BLOCK_N), 0)
        q, do, lse, delta = _grad_rows(Q, DO, O, LSE, DELTA, sq, sdo, so, b, h, H, offs_m, offs_d, q_ok, Lq,
                                       FUSED)
        for it in tl.range(0, n_tiles):
            offs_n, k, v = _key_tile(K, V, sk, sv, b, hk, n_start + it * BLOCK_N, offs_d, d_ok, k_lo, k_hi,
                                     BLOCK_N)
            p, dcap = _probs(q, k, qk_scale, softcap, mask, offs_m, offs_n, lo, hi, lse, b, h, Lq, Lk,
                             PRECISION, UPCAST, CAP)
            kept = _kept(drop, b, h, H, offs_m, offs_n, DROPOUT)
            dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp * (kept * rescale) - delta[:, None]) * dcap
            dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
            if FUSED:
                kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
                dv = _mm(tl.trans((p * kept).to(do.dtype)), do, PRECISION, UPCAST) * rescale
                dk = _mm(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST) * sm_scale
                tl.store(_block(DK, sdk, b, hk, offs_n, offs_d), dk.to(DK.dtype.element_ty), mask=kv_ok)
                tl.store(_block(DV, sdv, b, hk, offs_n, offs_d), dv.to(DV.dtype.element_ty), mask=kv_ok)
        if FUSED:  # the key tiles before and after the attended ones
            zero = tl.zeros([BLOCK_N, BLOCK_D], DK.dtype.element_ty)
            for start_n in tl.range(0, n_start, BLOCK_N):
                _store_zero_tile(DK, DV, sdk, sdv, b, hk, start_n, offs_d, d_ok, Lk, zero, BLOCK_N)
            for start_n in tl.range(n_start + n_tiles * BLOCK_N, Lk, BLOCK_N):
                _store_zero_tile(DK, DV, sdk, sdv, b, hk, start_n, offs_d, d_ok, Lk, zero, BLOCK_N)
    dq *= sm_scale
    tl.store(_block(DQ, sdq, c, h, offs_m, offs_d), dq.to(DQ.dtype.element_ty), mask=q_ok)


@triton.jit
def _store_zero_tile(DK, DV, sdk, sdv, b, hk, start_n, offs_d, d_ok, Lk, zero, BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
    tl.store(_block(DK, sdk, b, hk, offs_n, offs_d), zero, mask=kv_ok)
    tl.store(_block(DV, sdv, b, hk, offs_n, offs_d), zero, mask=kv_ok)


@triton.jit
def _attn_bwd_dq_sum(PART, DQ, spart, sdq, CHUNKS, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Shared queries: DQ[0, h] = the sum of the fp32 partials PART[c, h] over the chunks."""
    h = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c in tl.range(0, CHUNKS):
        dq += tl.load(_block(PART, spart, tl.cast(c, tl.int64), h, offs_m, offs_d), mask=ok, other=0.0)
    tl.store(_block(DQ, sdq, 0, h, offs_m, offs_d), dq.to(DQ.dtype.element_ty), mask=ok)


@triton.jit
def _exact_delta(q, do, lse, K, V, sk, sv, mask, b, h, hk, H, offs_m, offs_d, d_ok, lo, hi, k_lo, k_hi, Lq,
                 Lk, qk_scale, softcap, drop, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 CAP: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The bias gradients' first pass over the key tiles a query tile attends: (delta = rowsum(P ∘
    dO Vᵀ ∘ Z), Z the dropout factor, and the row sums of P, 1 up to the lse's rounding). delta
    is not taken from the rounded output: dS is not averaged over a feature dim, so delta's
    rounding error would show in it."""
    n_start = (k_lo // BLOCK_N) * BLOCK_N
    delta = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for it in tl.range(0, tl.maximum(tl.cdiv(k_hi - n_start, BLOCK_N), 0)):
        offs_n, k, v = _key_tile(K, V, sk, sv, b, hk, n_start + it * BLOCK_N, offs_d, d_ok, k_lo, k_hi,
                                 BLOCK_N)
        p, _ = _probs(q, k, qk_scale, softcap, mask, offs_m, offs_n, lo, hi, lse, b, h, Lq, Lk, PRECISION,
                      UPCAST, CAP)
        z = _keep(drop, b, h, H, offs_m, offs_n, DROPOUT)
        delta += tl.sum(p * z * _mm(do, tl.trans(v), PRECISION, UPCAST), axis=1)
        total += tl.sum(p, axis=1)
    return delta, total


@triton.jit
def _attn_bwd_dbias(
    Q, K, V, DO, LSE, DB, sq, sk, sv, sdo, sdb, mask, H, GROUP, Lq, Lk, D, qk_scale, softcap, drop,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, CAP: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The float bias's gradient, dS = P ∘ (dO Vᵀ ∘ Z - delta) (Z the dropout factor), of one query
    tile over every key tile: DB [B, H, Lq, Lk] fp32, every element written (0 where nothing is
    allowed; the bias is added after the cap, so dS has no cap factor). delta from
    ``_exact_delta``."""
    b, h, hk, offs_m, offs_d = _query_tile(GROUP, tl.program_id(0), BLOCK_M, BLOCK_D)
    lo, hi = _row_bounds(offs_m, b, Lq, Lk, mask)
    k_lo, k_hi = tl.min(lo, axis=0), tl.max(hi, axis=0)
    d_ok = offs_d < D
    q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    q, do, lse = _rows(Q, DO, LSE, sq, sdo, b, h, H, offs_m, offs_d, q_ok, Lq)
    delta = _exact_delta(q, do, lse, K, V, sk, sv, mask, b, h, hk, H, offs_m, offs_d, d_ok, lo, hi, k_lo,
                         k_hi, Lq, Lk, qk_scale, softcap, drop, PRECISION, UPCAST, CAP, DROPOUT, BLOCK_M,
                         BLOCK_N)[0]
    for start_n in tl.range(0, Lk, BLOCK_N):  # every tile: DB is written whole
        offs_n, k, v = _key_tile(K, V, sk, sv, b, hk, start_n, offs_d, d_ok, k_lo, k_hi, BLOCK_N)
        p, _ = _probs(q, k, qk_scale, softcap, mask, offs_m, offs_n, lo, hi, lse, b, h, Lq, Lk, PRECISION,
                      UPCAST, CAP)
        z = _keep(drop, b, h, H, offs_m, offs_n, DROPOUT)
        ds = p * (_mm(do, tl.trans(v), PRECISION, UPCAST) * z - delta[:, None])
        db_ok = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        tl.store(_block(DB, sdb, b, h, offs_m, offs_n), ds, mask=db_ok)


@triton.jit
def _attn_bwd_dposition(
    Q, K, V, DO, LSE, DP, sq, sk, sv, sdo, mask, H, GROUP, Lq, Lk, D, qk_scale, softcap, drop,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, CAP: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The position bias's gradient over one query tile's allowed keys, dS = P ∘ (dO Vᵀ ∘ Z -
    delta) (Z the dropout factor; the bias is added after the cap, so no cap factor) reduced: T5,
    summed per bucket; ALiBi, dS · -|i - j| summed. delta from ``_exact_delta`` (ALiBi weighs dS
    by distances up to Lk, which would scale the output's rounding error in delta); P is
    renormalised by its row sums from that pass. DP
    [B, H, tiles, BLOCK_P] fp32 (T5: bucket c at c, 0 past the table; ALiBi: at 0, 0 elsewhere):
    the tiles' partial sums, which the launcher adds in a fixed order (no atomics). Each tile loops
    only over the buckets between its smallest and its largest."""
    b, h, hk, offs_m, offs_d = _query_tile(GROUP, tl.program_id(0), BLOCK_M, BLOCK_D)
    lo, hi = _row_bounds(offs_m, b, Lq, Lk, mask)
    k_lo, k_hi = tl.min(lo, axis=0), tl.max(hi, axis=0)
    n_start = (k_lo // BLOCK_N) * BLOCK_N
    n_tiles = tl.maximum(tl.cdiv(k_hi - n_start, BLOCK_N), 0)
    d_ok = offs_d < D
    q_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    q, do, lse = _rows(Q, DO, LSE, sq, sdo, b, h, H, offs_m, offs_d, q_ok, Lq)
    delta, total = _exact_delta(q, do, lse, K, V, sk, sv, mask, b, h, hk, H, offs_m, offs_d, d_ok, lo, hi,
                                k_lo, k_hi, Lq, Lk, qk_scale, softcap, drop, PRECISION, UPCAST, CAP, DROPOUT,
                                BLOCK_M, BLOCK_N)
    # P renormalised: the bias makes the scores, and the lse, large, and the lse's rounding then
    # scales a row's P by a factor that ALiBi's distance weights would carry into the sum
    norm = 1.0 / tl.where(total == 0.0, 1.0, total)
    delta *= norm
    cols = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for it in tl.range(0, n_tiles):
        offs_n, k, v = _key_tile(K, V, sk, sv, b, hk, n_start + it * BLOCK_N, offs_d, d_ok, k_lo, k_hi,
                                 BLOCK_N)
        p, _ = _probs(q, k, qk_scale, softcap, mask, offs_m, offs_n, lo, hi, lse, b, h, Lq, Lk, PRECISION,
                      UPCAST, CAP)
        z = _keep(drop, b, h, H, offs_m, offs_n, DROPOUT)
        ds = p * norm[:, None] * (_mm(do, tl.trans(v), PRECISION, UPCAST) * z - delta[:, None])
        _, by = _position(mask, b, h, offs_m, offs_n, Lq, Lk)
        if mask.position_buckets is not None:
            first = tl.min(tl.min(by, axis=1), axis=0)
            last = tl.max(tl.max(by, axis=1), axis=0)
            for c in tl.range(first, last + 1):
                acc += tl.where(cols == c, tl.sum(tl.sum(tl.where(by == c, ds, 0.0), axis=1), axis=0), 0.0)
        else:
            acc += tl.where(cols == 0, tl.sum(tl.sum(ds * by, axis=1), axis=0), 0.0)
    tile = tl.program_id(0).to(tl.int64)
    out = ((b * H + h) * tl.num_programs(0) + tile) * BLOCK_P
    tl.store(DP + out + cols, acc)


# fmt: on


# ----------------------------------------------------------------------------------------------
# Launchers and ops
# ----------------------------------------------------------------------------------------------


def _dynamic(a: A.AttentionArgs, B: int, H: int, Lq: int, Lk: int):
    """The per-call kernel arguments a plan does not fix: the mask as the kernels take it, dropout's
    (seed, threshold, scale), and the values among them whose Triton specialisation can change
    between calls of one signature (the mask's tensors, the seed: _triton_utils.launch)."""
    drop = (a.seed, dropout.threshold(a.dropout_p), dropout.scale(a.dropout_p))
    tensors = tuple(t for t in a.mask if isinstance(t, torch.Tensor))
    return _kernel_mask(a.mask, B, H, Lq, Lk), drop, (*tensors, a.seed)


_SPANS: dict = {}  # the mask's (shape, strides, dtype) and the sizes -> _attn_mask_span's compiled launch


def _with_span(a: A.AttentionArgs) -> A.AttentionArgs:
    """The backend's ``prepare``: a dense mask's or float bias's per-row span of allowed keys
    (``masks.MaskArgs.with_span``'s rule, in one kernel: _attn_mask_span), so that the kernels
    skip the key tiles outside it and never read the keys outside it; for a bool mask also the
    rows whose mask is their span (``row_run``), whose mask elements the kernels do not load."""
    m = a.mask
    live = m.dense_mask if m.bias is None else m.bias
    if live is None:
        return a
    B, Lk, Lq = a.k.shape[0], a.k.shape[2], a.q.shape[2]
    if live.dtype == torch.bool:
        live = live.view(torch.uint8)
    while live.dim() < 4:
        live = live.unsqueeze(0)
    live = live.expand(B, live.shape[1], Lq, Lk)
    lo = poisoned(a.q.new_empty((B, Lq), dtype=torch.int64))
    hi = poisoned(a.q.new_empty((B, Lq), dtype=torch.int64))
    run = None if m.bias is not None else poisoned(a.q.new_empty((B, Lq), dtype=torch.uint8))
    key = (live.shape, live.stride(), live.dtype, a.q.device)
    if key not in _SPANS and len(_SPANS) >= P.MAX_PLANS:
        del _SPANS[next(iter(_SPANS))]
    launch(
        _attn_mask_span, (cdiv(Lq, 32), B), _SPANS.setdefault(key, {}), "span", (live, lo, hi, run),
        M=live, LO=lo, HI=hi, RUN=run, sm=live.stride(), HM=live.shape[1], Lq=Lq, Lk=Lk,
        BIAS=m.bias is not None, BLOCK_M=32, BLOCK_N=64,
    )  # fmt: skip
    LAUNCHES["attention_mask_span"] += 1
    return a._replace(mask=m._replace(row_lo=lo, row_hi=hi, row_run=run))


def _forward(a: A.AttentionArgs):
    p = P.plan(a)
    B, H, Lq, Lk, D = p.B, p.H, p.Lq, p.Lk, p.D
    out = poisoned(a.q.new_empty((B, Lq, H, D))).transpose(1, 2)
    lse = poisoned(a.q.new_empty((B, H, Lq, 2), dtype=torch.float32))
    mask, drop, dyn = _dynamic(a, B, H, Lq, Lk)
    o, o_lse, so_split = out, lse, 0
    if p.splits > 1:  # partials, then the combine
        o = poisoned(a.q.new_empty((p.splits, B, H, Lq, D), dtype=torch.float32))
        o_lse = poisoned(a.q.new_empty((p.splits, B * H * Lq, 2), dtype=torch.float32))
        so_split = o.stride(0)
    group = p.consts["GROUP"] if p.pack else 1
    grid = lambda meta: (cdiv(p.rows, meta["BLOCK_M"]) * p.splits, H // group, B)
    launch(
        _attn_fwd, grid, p.launched, "fwd", (a.q, a.k, a.v, o, o_lse, *dyn),
        Q=a.q, K=a.k, V=a.v, O=o, LSE=o_lse, sq=p.sq, sk=a.k.stride(), sv=a.v.stride(), so=o.stride()[-4:],
        mask=mask, H=H, Lq=Lq, Lk=Lk, D=D, qk_scale=a.scale * LOG2E.value,
        softcap=a.softcap, drop=drop, KEYS_PER_SPLIT=p.keys_per_split, so_split=so_split, SPLIT=p.splits > 1,
        PACK=p.pack, **{**p.consts, "LQ_KEY": next_pow2(p.rows)},
    )  # fmt: skip
    if p.splits > 1:
        launch(
            _attn_fwd_combine, (cdiv(Lq, 16), H, B), p.launched, "combine", (o, o_lse, out, lse),
            PO=o, PLSE=o_lse, O=out, LSE=lse, spo_split=o.stride(0), spo=o.stride()[1:], so=out.stride(),
            SPLITS=p.splits, H=H, Lq=Lq, D=D, BLOCK_M=16, BLOCK_D=p.consts["BLOCK_D"],
        )  # fmt: skip
        LAUNCHES["attention_fwd_split"] += 1
    LAUNCHES["attention_fwd"] += 1
    LAUNCHES["attention_fwd_packed"] += p.pack
    return out, lse


def _backward(g: A.AttentionGradArgs):
    a = g.fwd
    p = P.plan(a)
    B, H, Lq, Lk, D = p.B, p.H, p.Lq, p.Lk, p.D
    mask, drop, dyn = _dynamic(a, B, H, Lq, Lk)
    dq = poisoned(torch.empty_like(a.q))
    dk = poisoned(torch.empty_like(a.k))
    dv = poisoned(torch.empty_like(a.v))
    keys_fused, queries_fused = p.bwd == "keys_fused", p.bwd == "queries_fused"
    delta = None if p.bwd != "split" else poisoned(a.q.new_empty((B, H, Lq), dtype=torch.float32))
    # (the gradient's strides are the caller's: not part of the forward's signature)
    tensors = (a.q, a.k, a.v, g.out, g.grad_out, g.lse, delta, dq, dk, dv, g.grad_out.stride(), *dyn)
    common = dict(
        Q=a.q, K=a.k, V=a.v, O=g.out, DO=g.grad_out, LSE=g.lse, DELTA=delta, DK=dk, DV=dv, sq=p.sq,
        sk=a.k.stride(), sv=a.v.stride(), so=g.out.stride(), sdo=g.grad_out.stride(), sdk=dk.stride(),
        sdv=dv.stride(), mask=mask, H=H, Lq=Lq, Lk=Lk, D=D, qk_scale=a.scale * LOG2E.value,
        sm_scale=a.scale, softcap=a.softcap, drop=drop, **p.consts,
    )  # fmt: skip
    if p.bwd == "split":
        launch(
            _attn_bwd_delta, (cdiv(Lq, 32), H, B), p.launched, "delta",
            (g.out, g.grad_out, delta, g.grad_out.stride()),
            O=g.out, DO=g.grad_out, DELTA=delta, so=g.out.stride(), sdo=g.grad_out.stride(), H=H, Lq=Lq, D=D,
            BLOCK_M=32, BLOCK_D=p.consts["BLOCK_D"],
        )  # fmt: skip
    if not queries_fused:
        grid_kv = lambda meta: (cdiv(Lk, meta["BLOCK_N"]), p.Hk, B)
        launch(
            _attn_bwd_dkdv, grid_kv, p.launched, "dkdv", tensors,
            **common, DQ=dq, sdq=dq.stride(), Hk=p.Hk, FUSED=keys_fused,
        )  # fmt: skip
    if not keys_fused:
        dq_acc = poisoned(a.q.new_empty((p.chunks, H, Lq, D), dtype=torch.float32)) if p.shared else dq
        grid_q = lambda meta: (cdiv(Lq, meta["BLOCK_M"]), H, p.chunks)
        launch(
            _attn_bwd_dq, grid_q, p.launched, "dq", (*tensors, dq_acc),
            **common, DQ=dq_acc, sdq=dq_acc.stride(), B=B, B_PER_PROG=p.per_chunk, FUSED=queries_fused,
        )  # fmt: skip
        if p.shared:
            launch(
                _attn_bwd_dq_sum, (cdiv(Lq, 32), H), p.launched, "dq_sum", (dq_acc, dq),
                PART=dq_acc, DQ=dq, spart=dq_acc.stride(), sdq=dq.stride(), CHUNKS=p.chunks, Lq=Lq, D=D,
                BLOCK_M=32, BLOCK_D=p.consts["BLOCK_D"],
            )  # fmt: skip
    LAUNCHES["attention_bwd"] += 1
    return dq, dk, dv


def _bias_grad(g: A.AttentionGradArgs) -> torch.Tensor:
    a = g.fwd
    p = P.plan(a)
    B, H, Lq, Lk, D = p.B, p.H, p.Lq, p.Lk, p.D
    mask, drop, dyn = _dynamic(a, B, H, Lq, Lk)
    db = poisoned(a.q.new_empty((B, H, Lq, Lk), dtype=torch.float32))
    block = 32 if interpreter_on() else 64
    c = p.consts
    launch(
        _attn_bwd_dbias, (cdiv(Lq, block), H, B), p.launched, "dbias",
        (a.q, a.k, a.v, g.grad_out, g.lse, db, g.grad_out.stride(), *dyn),
        Q=a.q, K=a.k, V=a.v, DO=g.grad_out, LSE=g.lse, DB=db, sq=p.sq, sk=a.k.stride(), sv=a.v.stride(),
        sdo=g.grad_out.stride(), sdb=db.stride(), mask=mask, H=H, GROUP=c["GROUP"], Lq=Lq, Lk=Lk, D=D,
        qk_scale=a.scale * LOG2E.value, softcap=a.softcap, drop=drop, PRECISION=c["PRECISION"],
        UPCAST=c["UPCAST"], CAP=c["CAP"], DROPOUT=c["DROPOUT"], BLOCK_D=c["BLOCK_D"], BLOCK_M=block,
        BLOCK_N=block,
    )  # fmt: skip
    LAUNCHES["attention_bias_grad"] += 1
    return db


def _position_grad(g: A.AttentionGradArgs) -> torch.Tensor:
    a = g.fwd
    p = P.plan(a)
    B, H, Lq, Lk, D = p.B, p.H, p.Lq, p.Lk, p.D
    mask, drop, dyn = _dynamic(a, B, H, Lq, Lk)
    table = a.mask.position_bias
    t5 = a.mask.position_buckets is not None
    block = 32 if interpreter_on() else 64
    width = next_pow2(table.shape[1] if t5 else 1)
    tiles = cdiv(Lq, block)
    partial = poisoned(a.q.new_empty((B, H, tiles, width), dtype=torch.float32))
    c = p.consts
    launch(
        _attn_bwd_dposition, (tiles, H, B), p.launched, "dposition",
        (a.q, a.k, a.v, g.grad_out, g.lse, partial, g.grad_out.stride(), *dyn),
        Q=a.q, K=a.k, V=a.v, DO=g.grad_out, LSE=g.lse, DP=partial, sq=p.sq, sk=a.k.stride(),
        sv=a.v.stride(), sdo=g.grad_out.stride(), mask=mask, H=H, GROUP=c["GROUP"], Lq=Lq,
        Lk=Lk, D=D, qk_scale=a.scale * LOG2E.value, softcap=a.softcap, drop=drop, PRECISION=c["PRECISION"],
        UPCAST=c["UPCAST"], CAP=c["CAP"], DROPOUT=c["DROPOUT"], BLOCK_D=c["BLOCK_D"], BLOCK_M=block,
        BLOCK_N=block, BLOCK_P=width,
    )  # fmt: skip
    LAUNCHES["attention_position_grad"] += 1
    if t5:  # [H, num_buckets] (a copy only where num_buckets is not a power of two)
        return partial.sum((0, 2))[:, : table.shape[1]].contiguous()
    return partial[..., 0].sum(2)  # [B, H]


_fwd_op = _schema.python_op(
    "vlkernels::triton_attention_fwd",
    A.AttentionArgs,
    A.FWD_RETURNS,
    _forward,
    functools.partial(A.fwd_fake, lse_pair=True),
)
_bias_grad_op = _schema.python_op(
    "vlkernels::triton_attention_bias_grad", A.AttentionGradArgs, "Tensor", _bias_grad, A.bias_grad_fake
)
_bwd_op = _schema.python_op(
    "vlkernels::triton_attention_bwd", A.AttentionGradArgs, A.BWD_RETURNS, _backward, A.bwd_fake
)
_position_grad_op = _schema.python_op(
    "vlkernels::triton_attention_position_grad",
    A.AttentionGradArgs,
    "Tensor",
    _position_grad,
    A.position_grad_fake,
)


CAPABILITIES = dataclasses.replace(_dispatch.TRITON, head_dims=(1, 256, 1), max_grid_axis=P.GRID_AXIS_MAX)
BACKEND = _dispatch.Backend(
    "triton",
    _fwd_op,
    _bwd_op,
    CAPABILITIES,
    prepare=_with_span,
    bias_grad=_bias_grad_op,
    position_grad=_position_grad_op,
)
