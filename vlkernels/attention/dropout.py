"""Attention dropout's keep mask, defined once: entry (b, h, i, j) of a call with ``seed`` is kept
iff the top 24 bits of Philox-4x32-10 (key ``seed``, counter (j, i, b·H + h, 0), first word)
are >= ``threshold(p)``; kept probabilities are scaled by 1 / (1 - p). The Triton kernels
(``_keep`` in triton.py, Triton's own Philox) and the torch backend (``keep_mask`` here) draw the
same bits, so every backend drops the same entries for a seed."""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def threshold(p: float) -> int:
    """Entries whose 24-bit draw is below this are dropped: floor(p · 2²⁴ + 1/2) (the C++ launcher
    computes the same)."""
    return int(p * (1 << 24) + 0.5)


def scale(p: float) -> float:
    """The kept entries' factor, 1 / (1 - p) (0 when everything is dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _philox(seed: int, c0, c1, c2, c3):
    """Philox-4x32-10's first output word for counters (c0, c1, c2, c3) (int64 tensors holding
    uint32 values) and key ``seed`` (64 bits), as triton.language.philox computes it."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0, p2 = 0xCD9E8D57 * c2, 0xD2511F53 * c0  # 64-bit products: int64 keeps their bits
        c0, c2, c1, c3 = ((p0 >> 32) & _M32) ^ c1 ^ k0, ((p2 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32, p2 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0


def keep_mask(seed: int, p: float, B: int, H: int, Lq: int, Lk: int, device) -> torch.Tensor:
    """Bool [B, H, Lq, Lk]: True where attention dropout keeps the probability."""
    bh = torch.arange(B * H, device=device).view(B, H, 1, 1)
    i = torch.arange(Lq, device=device).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=device).view(1, 1, 1, Lk)
    shape = (B, H, Lq, Lk)
    r = _philox(
        seed,
        j.expand(shape),
        i.expand(shape),
        bh.expand(shape),
        torch.zeros(shape, dtype=torch.long, device=device),
    )
    return (r >> 8) >= threshold(p)
