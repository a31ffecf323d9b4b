"""AdamW with parameter groups and a warmup + cosine learning-rate schedule.

Weight decay applies to matrices only: norms, biases, embeddings (token, position, temporal,
class/mask tokens) and the logit scale/bias are excluded, as in CLIP/OpenCLIP and BERT. Frozen
parameters (``requires_grad=False``, e.g. LiT-locked towers) are left out of the optimizer.

    opt = build_optimizer(module, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, total_steps=cfg.train.max_steps)

Tested in tests/test_train.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's beta2 for stability with large batches
    eps: float = 1e-6
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # floor of the cosine, as a fraction of lr

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")


_NO_DECAY_NAMES = ("embed", "cls_token", "mask_token", "logit_scale", "logit_bias", "pos", "time")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or id(p) in embeddings or any(k in leaf for k in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(module, cfg.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"]) and bool(groups[0]["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))


__all__ = ["OptimConfig", "param_groups", "build_optimizer", "lr_factor", "build_scheduler"]
