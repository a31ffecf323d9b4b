"""Evaluation of a saved model on a curated corpus split: zero-shot classification, retrieval both
ways, a fine-tuned classifier, a linear probe; metrics named as CLIP_benchmark names them.

Embedding is a Ray Data plan: the split's Parquet rows stream through ``Embedder`` actors (each
loads the model once, decodes with ``mm.data.preprocess_batch`` and encodes), and only the
embeddings come back to the driver. Similarities are ranked in blocks (``mm.metrics.topk_indices``),
so a 1M-item retrieval holds 2 x 1M x D floats plus one block of scores, never a 1M x 1M matrix.

    result = evaluate_run("runs/pre", "corpora/demo", EvalConfig())   # Ray must be initialised
    write_eval(result, "runs/pre/eval.json")

``eval.json``: ``{"model", "data", "split", "modality", "tasks", "counts",
"metrics": {task: {name: value}}, "chance": {task: {name: value}}, "confusion_matrix", "skipped"}``
where task is ``zeroshot`` (acc1, acc5, mean_per_class_recall), ``retrieval``
(image_retrieval_recall@k = text→image, text_retrieval_recall@k = image→text; for a video corpus
video_retrieval_recall@k = text→video; with ``rerank_k > 0`` also ``*_itm``, the same recalls after
ITM re-ranking of each query's top ``rerank_k``), ``classify`` (a fine-tuned head) or ``linear_probe``.
Sample retrievals with thumbnails go to ``eval_samples.json`` beside it, for the report.

Zero-shot prompts: a JSON list of templates with ``{c}``, or a mapping class -> list of prompts;
class embeddings are averaged over the prompts and renormalised (CLIP, Radford et al. 2021).

Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from core.config import packaged_config
from mm import metrics as M

log = logging.getLogger(__name__)

Task = Literal["zeroshot", "retrieval", "classify", "linear_probe", "masked"]
DEFAULT_TEMPLATES = packaged_config("templates.json")  # the shipped prompts (package data)


@dataclass(frozen=True)
class LinearProbeConfig:
    """Logistic regression on frozen pooled features (CLIP's linear-probe protocol), fit with L-BFGS."""

    weight_decay: float = 1e-4
    max_iters: int = 200
    max_train_rows: int = 50_000  # rows of the train split embedded for the probe


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[Task, ...] = ("zeroshot", "retrieval")
    split: str = "val"
    templates_path: str | None = None  # default: DATA/templates.json, else configs/templates.json
    classes_path: str | None = None  # default: DATA/classes.json, else the sorted labels of the split
    batch_rows: int = 64  # rows per embedding batch
    num_actors: int = 1
    actor_cpus: float = 1.0
    max_rows: int = 0  # 0: the whole split
    ks: tuple[int, ...] = (1, 5, 10)
    block_rows: int = 1024  # queries per similarity block
    block_cols: int = 65536  # gallery items per similarity block
    sample_queries: int = 4  # sample retrievals kept for the report
    sample_hits: int = 5
    thumb_px: int = 96
    # ITM re-ranking of retrieval (ALBEF/BLIP as LAVIS runs it): each query's top rerank_k ITC
    # candidates are re-scored with the fusion encoder + ITM head (score = ITM match logit + ITC
    # cosine) and reported as *_itm beside the ITC recalls. 0: off. Needs a run that trained ITM.
    rerank_k: int = 0
    rerank_batch: int = 128  # fused (text, media) pairs per fusion-encoder forward
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)

    def __post_init__(self) -> None:
        if self.batch_rows < 1 or self.num_actors < 1:
            raise ValueError("batch_rows and num_actors must be >= 1")
        if not self.ks or min(self.ks) < 1:
            raise ValueError("ks must be positive")
        if self.rerank_k < 0 or self.rerank_batch < 1:
            raise ValueError("rerank_k must be >= 0 and rerank_batch >= 1")


# ----------------------------------------------------------------------------- inputs


def resolve_model_dir(path: str | Path) -> Path:
    """A run dir (with ``model/``) or a model dir (with ``config.json`` + ``model.safetensors``)."""
    p = Path(path)
    for cand in (p / "model", p):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FileNotFoundError(f"--model {path} is neither a run dir with model/ nor a model dir "
                            "(config.json + model.safetensors)")


