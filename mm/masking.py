"""Masking for masked modelling: BERT's 15% token masking with 80/10/10 replacement, MAE's random
patch masking for images, and VideoMAE's tube masking for video. torch only.

All functions draw from ``generator`` (or torch's global RNG, which the training loop reseeds
from (seed, rank, step) so a resumed run draws the same masks). Tested in tests/test_masking.py.
"""

from __future__ import annotations

import torch


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_id: int, vocab_size: int,
                special_ids: tuple[int, ...], prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019): pick ``prob`` of the real, non-special tokens; of those
    80% become [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 at
    unpicked positions). At least one token per row with a maskable token is picked, so short
    captions still carry signal."""
    dev = input_ids.device
    maskable = attention_mask.bool()
    for s in special_ids:
        maskable &= input_ids != s
    u = torch.rand(input_ids.shape, generator=generator, device=dev)
    picked = (u < prob) & maskable
    # Guarantee one pick per row: the maskable position with the smallest draw.
    forced = torch.where(maskable, u, torch.full_like(u, 2.0)).argmin(1)
    has_any = maskable.any(1)
    picked[has_any, forced[has_any]] = True
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(input_ids.shape, generator=generator, device=dev)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=dev)
    out = torch.where(picked & (r < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(picked & (r >= 0.8) & (r < 0.9), random_ids, out)
    return out, labels


def random_patch_mask(batch: int, num_patches: int, ratio: float, *, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE random masking. Returns keep_idx (B, K) sorted, and mask (B, N) True where hidden;
    K = round(N * (1 - ratio)), at least 1."""
    keep = max(1, int(round(num_patches * (1 - ratio))))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    keep_idx = noise.argsort(1)[:, :keep].sort(1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask


def tube_mask(batch: int, frames: int, num_patches: int, ratio: float, *, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VideoMAE tube masking (Tong et al. 2022): one spatial mask shared by all T frames, so a
    hidden patch cannot be copied from its neighbour in time. Returns keep_idx (B, T*K) into the
    frame-major T*N tokens, K per frame, and mask (B, T*N)."""
    keep_sp, mask_sp = random_patch_mask(batch, num_patches, ratio, device=device, generator=generator)
    offsets = torch.arange(frames, device=device)[:, None] * num_patches  # (T, 1)
    keep_idx = (keep_sp[:, None, :] + offsets[None]).flatten(1)  # (B, T*K)
    return keep_idx, mask_sp.repeat(1, frames)


__all__ = ["mask_tokens", "random_patch_mask", "tube_mask"]
