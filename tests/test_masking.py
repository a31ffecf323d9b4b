"""Masking: BERT's 15% with 80/10/10, MAE random patches, VideoMAE tubes.

    .venv/bin/pytest tests/test_masking.py -x -q
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mm.masking import mask_tokens, random_patch_mask, tube_mask

SPECIAL = (0, 2, 3, 4)  # pad, cls, sep, mask


def test_mask_tokens_rates_and_replacement_split():
    g = torch.Generator().manual_seed(0)
    b, length = 400, 50
    ids = torch.randint(5, 100, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    out, labels = mask_tokens(ids, mask, mask_id=4, vocab_size=100, special_ids=SPECIAL, generator=g)
    picked = labels != -100
    rate = picked[:, 1:-1].float().mean().item()
    assert 0.13 < rate < 0.18
    assert not picked[:, 0].any() and not picked[:, -1].any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(out[~picked], ids[~picked])
    to_mask = (out[picked] == 4).float().mean().item()
    kept = (out[picked] == ids[picked]).float().mean().item()
    assert 0.76 < to_mask < 0.84 and 0.07 < kept < 0.14  # random ids sometimes equal the original


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 11))
def test_every_row_with_a_real_token_gets_one_masked_and_padding_never(b, length, pad_from):
    ids = torch.randint(5, 50, (b, length + 2))
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, min(pad_from, length) + 1:] = 0
    ids[mask == 0] = 0
    _, labels = mask_tokens(ids, mask, mask_id=4, vocab_size=50, special_ids=SPECIAL)
    picked = labels != -100
    assert not picked[mask == 0].any()
    real = (mask.bool() & (ids >= 5)).any(1)
    assert torch.equal(picked.any(1), real)


def test_random_patch_mask_ratio_and_consistency():
    keep, mask = random_patch_mask(5, 64, 0.75)
    assert keep.shape == (5, 16) and mask.shape == (5, 64)
    assert (mask.sum(1) == 48).all()
    assert not mask.gather(1, keep).any()
    assert (keep.diff(1) > 0).all()  # sorted, unique


def test_tube_mask_hides_the_same_patches_in_every_frame():
    keep, mask = tube_mask(3, 4, 16, 0.9)
    k = max(1, round(16 * 0.1))
    assert keep.shape == (3, 4 * k) and mask.shape == (3, 64)
    frames = mask.view(3, 4, 16)
    assert (frames == frames[:, :1]).all()
    assert not mask.gather(1, keep).any()
    # Frame-major and K per frame, as divided attention requires.
    assert torch.equal(keep.view(3, 4, k) // 16, torch.arange(4)[None, :, None].expand(3, 4, k))
