"""Every launch decision of the attention kernels, made once per call signature, and its cost.

A call's signature is what the decisions and Triton's compiled kernels depend on: the shapes,
strides and dtypes of q, k, v and of the mask's tensors, the mask's integers and flags, whether
soft-capping and dropout are on, the device. ``plan(a)`` computes a ``Plan`` for it the first time
(tile choice is the autotuner's; the rest is here: decode splits, grouped-query packing, the
backward's path, dq partial chunks, the compile-time constants) and returns the same object for
every later call of that signature; the backward takes the forward's. Each plan also keeps the
compiled kernels its launches used (``_triton_utils.launch``), so a later call with the same
signature launches them without Triton's argument binding and cache lookup. The CUDA C++ ops take
the decisions that apply to them (decode splits, dq chunks) as arguments (``cuda.launch``).

The cost model (``kernels``, ``gemm_flops``, ``hbm_bytes``, ``span_bytes``) states what a plan's
launches execute from the kernels' grids and tile loops; benchmarks/bench_budget.py reads it and
tests/test_budget.py holds it to the launches and tl.dot calls the interpreter runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from vlkernels._dispatch import interpreter_on
from vlkernels._triton_utils import cdiv, next_pow2
from vlkernels.attention import args as A

DECODE_ROWS = 16  # at most this many query rows is decoding: the height of its tiles
GRID_AXIS_MAX = 65535  # CUDA's limit on grid axes 1 and 2, which the kernels give to heads and batch entries


# ----------------------------------------------------------------------------------------------
# Tiles: the autotuner's candidates and their filters
# ----------------------------------------------------------------------------------------------


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
FWD_CONFIGS = _configs(
    [
        *((64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)),
        *((16, 128, 4, 3), (16, 64, 4, 2)),  # decoding: a few query rows per program
    ]
)
BWD_CONFIGS = _configs([(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 1), (16, 64, 4, 1)])
AUTOTUNE_KEY = ["LQ_KEY", "LK_KEY", "BLOCK_D", "GROUP", "MASK_KEY", "CAP", "DROPOUT"]


SMEM_PER_BLOCK = 232448  # bytes of shared memory one block may take on an H100/H200 (the opt-in maximum)
# per kernel: (tiles its loop loads, tiles it keeps), in rows of BLOCK_D elements
_SMEM_TILES = {"fwd": ("2N", "M"), "dkdv": ("2M", "2N"), "dq": ("2N", "2M")}


def smem_bound(
    kernel: str, config, BLOCK_D: int, element_size: int, score_bytes: int = 0, fused: bool = False
) -> int:
    """An upper bound on the shared memory (bytes) of ``kernel`` ("fwd", "dkdv", "dq") compiled with
    ``config``: the tiles its loop loads, in max(num_stages, 2) buffers (Triton's software
    pipeline), with ``score_bytes`` per score (a dense mask's or bias's element); the tiles it keeps;
    an fp32 [BLOCK_M, BLOCK_N] tile (layout conversions) and, for a fused backward kernel, fp32 tiles
    of what it makes besides its own: dq [BLOCK_M, BLOCK_D] (dk/dv) or dk and dv [BLOCK_N, BLOCK_D]
    (dq). tests/test_kernels_compile.py holds it above what Triton allocates for every config it
    builds."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    rows = {"M": m, "N": n, "2M": 2 * m, "2N": 2 * n}
    looped, kept = (rows[r] for r in _SMEM_TILES[kernel])
    per_buffer = looped * BLOCK_D * element_size + m * n * score_bytes
    other = {"dkdv": m, "dq": 2 * n}.get(kernel, 0) if fused else 0  # rows of dq, or of dk and dv
    scratch = 4 * (m * n + other * BLOCK_D)
    return max(config.num_stages, 2) * per_buffer + kept * BLOCK_D * element_size + scratch


def _score_bytes(mask) -> int:
    """Bytes per score of the mask tiles a kernel loads (a dense bool mask, a float bias), from a
    MaskArgs or the kernels' form of it (its tensors as views with a ``ptr``)."""
    parts = (getattr(t, "ptr", t) for t in (mask.dense_mask, mask.bias) if t is not None)
    return sum(t.element_size() for t in parts)