def load_templates(path: str | Path) -> list[str] | dict[str, list[str]]:
    """A list of templates with ``{c}``, or a mapping class name -> list of prompts."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, list) and data and all(isinstance(t, str) and "{c}" in t for t in data):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) and v for v in data.values()):
        return {str(k): [str(x) for x in v] for k, v in data.items()}
    raise ValueError(f"templates {path}: expected a list of strings with {{c}} or a mapping class -> prompts")


def class_prompts(classes: list[str], templates: list[str] | dict[str, list[str]]) -> list[list[str]]:
    if isinstance(templates, dict):
        missing = [c for c in classes if c not in templates]
        if missing:
            raise ValueError(f"templates have no prompts for classes {missing[:5]}")
        return [templates[c] for c in classes]
    return [[t.format(c=c) for t in templates] for c in classes]


def corpus_file(data_dir: str | Path, override: str | None, name: str, fallback: Path | None = None) -> Path | None:
    if override:
        return Path(override)
    p = Path(data_dir) / name
    return p if p.is_file() else fallback


def split_labels(data_dir: str | Path, split: str) -> list[str | None]:
    """The ``label`` column of one split, read on the driver (one small column)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ds = pads.dataset(str(Path(data_dir) / "data"), format="parquet")
    if "label" not in ds.schema.names:
        return []
    return ds.to_table(columns=["label"], filter=pc.field("split") == split)["label"].to_pylist()


def resolve_classes(data_dir: str | Path, cfg: EvalConfig, labels: list[str | None]) -> list[str]:
    path = corpus_file(data_dir, cfg.classes_path, "classes.json")
    if path is not None:
        classes = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"classes file {path} must hold a JSON list of class names")
        return classes
    return sorted({x for x in labels if x is not None})


# ----------------------------------------------------------------------------- embedding on Ray Data


def media_key(blob) -> str:
    """Content key of one image (bytes) or clip (list of frame bytes): rows with the same media
    are one gallery item with several captions (CLIP_benchmark's texts_image_index)."""
    h = hashlib.blake2b(digest_size=12)
    for part in ([blob] if isinstance(blob, (bytes, bytearray)) else list(blob)):
        h.update(bytes(part))
    return h.hexdigest()


class Embedder:
    """Ray Data callable class: numpy batch of corpus rows -> embeddings under one or several models.

    Loads each model once per actor; several models (WiSE-FT's interpolation points, before/after
    a fine-tune) share one pass over the data: columns ``media_emb/i``, ``text_emb/i``, ``feature/i``.
    """

    def __init__(self, model_dirs: list[str], features: bool = False, pad_id: int = 0) -> None:
        import torch

        import mm
        from mm.data import DataConfig, PreprocessConfig

        torch.set_num_threads(1)
        self.torch = torch
        self.models = [mm.load(d).eval() for d in model_dirs]
        c = self.models[0].cfg
        for m in self.models[1:]:
            if (m.cfg.vision.image_px, m.cfg.vision.mean, m.cfg.vision.std, m.cfg.text.max_tokens) != \
                    (c.vision.image_px, c.vision.mean, c.vision.std, c.text.max_tokens):
                raise ValueError("models embedded in one pass must share their preprocessing")
        self.pre = replace(PreprocessConfig.build(c, DataConfig(), pad_id, train=False),
                           pad_to_longest=True)
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mm.data import preprocess_batch

        media_col = "image" if "image" in batch else "frames"
        x = preprocess_batch(batch, self.pre)
        t = self.torch
        out = {"sample_id": np.asarray(batch["sample_id"]).astype(str),
               "media_key": np.array([media_key(b) for b in batch[media_col]])}
        pix = t.from_numpy(x["pixels"][:, None] if "pixels" in x else x["frames"])  # (B, T, 3, H, W)
        ids, mask = t.from_numpy(x["input_ids"]), t.from_numpy(x["attention_mask"])
        with t.inference_mode():
            for i, model in enumerate(self.models):
                tokens = model.vision_tokens(pix)  # (B, 1+M, Wv)
                out[f"media_emb/{i}"] = model.project_vision(tokens).float().numpy()
                out[f"text_emb/{i}"] = model.encode_text(ids, mask).float().numpy()
                if self.features:
                    out[f"feature/{i}"] = model.vision.pool(tokens).float().numpy()
        labels = batch.get("label")
        out["label"] = (np.array(["" if v is None else str(v) for v in labels]) if labels is not None
                        else np.full(len(out["sample_id"]), "", dtype=str))
        return out


