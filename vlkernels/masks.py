"""Analytic attention masks.

A mask object describes which keys each query may attend to with a few integers per row; the
kernels compute it on the fly and skip key tiles it rules out. Every component allows, for
query row ``i`` of batch ``b``, one contiguous key interval ``[lo, hi)``, so an intersection of
components is again one interval per row.

>>> m = qformer(32, "multimodal_causal") & key_padding(lengths)
>>> m.to_dense(batch, q_len, k_len)   # bool [B, 1, Lq, Lk], True = may attend

``Mask.to_dense`` is the definition (what the eager reference uses). What the backends take is
``lower(mask, ...)``: a ``MaskArgs`` of a few tensors and integers, whose meaning is the key
interval rule ``MaskArgs.intervals`` here, ``_row_bounds`` in the Triton kernels and
``row_bounds`` in csrc/attention.cu; the tests hold all three to ``to_dense``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch


class QFormerMode(enum.IntEnum):
    """``Mask.qformer_mode``: which keys the text rows of [queries ; text] see (csrc/vlk.h's
    ``QFormerMode`` has the same values; a test compares them)."""

    BIDIRECTIONAL = 0  # every key
    MULTIMODAL_CAUSAL = 1  # the queries and the text up to itself
    UNIMODAL = 2  # the text only (the queries see the queries)


class MediaMode(enum.IntEnum):
    """``Mask.media_mode``: which images' latents a text row sees (csrc/vlk.h's ``MediaMode``)."""

    NONE = 0  # no media mask
    IMMEDIATE = 1  # only the image before it
    ALL_PREVIOUS = 2  # every image before it


QFORMER_MODES = tuple(mode.name.lower() for mode in QFormerMode)  # the names masks.qformer takes
# masks.media's only_immediate -> Mask.media_mode
MEDIA_MODES = {None: MediaMode.NONE, True: MediaMode.IMMEDIATE, False: MediaMode.ALL_PREVIOUS}


@dataclass(frozen=True)
class Mask:
    """An intersection of analytic mask components; build it with the functions of this module.

    Fields (``None``/``False`` = component absent):
      causal:          key j allowed for query i iff j <= i + (Lk - Lq).
      key_lengths:     int [B]; key j allowed iff j < key_lengths[b].
      qformer:         (num_queries, mode) over the sequence [queries ; text].
      prefix_lengths:  int [B]; key j allowed iff j < prefix_lengths[b] or j <= i.
      media:           (text_to_media int [B, Lq], latents_per_media, only_immediate).
      window:          key j allowed iff j > i + (Lk - Lq) - window (the last ``window`` keys).
      documents:       int [B, L] document ids of packed sequences (self-attention); key j allowed
                       iff j is in query i's run of equal ids.
    """

    causal: bool = False
    key_lengths: torch.Tensor | None = None
    qformer: tuple[int, str] | None = None
    prefix_lengths: torch.Tensor | None = None
    media: tuple[torch.Tensor, int, bool] | None = None
    window: int | None = None
    documents: torch.Tensor | None = None

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        out = replace(self, causal=self.causal or other.causal)
        if other.key_lengths is not None:
            kl = other.key_lengths
            if self.key_lengths is not None:
                kl = torch.minimum(self.key_lengths, kl)
            out = replace(out, key_lengths=kl)
        if other.prefix_lengths is not None:
            # [0, max(p1, i+1)) & [0, max(p2, i+1)) == [0, max(min(p1, p2), i+1))
            pl = other.prefix_lengths
            if self.prefix_lengths is not None:
                pl = torch.minimum(self.prefix_lengths, pl)
            out = replace(out, prefix_lengths=pl)
        if other.qformer is not None:
            if self.qformer is not None and self.qformer != other.qformer:
                raise ValueError(
                    f"mask: cannot intersect qformer{self.qformer} with qformer{other.qformer}; "
                    "pass the intersection as a dense bool mask (Mask.to_dense)"
                )
            out = replace(out, qformer=other.qformer)
        if other.window is not None:
            out = replace(out, window=other.window if self.window is None else min(self.window, other.window))
        if other.media is not None:
            if self.media is not None:
                raise ValueError("mask: cannot intersect two media masks; pass a dense bool mask instead")
            out = replace(out, media=other.media)
        if other.documents is not None:
            if self.documents is not None:
                raise ValueError("mask: cannot intersect two document masks; pass a dense bool mask instead")
            out = replace(out, documents=other.documents)
        return out

    def __repr__(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal()")
        if self.key_lengths is not None:
            parts.append(f"key_padding(<{tuple(self.key_lengths.shape)}>)")
        if self.qformer is not None:
            parts.append(f"qformer({self.qformer[0]}, {self.qformer[1]!r})")
        if self.prefix_lengths is not None:
            parts.append(f"prefix_lm(<{tuple(self.prefix_lengths.shape)}>)")
        if self.media is not None:
            t2m, lat, imm = self.media
            parts.append(f"media(<{tuple(t2m.shape)}>, {lat}, only_immediate={imm})")
        if self.window is not None:
            parts.append(f"sliding_window({self.window})")
        if self.documents is not None:
            parts.append(f"document(<{tuple(self.documents.shape)}>)")
        return " & ".join(parts) or "Mask()"

    def check(self, batch: int, q_len: int, k_len: int, device: torch.device) -> None:
        """Raise ValueError/TypeError if this mask cannot apply to [batch, *, q_len, k_len]."""
        for name, t in (
            ("key_padding lengths", self.key_lengths),
            ("prefix_lm prefix_lengths", self.prefix_lengths),
        ):
            if t is not None:
                _check_int_tensor(name, t, (batch,), "[B]", device)
        if self.qformer is not None and self.qformer[0] > k_len:
            raise ValueError(f"mask: qformer num_queries={self.qformer[0]} exceeds the key length {k_len}")
        if self.documents is not None:
            if q_len != k_len:
                raise ValueError(f"mask: document is a self-attention mask, got Lq={q_len} and Lk={k_len}")
            _check_int_tensor("document seq_ids", self.documents, (batch, q_len), "[B, L]", device)
        if self.media is not None:
            t2m, lat, _ = self.media
            _check_int_tensor("media text_to_media", t2m, (batch, q_len), "[B, Lq]", device)
            if k_len % lat:
                raise ValueError(
                    f"mask: media expects the key length to be a multiple of "
                    f"latents_per_media={lat}, got {k_len}"
                )

    def to_dense(self, batch: int, q_len: int, k_len: int) -> torch.Tensor:
        """Bool [batch, 1, q_len, k_len], True where attention is allowed (eager definition)."""
        dev = _device_of(self)
        self.check(batch, q_len, k_len, dev)
        i = torch.arange(q_len, device=dev).view(1, q_len, 1)
        j = torch.arange(k_len, device=dev).view(1, 1, k_len)
        allowed = torch.ones(batch, q_len, k_len, dtype=torch.bool, device=dev)
        if self.causal:
            allowed &= j <= i + (k_len - q_len)
        if self.key_lengths is not None:
            allowed &= j < self.key_lengths.view(-1, 1, 1)
        if self.qformer is not None:
            nq, mode = self.qformer
            q_is_query, k_is_query = i < nq, j < nq
            if mode == "multimodal_causal":
                allowed &= torch.where(q_is_query, k_is_query, k_is_query | (j <= i))
            elif mode == "unimodal":
                allowed &= q_is_query == k_is_query
        if self.prefix_lengths is not None:
            allowed &= (j < self.prefix_lengths.view(-1, 1, 1)) | (j <= i)
        if self.media is not None:
            t2m, lat, immediate = self.media
            text_time = t2m.view(batch, q_len, 1)
            key_time = j // lat + 1
            allowed &= (text_time >= 1) & ((key_time == text_time) if immediate else (key_time <= text_time))
        if self.window is not None:
            allowed &= j > i + (k_len - q_len) - self.window
        if self.documents is not None:  # the same run of equal ids
            ids = self.documents
            change = torch.cat([torch.zeros_like(ids[:, :1]), (ids[:, 1:] != ids[:, :-1]).long()], 1)
            run = change.cumsum(1)
            allowed &= run[:, :, None] == run[:, None, :]
        return allowed.unsqueeze(1)


def _device_of(m: Mask) -> torch.device:
    for t in (m.key_lengths, m.prefix_lengths, m.media[0] if m.media else None, m.documents):
        if t is not None:
            return t.device
    return torch.device("cpu")


def _check_int_tensor(name, t, shape, shape_txt, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"mask: {name} must be an int32/int64 tensor {shape_txt}, got {got}")
    if tuple(t.shape) != shape:
        raise ValueError(f"mask: {name} must have shape {shape_txt} = {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"mask: {name} is on {t.device}, the inputs are on {device}")


def _int_tensor(name: str, t, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an integer tensor, got {got}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {list(t.shape)}")
    return t


def causal() -> Mask:
    """Bottom-right aligned causal mask: key j allowed for query i iff j <= i + (Lk - Lq)."""
    return Mask(causal=True)


def key_padding(lengths: torch.Tensor) -> Mask:
    """Key j allowed iff j < lengths[b]; ``lengths``: int [B]."""
    return Mask(key_lengths=_int_tensor("key_padding: lengths", lengths, 1))


def qformer(num_queries: int, mode: str) -> Mask:
    """BLIP-2 Q-Former masks over [num_queries learned queries ; text] (paper, Figure 2).

    ``"bidirectional"`` (ITM): all see all. ``"multimodal_causal"`` (ITG): queries see queries,
    text sees all queries and earlier-or-same text. ``"unimodal"`` (ITC): queries see only
    queries, text only text.
    """
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 0:
        raise ValueError(f"qformer: num_queries must be an int >= 0, got {num_queries!r}")
    if mode not in QFORMER_MODES:
        raise ValueError(f"qformer: mode must be one of {QFORMER_MODES}, got {mode!r}")
    return Mask(qformer=(num_queries, mode))


def sliding_window(window: int) -> Mask:
    """Local attention (Mistral, Gemma 2): key j allowed iff j > i + (Lk - Lq) - window, the last
    ``window`` keys up to the query's bottom-right aligned position; with ``causal()`` each query
    sees itself and the window - 1 keys before it."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window: window must be an int >= 1, got {window!r}")
    return Mask(window=window)


