"""Video curation after the per-input stage: clip dedup and input-level accounting (curate hooks).

DESIGN.md: every input ends in ``data/`` (at least one clip) or in ``rejects/``, never both.
A video yields several clips, and one clip several rows (one per caption), so:

* dedup runs on one row per clip (its first caption, ``row_id == clip_id``) with the image
  machinery (``dedup.find_duplicates``: exact by frames, near by the sequence of frame pHashes);
  a dropped clip then takes all its caption rows (``find_clip_duplicates``);
* clip-level drops of an input that keeps other clips (static, too short, a duplicate of another
  clip, a bad subtitle cue ...) are not rejects: they are counted in ``stats.json`` under
  ``clips.dropped`` by reason; an input whose every candidate clip is removed by dedup becomes
  one reject with the duplicates' reason and a keeper's ``sample_id`` (``video_rejects``);
* probe metadata of every probed video (codec, container, fps, duration) goes to
  ``stats.json`` under ``video``.

``pipelines/curate.py`` calls ``find_clip_duplicates`` and ``video_rejects`` for
``modality: video``. Tested in tests/test_video.py (pure functions) and
tests/test_curate_video.py (a whole run).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def clip_candidates(batch: pa.Table) -> pa.Table:
    """Dedup candidates: one row per kept clip (its first caption; ``row_id == clip_id``)."""
    mask = pc.and_(pc.is_null(batch.column("reason")), pc.equal(batch.column("caption_index"), 0))
    return batch.filter(mask).drop_columns(["reason", "caption_index"])


def sibling_drops(batch: pa.Table, drops: pa.Table) -> pa.Table:
    """Rows (row_id, clip_id, reason) -> drops for every caption row of a dropped clip."""
    t = batch.filter(pc.is_null(batch.column("reason")))
    idx = pc.index_in(t.column("clip_id"), value_set=drops.column("row_id"))
    t, idx = t.filter(pc.is_valid(idx)), idx.filter(pc.is_valid(idx))
    return pa.table({"row_id": t.column("row_id"), "reason": pc.take(drops.column("reason"), idx),
                     "keeper": pc.take(drops.column("keeper"), idx)}, schema=drops.schema)


def reject_rows(batch: pa.Table) -> pa.Table:
    """Input-level rejects only (``clip_index == -1``) as ``schema.REJECT_SCHEMA`` rows."""
    from pipelines.schema import REJECT_SCHEMA

    t = batch.filter(pc.and_(pc.is_valid(batch.column("reason")), pc.equal(batch.column("clip_index"), -1)))
    return t.select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)


def find_clip_duplicates(read, dedup_cfg, light: dict) -> pa.Table:
    """Corpus dedup of clips (``dedup.find_duplicates`` on one row per clip: exact by frames,
    near by the frame pHash sequence); the drops then cover every caption row of a dropped clip.
    ``read(columns)`` reads the processed work rows as a Ray Dataset."""
    from pipelines.dedup import DROP_SCHEMA, find_duplicates

    cols = ["row_id", "sample_id", "source", "key", "caption", "content_hash", "hashes", "area", "reason",
            "caption_index"]
    clip_drops = find_duplicates(read(cols).map_batches(clip_candidates, **light), dedup_cfg)
    rows = read(["row_id", "clip_id", "reason"]).map_batches(sibling_drops, fn_kwargs={"drops": clip_drops}, **light)
    tables = [t for t in rows.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    return pa.concat_tables(tables).cast(DROP_SCHEMA) if tables else DROP_SCHEMA.empty_table()


def video_rejects(read, drops: pa.Table, light: dict):
    """The rejects of a video curation (a materialised Ray Dataset of REJECT_SCHEMA rows) and the
    stats extras (``kept_inputs``, ``clips``, ``video``): see ``summarize_inputs``."""
    import ray

    parts = [t for t in read(ACCOUNT_COLUMNS).map_batches(
        account_partial, fn_kwargs={"drop_ids": drops.column("row_id")}, **light).iter_batches(
        batch_size=None, batch_format="pyarrow") if t.num_rows]
    dup_rejects, extra = summarize_inputs(pa.concat_tables(parts) if parts else None, drops)
    rejects = read(["source", "key", "stage", "reason", "detail", "clip_index"]).map_batches(reject_rows, **light)
    if dup_rejects.num_rows:
        rejects = rejects.union(ray.data.from_arrow(dup_rejects))
    return rejects.materialize(), extra


ACCOUNT_COLUMNS = ["input_id", "row_id", "clip_id", "source", "key", "clip_index", "reason", "detail", "probe",
                   "start_s", "end_s"]


def account_partial(batch: pa.Table, drop_ids: pa.Array) -> pa.Table:
    """The small per-batch facts the input-level accounting needs (one row per fact)."""
    reason, clip_index = batch.column("reason"), batch.column("clip_index")
    candidate = pc.is_null(reason)
    dropped = pc.and_(candidate, pc.is_in(batch.column("row_id"), value_set=drop_ids))
    kind = pc.if_else(dropped, "dup", pc.if_else(candidate, "kept", pc.if_else(
        pc.equal(clip_index, -1), "reject", "clip_drop")))
    t = batch.select(["input_id", "row_id", "clip_id", "source", "key", "reason", "detail", "probe",
                      "start_s", "end_s"]).append_column("kind", kind)
    keep = pc.or_kleene(pc.not_equal(kind, "kept"), pc.or_kleene(
        pc.is_valid(batch.column("probe")), pc.equal(batch.column("row_id"), batch.column("clip_id"))))
    return t.filter(keep)


def summarize_inputs(facts: pa.Table | None, drops: pa.Table) -> tuple[pa.Table, dict]:
    """Facts from ``account_partial`` -> (rejects of inputs left without a clip by dedup,
    stats extras: ``kept_inputs``, ``clips`` and ``video`` probe summaries)."""
    from pipelines.schema import REJECT_SCHEMA

    rows = facts.to_pylist() if facts is not None else []
    kept_inputs = {r["input_id"] for r in rows if r["kind"] == "kept"}
    keeper = dict(zip(drops.column("row_id").to_pylist(),
                      zip(drops.column("reason").to_pylist(), drops.column("keeper").to_pylist())))
    clip_drops: Counter = Counter()
    rejects: dict[str, dict] = {}
    for r in rows:
        if r["kind"] == "clip_drop":
            clip_drops[r["reason"]] += int(r["detail"] or 1)
        elif r["kind"] == "dup" and r["row_id"] == r["clip_id"]:
            reason, kept_sid = keeper[r["row_id"]]
            if r["input_id"] in kept_inputs:
                clip_drops[reason] += 1
            elif r["input_id"] not in rejects:  # one reject per input, naming one keeper
                rejects[r["input_id"]] = {"source": r["source"], "key": r["key"], "stage": "dedup",
                                          "reason": reason, "detail": kept_sid}
    clips_kept = sum(1 for r in rows if r["kind"] == "kept" and r["row_id"] == r["clip_id"])
    seconds = [r["end_s"] - r["start_s"] for r in rows if r["kind"] == "kept" and r["row_id"] == r["clip_id"]]
    extra = {
        "kept_inputs": len(kept_inputs),
        "clips": {"kept": clips_kept, "kept_seconds": round(float(sum(seconds)), 3),
                  "dropped": dict(sorted(clip_drops.items(), key=lambda kv: (-kv[1], kv[0])))},
        "video": probe_summary([r["probe"] for r in rows if r["probe"]]),
    }
    return pa.Table.from_pylist(list(rejects.values()), schema=REJECT_SCHEMA), extra


_DURATION_EDGES_S = [0, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf")]
_FPS_EDGES = [0, 10, 15, 20, 24, 25, 30, 50, 60, 120, float("inf")]


def probe_summary(probes: list[str]) -> dict:
    """Probe metadata of every probed video: codecs, containers, fps/duration histograms."""
    ps = [json.loads(p) for p in probes]

    def hist(values, edges):
        idx = np.clip(np.searchsorted(np.array(edges), np.array(values, np.float64), side="right") - 1,
                      0, len(edges) - 2)
        return {"edges": [e if e != float("inf") else None for e in edges],
                "counts": np.bincount(idx, minlength=len(edges) - 1).tolist() if ps else [0] * (len(edges) - 1)}

    return {
        "probed": len(ps),
        "codec": dict(Counter(p["codec"] for p in ps).most_common()),
        "container": dict(Counter(p["container"] for p in ps).most_common()),
        "vfr": sum(bool(p["vfr"]) for p in ps), "with_audio": sum(bool(p["has_audio"]) for p in ps),
        "duration_s_total": round(sum(p["duration_s"] for p in ps), 3),
        "duration_s": hist([p["duration_s"] for p in ps], _DURATION_EDGES_S),
        "fps": hist([p["fps"] for p in ps], _FPS_EDGES),
    }


__all__ = ["clip_candidates", "sibling_drops", "reject_rows", "find_clip_duplicates", "video_rejects",
           "ACCOUNT_COLUMNS", "account_partial", "summarize_inputs", "probe_summary"]
