"""WiSE-FT (Wortsman et al. 2022) and the zero-shot retention measurement of a fine-tune.

    theta = interpolate_states(theta_0, theta_1, alpha)          # (1 - alpha) theta_0 + alpha theta_1
    result = evaluate_finetune(run, init_dir, data, "classify", cfg, heads)   # eval.json's dict

For each alpha in ``finetune.wise_ft_alphas`` (always with 0 and 1) the interpolated model (and
its interpolated classifier head) is evaluated; alpha = 0 is the pretrained model with its
zero-shot head, so the curve's ends give zero-shot accuracy before/after fine-tuning
("retention"), also on a second corpus (``finetune.retention_data``). Called by
mm/finetune.py; tested in tests/test_finetune.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mm.probe import ClassifierHead, save_classifier


def interpolate_states(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * theta0 + alpha * theta1 for every floating tensor (others from theta1)."""
    if theta0.keys() != theta1.keys():
        raise ValueError("WiSE-FT needs two models of one architecture")
    return {k: ((1 - alpha) * theta0[k].float() + alpha * v.float()).to(v.dtype) if v.is_floating_point() else v
            for k, v in theta1.items()}


def evaluate_finetune(run: Path, init_dir: Path, data: str, task: str, cfg,
                      heads: dict[str, ClassifierHead]) -> dict:
    """WiSE-FT curve over ``finetune.wise_ft_alphas`` (always with 0 and 1), final metrics, retention.
    ``cfg`` is the run's ``mm.finetune.FinetuneConfig``; ``heads`` its ``zeroshot`` and (classify)
    ``finetuned`` classifier heads.

    Every interpolated model is written under RUN/wise_ft/ and all are embedded in one Ray Data
    pass (mm.evaluate.evaluate_models); the directories are removed afterwards.
    """
    import mm
    from mm.checkpoint import read_tensors, save_model
    from mm.eval_inputs import corpus_templates, load_model_and_tokenizer
    from mm.eval_tasks import zeroshot_weights
    from mm.evaluate import evaluate_models

    s = cfg.finetune
    # retrieval on the fine-tune data's own captions gives the report its sample retrievals
    tasks = ("classify", "zeroshot", "retrieval") if task == "classify" else ("retrieval", "zeroshot")
    theta0 = read_tensors(init_dir / "model.safetensors")
    theta1 = read_tensors(run / "model" / "model.safetensors")
    alphas = sorted(set(s.wise_ft_alphas) | {0.0, 1.0})
    model = mm.load(str(run))
    dirs: list[Path] = []
    for alpha in alphas:
        if alpha == 1.0:
            dirs.append(run)
            continue
        d = run / "wise_ft" / f"alpha_{alpha:.2f}"
        shutil.rmtree(d, ignore_errors=True)
        model.load_state_dict(interpolate_states(theta0, theta1, alpha))
        save_model(model, model.cfg, d / "model", init_dir / "tokenizer")
        if "finetuned" in heads:
            z, f = heads["zeroshot"], heads["finetuned"]
            if s.strategy == "flyp":  # FLYP's classifier is the (interpolated) text tower's prompts
                m_a, tok = load_model_and_tokenizer(d / "model")
                w = zeroshot_weights(m_a, tok, z.classes, corpus_templates(data, s.templates_path)) * float(m_a.scale()[0].detach())
                head = ClassifierHead(z.classes, w, z.bias)
            else:
                head = ClassifierHead(f.classes, (1 - alpha) * z.weight + alpha * f.weight,
                                      (1 - alpha) * z.bias + alpha * f.bias)
            save_classifier(head, d / "classifier")
        dirs.append(d)
    results = evaluate_models(dirs, data, cfg.eval, tasks=tasks)
    if s.retention_data:
        for res, ret in zip(results, evaluate_models(dirs, s.retention_data, cfg.eval, tasks=("zeroshot", "retrieval"))):
            res["metrics"].update({f"retention_{k}": v for k, v in ret["metrics"].items()})
            res["chance"].update({f"retention_{k}": v for k, v in ret["chance"].items()})
    shutil.rmtree(run / "wise_ft", ignore_errors=True)
    curve = [{"alpha": a, "metrics": r["metrics"]} for a, r in zip(alphas, results)]
    final = results[-1]
    final["wise_ft"] = curve
    final["retention"] = retention(curve, task)
    return final


def retention(curve: list[dict], task: str) -> dict:
    """Zero-shot (and fine-tuned) numbers of the pretrained (alpha 0) and fine-tuned (alpha 1) models."""
    by = {p["alpha"]: p["metrics"] for p in curve}
    before, after = by[0.0], by[1.0]
    out: dict[str, float | None] = {}
    for task_name in sorted(set(before) & set(after)):
        for name in ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1", "video_retrieval_recall@1"):
            if name in before[task_name] and name in after[task_name]:
                b, a = before[task_name][name], after[task_name][name]
                out[f"{task_name}/{name}/pretrained"] = b
                out[f"{task_name}/{name}/finetuned"] = a
                if task_name.startswith(("zeroshot", "retention_")):
                    out[f"{task_name}/{name}/retention"] = a / b if b > 0 else None
    return out


__all__ = ["interpolate_states", "evaluate_finetune", "retention"]
