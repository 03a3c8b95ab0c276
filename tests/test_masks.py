"""Mask definitions (to_dense) against hand-written matrices, intersections, mask errors, and the
lowering (MaskArgs, the interval rule of each backend) against to_dense."""

import pytest
import torch
from helpers import DEVICE

from vlkernels import masks

T, F = True, False


def dense(m, B, Lq, Lk):
    d = m.to_dense(B, Lq, Lk)
    assert d.shape == (B, 1, Lq, Lk) and d.dtype == torch.bool
    return d[:, 0].tolist()


def test_causal_is_bottom_right_aligned():
    assert dense(masks.causal(), 1, 2, 4) == [[[T, T, T, F], [T, T, T, T]]]
    assert dense(masks.causal(), 1, 3, 2) == [[[F, F], [T, F], [T, T]]]


def test_key_padding():
    assert dense(masks.key_padding(torch.tensor([1, 3])), 2, 1, 3) == [[[T, F, F]], [[T, T, T]]]


def test_qformer_modes_blip2_figure2():
    # 2 learned queries followed by 3 text tokens
    assert dense(masks.qformer(2, "bidirectional"), 1, 5, 5) == [[[T] * 5] * 5]
    assert dense(masks.qformer(2, "multimodal_causal"), 1, 5, 5) == [
        [
            [T, T, F, F, F],
            [T, T, F, F, F],
            [T, T, T, F, F],
            [T, T, T, T, F],
            [T, T, T, T, T],
        ]
    ]
    assert dense(masks.qformer(2, "unimodal"), 1, 5, 5) == [
        [
            [T, T, F, F, F],
            [T, T, F, F, F],
            [F, F, T, T, T],
            [F, F, T, T, T],
            [F, F, T, T, T],
        ]
    ]


def test_prefix_lm():
    assert dense(masks.prefix_lm(torch.tensor([2])), 1, 4, 4) == [
        [
            [T, T, F, F],
            [T, T, F, F],
            [T, T, T, F],
            [T, T, T, T],
        ]
    ]


def test_media_immediate_and_all_previous():
    t2m = torch.tensor([[0, 1, 2, 2]])  # 2 images x 2 latents
    assert dense(masks.media(t2m, 2, True), 1, 4, 4) == [
        [
            [F, F, F, F],
            [T, T, F, F],
            [F, F, T, T],
            [F, F, T, T],
        ]
    ]
    assert dense(masks.media(t2m, 2, False), 1, 4, 4) == [
        [
            [F, F, F, F],
            [T, T, F, F],
            [T, T, T, T],
            [T, T, T, T],
        ]
    ]


def test_sliding_window():
    # bottom-right aligned: 3 queries over 5 keys, each sees the last 2 keys up to its position
    assert dense(masks.sliding_window(2), 1, 3, 5) == [
        [
            [F, T, T, T, T],
            [F, F, T, T, T],
            [F, F, F, T, T],
        ]
    ]
    assert dense(masks.causal() & masks.sliding_window(2), 1, 3, 5) == [
        [
            [F, T, T, F, F],
            [F, F, T, T, F],
            [F, F, F, T, T],
        ]
    ]
    narrow = masks.sliding_window(3) & masks.sliding_window(2)
    assert torch.equal(narrow.to_dense(1, 4, 4), masks.sliding_window(2).to_dense(1, 4, 4))


def test_intersection():
    m = masks.qformer(2, "multimodal_causal") & masks.key_padding(torch.tensor([4]))
    assert dense(m, 1, 5, 5)[0][4] == [T, T, T, T, F]
    both = masks.key_padding(torch.tensor([3])) & masks.key_padding(torch.tensor([2]))
    assert dense(both, 1, 1, 4) == [[[T, T, F, F]]]
    prefixes = masks.prefix_lm(torch.tensor([3])) & masks.prefix_lm(torch.tensor([1]))
    expect = masks.prefix_lm(torch.tensor([3])).to_dense(1, 4, 4) & masks.prefix_lm(
        torch.tensor([1])
    ).to_dense(1, 4, 4)
    assert torch.equal(prefixes.to_dense(1, 4, 4), expect)
    assert "causal()" in repr(masks.causal() & masks.key_padding(torch.tensor([1])))


