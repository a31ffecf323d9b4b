"""Evaluation of a saved model on a curated corpus split: zero-shot classification, retrieval both
ways, a fine-tuned classifier, a linear probe, masked modelling; metrics named as CLIP_benchmark
names them. This module runs the tasks and writes their result; each concern lives apart:

* ``mm.eval_inputs``: ``EvalConfig``, the model dir, labels, classes and prompts;
* ``mm.embed``: the split's embeddings, one Ray Data pass (``Embedder`` actors) for all models;
* ``mm.eval_tasks``: zero-shot weights, classifier and linear-probe metrics, retrieval samples;
* ``mm.rerank``: ITM re-ranking of retrieval (``rerank_k``);
* ``mm.masked_eval``: MLM / MIM metrics from the run's objective heads.

Similarities are ranked in blocks (``mm.metrics.topk_indices``), so a 1M-item retrieval holds
2 x 1M x D floats plus one block of scores, never a 1M x 1M matrix.

    result = evaluate_run("runs/pre", "corpora/demo", EvalConfig())   # Ray must be initialised
    write_eval(result, "runs/pre/eval.json")

``eval.json``: ``{"model", "data", "split", "modality", "tasks", "counts",
"metrics": {task: {name: value}}, "chance": {task: {name: value}}, "confusion_matrix", "skipped"}``
where task is ``zeroshot`` (acc1, acc5, mean_per_class_recall), ``retrieval``
(image_retrieval_recall@k = text→image, text_retrieval_recall@k = image→text; for a video corpus
video_retrieval_recall@k = text→video; with ``rerank_k > 0`` also ``*_itm``, the same recalls after
ITM re-ranking of each query's top ``rerank_k``), ``classify`` (a fine-tuned head) or ``linear_probe``.
Sample retrievals with thumbnails go to ``eval_samples.json`` beside it, for the report.

Every public name of the modules above is importable from here too. Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mm import metrics as M
from mm.embed import Embedder, Embeddings, embed_split, embed_split_multi, media_key
from mm.eval_inputs import (
    DEFAULT_TEMPLATES,
    EvalConfig,
    LinearProbeConfig,
    Task,
    class_prompts,
    corpus_file,
    corpus_templates,
    load_model_and_tokenizer,
    load_templates,
    resolve_classes,
    resolve_model_dir,
    schema_names,
    split_labels,
)
from mm.eval_tasks import (
    encode_prompts,
    evaluate_classifier,
    label_targets,
    linear_probe,
    retrieval_inputs,
    sample_retrievals,
    zeroshot_weights,
)
from mm.masked_eval import masked_modelling
from mm.rerank import ITMScorer, itm_checkpoint, load_itm_head

log = logging.getLogger(__name__)


def evaluate_run(model_path: str | Path, data_dir: str | Path, cfg: EvalConfig,
                 tasks: tuple[str, ...] | None = None, classifier: str | Path | None = None) -> dict:
    """Evaluate ``model_path`` (run or model dir) on ``data_dir``'s ``cfg.split``. Ray must be up.

    ``classifier``: a fine-tuned classifier dir (``RUN/classifier``) for the ``classify`` task;
    by default ``RUN/classifier`` when ``model_path`` is a run holding one.
    """
    return evaluate_models([model_path], data_dir, cfg, tasks, [classifier])[0]


def evaluate_models(model_paths: list[str | Path], data_dir: str | Path, cfg: EvalConfig,
                    tasks: tuple[str, ...] | None = None,
                    classifiers: list[str | Path | None] | None = None) -> list[dict]:
    """``evaluate_run`` for several models of one architecture, embedding the split in one pass."""
    t0 = time.time()
    model_dirs = [resolve_model_dir(p) for p in model_paths]
    classifiers = list(classifiers or [None] * len(model_paths))
    for i, p in enumerate(model_paths):
        if classifiers[i] is None and (Path(p) / "classifier").is_dir():
            classifiers[i] = Path(p) / "classifier"
    tasks = tuple(tasks or cfg.tasks)
    labels = split_labels(data_dir, cfg.split)
    classes = resolve_classes(data_dir, cfg, labels)
    labelled = sum(1 for x in labels if x)
    skipped: dict[str, str] = {}
    for task in ("zeroshot", "classify", "linear_probe"):
        if task in tasks and (not labelled or not classes):
            skipped[task] = f"split {cfg.split!r} has no labelled rows"
    if "classify" in tasks and any(c is None for c in classifiers):
        skipped["classify"] = "no fine-tuned classifier (RUN/classifier) in --model"
    tasks = tuple(t for t in tasks if t not in skipped)
    if cfg.rerank_k > 0 and "retrieval" in tasks:
        for d in model_dirs:  # before any embedding: a model without an ITM head fails here
            itm_checkpoint(d, cfg.rerank_k)

    embs = embed_split_multi(model_dirs, data_dir, cfg.split, cfg, features="linear_probe" in tasks,
                             max_rows=cfg.max_rows)
    modality = "video" if "frames" in schema_names(data_dir) else "image"
    train_embs = None
    if "linear_probe" in tasks:
        train_embs = embed_split_multi(model_dirs, data_dir, "train", cfg, features=True,
                                       max_rows=cfg.linear_probe.max_train_rows)
    results = []
    for i, (model_dir, emb) in enumerate(zip(model_dirs, embs)):
        result = _task_metrics(model_dir, data_dir, cfg, tasks, emb, classes, classifiers[i], modality,
                               train_embs[i] if train_embs else None)
        result.update(skipped=skipped, config=asdict(cfg), time_s=round(time.time() - t0, 2))
        results.append(result)
    return results


def _task_metrics(model_dir: Path, data_dir, cfg: EvalConfig, tasks, emb: Embeddings, classes: list[str],
                  classifier, modality: str, train_emb: Embeddings | None) -> dict:
    result: dict = {"model": str(model_dir), "data": str(data_dir), "split": cfg.split, "modality": modality,
                    "tasks": list(tasks), "counts": {"rows": int(len(emb.sample_id))}, "metrics": {}, "chance": {}}
    keep, targets = label_targets(emb.label, classes)
    result["counts"].update(labelled_rows=int(keep.sum()), classes=len(classes))
    if "zeroshot" in tasks:
        model, tok = load_model_and_tokenizer(model_dir)
        templates = corpus_templates(data_dir, cfg.templates_path)
        w = zeroshot_weights(model, tok, classes, templates)
        logits = emb.media_emb[keep] @ w.T  # (N, C)
        m, c, cm = evaluate_classifier(logits, targets, classes, "zeroshot")
        result["metrics"]["zeroshot"], result["chance"]["zeroshot"] = m, c
        result["confusion_matrix"] = cm
    if "classify" in tasks:
        from mm.probe import load_classifier

        head = load_classifier(classifier)
        ckeep, ctargets = label_targets(emb.label, head.classes)
        logits = head.logits(emb.media_emb[ckeep])
        m, c, cm = evaluate_classifier(logits, ctargets, head.classes, "classify")
        result["metrics"]["classify"], result["chance"]["classify"] = m, c
        result["confusion_matrix"] = cm  # the fine-tuned head's, when there is one
    if "linear_probe" in tasks:
        result["metrics"]["linear_probe"], result["chance"]["linear_probe"] = linear_probe(cfg, train_emb, emb, classes)
    if "masked" in tasks:
        result["metrics"]["masked"], result["chance"]["masked"] = masked_modelling(model_dir, data_dir, cfg)
    if "retrieval" in tasks:
        media, t2m, first = retrieval_inputs(emb)
        m, c = M.retrieval_metrics(media, emb.text_emb, t2m, media=modality, ks=cfg.ks,
                                   block_rows=cfg.block_rows, block_cols=cfg.block_cols)
        if cfg.rerank_k > 0:
            scorer = ITMScorer(model_dir, data_dir, emb, first, cfg)
            m.update(M.reranked_retrieval_metrics(
                media, emb.text_emb, t2m, scorer.score, lambda mi, ti: scorer.score(ti, mi), cfg.rerank_k,
                media=modality, ks=cfg.ks, block_rows=cfg.block_rows, block_cols=cfg.block_cols,
                rerank_rows=max(1, cfg.rerank_batch // cfg.rerank_k)))
            c = {**c, **{f"{name}_itm": v for name, v in c.items()}}
        result["metrics"]["retrieval"], result["chance"]["retrieval"] = m, c
        result["counts"].update(media=int(len(media)), texts=int(len(emb.text_emb)))
        result["samples"] = sample_retrievals(data_dir, emb, media, t2m, first, cfg)
    return result


def write_eval(result: dict, out: str | Path) -> Path:
    """Write eval.json (without the thumbnails) and ``<stem>_samples.json`` beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = _finite({k: v for k, v in result.items() if k != "samples"})
    out.write_text(json.dumps(body, indent=1, default=_jsonable, allow_nan=False), encoding="utf-8")
    if "samples" in result:
        out.with_name(out.stem + "_samples.json").write_text(json.dumps(result["samples"]), encoding="utf-8")
    return out


def _finite(x):
    """NaN/inf -> null: eval.json stays strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)) and not np.isfinite(x):
        return None
    return x


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


__all__ = ["EvalConfig", "LinearProbeConfig", "Task", "DEFAULT_TEMPLATES", "Embedder", "Embeddings", "media_key",
           "resolve_model_dir", "load_templates", "class_prompts", "corpus_file", "corpus_templates", "split_labels", "resolve_classes",
           "load_model_and_tokenizer", "embed_split", "embed_split_multi", "zeroshot_weights", "encode_prompts",
           "evaluate_classifier", "sample_retrievals", "linear_probe", "masked_modelling", "evaluate_run",
           "evaluate_models", "write_eval", "retrieval_inputs", "label_targets", "itm_checkpoint", "load_itm_head",
           "ITMScorer"]