def prefix_lm(prefix_lengths: torch.Tensor) -> Mask:
    """PaLI prefix-LM: key j allowed iff j < prefix_lengths[b] or j <= i; int [B]."""
    return Mask(prefix_lengths=_int_tensor("prefix_lm: prefix_lengths", prefix_lengths, 1))


def document(seq_ids: torch.Tensor) -> Mask:
    """Packed variable-length sequences (FlashAttention's varlen, xformers' BlockDiagonalMask,
    FlexAttention's document mask): ``seq_ids`` int [B, L], the document of each token, each
    document's tokens contiguous; key j allowed iff it is in the same run of equal ids as query i.
    Self-attention (Lq == Lk); combine with ``causal()``, ``key_padding`` etc. Tiles of other
    documents are skipped, so a packed batch does no padding work."""
    return Mask(documents=_int_tensor("document: seq_ids", seq_ids, 2))


def varlen(cu_seqlens: torch.Tensor, seq_len: int) -> Mask:
    """FlashAttention's varlen form of ``document``: sequences packed into one row of ``seq_len``
    tokens (batch 1, q/k/v [1, H, seq_len, D]), sequence s at [cu_seqlens[s], cu_seqlens[s + 1]);
    ``cu_seqlens`` int [n + 1], non-decreasing from 0 to at most seq_len. Tokens past
    cu_seqlens[-1] attend to nothing (0). Built on the device, no host synchronisation: on CPU the
    values are checked (ValueError), on a GPU they are not (reading them would synchronise)."""
    cu = _int_tensor("varlen: cu_seqlens", cu_seqlens, 1)
    if cu.numel() < 2:
        raise ValueError(f"varlen: cu_seqlens needs at least 2 entries (0 and the total), got {cu.numel()}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"varlen: seq_len must be an int >= 1, got {seq_len!r}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if cu[0] != 0 or bool((cu[1:] < cu[:-1]).any()) or cu[-1] > seq_len:
            raise ValueError(
                f"varlen: cu_seqlens must be non-decreasing from 0 to at most seq_len={seq_len}, "
                f"got {cu.tolist() if cu.numel() <= 16 else cu}"
            )
    positions = torch.arange(seq_len, device=cu.device, dtype=cu.dtype)
    ids = torch.searchsorted(cu[1:].contiguous(), positions, right=True)
    return document(ids[None]) & key_padding(cu[-1:])


def media(text_to_media: torch.Tensor, latents_per_media: int, only_immediate: bool = True) -> Mask:
    """Flamingo media mask.

    ``text_to_media``: int [B, Lq], 0 where no image precedes the token, m >= 1 for the m-th
    image (open_flamingo's ``media_locations.cumsum(-1)``). Keys are the latents of the images
    in order, ``latents_per_media`` each. Allowed iff text_to_media >= 1 and the key's image
    index equals it (``only_immediate``) or is <= it.
    """
    t2m = _int_tensor("media: text_to_media", text_to_media, 2)
    if not isinstance(latents_per_media, int) or latents_per_media < 1:
        raise ValueError(f"media: latents_per_media must be an int >= 1, got {latents_per_media!r}")
    return Mask(media=(t2m, latents_per_media, bool(only_immediate)))


# ----------------------------------------------------------------------------------------------
# Lowering: what the backends take
# ----------------------------------------------------------------------------------------------


class MaskArgs(NamedTuple):
    """A mask as kernel arguments (schema order). Every analytic part allows query row ``i`` of
    batch ``b`` one key interval (``intervals``); ``dense_mask`` applies on top, element-wise.

    dense_mask:        bool, broadcastable to [B, H, Lq, Lk] (True = may attend)
    key_lengths:       int32 or int64 [B]
    prefix_lengths:    int32 or int64 [B]
    text_to_media:     int32 or int64 [B, Lq]
    causal:            bottom-right aligned
    qformer_queries:   the number of learned queries of the qformer mask
    qformer_mode:      a QFormerMode
    media_mode:        a MediaMode
    latents_per_media: keys per image
    window:            sliding window (0: none)
    bias:              float, broadcastable to [B, H, Lq, Lk]: added to the scaled scores (SDPA's
                       float attn_mask; -inf = may not attend)
    row_lo:            int64 [B, Lq]: per query row, the first key it may attend (a document
                       mask's run; for a dense mask or float bias, ``with_span``: its first
                       allowed key over the heads)
    row_hi:            int64 [B, Lq]: one past the last
    row_run:           uint8 [B, Lq], with a dense bool mask's span: 1 where the dense mask allows
                       exactly the keys [row_lo, row_hi) of the row on every head (causal,
                       padding, prefix-LM, an image's block: one run), so the kernels that take
                       it bound the row by its span and load none of its mask elements
    position_bias:     an analytic position bias (``vlkernels.bias``), added to the scores after
                       the cap: T5's table [H, num_buckets], or ALiBi's slopes [B or 1, H]
    position_buckets:  int32 [2 · max_distance + 1], T5's bucket of each relative position
                       (``bias.bucket_table``); None with ALiBi
    position_shift:    query row i sits at key position i + (Lk - Lq) + position_shift
    """

    dense_mask: torch.Tensor | None = None
    key_lengths: torch.Tensor | None = None
    prefix_lengths: torch.Tensor | None = None
    text_to_media: torch.Tensor | None = None
    causal: bool = False
    qformer_queries: int = 0
    qformer_mode: int = 0
    media_mode: int = 0
    latents_per_media: int = 1
    window: int = 0
    bias: torch.Tensor | None = None
    row_lo: torch.Tensor | None = None
    row_hi: torch.Tensor | None = None
    row_run: torch.Tensor | None = None
    position_bias: torch.Tensor | None = None
    position_buckets: torch.Tensor | None = None
    position_shift: int = 0

    def restricts(self) -> bool:
        """Whether any part besides the bias may disallow a key (False: ``allowed`` is all True)."""
        tensors = (self.dense_mask, self.key_lengths, self.prefix_lengths, self.text_to_media, self.row_lo)
        return any(t is not None for t in tensors) or bool(
            self.causal or self.qformer_mode or self.media_mode or self.window
        )

    def intervals(self, q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The allowed key interval [lo, hi) of every query row: int64 [B or 1, q_len] each
        (empty where lo >= hi). The Python statement of the rule the kernels implement."""
        i = torch.arange(q_len, device=device)[None]
        lo, hi = torch.zeros_like(i), torch.full_like(i, k_len)
        nq = self.qformer_queries
        if self.causal:
            hi = torch.minimum(hi, i + (k_len - q_len) + 1)
        if self.key_lengths is not None:
            hi = torch.minimum(hi, self.key_lengths.long()[:, None])
        if self.qformer_mode == QFormerMode.MULTIMODAL_CAUSAL:  # text -> queries + text up to itself
            hi = torch.minimum(hi, torch.where(i < nq, nq, torch.clamp(i + 1, min=nq)))
        if self.qformer_mode == QFormerMode.UNIMODAL:  # queries -> queries; text -> text
            hi = torch.minimum(hi, torch.where(i < nq, nq, k_len))
            lo = torch.maximum(lo, torch.where(i < nq, 0, nq))
        if self.prefix_lengths is not None:
            hi = torch.minimum(hi, torch.maximum(self.prefix_lengths.long()[:, None], i + 1))
        if self.media_mode:
            t = self.text_to_media.long()
            hi = torch.minimum(hi, t * self.latents_per_media)
            if self.media_mode == MediaMode.IMMEDIATE:
                lo = torch.maximum(lo, (t - 1) * self.latents_per_media)
        if self.window:
            lo = torch.maximum(lo, i + (k_len - q_len) - self.window + 1)
        if self.row_lo is not None:
            lo = torch.maximum(lo, self.row_lo.long())
            hi = torch.minimum(hi, self.row_hi.long())
        return lo, hi

    def allowed(self, q_len: int, k_len: int, device: torch.device, intervals=None) -> torch.Tensor:
        """Bool broadcastable to [B, H, q_len, k_len], True = may attend: the intervals (computed
        here unless given) and the dense mask."""
        lo, hi = intervals or self.intervals(q_len, k_len, device)
        j = torch.arange(k_len, device=device)
        ok = ((j >= lo[..., None]) & (j < hi[..., None]))[:, None]
        if self.dense_mask is not None:
            ok = ok & self.dense_mask
        return ok

    def with_span(self, batch: int, q_len: int, k_len: int) -> MaskArgs:
        """This mask with ``row_lo`` / ``row_hi`` set to the span of each query row's allowed keys
        under its dense mask or float bias (-inf: not allowed), over the heads, for the kernels:
        they skip the key tiles outside a tile's spans and never read the keys outside them (the
        garbage after the valid length of a KV buffer, NaN included). Computed on the device,
        without a host synchronisation; the mask itself is unchanged (the dense mask still applies
        inside the span)."""
        live = self.dense_mask if self.bias is None else self.bias != float("-inf")
        if live is None:
            return self
        while live.dim() < 4:
            live = live.unsqueeze(0)
        live = live.expand(*live.shape[:3], k_len).any(1)  # [B or 1, Lq or 1, Lk]
        some = live.any(-1)
        first = live.view(torch.uint8).argmax(-1)  # argmax: the first of equal maxima
        last = k_len - live.flip(-1).view(torch.uint8).argmax(-1)
        lo = torch.where(some, first, k_len).expand(batch, q_len).contiguous()
        hi = torch.where(some, last, 0).expand(batch, q_len).contiguous()
        return self._replace(row_lo=lo, row_hi=hi)


def _check_dense(mask, B, H, Lq, Lk, device) -> None:
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(
            f"attention: a tensor mask must be bool (True = may attend) or float (added to the "
            f"scores), got {mask.dtype}"
        )
    if mask.device != device:
        raise ValueError(f"attention: mask is on {mask.device}, the inputs are on {device}")
    full = (B, H, Lq, Lk)
    ok = mask.dim() <= 4 and all(m in (1, f) for m, f in zip(mask.shape[::-1], full[::-1], strict=False))
    if not ok:
        raise ValueError(
            f"attention: mask must broadcast to [B, H, Lq, Lk] = {list(full)}, got shape {list(mask.shape)}"
        )


def lower(mask, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> MaskArgs:
    """The kernel arguments of ``mask`` (None, a bool tensor, a float tensor added to the scores
    or a ``Mask``) for attention over [batch, heads, q_len, k_len]; raises on a mask that cannot
    apply."""
    if mask is None:
        return MaskArgs()
    if isinstance(mask, torch.Tensor):
        _check_dense(mask, batch, heads, q_len, k_len, device)
        return MaskArgs(dense_mask=mask) if mask.dtype == torch.bool else MaskArgs(bias=mask)
    if not isinstance(mask, Mask):
        raise TypeError(
            "attention: mask must be None, a bool tensor, a float tensor or a vlkernels.masks mask, "
            f"got {type(mask).__name__}"
        )
    mask.check(batch, q_len, k_len, device)

    def flat(t):  # the kernels index the lengths as contiguous; no copy when they are
        return None if t is None else t.contiguous()

    nq, mode = mask.qformer if mask.qformer is not None else (0, "bidirectional")
    t2m, lat, immediate = mask.media if mask.media is not None else (None, 1, None)
    lo, hi = _runs(mask.documents) if mask.documents is not None else (None, None)
    return MaskArgs(
        key_lengths=flat(mask.key_lengths),
        prefix_lengths=flat(mask.prefix_lengths),
        text_to_media=t2m,
        causal=mask.causal,
        qformer_queries=nq,
        qformer_mode=QFORMER_MODES.index(mode),
        media_mode=MEDIA_MODES[immediate],
        latents_per_media=lat,
        window=mask.window or 0,
        row_lo=lo,
        row_hi=hi,
    )


def _runs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of ``ids`` [B, L], the start and the end (exclusive) of its run of equal
    ids: int64 [B, L] each (no host synchronisation)."""
    L = ids.shape[1]
    idx = torch.arange(L, device=ids.device).expand_as(ids)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    last = torch.ones_like(ids, dtype=torch.bool)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, idx, 0).cummax(1).values
    end = torch.where(last, idx + 1, L).flip(1).cummin(1).values.flip(1)
    return start.contiguous(), end.contiguous()
