"""Evaluation metrics in the conventions of CLIP_benchmark, plus their chance levels.

Pure numpy functions on embeddings, logits and labels; no model, no Ray. Names follow
CLIP_benchmark (``clip_benchmark/metrics/zeroshot_classification.py`` and
``zeroshot_retrieval.py``):

* ``acc1``, ``acc5``: top-k accuracy of class logits; ``mean_per_class_recall``: recall averaged
  over the classes present in the targets (sklearn's ``balanced_accuracy_score``).
* ``image_retrieval_recall@k``: **text → image** (each text query retrieves images);
  ``text_retrieval_recall@k``: **image → text**. A query is a hit when any of its positives is
  among the top k. Positives are given by keys: a gallery item is a positive of a query when their
  keys are equal (CLIP_benchmark's ``texts_image_index``: key = index of the caption's image), so an
  image with several captions has several positives.

Ties are broken towards the lower gallery/class index (as a stable descending sort does), so the
results are deterministic and independent of the block sizes. ``topk_indices`` works in blocks of
queries x gallery, holding only ``(block_rows, block_cols)`` scores and the running ``(N_q, k)``
top-k at a time, so retrieval over 1M items fits in memory.

Tested against hand-computed examples (ties, multiple positives) in tests/test_metrics.py:
    .venv/bin/pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import math

import numpy as np

RETRIEVAL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------- ranking


def _sortable(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Map (float32 score, int index) to one uint64 whose order is (score desc, index asc).

    The float's IEEE bits become an order-preserving uint32 (negative floats flipped), placed in
    the high half; the low half holds ``2**32 - 1 - index`` so that the lower index wins a tie.
    """
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    ordered = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    low = np.uint64(0xFFFFFFFF) - index.astype(np.uint64)
    return (ordered.astype(np.uint64) << np.uint64(32)) | low


def _unsort_index(keys: np.ndarray) -> np.ndarray:
    return (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)


def _merge_topk(best: np.ndarray | None, scores: np.ndarray, offset: int, k: int) -> np.ndarray:
    """Fold a ``(b, c)`` score block whose columns start at ``offset`` into running top-k keys."""
    idx = np.arange(offset, offset + scores.shape[1])
    keys = _sortable(scores, np.broadcast_to(idx, scores.shape))
    if best is not None:
        keys = np.concatenate([best, keys], axis=1)
    if keys.shape[1] > k:
        keys = np.partition(keys, keys.shape[1] - k, axis=1)[:, -k:]
    return keys


def _finish(keys: np.ndarray) -> np.ndarray:
    return _unsort_index(np.sort(keys, axis=1)[:, ::-1])


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices ``(N, min(k, C))`` of the k highest scores per row, best first, ties to lower index."""
    scores = np.asarray(scores, dtype=np.float32)
    k = min(int(k), scores.shape[1])
    if k == 0 or len(scores) == 0:
        return np.empty((len(scores), k), dtype=np.int64)
    return _finish(_merge_topk(None, scores, 0, k))


def topk_indices(queries: np.ndarray, gallery: np.ndarray, k: int, *, block_rows: int = 1024,
                 block_cols: int = 65536) -> np.ndarray:
    """Indices ``(N_q, min(k, N_g))`` of the highest dot-product gallery items per query, best first.

    Scores are computed block by block (``block_rows x block_cols`` floats at a time) and merged
    into a running top-k, so memory is ``O(N_q * k + block_rows * block_cols)``.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    n_q, n_g = len(queries), len(gallery)
    if n_g >= 2**32:
        raise ValueError("gallery larger than 2**32 items")
    k = min(int(k), n_g)
    out = np.empty((n_q, k), dtype=np.int64)
    if k == 0:
        return out
    for r0 in range(0, n_q, block_rows):
        q = queries[r0:r0 + block_rows]
        best = None
        for c0 in range(0, n_g, block_cols):
            best = _merge_topk(best, q @ gallery[c0:c0 + block_cols].T, c0, k)  # (bq, bc) scores
        out[r0:r0 + len(q)] = _finish(best)
    return out