def loadable(
    kernel: str, configs, BLOCK_D: int, element_size: int, score_bytes: int = 0, fused: bool = False
):
    """The configs of ``kernel`` whose shared memory fits a block on the GPU (``smem_bound``); all
    of them under the interpreter."""
    if interpreter_on():
        return configs
    bound = functools.partial(smem_bound, kernel, BLOCK_D=BLOCK_D, element_size=element_size)
    return [c for c in configs if bound(c, score_bytes=score_bytes, fused=fused) <= SMEM_PER_BLOCK]


def fit(configs, args):
    """The configs whose tiles are no larger than the problem (rounded up to a power of two): a
    larger tile does the same work on more padding. All of them if none is."""
    fitting = [
        c for c in configs if c.kwargs["BLOCK_M"] <= args["LQ_KEY"] and c.kwargs["BLOCK_N"] <= args["LK_KEY"]
    ]
    return fitting or configs


def bound_kwargs(args: dict) -> dict:
    """``smem_bound``'s arguments after the kernel and config, from a tiled attention kernel's
    arguments (as its prune and a recorded launch have them)."""
    return dict(
        BLOCK_D=args["BLOCK_D"],
        element_size=args["Q"].element_size(),
        score_bytes=_score_bytes(args["mask"]),
        fused=bool(args.get("FUSED")),
    )


def _loadable_args(kernel: str, configs, args):
    return loadable(kernel, configs, **bound_kwargs(args))


def fwd_prune(configs, args):
    """The forward's configs for a kernel's arguments: those that fit in shared memory, then ``fit``."""
    return fit(_loadable_args("fwd", configs, args), args)


def _no_spill(config, BLOCK_D: int) -> bool:
    """From head dim 128 on, a backward config has no 64 x 64 tile (its dk, dv and dq accumulators
    spill)."""
    return BLOCK_D < 128 or config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] < 64 * 64


def bwd_prune(kernel: str, block: str, length: str):
    """The backward's configs for a kernel's arguments: those that fit in shared memory; with FUSED
    those where a program holds every key (dk/dv: BLOCK_N >= Lk) or every query (dq: BLOCK_M >=
    Lq); ``_no_spill``; then ``fit``."""

    def prune(configs, args):
        fused = args.get("FUSED")
        kept = [
            c
            for c in _loadable_args(kernel, configs, args)
            if (not fused or c.kwargs[block] >= args[length]) and _no_spill(c, args["BLOCK_D"])
        ]
        return fit(kept, args)

    return prune


def _largest_bwd_tile(kernel: str, side: str, a: A.AttentionArgs, BLOCK_D: int) -> int:
    """The largest BLOCK_M or BLOCK_N the backward kernel may take here with a config that fits in
    shared memory (the fused paths need one tile to hold every query or every key); 0 if none."""
    configs = [INTERPRET_CONFIG] if interpreter_on() else BWD_CONFIGS
    configs = loadable(kernel, configs, BLOCK_D, a.q.element_size(), _score_bytes(a.mask), fused=True)
    return max((c.kwargs[side] for c in configs if _no_spill(c, BLOCK_D)), default=0)


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """The launch decisions of one call signature (shapes: q [Bq, H, Lq, D], k, v [B, Hk, Lk, D])."""

    B: int
    H: int
    Hk: int
    Lq: int
    Lk: int
    D: int
    shared: bool  # one set of queries for the batch (Bq = 1 < B)
    sq: tuple  # q's strides as the kernels take them: batch stride 0 when shared
    consts: dict  # compile-time constants and autotune keys of every kernel
    pack: bool  # the forward packs the query heads of a key head into one program's rows
    rows: int  # query rows of a forward program's tiles: GROUP · Lq when packed, else Lq
    splits: int  # flash-decoding: key splits across programs (1: none)
    keys_per_split: int
    bwd: str  # "keys_fused" (one tile holds every key), "queries_fused", or "split"
    chunks: int  # dq partial sums of a shared-query backward (the batch otherwise)
    per_chunk: int  # batch entries per dq chunk
    launched: dict  # kernel name -> the compiled kernel its first launch used


