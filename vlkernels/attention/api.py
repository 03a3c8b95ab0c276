"""The public ``attention``: input checks, mask lowering, backend choice, autograd."""

from __future__ import annotations

import math

import torch

from vlkernels import _dispatch, masks
from vlkernels import bias as position
from vlkernels.attention import dropout
from vlkernels.attention import torch as torch_backend
from vlkernels.attention.args import AttentionArgs
from vlkernels.attention.autograd import AttentionFunction

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(t) -> str:
    return str(list(t.shape))


def _check_inputs(q, k, v, scale, softcap, dropout_p) -> None:
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
    B, Hk, _, D = k.shape
    Bq, H, _, Dq = q.shape
    if Bq not in (B, 1):
        raise ValueError(f"attention: q batch must be {B} (the batch of k) or 1, got {Bq}")
    if Dq != D:
        raise ValueError(f"attention: q head dim must equal k's ({D}), got {Dq}")
    if H < 1 or Hk < 1:
        raise ValueError(f"attention: head counts must be >= 1, got q {_shape(q)}, k {_shape(k)}")
    if H % Hk:
        raise ValueError(f"attention: q heads ({H}) must be a multiple of k/v heads ({Hk})")
    if D < 1:
        raise ValueError(f"attention: head dim must be >= 1, got {D}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite float, got {scale}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"attention: softcap must be a float or None, got {type(softcap).__name__}")
        if not 0 < softcap < math.inf:
            raise ValueError(f"attention: softcap must be a positive finite float, got {softcap}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p <= 1:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1], got {dropout_p!r}")


def _distinct(q, k, v):
    """q, k, v as three tensor objects: one tensor passed twice (``attention(q, mem, mem)``,
    self-attention with q = k = v) becomes a view, which autograd and torch.compile take as a
    separate input (Dynamo refuses one tensor twice in an autograd function's inputs)."""
    if k is q:
        k = k.view(k.shape)
    if v is q or v is k:
        v = v.view(v.shape)
    return q, k, v


def attention(
    q,
    k,
    v,
    mask=None,
    *,
    scale=None,
    softcap=None,
    dropout_p=0.0,
    seed=None,
    position_bias=None,
    backend=None,
):
    """Masked multi-head attention, SDPA layout. q [Bq, H, Lq, D]; k, v [B, Hk, Lk, D].

    Returns [B, H, Lq, D] (memory laid out as [B, Lq, H, D], so merging heads is free).
    ``mask``: None, bool broadcastable to [B, H, Lq, Lk] (True = may attend), float broadcastable
    to it (added to the scaled scores, as SDPA's attn_mask; its gradient when it requires grad),
    or a mask from ``vlkernels.masks``. Rows with no allowed key give 0 and receive 0 gradient.
    ``scale`` defaults to 1/sqrt(D). ``softcap``: logit soft-capping (Gemma 2): the scaled scores
    become softcap · tanh(scores / softcap) before a float mask is added. ``dropout_p``: attention
    dropout on the probabilities (kept ones scaled by 1 / (1 - p)); its keep mask is a function of
    ``seed`` (an int, or an int64 tensor on q's device; None draws one on the device from torch's
    generator, so torch.manual_seed makes runs repeat and compiled steps and CUDA-graph replays draw
    anew), regenerated in the backward,
    the same on every backend (``dropout_mask``). ``position_bias``: an analytic position bias
    from ``vlkernels.bias`` (T5's learned buckets, ALiBi), computed in the kernels and added to the
    scores after the cap; its table's or slopes' gradient is reduced in the backward. ``backend``:
    None (automatic), "triton", "cuda", "torch".
    Under autocast, q, k, v are cast to its lower-precision dtype first (as SDPA).
    """
    _check_inputs(q, k, v, scale, softcap, dropout_p)
    q, k, v = _distinct(*_dispatch.autocast_inputs(q, k, v))
    B, _, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    lowered = _lower(mask, position_bias, B, H, Lq, Lk, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    softcap, dropout_p = float(softcap or 0.0), float(dropout_p)
    if dropout_p == 0:
        seed = None
    else:
        seed = draw_seed(q.device) if seed is None else checked_seed(seed, "attention", q.device)
    args = AttentionArgs(q, k, v, lowered, scale, softcap, dropout_p, seed)
    chosen = _dispatch.choose("attention", backend, args)
    if not (B and Lq and Lk):
        return _nothing_to_attend(q, k, v)
    args = chosen.prepare(args)
    if chosen.records_backward:  # a C++ op: autocast passes custom ops through untouched
        return chosen.forward(args)[0]
    lowered = args.mask
    out, _ = AttentionFunction.apply(
        chosen.name, q, k, v, lowered, scale, softcap, dropout_p, seed, lowered.bias, lowered.position_bias
    )
    return out


def _nothing_to_attend(q, k, v) -> torch.Tensor:
    """SDPA's answer where there is no work: an empty batch or query length gives an empty output,
    no keys (Lk = 0) rows of 0; q, k, v get gradients of 0 (empty products, no kernel)."""
    H, Hk = q.shape[1], k.shape[1]
    if H != Hk:
        k, v = (t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
    out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)), v)  # [B, H, Lq, D]: its inner dim or size is 0
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _lower(mask, position_bias, B: int, H: int, Lq: int, Lk: int, device) -> masks.MaskArgs:
    """The mask and the position bias as the backends take them (``masks.MaskArgs``)."""
    lowered = masks.lower(mask, B, H, Lq, Lk, device)
    if position_bias is None:
        return lowered
    return lowered._replace(**position.lower(position_bias, B, H, Lq, Lk, device))


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed drawn by ``device``'s generator (what ``seed=None`` means): an int64 0-d
    tensor there, no host synchronisation, a fresh value at each replay of a CUDA graph and each
    step of a compiled function (torch.manual_seed makes runs repeat)."""
    return torch.randint(0, 2**62, (), device=device)


def checked_seed(seed, fn: str, device: torch.device) -> torch.Tensor:
    """``seed`` as the kernels take it: an int in [0, 2**63) as an int64 0-d tensor on ``device``,
    or such a tensor as it is (its value is not read here: that would synchronise); else an error
    naming ``fn``."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
            raise ValueError(
                f"{fn}: a seed tensor must be one int64 element on {device}, got {seed.dtype} "
                f"{list(seed.shape)} on {seed.device}"
            )
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{fn}: seed must be an int in [0, 2**63) or an int64 tensor, got {seed!r}")
    return torch.full((), seed, dtype=torch.int64, device=device)


