"""Incremental curation: a snapshot of new inputs, deduplicated against the corpus curated before it.

    stats = curate_snapshot(new_uris, staging, cfg)          # run_curate, its work rows kept
    dups = dedup_against_index(staging, corpus / "_index", "20260101T0000", "image", cfg.dedup)
    index_snapshot(staging, corpus / "_index", "20260101T0000", "image")   # then the work rows go

The corpus index (a folder, ``CORPUS/_index`` for ``mm refresh``) holds one Parquet file per snapshot, ``snapshot=ID.parquet``, and
one for the held-out set, ``heldout.parquet`` (``HELDOUT``), of the kept rows' dedup columns
(``INDEX_COLUMNS``: content hash, pHash sequence, area, caption ...), with row ids namespaced by
snapshot so the same (source, key) in two snapshots never collides. ``dedup_against_index`` runs
``dedup.find_duplicates`` over a new snapshot's kept rows and every other file of the index:
indexed rows get priority 0 (never dropped), the held-out set's -1, new rows 1. A new row
that duplicates an indexed one moves from ``data/`` to ``rejects/cross_snapshot.parquet``
(reason ``duplicate``/``near_duplicate``, the keeper's sample_id in ``detail``) and
``stats.json`` is corrected (counts, splits, histograms) so the accounting invariant still holds.

The kept rows' dedup columns and original sizes come from the curate run's work rows
(``curate.WORK_ROWS_DIR``, kept by ``curate_snapshot``); ``index_snapshot`` writes the index file
and then removes them. ``replay_mix`` names the corpora (and their mix weights) a model
continued on a new snapshot trains on: the new snapshot, and the older committed ones replayed
in proportion to their train rows. Used by ``mm refresh`` (jobs/refresh.py). Tested in tests/test_refresh.py
(the three-refresh story: exact and near duplicates of an older snapshot are rejected).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.lineage import read_json, read_manifest, write_json_atomic
from pipelines import stats as stats_mod
from pipelines.curate import WORK_DIR, WORK_ROWS_DIR, CurateConfig, run_curate
from pipelines.dedup import DedupConfig, find_duplicates
from pipelines.schema import REJECT_SCHEMA, make_sample_id

INDEX_COLUMNS = ["row_id", "sample_id", "source", "key", "content_hash", "hashes", "area", "caption"]
HELDOUT = "heldout"  # the snapshot id of the held-out set in the index


def curate_snapshot(sources: list[str], out: str | Path, cfg: CurateConfig) -> dict:
    """``run_curate`` that keeps the work rows this module reads (Ray already initialised)."""
    keep = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, keep_work=True))
    return run_curate(sources, str(out), keep)


def _index_path(index_dir: Path, snapshot: str) -> Path:
    return index_dir / (f"{HELDOUT}.parquet" if snapshot == HELDOUT else f"snapshot={snapshot}.parquet")


def index_snapshot(curated: Path, index_dir: Path, snapshot: str, modality: str) -> None:
    """Write the index rows of what ``curated/data`` kept as ``snapshot``'s index file (atomically),
    then drop the work rows."""
    rows = kept_index_rows(curated, modality, snapshot)
    path = _index_path(index_dir, snapshot)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(rows, tmp)
    tmp.replace(path)
    shutil.rmtree(curated / WORK_DIR, ignore_errors=True)


def replay_mix(corpus: Path, new: Path, replay_ratio: float) -> tuple[list[Path], list[float]]:
    """``([new, *older], weights)``: ``new`` gets ``1 - replay_ratio`` of the batches (all of them
    when nothing older has train rows), the committed older snapshots of ``corpus`` (``snapshot=*``
    with a lineage stamp) share the rest by their train rows."""
    old = []
    for d in sorted(corpus.glob("snapshot=*")):
        st = read_json(d / "stats.json") or {}
        rows = (st.get("splits") or {}).get("train", 0)
        if d != new and rows > 0 and (read_manifest(d) or {}).get("lineage"):
            old.append((d, rows))
    replay = replay_ratio if old else 0.0
    total_old = sum(n for _, n in old) or 1
    return [new] + [d for d, _ in old], [1.0 - replay] + [replay * n / total_old for _, n in old]


def _work_rows(curated: Path) -> pa.Table:
    return pq.read_table(curated / WORK_ROWS_DIR)


def _join_keys(t: pa.Table, modality: str) -> list[tuple]:
    cols = ["source", "key"] + (["start_s"] if modality == "video" else [])
    values = [t.column(c).to_pylist() for c in cols]
    return [tuple(round(v, 3) if isinstance(v, float) else v for v in row) for row in zip(*values)]


def kept_index_rows(curated: Path, modality: str, namespace: str) -> pa.Table:
    """Index rows (INDEX_COLUMNS) of the rows ``curated/data`` kept, from its ``_work`` rows; the
    row_id is namespaced so the same (source, key) in two snapshots never collides."""
    data = pq.read_table(curated / "data", columns=["source", "key"] + (["start_s"] if modality == "video" else []))
    kept = set(_join_keys(data, modality))
    work = _work_rows(curated)
    work = work.filter(pc.is_null(work.column("reason")))
    mask = pa.array([k in kept for k in _join_keys(work, modality)], pa.bool_())
    rows = work.filter(mask).select(INDEX_COLUMNS + (["start_s"] if modality == "video" else []))
    if modality == "video":  # one row per clip: a clip's caption rows (MSR-VTT style) share its media
        first: dict[tuple, int] = {}
        for i, k in enumerate(_join_keys(rows, modality)):
            first.setdefault(k, i)
        rows = rows.take(pa.array(sorted(first.values()), pa.int64()))
    rid = pa.array([make_sample_id(namespace, r) for r in rows.column("row_id").to_pylist()], pa.string())
    return rows.set_column(0, "row_id", rid)


def dedup_against_index(curated: Path, index_dir: Path, snapshot: str, modality: str, dedup_cfg: DedupConfig) -> dict:
    """Reject rows of ``curated`` (snapshot ``snapshot``) that duplicate a row of the index's other
    files (older snapshots, the held-out set). Returns {"duplicate": n, "near_duplicate": n,
    "heldout": n}; rewrites data/, rejects/, stats.json."""
    import ray

    own = _index_path(index_dir, snapshot)
    index_files = [f for f in sorted(index_dir.glob("snapshot=*.parquet")) if f != own]
    if _index_path(index_dir, HELDOUT).is_file():
        index_files.append(_index_path(index_dir, HELDOUT))
    new = kept_index_rows(curated, modality, snapshot)
    counts = {"duplicate": 0, "near_duplicate": 0, "heldout": 0}
    if new.num_rows == 0 or not index_files:
        return counts
    parts = [new.select(INDEX_COLUMNS).append_column("priority", pa.array([1] * new.num_rows, pa.int64()))]
    heldout_ids: set[str] = set()
    for f in index_files:
        t = pq.read_table(f).select(INDEX_COLUMNS)  # a video index also holds start_s
        prio = -1 if f.stem == HELDOUT else 0
        if prio < 0:
            heldout_ids.update(t.column("sample_id").to_pylist())
        parts.append(t.append_column("priority", pa.array([prio] * t.num_rows, pa.int64())))
    rows = ray.data.from_arrow(pa.concat_tables(parts))
    drops = find_duplicates(rows, dedup_cfg)
    # Only a new row whose keeper is an indexed (older or held-out) row leaves: duplicates among the
    # new rows were decided by the snapshot's own curate run.
    new_ids = set(new.column("row_id").to_pylist())
    indexed = set()
    for part in parts[1:]:
        indexed.update(part.column("sample_id").to_pylist())
    new_only = set(new.column("sample_id").to_pylist()) - indexed  # an exact copy shares its keeper's id
    drops = drops.filter(pa.array([r in new_ids and k not in new_only for r, k in
                                   zip(drops.column("row_id").to_pylist(), drops.column("keeper").to_pylist())],
                                  pa.bool_()))
    if drops.num_rows == 0:
        return counts
    by_rid = {r: i for i, r in enumerate(new.column("row_id").to_pylist())}
    idx = pa.array([by_rid[r] for r in drops.column("row_id").to_pylist()], pa.int64())
    dropped = new.take(idx)
    rejects = pa.table({"source": dropped.column("source"), "key": dropped.column("key"),
                        "stage": pa.array(["dedup"] * drops.num_rows), "reason": drops.column("reason"),
                        "detail": drops.column("keeper")}).cast(REJECT_SCHEMA)
    pq.write_table(rejects, curated / "rejects" / "cross_snapshot.parquet")
    gone = set(_join_keys(dropped, modality))
    removed = _rewrite_data(curated, gone, modality)
    for reason, keeper in zip(drops.column("reason").to_pylist(), drops.column("keeper").to_pylist()):
        counts[reason] += 1
        counts["heldout"] += keeper in heldout_ids
    _correct_stats(curated, removed, drops.column("reason").to_pylist(), modality)
    return counts


def _rewrite_data(curated: Path, gone: set, modality: str) -> pa.Table:
    """Drop rows keyed in ``gone`` from every data/ file (each rewritten atomically); return the
    removed rows' (split, caption, input_ids) for the stats correction."""
    removed = []
    for f in sorted((curated / "data").glob("*.parquet")):
        t = pq.read_table(f)
        mask = pa.array([k in gone for k in _join_keys(t, modality)], pa.bool_())
        if not pc.any(mask).as_py():
            continue
        removed.append(t.filter(mask).select(["sample_id", "split", "caption", "input_ids"]))
        tmp = f.with_name(f".{f.name}.tmp")
        pq.write_table(t.filter(pc.invert(mask)), tmp)
        tmp.replace(f)
    return pa.concat_tables(removed)


