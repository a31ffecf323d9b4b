"""Metrics of the evaluation tasks on a split's embeddings: zero-shot classification (class
prompt embeddings), a classifier head's confusion matrix, the linear probe, retrieval's
deduplicated gallery and its sample retrievals (thumbnails) for the report.

    w = zeroshot_weights(model, tokenizer, classes, templates)    # (C, D)
    keep, y = label_targets(emb.label, classes)
    metrics, chance, confusion = evaluate_classifier(emb.media_emb[keep] @ w.T, y, classes, "zeroshot")

Class embeddings are averaged over their prompts and renormalised (CLIP, Radford et al. 2021).
Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from mm import metrics as M
from mm.embed import Embeddings
from mm.eval_inputs import EvalConfig, class_prompts


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
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


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


def thumbnail_b64(blob, px: int) -> str:
    """A JPEG (or a video's middle frame) as a base64 JPEG thumbnail of at most ``px`` for report.html."""
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

    from mm.data import corpus_dataset

    n = len(emb.text_emb)
    if n == 0 or cfg.sample_queries <= 0:
        return {"retrievals": []}
    queries = np.unique(np.linspace(0, n - 1, min(cfg.sample_queries, n)).round().astype(int))
    top = M.topk_indices(emb.text_emb[queries], media, cfg.sample_hits)
    needed = {str(emb.sample_id[first[j]]) for row in top for j in row} | {str(emb.sample_id[q]) for q in queries}
    ds = corpus_dataset(data_dir)  # a local dir or a URI
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
                items.append({"caption": r["caption"], "image": thumbnail_b64(r[media_col], cfg.thumb_px),
                              "positive": bool(j == text_to_media[q])})
        out.append({"direction": "text→image" if media_col == "image" else "text→video",
                    "query": qrow.get("caption", ""), "hits": items})
    return {"retrievals": out}


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


__all__ = ["encode_prompts", "zeroshot_weights", "label_targets", "evaluate_classifier", "retrieval_inputs",
           "sample_retrievals", "linear_probe", "thumbnail_b64"]
