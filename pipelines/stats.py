"""Curate statistics: reject counts per reason and histograms, summed from per-batch partials.

    parts = ds.map_batches(histogram_partials, batch_format="pyarrow")   # one row per batch
    stats = build_stats(inputs=N, reject_counts={...}, partials=[...])

``stats.json`` (DESIGN.md "Curate output")::

    {"inputs": N, "kept": K, "rejected": {reason: count}, "rejected_by_stage": {stage: count},
     "invariant_ok": true, "splits": {"train": .., "val": ..},
     "histograms": {"width_px": {"edges": [...], "counts": [...]}, "height_px", "aspect_ratio",
                    "caption_chars", "caption_words", "caption_tokens"}, ...}

For images ``inputs == kept + sum(rejected)`` must hold; ``invariant_ok`` says whether it did.
Histogram bins are fixed (below), so partials from any number of batches add up exactly.
Tested in tests/test_curate.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HIST_EDGES: dict[str, list[float]] = {
    "width_px": [0, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, float("inf")],
    "height_px": [0, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, float("inf")],
    "aspect_ratio": [0, 0.25, 0.33, 0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, 3.0, 4.0, float("inf")],
    "caption_chars": [0, 10, 20, 40, 60, 80, 120, 160, 240, 320, 500, 1000, float("inf")],
    "caption_words": [0, 2, 4, 6, 8, 10, 15, 20, 30, 50, 100, float("inf")],
    "caption_tokens": [0, 4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 128, float("inf")],
}
_PARTIAL_SCHEMA = pa.schema([pa.field(name, pa.list_(pa.int64())) for name in HIST_EDGES]
                            + [pa.field("train", pa.int64()), pa.field("val", pa.int64())])


def _counts(values: np.ndarray, name: str) -> list[int]:
    edges = np.array(HIST_EDGES[name], dtype=np.float64)
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.int64).tolist()


def histogram_partials(batch: pa.Table) -> pa.Table:
    """Kept rows (orig_width, orig_height, caption, input_ids, split) → one row of bin counts."""
    w = batch.column("orig_width").to_numpy(zero_copy_only=False).astype(np.float64)
    h = batch.column("orig_height").to_numpy(zero_copy_only=False).astype(np.float64)
    captions = [c or "" for c in batch.column("caption").to_pylist()]
    tokens = pc.list_value_length(batch.column("input_ids")).to_numpy(zero_copy_only=False)
    split = batch.column("split").to_pylist()
    row = {
        "width_px": _counts(w, "width_px"),
        "height_px": _counts(h, "height_px"),
        "aspect_ratio": _counts(w / np.maximum(h, 1), "aspect_ratio"),
        "caption_chars": _counts(np.array([len(c) for c in captions], np.float64), "caption_chars"),
        "caption_words": _counts(np.array([len(c.split()) for c in captions], np.float64), "caption_words"),
        "caption_tokens": _counts(tokens.astype(np.float64), "caption_tokens"),
        "train": sum(s == "train" for s in split), "val": sum(s == "val" for s in split),
    }
    return pa.Table.from_pylist([row], schema=_PARTIAL_SCHEMA)


def sum_partials(partials: list[dict]) -> tuple[dict, dict]:
    hist = {name: {"edges": [e if e != float("inf") else None for e in edges], "counts": [0] * (len(edges) - 1)}
            for name, edges in HIST_EDGES.items()}
    splits = {"train": 0, "val": 0}
    for p in partials:
        for name in HIST_EDGES:
            hist[name]["counts"] = [a + b for a, b in zip(hist[name]["counts"], p[name])]
        splits["train"] += p["train"]
        splits["val"] += p["val"]
    return hist, splits


def build_stats(*, modality: str, inputs: int, kept: int, reject_counts: dict[str, int],
                stage_counts: dict[str, int], partials: list[dict], extra: dict | None = None) -> dict:
    hist, splits = sum_partials(partials)
    rejected = dict(sorted(reject_counts.items(), key=lambda kv: (-kv[1], kv[0])))
    total = kept + sum(rejected.values())
    stats = {
        "modality": modality, "inputs": inputs, "kept": kept, "rejected": rejected,
        "rejected_total": sum(rejected.values()), "rejected_by_stage": dict(sorted(stage_counts.items())),
        "invariant_ok": (inputs == total) if modality == "image" else None,
        "splits": splits, "histograms": hist,
    }
    stats.update(extra or {})
    return stats


def dumps(stats: dict) -> str:
    return json.dumps(stats, indent=2, sort_keys=False) + "\n"


__all__ = ["HIST_EDGES", "histogram_partials", "sum_partials", "build_stats", "dumps"]