def attention_dropout_mask(q, k, dropout_p: float, seed) -> torch.Tensor:
    """The keep mask that ``attention(q, k, v, dropout_p=dropout_p, seed=seed)`` applies, on every
    backend: bool [B, H, Lq, Lk], True = kept (as FlashAttention's debug mask, for testing and
    inspection). ``seed``: the seed given to ``attention`` (an int, or an int64 tensor)."""
    _check_inputs(q, k, k, None, None, dropout_p)
    seed = checked_seed(seed, "attention_dropout_mask", q.device)
    return dropout.keep_mask(seed, dropout_p, k.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)


def attention_weights(
    q, k, mask=None, *, scale=None, softcap=None, dropout_p=0.0, seed=None, position_bias=None
):
    """The attention probabilities that ``attention(q, k, v, mask, ...)`` multiplies v by, as a
    tensor: [B, H, Lq, Lk] in q's dtype, computed in fp32 (what ``output_attentions=True`` returns
    in transformers' eager attention). Masked entries and rows with no allowed key are 0; with
    ``dropout_p`` > 0 the entries dropped for ``seed`` are 0 and the kept ones scaled by
    1 / (1 - p), as in the forward (the seed given to ``attention``: required then). Arguments
    as ``attention``'s; materialises [B, H, Lq, Lk]."""
    _check_inputs(q, k, k, scale, softcap, dropout_p)
    if dropout_p > 0 and seed is None:
        raise ValueError("attention_weights: dropout_p > 0 needs the seed given to attention()")
    seed = None if dropout_p == 0 else checked_seed(seed, "attention_weights", q.device)
    B, _, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    lowered = _lower(mask, position_bias, B, H, Lq, Lk, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not (B and Lq and Lk):  # nothing to attend: empty, or rows of 0 (Lk = 0)
        return q.new_zeros((B, H, Lq, Lk))
    args = AttentionArgs(q, k, k, lowered, scale, float(softcap or 0.0), float(dropout_p), seed)
    return torch_backend.probabilities(args).to(q.dtype)