def packs(H: int, Hk: int, Lq: int) -> bool:
    """Whether the forward packs the query heads that share a key head into one program's rows:
    grouped keys and at most DECODE_ROWS query rows, where one head's rows would leave most of a
    tile empty and each query head would read its K and V again."""
    return H > Hk and Lq <= DECODE_ROWS


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(B: int, H: int, Lq: int, Lk: int, device: torch.device, group: int = 1) -> tuple[int, int]:
    """(splits, keys per split) of the forward: flash-decoding's split of the keys across programs
    when a few query rows (Lq <= DECODE_ROWS) would leave the GPU idle (fewer than two programs
    per SM) over many keys; (1, Lk) otherwise. ``group``: query heads packed per program. A split
    holds a multiple of 128 keys (of 64 under the interpreter: its tiles are 32 wide), at least 256
    (128)."""
    interp = device.type != "cuda"
    unit, least = (64, 128) if interp else (128, 256)
    programs = B * (H // group) * cdiv(group * Lq, DECODE_ROWS)
    target = 4 if interp else cdiv(2 * _sms(device), programs)  # interpreter: exercise the combine
    if Lq > DECODE_ROWS or Lk < 2 * least or target < 2:
        return 1, Lk
    per_split = max(least, cdiv(cdiv(Lk, target), unit) * unit)
    splits = cdiv(Lk, per_split)
    return (splits, per_split) if splits > 1 else (1, Lk)


def dq_chunks(B: int, H: int, Lq: int, shared: bool, device: torch.device) -> int:
    """How many partial dq sums a shared-query backward splits the batch into: enough programs
    to fill the GPU (at least two under the interpreter so that the reduction is exercised)."""
    if not shared:
        return B
    if device.type != "cuda":
        return min(B, 2)
    return max(1, min(B, cdiv(2 * _sms(device), H * cdiv(Lq, 64))))


def mask_key(m) -> str:
    """Which parts and modes the mask has: the mask's share of the autotune key."""
    return ",".join(
        f"{n}={'t' if isinstance(v, torch.Tensor) else v}"
        for n, v in zip(m._fields, m, strict=True)
        if v is not None
    )


def _tensor_signature(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype


def signature(a: A.AttentionArgs) -> tuple:
    """What a plan and the kernels compiled for it depend on (Triton's per-call specialisation of
    pointer alignment and of the dropout seed is checked at each launch: _triton_utils.launch)."""
    mask = tuple(_tensor_signature(x) if isinstance(x, torch.Tensor) else x for x in a.mask)
    return (
        _tensor_signature(a.q),
        _tensor_signature(a.k),
        a.v.stride(),
        a.q.device,
        mask,
        a.softcap > 0,
        a.dropout_p,
    )


_PLANS: dict = {}
MAX_PLANS = 512  # signatures kept; the oldest is dropped past it


def plan(a: A.AttentionArgs) -> Plan:
    """The plan of ``a``'s call signature: computed once, the same object afterwards."""
    key = signature(a)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= MAX_PLANS:
            del _PLANS[next(iter(_PLANS))]
        p = _PLANS[key] = _make(a)
    return p


def _make(a: A.AttentionArgs) -> Plan:
    B, Hk, Lk, D = a.k.shape
    H, Lq = a.q.shape[1], a.q.shape[2]
    sq = a.q.stride()
    shared = a.shared_queries
    consts = dict(
        GROUP=H // Hk,
        LQ_KEY=next_pow2(Lq),
        LK_KEY=next_pow2(Lk),
        MASK_KEY=mask_key(a.mask),
        PRECISION="ieee" if a.q.dtype == torch.float32 else "tf32",
        UPCAST=a.q.dtype == torch.bfloat16 and interpreter_on(),
        BLOCK_D=max(16, next_pow2(D)),  # tl.dot's smallest K; columns past D masked
        CAP=a.softcap > 0,
        DROPOUT=a.dropout_p > 0,
    )
    pack = packs(H, Hk, Lq)
    group = H // Hk if pack else 1  # query heads per forward program
    splits, per_split = decode_splits(B, H, Lq, Lk, a.q.device, group)
    # one key tile holds every key (the Q-Former's [queries ; text]) or one query tile every query
    # (its cross-attention: 32 queries): the whole backward in one kernel
    BLOCK_D = consts["BLOCK_D"]
    if not shared and Lk <= _largest_bwd_tile("dkdv", "BLOCK_N", a, BLOCK_D):
        bwd = "keys_fused"
    elif not shared and H == Hk and Lq <= _largest_bwd_tile("dq", "BLOCK_M", a, BLOCK_D):
        bwd = "queries_fused"
    else:
        bwd = "split"
    chunks = dq_chunks(B, H, Lq, shared, a.q.device)
    per_chunk = cdiv(B, chunks)
    return Plan(
        B=B,
        H=H,
        Hk=Hk,
        Lq=Lq,
        Lk=Lk,
        D=D,
        shared=shared,
        sq=(0 if shared else sq[0], *sq[1:]),
        consts=consts,
        pack=pack,
        rows=group * Lq,
        splits=splits,
        keys_per_split=per_split,
        bwd=bwd,
        chunks=cdiv(B, per_chunk),
        per_chunk=per_chunk,
        launched={},
    )


# ----------------------------------------------------------------------------------------------
# Cost model: what a plan's launches execute, from the kernels' own grids and tile loops
# ----------------------------------------------------------------------------------------------


def kernels(p: Plan, backward: bool = False, bias_grad: bool = False, position_grad: bool = False):
    """The Triton kernels one forward (or backward) of plan ``p`` launches, in order (a dense
    mask's span kernel runs before, in the backend's prepare); the backward's ends with a float
    bias's gradient (``bias_grad``), then a position bias's (``position_grad``) where asked."""
    if not backward:
        return ("_attn_fwd", "_attn_fwd_combine") if p.splits > 1 else ("_attn_fwd",)
    out = ("_attn_bwd_delta",) if p.bwd == "split" else ()
    if p.bwd != "queries_fused":
        out += ("_attn_bwd_dkdv",)
    if p.bwd != "keys_fused":
        out += ("_attn_bwd_dq", "_attn_bwd_dq_sum") if p.shared else ("_attn_bwd_dq",)
    return out + ("_attn_bwd_dbias",) * bias_grad + ("_attn_bwd_dposition",) * position_grad


def row_intervals(lo: torch.Tensor, hi: torch.Tensor, B: int, Lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, query row) allowed keys [lo, hi) as the kernels bound their loops: [B, Lq],
    an empty row as [Lk, 0) (``_row_bounds``). ``lo``, ``hi``: a mask's intervals, broadcastable."""
    Lq = max(lo.shape[-1], hi.shape[-1])
    lo, hi = lo.expand(B, Lq), hi.expand(B, Lq)
    empty = lo >= hi
    return torch.where(empty, Lk, lo), torch.where(empty, 0, hi)


def _query_tiles(lo, hi, BM, Lk):
    """lo, hi padded to whole query tiles: [B, n_tiles, BM]."""
    B, Lq = lo.shape
    pad = -Lq % BM
    lo = torch.nn.functional.pad(lo, (0, pad), value=Lk).view(B, -1, BM)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(B, -1, BM)
    return lo, hi


def _key_tiles_visited(lo, hi, BM, BN, Lk, per_split=None):
    """Iterations of the forward's (and dq's) key loop per query tile: [B, n_tiles]; with
    ``per_split`` (flash-decoding), summed over the key splits, each loop clipped to its split."""
    lo, hi = _query_tiles(lo, hi, BM, Lk)
    start, end = lo.amin(-1) // BN * BN, hi.amax(-1)
    if per_split is None:
        return torch.clamp(-((start - end) // BN), min=0)
    total = torch.zeros_like(start)
    for s0 in range(0, Lk, per_split):
        a, b = torch.clamp(start, min=s0), torch.clamp(end, max=s0 + per_split)
        total += torch.clamp(-((a - b) // BN), min=0)
    return total


def gemm_flops(p: Plan, kernel: str, BLOCK_M: int, BLOCK_N: int, lo: torch.Tensor, hi: torch.Tensor) -> int:
    """Executed GEMM FLOPs of one launch of ``kernel`` under plan ``p`` with tiles BLOCK_M x
    BLOCK_N (tile waste included): the tiles each program's loops visit, times the tile GEMMs of
    one visit. ``lo``, ``hi``: ``row_intervals`` [B, Lq] (CPU)."""
    if kernel in ("_attn_bwd_delta", "_attn_bwd_dq_sum", "_attn_fwd_combine", "_attn_mask_span"):  # no GEMM
        return 0
    B, H, Lq, Lk = p.B, p.H, p.Lq, p.Lk
    BM, BN = BLOCK_M, BLOCK_N
    tile = 2 * BM * BN * p.consts["BLOCK_D"]  # one tile GEMM
    if kernel == "_attn_fwd":  # S = QKᵀ, O += PV
        per_split = p.keys_per_split if p.splits > 1 else None
        heads = H
        if p.pack:  # a program's rows: the query rows of each head of a group, head-major
            group = p.consts["GROUP"]
            lo, hi, heads = lo.repeat(1, group), hi.repeat(1, group), H // group
        return heads * int(_key_tiles_visited(lo, hi, BM, BN, Lk, per_split).sum()) * 2 * tile
    if kernel == "_attn_bwd_dposition":  # two passes (delta, then dS) over the dq kernel's key tiles: S, dP
        return H * int(_key_tiles_visited(lo, hi, BM, BN, Lk).sum()) * 4 * tile
    if kernel == "_attn_bwd_dbias":  # delta over the attended key tiles, dS over every one: S, dP each
        attended = int(_key_tiles_visited(lo, hi, BM, BN, Lk).sum())
        return H * (attended + B * cdiv(Lq, BM) * cdiv(Lk, BN)) * 2 * tile
    if kernel == "_attn_bwd_dq":  # S, dP = dO Vᵀ, dQ += dS K; fused: dV and dK too
        fused = p.bwd == "queries_fused"
        return H * int(_key_tiles_visited(lo, hi, BM, BN, Lk).sum()) * (5 if fused else 3) * tile
    if kernel == "_attn_bwd_dkdv" and p.bwd == "keys_fused":  # every query tile: S, dV, dP, dK, dQ
        return H * B * cdiv(Lq, BM) * 5 * tile
    if kernel == "_attn_bwd_dkdv":  # per key tile, the query tiles from the first to the last that touch it
        lo, hi = _query_tiles(lo, hi, BM, Lk)
        n0 = torch.arange(0, Lk, BN)
        touch = ((lo[..., None] < n0 + BN) & (hi[..., None] > n0)).any(dim=2)  # [B, n_m, n_n]
        tiles = torch.arange(touch.shape[1])[None, :, None]
        first = torch.where(touch, tiles, touch.shape[1]).amin(1)
        last = torch.where(touch, tiles, -1).amax(1)
        return H * int(torch.clamp(last - first + 1, min=0).sum()) * 4 * tile  # S, dV, dP, dK
    raise KeyError(kernel)


def hbm_bytes(p: Plan, element_size: int) -> tuple[int, int]:
    """(forward, backward) fewest HBM bytes: every input read once, every output written once
    (forward: q, k, v in; out, lse out. Backward: q, k, v, out, dout, lse in; dq, dk, dv out)."""
    Bq = 1 if p.shared else p.B
    qkv = (Bq * p.H * p.Lq + 2 * p.B * p.Hk * p.Lk) * p.D * element_size
    out = p.B * p.H * p.Lq * p.D * element_size
    lse = p.B * p.H * p.Lq * 4
    return qkv + out + lse, qkv + 2 * out + lse + qkv


def span_bytes(live: torch.Tensor, B: int, Lq: int, Lk: int) -> int:
    """HBM bytes of the span pass over a dense mask or float bias ``live`` (broadcastable to
    [B, H, Lq, Lk]; read once per batch entry over its own heads) that the Triton backend's prepare
    runs once per forward: the mask read, each row's span written (int64 lo, hi) and, for a bool
    mask, whether the row is one run (uint8)."""
    heads = live.shape[-3] if live.dim() >= 3 else 1
    per_row = 16 + (live.dtype == torch.bool)
    return B * heads * Lq * Lk * live.element_size() + B * Lq * per_row