def test_mask_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        masks.qformer(32, "causal")
    with pytest.raises(ValueError, match="num_queries"):
        masks.qformer(-1, "unimodal")
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        masks.key_padding(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="must have 1 dimension"):
        masks.prefix_lm(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="latents_per_media"):
        masks.media(torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="cannot intersect two media"):
        m = masks.media(torch.zeros(1, 3, dtype=torch.long), 2)
        m & m
    with pytest.raises(ValueError, match="cannot intersect qformer"):
        masks.qformer(2, "unimodal") & masks.qformer(2, "bidirectional")
    with pytest.raises(ValueError, match=r"shape \[B\] = \[3\], got \[2\]"):
        masks.key_padding(torch.tensor([1, 2])).to_dense(3, 4, 4)
    with pytest.raises(ValueError, match="multiple of latents_per_media=2, got 5"):
        masks.media(torch.zeros(1, 3, dtype=torch.long), 2).to_dense(1, 3, 5)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        masks.sliding_window(0)
    with pytest.raises(ValueError, match="exceeds the key length"):
        masks.qformer(8, "unimodal").to_dense(1, 4, 4)
    with pytest.raises(TypeError, match=r"document: seq_ids must be an integer tensor, got torch\.float32"):
        masks.document(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"document: seq_ids must have 2 dimension\(s\), got shape \[4\]"):
        masks.document(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="document is a self-attention mask, got Lq=4 and Lk=5"):
        masks.document(torch.zeros(1, 4, dtype=torch.long)).to_dense(1, 4, 5)
    with pytest.raises(
        ValueError, match=r"document seq_ids must have shape \[B, L\] = \[2, 4\], got \[1, 4\]"
    ):
        masks.document(torch.zeros(1, 4, dtype=torch.long)).to_dense(2, 4, 4)
    with pytest.raises(ValueError, match="cannot intersect two document masks"):
        d = masks.document(torch.zeros(1, 4, dtype=torch.long))
        d & d


# -- the lowering: MaskArgs and its interval rule, in every language, against to_dense ----------


def _lowering_cases():
    """(name, Lq, Lk, mask) for every component and the intersections the models use."""
    g = torch.Generator().manual_seed(0)
    B = 3

    def lengths(hi, low=0):
        return torch.randint(low, hi + 1, (B,), generator=g)

    t2m = torch.randint(0, 4, (B, 23), generator=g).sort(dim=1).values
    cases = [
        ("causal, Lq < Lk", 23, 48, masks.causal()),
        ("causal, Lq > Lk", 48, 23, masks.causal()),
        ("key_padding", 23, 48, masks.key_padding(lengths(48))),
        ("causal & key_padding", 40, 40, masks.causal() & masks.key_padding(lengths(40))),
        ("prefix_lm", 40, 40, masks.prefix_lm(lengths(40))),
        ("prefix_lm & key_padding", 40, 40, masks.prefix_lm(lengths(40)) & masks.key_padding(lengths(40))),
        ("media immediate", 23, 48, masks.media(t2m, 16, True)),
        ("media all previous", 23, 48, masks.media(t2m, 16, False)),
        ("media & key_padding", 23, 48, masks.media(t2m, 16, True) & masks.key_padding(lengths(48))),
        ("sliding_window", 23, 48, masks.sliding_window(7)),
        ("causal & sliding_window", 40, 40, masks.causal() & masks.sliding_window(5)),
        ("sliding_window & key_padding", 48, 23, masks.sliding_window(9) & masks.key_padding(lengths(23))),
    ]
    for mode in masks.QFORMER_MODES:
        cases.append((f"qformer {mode}", 40, 40, masks.qformer(12, mode)))
        cases.append(
            (
                f"qformer {mode} & key_padding",
                40,
                40,
                masks.qformer(12, mode) & masks.key_padding(lengths(40, 12)),
            )
        )
    return cases


