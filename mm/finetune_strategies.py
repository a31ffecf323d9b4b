"""Fine-tuning strategies: which weights of a run's model train (``finetune.strategy``).

    PrepareModel("lora", ("vision", "text"), lora_rank=8)(model)   # on every Ray Train worker

``StrategyConfig`` is the config's ``finetune`` section; ``STRATEGIES`` holds one entry per
strategy (``StrategySpec``: the function that sets which weights train, a probe first or not,
FLYP's prompt-contrastive training, the tasks it applies to), and ``PrepareModel`` is the
``prepare_model`` hook of mm.train.fit that applies it:

* ``full``: every weight of the adapted tower(s) (classify: the vision tower and its projection).
* ``last_n``: only the last ``last_n_blocks`` blocks (+ final norm, projection) of the tower(s).
* ``head_only``: a linear probe on frozen features (mm/finetune_tasks.py's ``fit_probe``); no
  Ray Train run.
* ``lora``: LoRA (Hu et al. 2021) through ``peft`` on the attention projections (timm ``attn.qkv``,
  ``attn.proj``; BERT ``query``, ``key``, ``value``, ``attention.output.dense``), merged into the
  weights after training (``merge_lora_state``, ``merge_lora_run``) so ``RUN/model`` is a plain model.
* ``lp_ft``: linear probe, then full fine-tuning from the probe's head (Kumar et al. 2022).
* ``flyp``: contrastive fine-tuning of both towers against class-name prompts (Goyal et al. 2023).

What each task does with them is mm/finetune_tasks.py; the entry point is mm/finetune.py.
Tested in tests/test_finetune.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Strategy = Literal["full", "last_n", "head_only", "lora", "lp_ft", "flyp"]
_LORA_TARGETS = {
    "vision": r"vision\.vit\.blocks\.\d+\.attn\.(qkv|proj)",
    "text": r"text\.bert\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
}


@dataclass(frozen=True)
class StrategyConfig:
    strategy: Strategy = "full"
    # Which tower(s) full / last_n / lora adapt; None: the task's default (retrieval: both; caption:
    # none, a frozen-tower decoder). Classify always adapts vision only (the text tower gets no
    # gradient from a classification loss, so it stays pretrained), caption at most vision.
    towers: Literal["vision", "text", "both", "none"] | None = None
    last_n_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    head_init: Literal["zeroshot", "zeros"] = "zeroshot"
    label_smoothing: float = 0.0
    probe_weight_decay: float = 1e-4
    probe_max_iters: int = 200
    classes_path: str | None = None  # default: DATA/classes.json, else the sorted labels
    templates_path: str | None = None  # default: DATA/templates.json, else configs/templates.json
    wise_ft_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    retention_data: str | None = None  # a second corpus whose zero-shot/retrieval is measured before/after

    def __post_init__(self) -> None:
        if self.last_n_blocks < 1:
            raise ValueError("last_n_blocks must be >= 1")
        if self.lora_rank < 1:
            raise ValueError("lora_rank must be >= 1")
        if any(not 0.0 <= a <= 1.0 for a in self.wise_ft_alphas):
            raise ValueError("wise_ft_alphas must lie in [0, 1]")



def _train_towers(model, p: PrepareModel) -> None:
    """``full``: every weight of the adapted towers and their projections."""
    for t in p.towers:
        getattr(model, t).requires_grad_(True)
        getattr(model, f"{t}_proj").requires_grad_(True)


def _train_last_blocks(model, p: PrepareModel) -> None:
    """``last_n``: the towers' last ``last_n_blocks`` blocks (vision: + final norm and temporal
    blocks) and their projections."""
    for t in p.towers:
        tower = getattr(model, t)
        for b in list(tower.blocks)[-p.last_n_blocks:]:
            b.requires_grad_(True)
        if t == "vision":
            tower.norm.requires_grad_(True)
            if tower.temporal is not None:
                for m in list(tower.temporal)[-p.last_n_blocks:]:
                    m.requires_grad_(True)
        getattr(model, f"{t}_proj").requires_grad_(True)


def _train_lora(model, p: PrepareModel) -> None:
    """``lora``: peft adapters on the towers' attention projections, nothing else trains."""
    from peft import LoraConfig, inject_adapter_in_model

    target = "|".join(_LORA_TARGETS[t] for t in p.towers)
    inject_adapter_in_model(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                                       target_modules=f"^({target})$"), model)  # leaves only the adapters trainable


@dataclass(frozen=True)
class StrategySpec:
    """One fine-tuning strategy. ``trainable`` sets which weights train (``PrepareModel`` runs it on
    every worker; None: no Ray Train run); ``probe_first``: a linear probe on cached frozen
    features starts the head; ``prompts_contrastive``: classification trains both towers
    contrastively against class prompts and reads its classifier off the text tower (FLYP);
    ``tasks``: the tasks it applies to (None: every task in ``TASKS``)."""

    trainable: Callable | None
    probe_first: bool = False
    prompts_contrastive: bool = False
    tasks: tuple[str, ...] | None = None


STRATEGIES: dict[str, StrategySpec] = {
    "full": StrategySpec(_train_towers),
    "last_n": StrategySpec(_train_last_blocks),
    "lora": StrategySpec(_train_lora),
    "head_only": StrategySpec(None, probe_first=True, tasks=("classify",)),
    "lp_ft": StrategySpec(_train_towers, probe_first=True, tasks=("classify",)),
    "flyp": StrategySpec(_train_towers, prompts_contrastive=True, tasks=("classify",)),
}


@dataclass
class PrepareModel:
    """The ``prepare_model`` hook: which weights train, per strategy (runs on every worker)."""

    strategy: str
    towers: tuple[str, ...]  # subset of ("vision", "text")
    last_n_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    train_scale: bool = False  # the logit scale: only with a contrastive objective

    def __call__(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        STRATEGIES[self.strategy].trainable(model, self)
        # Only what the objectives use may require grad: DDP fails on parameters without gradients.
        model.logit_scale.requires_grad_(self.train_scale)
        return model


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft LoRA keys -> plain keys: W + (B @ A) * scaling under the base layer's name."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if ".base_layer." in k:
            prefix, leaf = k.split(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.default.weight"].float()  # (r, in)
                b = state[f"{prefix}.lora_B.default.weight"].float()  # (out, r)
                v = (v.float() + (b @ a) * scaling).to(v.dtype)
            out[f"{prefix}.{leaf}"] = v
        else:
            out[k] = v
    return out


def merge_lora_run(run: Path, s: StrategyConfig) -> None:
    """Rewrite RUN/model without adapters (W + BA * alpha/r): a plain model for mm.load."""
    from mm.checkpoint import read_tensors, write_tensors

    path = run / "model" / "model.safetensors"
    state = read_tensors(path)
    if any(".lora_A." in k for k in state):
        write_tensors(path, merge_lora_state(state, s.lora_alpha / s.lora_rank), metadata={"format": "mm-vlmodel/1"})


__all__ = ["Strategy", "StrategyConfig", "StrategySpec", "STRATEGIES", "PrepareModel", "merge_lora_state",
           "merge_lora_run"]
