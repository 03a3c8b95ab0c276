"""Mask definitions (to_dense) against hand-written matrices, intersections, and mask errors."""

import pytest
import torch

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
    with pytest.raises(ValueError, match="exceeds the key length"):
        masks.qformer(8, "unimodal").to_dense(1, 4, 4)
