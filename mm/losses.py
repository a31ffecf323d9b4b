"""Loss functions: pure tensor functions, one per objective. torch only, no Ray.

* ``clip_loss``: symmetric InfoNCE (CLIP, Radford et al. 2021) over features gathered from every
  worker *with gradients* (``gather_features``: an all-gather whose backward sums the ranks' gradients), in OpenCLIP's two
  variants: the full (world*B)^2 logit matrix on every rank, or ``local_loss`` where each rank
  scores only its own B rows against all world*B columns (same gradient, 1/world the compute).
* ``siglip_loss``: pairwise sigmoid loss (SigLIP, Zhai et al. 2023): local images against all
  texts, positives on this rank's diagonal block.
* ``mlm_loss``, ``itm_loss``: cross-entropy; ``masked_patch_loss``: MAE's per-patch-normalised
  pixel MSE on masked patches (He et al. 2022).

Tested in tests/test_losses.py (including a 2-process gloo check that gathered gradients match
one process computing the global batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """(B, D) per rank -> (world*B, D), rank-major, differentiable w.r.t. every rank's input."""
    rank, size = world()
    if size == 1:
        return x
    return _AllGather.apply(x)


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's rows (a
    reduce-scatter, done as all_reduce + slice so gloo runs it too). Hand-written because the
    autograd-aware ``torch.distributed.nn.functional.all_gather`` is deprecated (FutureWarning
    every step) and its replacement in ``_functional_collectives`` is private."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, *,
              local_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """image, text: (B, D) L2-normalised; logit_scale: scalar (already exponentiated).

    Returns (loss, logits_per_image (B, world*B)) — the local rows, for hard-negative mining and
    accuracy metrics.
    """
    rank, size = world()
    b = image.shape[0]
    all_image, all_text = gather_features(image), gather_features(text)
    if local_loss or size == 1:
        logits_image = logit_scale * image @ all_text.T  # (B, world*B)
        logits_text = logit_scale * text @ all_image.T
        labels = torch.arange(b, device=image.device) + rank * b
    else:
        logits_image = logit_scale * all_image @ all_text.T  # (world*B, world*B)
        logits_text = logits_image.T
        labels = torch.arange(size * b, device=image.device)
    loss = (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
    local_rows = logits_image if logits_image.shape[0] == b else logits_image[rank * b:(rank + 1) * b]
    return loss, local_rows


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid loss, summed over all pairs of this rank's images with every text, / B."""
    rank, _ = world()
    b = image.shape[0]
    all_text = gather_features(text)
    logits = logit_scale * image @ all_text.T + logit_bias  # (B, world*B)
    signs = -torch.ones_like(logits)
    signs[torch.arange(b), torch.arange(b) + rank * b] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b, logits


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, L, V), labels (B, L) with -100 where not masked."""
    if not (labels != -100).any():
        return logits.sum() * 0.0  # keeps the graph (and DDP's reducer) intact on an empty mask
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, 2), labels (N,) with 1 = matched pair."""
    return F.cross_entropy(logits.float(), labels)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      norm_pix: bool = True) -> torch.Tensor:
    """pred, target (B, M, P); mask (B, M) True where hidden. MSE on hidden patches only; with
    ``norm_pix`` each target patch is normalised by its own mean and variance (MAE's best)."""
    target = target.float()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(-1)  # (B, M)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


__all__ = ["world", "gather_features", "clip_loss", "siglip_loss", "mlm_loss", "itm_loss", "masked_patch_loss"]