# ----------------------------------------------------------------------------- classification


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target class is among the k highest logits, for each k."""
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if len(logits) == 0:
        return {k: float("nan") for k in ks}
    order = topk_rows(logits, max(ks))  # (N, min(kmax, C)) classes ranked by logit
    hits = order == targets[:, None]  # (N, k)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def predict(logits: np.ndarray) -> np.ndarray:
    """Top-1 class per row, ties to the lower class index."""
    return np.argmax(np.asarray(logits), axis=1).astype(np.int64)


def mean_per_class_recall(preds: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present in ``targets`` of (correct in class / rows of class)."""
    preds = np.asarray(preds, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    classes = np.unique(targets)
    if len(classes) == 0:
        return float("nan")
    recalls = [float((preds[targets == c] == c).mean()) for c in classes]
    return float(np.mean(recalls))


def confusion_matrix(preds: np.ndarray, targets: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts; row = true class, column = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def classification_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` of ``(N, C)`` logits."""
    acc = topk_accuracy(logits, targets, (1, 5))
    return {"acc1": acc[1], "acc5": acc[5],
            "mean_per_class_recall": mean_per_class_recall(predict(logits), targets)}


def classification_chance(n_classes: int) -> dict[str, float]:
    """What a uniform random ranking of the classes scores on average."""
    return {"acc1": 1.0 / n_classes, "acc5": min(5, n_classes) / n_classes,
            "mean_per_class_recall": 1.0 / n_classes}


# ----------------------------------------------------------------------------- retrieval


def recall_at_k(topk: np.ndarray, query_keys: np.ndarray, gallery_keys: np.ndarray,
                ks: tuple[int, ...] = RETRIEVAL_KS) -> dict[int, float]:
    """Fraction of queries with at least one positive (same key) among their top k, for each k."""
    query_keys = np.asarray(query_keys)
    hits = np.asarray(gallery_keys)[topk] == query_keys[:, None]  # (N_q, K)
    if len(query_keys) == 0:
        return {k: float("nan") for k in ks}
    first = np.cumsum(hits, axis=1) > 0
    return {k: float(first[:, min(k, topk.shape[1]) - 1].mean()) if topk.shape[1] else 0.0 for k in ks}


def chance_recall_at_k(n_positives: np.ndarray, n_gallery: int, k: int) -> float:
    """Mean over queries of P(at least one of p positives in a random k of N) = 1 - C(N-p,k)/C(N,k)."""
    k = min(k, n_gallery)
    out = []
    for p in np.asarray(n_positives, dtype=np.int64):
        if p <= 0:
            out.append(0.0)
        elif n_gallery - p < k:
            out.append(1.0)
        else:
            # C(N-p, k) / C(N, k) = prod_{i<p} (N-k-i) / (N-i)
            miss = math.exp(sum(math.log((n_gallery - k - i) / (n_gallery - i)) for i in range(int(p))))
            out.append(1.0 - miss)
    return float(np.mean(out)) if out else float("nan")


def _positives_per_query(query_keys: np.ndarray, gallery_keys: np.ndarray) -> np.ndarray:
    values, counts = np.unique(np.asarray(gallery_keys), return_counts=True)
    pos = np.searchsorted(values, query_keys)
    pos = np.clip(pos, 0, max(0, len(values) - 1))
    found = (values[pos] == query_keys) if len(values) else np.zeros(len(query_keys), bool)
    return np.where(found, counts[pos] if len(values) else 0, 0)


def retrieval_metrics(media_emb: np.ndarray, text_emb: np.ndarray, text_to_media: np.ndarray, *,
                      media: str = "image", ks: tuple[int, ...] = RETRIEVAL_KS,
                      block_rows: int = 1024, block_cols: int = 65536) -> tuple[dict, dict]:
    """Recall@k both ways between media (images or videos) and texts; returns (metrics, chance).

    ``text_to_media[t]`` is the index of the image/video that caption ``t`` describes (several
    captions may share one). Names say what is retrieved: ``{media}_retrieval_recall@k`` for
    text → media queries (``image_retrieval_recall@k``, ``video_retrieval_recall@k``) and
    ``text_retrieval_recall@k`` for media → text queries.
    """
    text_to_media = np.asarray(text_to_media, dtype=np.int64)
    media_keys = np.arange(len(media_emb), dtype=np.int64)
    kmax = max(ks)
    t2m = topk_indices(text_emb, media_emb, kmax, block_rows=block_rows, block_cols=block_cols)
    m2t = topk_indices(media_emb, text_emb, kmax, block_rows=block_rows, block_cols=block_cols)
    r_t2m = recall_at_k(t2m, text_to_media, media_keys, ks)
    r_m2t = recall_at_k(m2t, media_keys, text_to_media, ks)
    metrics, chance = {}, {}
    pos_t = _positives_per_query(text_to_media, media_keys)
    pos_m = _positives_per_query(media_keys, text_to_media)
    for k in ks:
        metrics[f"{media}_retrieval_recall@{k}"] = r_t2m[k]
        metrics[f"text_retrieval_recall@{k}"] = r_m2t[k]
        chance[f"{media}_retrieval_recall@{k}"] = chance_recall_at_k(pos_t, len(media_emb), k)
        chance[f"text_retrieval_recall@{k}"] = chance_recall_at_k(pos_m, len(text_emb), k)
    return metrics, chance


def rerank_topk(topk: np.ndarray, itc: np.ndarray, score_pairs, k: int, *, block_rows: int = 64) -> np.ndarray:
    """Re-rank the first ``k`` ITC candidates of every query by a pair scorer (ALBEF/BLIP/LAVIS).

    ``topk`` (N_q, K): gallery indices best first by ITC; ``itc`` (N_q, K): their ITC scores.
    ``score_pairs(query_idx (P,), gallery_idx (P,)) -> (P,)``: the ITM match logit of each pair.
    The first ``min(k, K)`` columns are re-sorted by ``itm + itc`` (LAVIS's ``score + topk_sim``),
    ties keeping the ITC order; columns past ``k`` keep their ITC order below them, so a candidate
    outside the top k is never promoted. Scores ``block_rows x k`` pairs per call.
    """
    topk = np.asarray(topk, dtype=np.int64)
    itc = np.asarray(itc, dtype=np.float32)
    if topk.shape != itc.shape:
        raise ValueError(f"topk {topk.shape} and itc {itc.shape} differ in shape")
    k = min(int(k), topk.shape[1])
    out = topk.copy()
    if k <= 1 or len(topk) == 0:
        return out
    for r0 in range(0, len(topk), block_rows):
        cand = topk[r0:r0 + block_rows, :k]  # (b, k)
        rows = np.repeat(np.arange(r0, r0 + len(cand), dtype=np.int64), k)
        itm = np.asarray(score_pairs(rows, cand.reshape(-1)), dtype=np.float32).reshape(cand.shape)
        order = np.argsort(-(itm + itc[r0:r0 + block_rows, :k]), axis=1, kind="stable")
        out[r0:r0 + len(cand), :k] = np.take_along_axis(cand, order, axis=1)
    return out


def reranked_retrieval_metrics(media_emb: np.ndarray, text_emb: np.ndarray, text_to_media: np.ndarray,
                               score_t2m, score_m2t, k: int, *, media: str = "image",
                               ks: tuple[int, ...] = RETRIEVAL_KS, block_rows: int = 1024,
                               block_cols: int = 65536, rerank_rows: int = 64) -> dict:
    """``retrieval_metrics``' recall@k after re-ranking each query's top ``k`` with ``rerank_topk``,
    named with an ``_itm`` suffix (``image_retrieval_recall@1_itm``, ``text_retrieval_recall@1_itm``).

    ``score_t2m(text_idx, media_idx)`` and ``score_m2t(media_idx, text_idx)`` give ITM logits.
    """
    text_to_media = np.asarray(text_to_media, dtype=np.int64)
    media_emb = np.asarray(media_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    media_keys = np.arange(len(media_emb), dtype=np.int64)
    depth = max(max(ks), int(k))
    metrics = {}
    for name, queries, gallery, q_keys, g_keys, scorer in (
            (f"{media}_retrieval_recall", text_emb, media_emb, text_to_media, media_keys, score_t2m),
            ("text_retrieval_recall", media_emb, text_emb, media_keys, text_to_media, score_m2t)):
        top = topk_indices(queries, gallery, depth, block_rows=block_rows, block_cols=block_cols)
        itc = np.zeros(top.shape, np.float32)
        for r0 in range(0, len(top), block_rows):  # (block_rows, depth, D) gathered at a time
            itc[r0:r0 + block_rows] = np.einsum("qd,qkd->qk", queries[r0:r0 + block_rows],
                                                gallery[top[r0:r0 + block_rows]])
        top = rerank_topk(top, itc, scorer, k, block_rows=rerank_rows)
        for kk, v in recall_at_k(top, q_keys, g_keys, ks).items():
            metrics[f"{name}@{kk}_itm"] = v
    return metrics


__all__ = [
    "RETRIEVAL_KS", "topk_rows", "topk_indices", "topk_accuracy", "predict", "mean_per_class_recall",
    "confusion_matrix", "classification_metrics", "classification_chance", "recall_at_k",
    "chance_recall_at_k", "retrieval_metrics", "rerank_topk", "reranked_retrieval_metrics",
]
