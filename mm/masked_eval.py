"""Masked-modelling metrics of a pretraining run on a split: MLM accuracy/loss (text alone and
image-conditioned) and the masked-reconstruction (MIM) loss, with their chance levels.

    metrics, chance = masked_modelling(model_dir, data_dir, EvalConfig(split="val"))

Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from mm.eval_inputs import EvalConfig, load_model_and_tokenizer, run_dir_of


def masked_modelling(model_dir: Path, data_dir, cfg: EvalConfig, max_batches: int = 50) -> tuple[dict, dict]:
    """MLM accuracy/loss and masked-reconstruction (MIM) loss on the eval split.

    The objectives' heads (MLM head, MAE decoder) are not part of RUN/model: they are read with
    the run's objectives config (RUN/manifest.json) from its last Ray Train step checkpoint
    (RUN/ray/step_*). Masks are drawn with a fixed seed, so reruns agree. Names: mlm_accuracy,
    mlm_loss, fusion_mlm_accuracy, fusion_mlm_loss, mim_loss; chance: a uniform guess over the
    vocabulary (1/V, ln V) and, for MIM with per-patch-normalised targets, predicting the patch
    mean (MSE 1.0; without norm_pix it is not defined and left out).
    """
    import torch

    from core.config import build
    from mm.checkpoint import load_train_state, read_json
    from mm.data import DataConfig, PreprocessConfig, build_dataset, load_token_info, trim_padding
    from mm.objectives import ObjectiveSet, build_objectives
    from mm.train import PretrainConfig

    run = run_dir_of(model_dir)
    ckpts = sorted(run.glob("ray/step_*/train_state.json"))
    if not (run / "manifest.json").is_file() or not ckpts:
        raise ValueError(f"masked: {run} has no manifest.json and ray/step_* checkpoint holding the objective heads")
    pcfg = build(PretrainConfig, read_json(run / "manifest.json")["config"])
    model, _ = load_model_and_tokenizer(model_dir)
    tokens = load_token_info(str(model_dir / "tokenizer"))
    torch.manual_seed(0)
    module = ObjectiveSet(model, build_objectives(pcfg.objectives, model, tokens))
    state, _, _ = load_train_state(ckpts[-1].parent)
    module.load_state_dict(state, strict=True)
    module.eval()
    wanted = [o for o in module.objectives.values() if o.name in ("mlm", "fusion_mlm", "mim")]
    if not wanted:
        raise ValueError(f"masked: run {run} trained no masked objective (mlm, fusion_mlm, mim)")
    data_cfg = DataConfig(batch_size=cfg.batch_rows, augment=False)
    pre = PreprocessConfig.build(model.cfg, data_cfg, tokens.pad_id, train=False)
    ds = build_dataset(str(data_dir), cfg.split, pre, data_cfg)
    sums: dict[str, float] = {}
    n = 0
    torch.manual_seed(0)
    with torch.no_grad():
        for i, batch in enumerate(ds.iter_torch_batches(batch_size=cfg.batch_rows)):
            if i >= max_batches:
                break
            batch = {**trim_padding(batch), "_cache": {}}
            b = len(batch["input_ids"])
            for obj in wanted:
                loss, extra = obj.step(model, batch)
                sums[f"{obj.name}_loss"] = sums.get(f"{obj.name}_loss", 0.0) + float(loss) * b
                if "acc" in extra:
                    sums[f"{obj.name}_accuracy"] = sums.get(f"{obj.name}_accuracy", 0.0) + float(extra["acc"]) * b
            n += b
    metrics = {k: v / max(n, 1) for k, v in sorted(sums.items())}
    chance: dict[str, float] = {}
    for k in metrics:
        if k.endswith("_accuracy"):
            chance[k] = 1.0 / tokens.vocab_size
        elif k.startswith(("mlm", "fusion_mlm")):
            chance[k] = math.log(tokens.vocab_size)
        elif k == "mim_loss" and pcfg.objectives.mim.norm_pix:
            chance[k] = 1.0
    return metrics, chance


__all__ = ["masked_modelling"]