def _correct_stats(curated: Path, removed: pa.Table, reasons: list[str], modality: str) -> None:
    st = json.loads((curated / "stats.json").read_text())
    n = removed.num_rows
    st["kept"] -= n
    for r in reasons:
        st["rejected"][r] = st["rejected"].get(r, 0) + 1
    st["rejected_total"] = sum(st["rejected"].values())
    st["rejected_by_stage"]["dedup"] = st["rejected_by_stage"].get("dedup", 0) + len(reasons)
    for s in removed.column("split").to_pylist():
        st["splits"][s] -= 1
    # Subtract the removed rows' caption histograms (bins are fixed, counts add up exactly).
    work = _work_rows(curated).select(["sample_id", "orig_width", "orig_height"])
    dims = {s: (w, h) for s, w, h in zip(*(work.column(c).to_pylist() for c in work.column_names))}
    ids = removed.column("sample_id").to_pylist()
    part = stats_mod.histogram_partials(pa.table({
        "orig_width": pa.array([dims[s][0] for s in ids], pa.int32()),
        "orig_height": pa.array([dims[s][1] for s in ids], pa.int32()),
        "caption": removed.column("caption"), "input_ids": removed.column("input_ids"),
        "split": removed.column("split")})).to_pylist()[0]
    for name, h in st["histograms"].items():
        h["counts"] = [a - b for a, b in zip(h["counts"], part[name])]
    st["cross_snapshot_duplicates"] = len(reasons)
    st["duplicates_dropped"] = st.get("duplicates_dropped", 0) + len(reasons)
    if modality == "image":
        st["invariant_ok"] = st["inputs"] == st["kept"] + st["rejected_total"]
    write_json_atomic(curated / "stats.json", st)



__all__ = ["INDEX_COLUMNS", "HELDOUT", "curate_snapshot", "index_snapshot", "kept_index_rows",
           "dedup_against_index", "replay_mix"]
