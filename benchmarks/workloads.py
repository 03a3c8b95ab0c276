"""The paper workloads, declared once: their shapes, masks, dtype, the peer their estimate is
compared with, their README row and their budget ceilings.

Read by benchmarks/bench_budget.py (the budgets, every workload), benchmarks/bench_attention.py
(the attention benchmark: the Q-Former, Flamingo and CoCa workloads at these sizes on a GPU, at
``quick_B`` with --quick, at ``cpu`` on a CPU), vlkernels/demo.py (its GPU sizes) and, through the
benchmarks, benchmarks/gpu_session.sh. tests/test_workloads.py checks that each of them and
README's budget table agree with what is declared here.
"""

from __future__ import annotations

import dataclasses

import torch

QFORMER_QUERIES = 32  # BLIP-2's learned queries; text of up to 32 tokens follows them
FLAMINGO_IMAGES, FLAMINGO_LATENTS = 5, 64  # images per sequence, resampler latents per image
DECODE_KEYS = (256, 1024, 4096, 8192)  # cached keys of the decoding workloads


@dataclasses.dataclass(frozen=True)
class Budget:
    """Ceilings (tests/test_budget.py): what the kernels do now; lower one when a change improves it.

    launches: (forward, backward) kernel launches; flops_ratio: (forward, backward) GEMM FLOPs
    executed over useful; bwd_over_fwd: backward over forward FLOPs; flops_per_n2d: contrastive
    FLOPs over N²·D(·Q); spill_bytes: the most any of the workload's kernels spills on sm_90a."""

    launches: tuple[int, int]
    flops_ratio: tuple[float, float] | None = None
    bwd_over_fwd: float | None = None
    flops_per_n2d: float | None = None
    spill_bytes: int = 0
    host_syncs: int = 0

    def ceilings(self) -> dict:
        """{measure: ceiling} as bench_budget.summarise names the measures."""
        out = dict(launches_fwd=self.launches[0], launches_bwd=self.launches[1], host_syncs=self.host_syncs)
        if self.flops_ratio is not None:
            out["flops_ratio_fwd"], out["flops_ratio_bwd"] = self.flops_ratio
        for name in ("bwd_over_fwd", "flops_per_n2d"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["spill_bytes"] = self.spill_bytes
        return out


@dataclasses.dataclass(frozen=True)
class Attention:
    """q [Bq, H, Lq, D] over k, v [B, Hk, Lk, D] (Bq 1: queries shared by the batch) under the
    mask ``mask`` names (MASKS), in ``dtype``."""

    name: str
    label: str  # README's budget row
    B: int
    Bq: int
    H: int
    Hk: int
    Lq: int
    Lk: int
    D: int
    mask: str
    budget: Budget
    position: str | None = None  # "t5": T5's relative bias, its table learned
    peer: str = "sdpa-flash, dense (est)"
    dtype: torch.dtype = torch.bfloat16
    quick_batch: int | None = None  # the batch of the quick attention benchmark (None: B)
    cpu: dict | None = None  # the CPU attention benchmark's sizes (fields replaced); None: not run there
    op: str = "attention"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.B, self.Bq, self.H, self.Hk, self.Lq, self.Lk, self.D

    def at(self, **sizes) -> Attention:
        """The same workload at other sizes (B: Bq follows unless shared)."""
        if "B" in sizes and "Bq" not in sizes:
            sizes["Bq"] = sizes["B"] if self.Bq == self.B else self.Bq
        return dataclasses.replace(self, **sizes)

    def make_mask(self, device):
        return MASKS[self.mask](self, device)


@dataclasses.dataclass(frozen=True)
class Contrastive:
    """x [N, D] (or [N, Q, D]: the max over Q queries) against y [N, D]."""

    name: str
    label: str
    N: int
    D: int
    Q: int
    kind: str  # clip, siglip
    budget: Budget
    peer: str = "open_clip N×N (est)"
    dtype: torch.dtype = torch.bfloat16
    op: str = "contrastive"


@dataclasses.dataclass(frozen=True)
class Gated:
    """x + tanh(gate) * y over [B, L, C]."""

    name: str
    label: str
    shape: tuple[int, int, int]
    budget: Budget
    peer: str = "eager x + tanh(g)*y (est)"
    dtype: torch.dtype = torch.bfloat16
    op: str = "gated_residual"


# ----------------------------------------------------------------------------------------------
# Masks: (workload, device) -> a vlkernels mask (or a dense one, as a patched model hands it over)
# ----------------------------------------------------------------------------------------------


def _seeded_lengths() -> dict[str, torch.Tensor]:
    """Q-Former text (8..32 tokens), PaLI's prefix-LM prefix and its encoder's input (256 image
    tokens + a prompt of 8..32), for up to 128 / 16 / 16 sequences."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(8, 33, (128,), generator=g)
    prefix = 256 + torch.randint(8, 33, (16,), generator=g)
    encoder = 256 + torch.randint(8, 33, (16,), generator=g)
    return dict(text=text, prefix=prefix, encoder=encoder)


_LENGTHS = _seeded_lengths()  # drawn once, on CPU (the budget records its launches under fake tensors)


def _take(name: str, B: int) -> torch.Tensor:
    """The first B seeded lengths (repeated past what is drawn)."""
    drawn = _LENGTHS[name]
    return drawn.repeat(-(-B // len(drawn)))[:B]


def _qformer(mode):
    from vlkernels import masks

    return lambda w, d: (
        masks.qformer(QFORMER_QUERIES, mode) & masks.key_padding((_take("text", w.B) + QFORMER_QUERIES).to(d))
    )


def text_to_media(B: int, T: int, device="cpu") -> torch.Tensor:
    """Flamingo: image m (1-based) before token m·T/FLAMINGO_IMAGES; [B, T] int."""
    pos = torch.arange(T, device=device)
    return ((pos * FLAMINGO_IMAGES) // T + 1).expand(B, T).contiguous()


def _media(immediate: bool, dense: bool = False):
    from vlkernels import masks

    def make(w, d):
        m = masks.media(text_to_media(w.B, w.Lq, d), FLAMINGO_LATENTS, immediate)
        return m.to_dense(w.B, w.Lq, w.Lk) if dense else m

    return make


def _prefix_lm(dense: bool = False):
    from vlkernels import masks

    def make(w, d):
        m = masks.prefix_lm(_take("prefix", w.B).to(d))
        return m.to_dense(w.B, w.Lq, w.Lk) if dense else m

    return make


def _encoder_padding(w, d):
    from vlkernels import masks

    return masks.key_padding(_take("encoder", w.B).to(d))


def _t5_dense(w, d):
    """T5's bias [1, H, L, L] with the encoder's padding (-inf) as one float [B, H, L, L] that
    needs its gradient: what a model without the kernels hands over."""
    from vlkernels import bias

    pb = bias.t5(torch.randn(32, w.H, dtype=w.dtype), True).dense(w.Lq, w.Lk)
    padded = torch.arange(w.Lk)[None, None, None, :] >= _take("encoder", w.B)[:, None, None, None]
    return pb.expand(w.B, w.H, w.Lq, w.Lk).masked_fill(padded, float("-inf")).to(d).requires_grad_()


def _causal_dense(w, d):
    from vlkernels import masks

    return masks.causal().to_dense(w.B, w.Lq, w.Lk).to(d)


MASKS = {
    "none": lambda w, d: None,
    "qformer_itm": _qformer("bidirectional"),
    "qformer_itg": _qformer("multimodal_causal"),
    "qformer_itc": _qformer("unimodal"),
    "media_immediate": _media(True),
    "media_all_previous": _media(False),
    "prefix_lm": _prefix_lm(),
    "encoder_padding": _encoder_padding,
    "t5_dense_bias": _t5_dense,
    "media_immediate_dense": _media(True, dense=True),
    "prefix_lm_dense": _prefix_lm(dense=True),
    "causal_dense": _causal_dense,
}


def t5_table(w: Attention, device):
    """T5's relative bias (32 buckets, bidirectional) with a learnable table [32, H]."""
    from vlkernels import bias

    return bias.t5(torch.randn(32, w.H, device=device, dtype=w.dtype, requires_grad=True), True)


# ----------------------------------------------------------------------------------------------
# The workloads
# ----------------------------------------------------------------------------------------------

_QF = dict(B=128, Bq=128, H=12, Hk=12, Lq=64, Lk=64, D=64, quick_batch=64, cpu=dict(B=32))
_FLAMINGO = dict(B=8, Bq=8, H=16, Hk=16, Lq=2048, Lk=FLAMINGO_IMAGES * FLAMINGO_LATENTS, D=64)
_SPLIT = dict(bwd_over_fwd=3.5)  # FlashAttention's split backward: 5 GEMMs over the forward's 2
_DECODE = dict(B=8, Bq=8, H=32, Hk=8, Lq=1, D=128)  # 32 query heads, 8 KV heads
_DECODE_LABELS = (
    "decode 1 token, 256 cached keys (B 8, 32 heads, 8 kv heads, hd 128)",
    "decode, 1 024 keys (keys split across programs)",
    "decode, 4 096 keys",
    "decode, 8 192 keys",
)
_PREFIX = dict(B=16, Bq=16, H=8, Hk=1, Lq=320, Lk=320, D=256)  # PaLI's decoder: 1 KV head, hd 256
_T5 = dict(B=16, Bq=16, H=16, Hk=16, Lq=288, Lk=288, D=64)  # mT5-Large's encoder: 16 heads of 64
_T5_PEER = "sdpa-mem-efficient, dense bias (est)"

_FLAMINGO_IMMEDIATE = Attention(
    "flamingo_immediate",
    "Flamingo immediate (B 8, 16×64, 2048→5×64)",
    **_FLAMINGO,
    mask="media_immediate",
    budget=Budget((1, 3), (1.13, 1.58), **_SPLIT),
    cpu=dict(B=4, Bq=4, H=8, Hk=8, Lq=512),
)
_PREFIX_LM = Attention(
    "pali_prefix_lm",
    "PaLI prefix-LM (8 heads, 1 kv head, hd 256)",
    **_PREFIX,
    mask="prefix_lm",
    budget=Budget((1, 3), (1.16, 1.49), 3.22, spill_bytes=304),
)


def _dense(analytic: Attention, label: str, **budget) -> Attention:
    """``analytic``'s mask as a patched model hands it over, dense bool [B, 1, Lq, Lk] (the mask
    ``analytic.mask + "_dense"``): its shapes and ceilings (the span bounds the same tiles), one
    more forward launch (the span), ``budget``'s fields replaced; not in the CPU benchmark."""
    b = analytic.budget
    b = dataclasses.replace(b, launches=(b.launches[0] + 1, b.launches[1]), **budget)
    return dataclasses.replace(
        analytic,
        name=analytic.name + "_dense",
        label=label,
        mask=analytic.mask + "_dense",
        budget=b,
        cpu=None,
    )


ATTENTION = [
    # BLIP-2 Q-Former self-attention under its three masks (every key in one tile: one backward pass)
    *(
        Attention(
            f"qformer_self_{task}",
            label,
            **_QF,
            mask=f"qformer_{task}",
            budget=Budget((1, 1), (flops_ratio, flops_ratio), 2.5),
        )
        for task, label, flops_ratio in (
            ("itm", "Q-Former self ITM (B 128, 12×64, 32+32)", 1.23),
            ("itg", "Q-Former self ITG", 1.66),
            ("itc", "Q-Former self ITC", 2.46),
        )
    ),
    Attention(
        "qformer_cross",
        "Q-Former cross 32→257",
        **dict(_QF, Lq=QFORMER_QUERIES, Lk=257),
        mask="none",
        budget=Budget((1, 1), (1.25, 1.25), 2.5),
    ),
    _FLAMINGO_IMMEDIATE,
    Attention(
        "flamingo_all_previous",
        "Flamingo all previous",
        **_FLAMINGO,
        mask="media_all_previous",
        budget=Budget((1, 3), (1.03, 1.43), **_SPLIT),
    ),
    Attention(
        "coca_pooler_hd64",
        "CoCa pooler hd 64 (256 shared queries, 196 keys)",
        128,
        1,
        8,
        8,
        256,
        196,
        64,
        mask="none",
        budget=Budget((1, 4), (1.31, 1.83), **_SPLIT),
        quick_batch=64,
        cpu=dict(B=32),
    ),
    Attention(
        "coca_pooler_hd96",
        "CoCa pooler hd 96 (576 keys)",
        128,
        1,
        8,
        8,
        256,
        576,
        96,
        mask="none",
        budget=Budget((1, 4), (1.34, 1.87), **_SPLIT),
        quick_batch=64,
    ),
    _PREFIX_LM,
    # PaLI's mT5 encoder layer over [256 image tokens ; a prompt of up to 32], padded, with T5's
    # relative bias (its table learned): computed in the kernels, or as a model without them
    # hands it over, one dense float [B, H, L, L] (bias + padding) whose gradient the kernels
    # write and the model sums into the table
    Attention(
        "pali_encoder_t5",
        "PaLI mT5 encoder layer, T5 relative bias in the kernels, table learned (B 16, 16×64, 256+32 padded)",
        **_T5,
        mask="encoder_padding",
        position="t5",
        peer=_T5_PEER,
        # the table's gradient: two more passes over the dq kernel's tiles (S, dP)
        budget=Budget((1, 6), (1.28, 2.8), 5.5),
    ),
    Attention(
        "pali_encoder_t5_dense",
        "the same with the bias as one dense float [B, H, L, L] (bias + padding, its gradient returned)",
        **_T5,
        mask="t5_dense_bias",
        peer=_T5_PEER,
        # the dense bias's span pass; its gradient: delta, then dS over every tile
        budget=Budget((2, 5), (1.24, 2.72), 5.5),
    ),
    # decoding one token over a KV cache: the 4 query heads of a key head share a 16-row tile (4x
    # the useful MMA FLOPs forward, bytes bound); the backward (training on one row) keeps a head
    # per tile; from 1024 keys on, the keys split across programs and a second kernel combines
    *(
        Attention(
            f"decode_Lk{Lk}",
            label,
            **_DECODE,
            Lk=Lk,
            mask="none",
            budget=Budget((1 if Lk == 256 else 2, 3), (4.0, 22.4)),
        )
        for Lk, label in zip(DECODE_KEYS, _DECODE_LABELS, strict=True)
    ),
    # the masks as transformers hands them to a patched model, dense bool [B, 1, Lq, Lk]: the
    # analytic masks' FLOPs (the span bounds the same tiles) and one more forward launch (the span)
    _dense(_FLAMINGO_IMMEDIATE, "Flamingo immediate, dense bool mask (a patched Idefics)"),
    # the dense mask's loads cost registers at head dim 256
    _dense(_PREFIX_LM, "PaLI prefix-LM, dense bool mask (a patched PaliGemma)", spill_bytes=384),
    Attention(
        "causal_lm_dense",
        "causal LM, dense bool mask (B 4, 32 heads, 8 kv heads, hd 64, 2048)",
        4,
        4,
        32,
        8,
        2048,
        2048,
        64,
        mask="causal_dense",
        budget=Budget((2, 3), (1.04, 1.45), **_SPLIT),
    ),
]

_FUSED_LOSS = Budget((2, 3), (1.0, 2.0), flops_per_n2d=10.0)
CONTRASTIVE = [
    Contrastive("contrastive_clip_N32k", "CLIP N=32k D=768", 32768, 768, 1, "clip", _FUSED_LOSS),
    Contrastive("contrastive_clip_N64k", "CLIP N=64k D=768", 65536, 768, 1, "clip", _FUSED_LOSS),
    Contrastive("contrastive_siglip_N32k", "SigLIP N=32k", 32768, 768, 1, "siglip", _FUSED_LOSS),
    Contrastive(
        "contrastive_blip2_N8k_Q32", "BLIP-2 ITC N=8k, 32 queries, D=256", 8192, 256, 32, "clip", _FUSED_LOSS
    ),
]

GATED = [Gated("gated_residual", "gated residual 8×2048×2048", (8, 2048, 2048), Budget((1, 2)))]

WORKLOADS = {w.name: w for w in [*ATTENTION, *CONTRASTIVE, *GATED]}

# Patched models' dense masks and the analytic masks they spell out (equal FLOPs, tested)
DENSE_OF = {f"{w.name}_dense": w.name for w in (_FLAMINGO_IMMEDIATE, _PREFIX_LM)}