CASES = _lowering_cases()


def _document_cases():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 4, (3, 40), generator=g).sort(dim=1).values
    ids[1] = ids[1] // 3 + 7  # runs of other ids and lengths
    lengths = torch.tensor([40, 31, 12])
    return [
        ("document", 40, 40, masks.document(ids)),
        ("document & causal", 40, 40, masks.document(ids) & masks.causal()),
        (
            "document & key_padding & sliding_window",
            40,
            40,
            masks.document(ids) & masks.key_padding(lengths) & masks.sliding_window(6),
        ),
    ]


DOC_CASES = _document_cases()


@pytest.mark.parametrize("case", CASES + DOC_CASES, ids=[c[0] for c in CASES + DOC_CASES])
def test_interval_rule_matches_to_dense(case):
    """MaskArgs.intervals, the Python statement of what the kernels compute per row."""
    _, Lq, Lk, m = case
    B = 3
    lowered = masks.lower(m, B, 1, Lq, Lk, torch.device("cpu"))
    assert isinstance(lowered, masks.MaskArgs)
    lo, hi = lowered.intervals(Lq, Lk, torch.device("cpu"))
    j = torch.arange(Lk)
    got = (j >= lo[..., None]) & (j < hi[..., None])
    assert torch.equal(got.expand(B, Lq, Lk), m.to_dense(B, Lq, Lk)[:, 0])
    dense = torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(1)) > 0.5
    both = masks.MaskArgs(dense, *lowered[1:]).allowed(Lq, Lk, torch.device("cpu"))
    assert torch.equal(both.expand(B, 1, Lq, Lk), m.to_dense(B, Lq, Lk) & dense)


def _attended(backend, m, Lq, Lk, B=3, D=64):
    """Which keys each row attends to through ``backend`` (bool [B, 2, Lq, Lk]): with q = k = 0
    every allowed key has the same weight, and v = one-hot keys shows which ones a row attended to."""
    import vlkernels

    q = torch.zeros(B, 2, Lq, D, device=DEVICE)
    k = torch.zeros(B, 1, Lk, D, device=DEVICE)
    v = torch.eye(Lk, D, device=DEVICE).expand(B, 1, Lk, D)
    return vlkernels.attention(q, k, v, _to(m, DEVICE), backend=backend)[..., :Lk] > 0


def test_each_backend_allows_what_to_dense_allows(backend):
    """The kernels' own statements of the rule (_row_bounds in Triton, row_bounds in
    csrc/attention.cu; the torch backend's MaskArgs.allowed) against to_dense."""
    for name, Lq, Lk, m in CASES:
        want = _to(m, DEVICE).to_dense(3, Lq, Lk).expand(3, 2, Lq, Lk)
        assert torch.equal(_attended(backend, m, Lq, Lk), want), name


def test_document_mask_on_each_backend(backend):
    """Packed sequences: each backend's rule against to_dense."""
    for name, Lq, Lk, m in DOC_CASES:
        want = _to(m, DEVICE).to_dense(3, Lq, Lk).expand(3, 2, Lq, Lk)
        assert torch.equal(_attended(backend, m, Lq, Lk), want), name


def _to(m, device):
    """The mask with its tensors on ``device``."""
    from dataclasses import replace

    moved = {
        f: getattr(m, f).to(device) for f in ("key_lengths", "prefix_lengths") if getattr(m, f) is not None
    }
    if m.media is not None:
        moved["media"] = (m.media[0].to(device), *m.media[1:])
    if m.documents is not None:
        moved["documents"] = m.documents.to(device)
    return replace(m, **moved)
