"""Every launch decision of the Triton attention kernels, made once per call signature.

A call's signature is what the decisions and Triton's compiled kernels depend on: the shapes,
strides and dtypes of q, k, v and of the mask's tensors, the mask's integers and flags, whether
soft-capping and dropout are on, the device. ``plan(a)`` computes a ``Plan`` for it the first time
(tile choice is the autotuner's; the rest is here: decode splits, grouped-query packing, the
backward's path, dq partial chunks, the compile-time constants) and returns the same object for
every later call of that signature; the backward takes the forward's. Each plan also keeps the
compiled kernels its launches used (``_triton_utils.launch``), so a later call with the same
signature launches them without Triton's argument binding and cache lookup.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from vlkernels._dispatch import interpreter_on
from vlkernels._triton_utils import next_pow2
from vlkernels.attention import args as A

DECODE_ROWS = 16  # at most this many query rows is decoding: the height of its tiles


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


def fit(configs, args):
    """The configs whose tiles are no larger than the problem (rounded up to a power of two): a
    larger tile does the same work on more padding. All of them if none is."""
    fitting = [
        c for c in configs if c.kwargs["BLOCK_M"] <= args["LQ_KEY"] and c.kwargs["BLOCK_N"] <= args["LK_KEY"]
    ]
    return fitting or configs


def bwd_prune(block: str, length: str):
    """The backward's configs for a kernel's arguments: with FUSED a program holds every key (dk/dv:
    BLOCK_N >= Lk) or every query (dq: BLOCK_M >= Lq); from head dim 128 on, no 64 x 64 tile (its
    dk, dv and dq accumulators spill); then ``fit``."""

    def prune(configs, args):
        return fit(
            [
                c
                for c in configs
                if (not args.get("FUSED") or c.kwargs[block] >= args[length])
                and (args["BLOCK_D"] < 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 64 * 64)
            ],
            args,
        )

    return prune


def _largest_bwd_tile(side: str) -> int:
    """The largest BLOCK_M or BLOCK_N a backward kernel may take here (the fused paths need one tile
    to hold every query or every key)."""
    configs = [INTERPRET_CONFIG] if interpreter_on() else BWD_CONFIGS
    return max(c.kwargs[side] for c in configs)


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
    programs = B * (H // group) * triton.cdiv(group * Lq, DECODE_ROWS)
    target = 4 if interp else triton.cdiv(2 * _sms(device), programs)  # interpreter: exercise the combine
    if Lq > DECODE_ROWS or Lk < 2 * least or target < 2:
        return 1, Lk
    per_split = max(least, triton.cdiv(triton.cdiv(Lk, target), unit) * unit)
    splits = triton.cdiv(Lk, per_split)
    return (splits, per_split) if splits > 1 else (1, Lk)


def dq_chunks(B: int, H: int, Lq: int, shared: bool, device: torch.device) -> int:
    """How many partial dq sums a shared-query backward splits the batch into: enough programs
    to fill the GPU (at least two under the interpreter so that the reduction is exercised)."""
    if not shared:
        return B
    if device.type != "cuda":
        return min(B, 2)
    return max(1, min(B, triton.cdiv(2 * _sms(device), H * triton.cdiv(Lq, 64))))


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
    if not shared and Lk <= _largest_bwd_tile("BLOCK_N"):
        bwd = "keys_fused"
    elif not shared and H == Hk and Lq <= _largest_bwd_tile("BLOCK_M"):
        bwd = "queries_fused"
    else:
        bwd = "split"
    chunks = dq_chunks(B, H, Lq, shared, a.q.device)
    per_chunk = triton.cdiv(B, chunks)
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
        chunks=triton.cdiv(B, per_chunk),
        per_chunk=per_chunk,
        launched={},
    )