@dataclass
class Embeddings:
    """Per-row embeddings of one split, sorted by sample_id (deterministic whatever the plan's order)."""

    sample_id: np.ndarray
    media_key: np.ndarray
    label: np.ndarray  # "" where unlabelled
    media_emb: np.ndarray  # (N, D)
    text_emb: np.ndarray  # (N, D)
    feature: np.ndarray | None = None  # (N, Wv) pooled pre-projection, for probes


def embed_split_multi(model_dirs: list[str | Path], data_dir: str | Path, split: str, cfg: EvalConfig, *,
                      features: bool = False, max_rows: int = 0) -> list[Embeddings]:
    """Stream one split through ``Embedder`` actors once, for every model; only embeddings reach the driver."""
    import pyarrow.parquet as pq
    import ray.data
    from ray.data.expressions import col

    from mm.data import load_token_info

    files = sorted((Path(data_dir) / "data").glob("*.parquet"))
    names = pq.read_schema(files[0]).names
    media = "frames" if "frames" in names else "image"
    columns = ["sample_id", media, "input_ids"] + (["label"] if "label" in names else [])
    pad_id = load_token_info(str(Path(model_dirs[0]) / "tokenizer")).pad_id
    ds = (ray.data.read_parquet([str(f) for f in files])
          .filter(expr=col("split") == split)  # pushed down into the Parquet read
          .select_columns(columns))
    if max_rows:
        ds = ds.limit(max_rows)
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model_dirs": [str(d) for d in model_dirs],
                                                         "features": features, "pad_id": pad_id},
                        batch_size=cfg.batch_rows, batch_format="numpy", num_cpus=cfg.actor_cpus,
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors))
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError(f"split {split!r} of {data_dir} has no rows")
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["sample_id"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    return [Embeddings(sample_id=cols["sample_id"], media_key=cols["media_key"], label=cols["label"],
                       media_emb=cols[f"media_emb/{i}"], text_emb=cols[f"text_emb/{i}"],
                       feature=cols.get(f"feature/{i}")) for i in range(len(model_dirs))]


def embed_split(model_dir: str | Path, data_dir: str | Path, split: str, cfg: EvalConfig, *,
                features: bool = False, max_rows: int = 0) -> Embeddings:
    return embed_split_multi([model_dir], data_dir, split, cfg, features=features, max_rows=max_rows)[0]


# ----------------------------------------------------------------------------- tasks


def encode_prompts(model, tokenizer, prompts: list[str], batch: int = 256) -> np.ndarray:
    """Texts -> (N, D) normalised embeddings with the model's tokenizer and text tower."""
    import torch

    from mm.data import pad_ids

    out = []
    for i in range(0, len(prompts), batch):
        ids = tokenizer(prompts[i:i + batch], add_special_tokens=True)["input_ids"]
        input_ids, mask = pad_ids(ids, tokenizer.pad_token_id, model.cfg.text.max_tokens, True)
        with torch.inference_mode():
            out.append(model.encode_text(torch.from_numpy(input_ids), torch.from_numpy(mask)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_width), np.float32)


def zeroshot_weights(model, tokenizer, classes: list[str], templates) -> np.ndarray:
    """(C, D): each class's prompt embeddings averaged and renormalised."""
    prompts = class_prompts(classes, templates)
    flat = encode_prompts(model, tokenizer, [p for ps in prompts for p in ps])
    w, i = [], 0
    for ps in prompts:
        m = flat[i:i + len(ps)].mean(0)
        w.append(m / max(np.linalg.norm(m), 1e-12))
        i += len(ps)
    return np.stack(w).astype(np.float32)


def label_targets(labels: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is one of ``classes`` -> (row mask, class index per kept row)."""
    index = {c: i for i, c in enumerate(classes)}
    keep = np.array([lab in index for lab in labels], dtype=bool)
    return keep, np.array([index[lab] for lab in labels[keep]], dtype=np.int64)


def evaluate_classifier(logits: np.ndarray, targets: np.ndarray, classes: list[str], source: str):
    metrics = M.classification_metrics(logits, targets)
    cm = M.confusion_matrix(M.predict(logits), targets, len(classes))
    return metrics, M.classification_chance(len(classes)), {"classes": classes, "matrix": cm.tolist(), "source": source}


def retrieval_inputs(emb: Embeddings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deduplicate media by content key: (media embeddings (M, D), text→media index (N,), first row per media)."""
    _, first, inverse = np.unique(emb.media_key, return_index=True, return_inverse=True)
    return emb.media_emb[first], inverse.astype(np.int64), first


def _thumb(blob, px: int) -> str:
    from PIL import Image

    data = blob if isinstance(blob, (bytes, bytearray)) else list(blob)[len(blob) // 2]
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sample_retrievals(data_dir: str | Path, emb: Embeddings, media: np.ndarray, text_to_media: np.ndarray,
                      first: np.ndarray, cfg: EvalConfig) -> dict:
    """A few text→media queries with their top hits as thumbnails (for report.html)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    n = len(emb.text_emb)
    if n == 0 or cfg.sample_queries <= 0:
        return {"retrievals": []}
    queries = np.unique(np.linspace(0, n - 1, min(cfg.sample_queries, n)).round().astype(int))
    top = M.topk_indices(emb.text_emb[queries], media, cfg.sample_hits)
    needed = {str(emb.sample_id[first[j]]) for row in top for j in row} | {str(emb.sample_id[q]) for q in queries}
    ds = pads.dataset(str(Path(data_dir) / "data"), format="parquet")
    media_col = "frames" if "frames" in ds.schema.names else "image"
    table = ds.to_table(columns=["sample_id", "caption", media_col],
                        filter=pc.field("sample_id").isin(sorted(needed)))
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    out = []
    for q, hits in zip(queries, top):
        qrow = rows.get(str(emb.sample_id[q]), {})
        items = []
        for j in hits:
            r = rows.get(str(emb.sample_id[first[j]]))
            if r is not None:
                items.append({"caption": r["caption"], "image": _thumb(r[media_col], cfg.thumb_px),
                              "positive": bool(j == text_to_media[q])})
        out.append({"direction": "text→image" if media_col == "image" else "text→video",
                    "query": qrow.get("caption", ""), "hits": items})
    return {"retrievals": out}


def _load_model_and_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    import mm

    model = mm.load(str(model_dir))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))


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
    modality = "video" if "frames" in _schema_names(data_dir) else "image"
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
        model, tok = _load_model_and_tokenizer(model_dir)
        templates = load_templates(corpus_file(data_dir, cfg.templates_path, "templates.json", DEFAULT_TEMPLATES))
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


def _schema_names(data_dir) -> list[str]:
    import pyarrow.parquet as pq

    files = sorted((Path(data_dir) / "data").glob("*.parquet"))
    return pq.read_schema(files[0]).names if files else []


def linear_probe(cfg: EvalConfig, train: Embeddings, val: Embeddings, classes: list[str]):
    """Logistic regression on the train split's frozen pooled features, scored on the eval split."""
    from mm.probe import fit_linear_head

    tkeep, ttargets = label_targets(train.label, classes)
    vkeep, vtargets = label_targets(val.label, classes)
    if not tkeep.any():
        raise ValueError("linear probe: the train split has no labelled rows")
    head = fit_linear_head(train.feature[tkeep], ttargets, len(classes), weight_decay=cfg.linear_probe.weight_decay,
                           max_iters=cfg.linear_probe.max_iters)
    return M.classification_metrics(head(val.feature[vkeep]), vtargets), M.classification_chance(len(classes))


def _run_dir_of(model_dir: Path) -> Path:
    return model_dir.parent if model_dir.name == "model" else model_dir


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

    run = _run_dir_of(model_dir)
    ckpts = sorted(run.glob("ray/step_*/train_state.json"))
    if not (run / "manifest.json").is_file() or not ckpts:
        raise ValueError(f"masked: {run} has no manifest.json and ray/step_* checkpoint holding the objective heads")
    pcfg = build(PretrainConfig, read_json(run / "manifest.json")["config"])
    model, _ = _load_model_and_tokenizer(model_dir)
    tokens = load_token_info(str(model_dir / "tokenizer"))
    torch.manual_seed(0)
    module = ObjectiveSet(model, build_objectives(pcfg.objectives, model, tokens))
    state, _, _ = load_train_state(ckpts[-1].parent)
    module.load_state_dict(state, strict=True)
    module.eval()
    wanted = [o for o in module.objectives if o.name in ("mlm", "fusion_mlm", "mim")]
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
    import math

    chance: dict[str, float] = {}
    for k in metrics:
        if k.endswith("_accuracy"):
            chance[k] = 1.0 / tokens.vocab_size
        elif k.startswith(("mlm", "fusion_mlm")):
            chance[k] = math.log(tokens.vocab_size)
        elif k == "mim_loss" and pcfg.objectives.mim.norm_pix:
            chance[k] = 1.0
    return metrics, chance


def itm_checkpoint(model_dir: Path, rerank_k: int):
    """The run's pretraining config and last step checkpoint holding an ITM head, or a one-line
    ValueError naming ``rerank_k``. The ITM head belongs to the objective, not to the exported
    model: it is read from RUN/ray/step_* with RUN/manifest.json's config, as ``masked`` does."""
    from core.config import build
    from mm.checkpoint import read_json
    from mm.train import PretrainConfig

    run = _run_dir_of(Path(model_dir))
    ckpts = sorted(run.glob("ray/step_*/train_state.json"))
    why = None
    if not (run / "manifest.json").is_file() or not ckpts:
        why = f"{run} has no manifest.json and ray/step_* checkpoint to read an ITM head from"
    else:
        pcfg = build(PretrainConfig, read_json(run / "manifest.json")["config"])
        if pcfg.model.fusion.depth <= 0 or pcfg.objectives.itm.weight <= 0:
            why = f"run {run} trained no ITM head (model.fusion.depth > 0 and objectives.itm.weight > 0)"
    if why:
        raise ValueError(f"rerank_k={rerank_k} needs a model with an ITM head: {why}; set rerank_k=0")
    ckpt = ckpts[-1].parent
    _check_same_fusion(Path(model_dir), ckpt, rerank_k)
    return pcfg, ckpt


def _check_same_fusion(model_dir: Path, ckpt: Path, rerank_k: int) -> None:
    """The ITM head pairs with the fusion encoder it was trained with: refuse a step checkpoint
    whose fusion weights differ from the model's (a model saved from another step or run)."""
    import torch
    from safetensors import safe_open

    from mm.checkpoint import model_dir as resolve

    with safe_open(str(resolve(model_dir) / "model.safetensors"), framework="pt") as m, \
            safe_open(str(ckpt / "state.safetensors"), framework="pt") as c:
        have = set(c.keys())
        names = [k for k in m.keys() if k.startswith("fusion.")]
        if any(f"model.{k}" not in have or not torch.equal(m.get_tensor(k), c.get_tensor(f"model.{k}"))
               for k in names):
            raise ValueError(f"rerank_k={rerank_k}: the ITM head's checkpoint {ckpt} holds other fusion weights "
                             "than the model (saved from another step or run); set rerank_k=0")


def load_itm_head(model_dir: Path, rerank_k: int):
    """``ITMHead`` with the weights of the run's last step checkpoint."""
    import torch
    from safetensors import safe_open

    from mm.models.heads import ITMHead

    pcfg, ckpt = itm_checkpoint(model_dir, rerank_k)
    o = pcfg.objectives
    index = sum(w > 0 for w in (o.contrastive.weight, o.mlm.weight, o.fusion_mlm.weight, o.mim.weight))
    prefix = f"objectives.{index}.head."  # build_objectives' order: ITM after these four
    head = ITMHead(pcfg.model.text.width)
    with safe_open(str(ckpt / "state.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if prefix in k]
        state = {k.split(prefix, 1)[1]: f.get_tensor(k) for k in keys}
    if set(state) != set(head.state_dict()):
        raise ValueError(f"rerank_k: {ckpt} holds no ITM head under {prefix!r} (found {sorted(state)})")
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return head.eval()


class ITMScorer:
    """ITM match logits (``itm_head(fuse(text, media)[:, 0])[:, 1]``, LAVIS's score) of (text row,
    media item) pairs, on the driver, for ``mm.metrics.reranked_retrieval_metrics``.

    Holds the split's token ids and compressed media bytes (not their token features); each call
    decodes and encodes only the media and texts of its pairs and fuses them ``rerank_batch``
    pairs at a time, so memory is one call's pairs, never N x N fused pairs.
    """

    def __init__(self, model_dir: Path, data_dir, emb: Embeddings, first: np.ndarray, cfg: EvalConfig) -> None:
        import pyarrow.compute as pc
        import pyarrow.dataset as pads
        import torch

        import mm
        from mm.data import DataConfig, PreprocessConfig, load_token_info

        self.torch = torch
        self.model = mm.load(str(model_dir)).eval()
        self.head = load_itm_head(model_dir, cfg.rerank_k)
        c = self.model.cfg
        pad_id = load_token_info(str(Path(model_dir) / "tokenizer")).pad_id
        self.pre = replace(PreprocessConfig.build(c, DataConfig(), pad_id, train=False),
                           pad_to_longest=True)
        self.batch = cfg.rerank_batch
        ds = pads.dataset(str(Path(data_dir) / "data"), format="parquet")
        self.media_col = "frames" if "frames" in ds.schema.names else "image"
        table = ds.to_table(columns=["sample_id", "input_ids", self.media_col], filter=pc.field("split") == cfg.split)
        row = {sid: i for i, sid in enumerate(table["sample_id"].to_pylist())}
        ids_col, media_col = table["input_ids"], table[self.media_col]
        self.ids = [np.asarray(ids_col[row[str(s)]].as_py()) for s in emb.sample_id]  # per text row
        self.media_ids = [str(emb.sample_id[j]) for j in first]
        self.media = [media_col[row[s]].as_py() for s in self.media_ids]  # per media item

    def _vision(self, idx: np.ndarray):
        from mm.data import preprocess_batch

        out = []
        for i in range(0, len(idx), self.batch):
            part = idx[i:i + self.batch]
            blobs = np.empty(len(part), dtype=object)
            blobs[:] = [self.media[j] for j in part]
            x = preprocess_batch({self.media_col: blobs, "input_ids": [np.zeros(1, np.int64)] * len(part),
                                  "sample_id": np.array([self.media_ids[j] for j in part])}, self.pre)
            pix = self.torch.from_numpy(x["pixels"][:, None] if "pixels" in x else x["frames"])
            out.append(self.model.vision_tokens(pix))
        return self.torch.cat(out)

    def _text(self, idx: np.ndarray):
        from mm.data import pad_ids

        ids, mask = pad_ids([self.ids[i] for i in idx], self.pre.pad_id, self.pre.max_tokens, True)
        ids, mask = self.torch.from_numpy(ids), self.torch.from_numpy(mask)
        toks = [self.model.text_tokens(ids[i:i + self.batch], mask[i:i + self.batch])
                for i in range(0, len(idx), self.batch)]
        return self.torch.cat(toks), mask

    def score(self, text_idx: np.ndarray, media_idx: np.ndarray) -> np.ndarray:
        """(P,) text rows and (P,) media items -> (P,) ITM match logits."""
        ut, inv_t = np.unique(np.asarray(text_idx), return_inverse=True)
        um, inv_m = np.unique(np.asarray(media_idx), return_inverse=True)
        out = np.empty(len(inv_t), np.float32)
        with self.torch.inference_mode():
            vis = self._vision(um)
            txt, mask = self._text(ut)
            for i in range(0, len(out), self.batch):
                t, m = self.torch.from_numpy(inv_t[i:i + self.batch]), self.torch.from_numpy(inv_m[i:i + self.batch])
                fused = self.model.fuse(txt[t], mask[t], vis[m])[:, 0]
                out[i:i + len(t)] = self.head(fused.float())[:, 1].numpy()
        return out


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


__all__ = ["EvalConfig", "LinearProbeConfig", "Embedder", "Embeddings", "resolve_model_dir", "load_templates",
           "class_prompts", "embed_split", "embed_split_multi", "zeroshot_weights", "encode_prompts", "evaluate_run",
           "evaluate_models", "write_eval",
           "retrieval_inputs", "label_targets", "itm_checkpoint", "load_itm_head", "ITMScorer"]
