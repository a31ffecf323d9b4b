"""Incremental curation: a snapshot of new inputs, deduplicated against the corpus curated before it.

    stats = curate_snapshot(new_uris, staging, cfg)          # run_curate, its work rows kept
    dups = dedup_against_index(staging, corpus + "/_index", "20260101T0000", "image", cfg.dedup)
    index_snapshot(staging, corpus + "/_index", "20260101T0000", "image", cfg.dedup)   # then the work rows go

Every path may be local or a URI (``s3://``, ``gs://``: pyarrow.fs through core.storage).

**The index** (``CORPUS/_index`` for ``mm refresh``: per snapshot, the kept rows' dedup columns
and their LSH bands) and the candidate pairs it gives for a new snapshot's rows are
pipelines/incremental_index.py; only the new rows are banded and only the stored rows they meet
are read, so a refresh's cost follows the new data.

**The decisions** (``dedup_against_index``), with curation's rules and code: an exact pair drops
the new row; a near pair is verified on the thumbnails (``dedup_verify.verify_candidates``;
decided on the hashes within ``unverified_max_hamming`` where a row has none: video clips, index
rows written before thumbnails were indexed); the keeper is the best stored match by
``dedup.keeper_order`` (the held-out set first, priority -1, then the snapshots, 0). Pairs of two
stored rows or of two new rows are never formed: the stored rows are the corpus, the new rows
were deduplicated by their own curate run.

A new row that duplicates an indexed one moves from ``data/`` to
``rejects/cross_snapshot.parquet`` (reason ``duplicate``/``near_duplicate``; ``detail``: the
keeper's sample_id, then the evidence, as curate writes it: ``dedup.drop_details``) and
``stats.json`` is corrected (counts, splits, histograms) so the accounting invariant still holds.
The kept rows' dedup columns and original sizes come from the curate run's work rows
(``curate.WORK_ROWS_DIR``, kept by ``curate_snapshot``); ``index_snapshot`` writes the index
files and then removes them. ``replay_mix`` names the corpora (and their mix weights) a model
continued on a new snapshot trains on: the new snapshot, and the older committed ones replayed in
proportion to their train rows. Used by ``mm refresh`` (jobs/refresh_steps.py). Tested in
tests/test_incremental.py and tests/test_refresh.py; the cost in bench/refresh_cost.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from core.lineage import read_json, read_manifest, write_json_atomic
from core.storage import join, remove, resolve
from pipelines import stats as stats_mod
from pipelines.curate import WORK_DIR, WORK_ROWS_DIR, CurateConfig, run_curate
from pipelines.dedup import EVIDENCE_SCHEMA, DedupConfig, drop_details, keeper_order
from pipelines.dedup_verify import verify_candidates
from pipelines.incremental_index import (
    HELDOUT,
    INDEX_COLUMNS,
    VERIFY_COLUMNS,
    band_rows,
    candidates,
    parquet_files,
    read_parquet,
    write_index,
    write_parquet,
)
from pipelines.schema import REJECT_SCHEMA, make_sample_id


def curate_snapshot(sources: list[str], out: str, cfg: CurateConfig) -> dict:
    """``run_curate`` that keeps the work rows this module reads (Ray already initialised)."""
    keep = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, keep_work=True))
    return run_curate(sources, str(out), keep)


def index_snapshot(curated: str, index_dir: str, snapshot: str, modality: str,
                   dedup_cfg: DedupConfig | None = None) -> None:
    """Write ``snapshot``'s index files (rows and bands) for what ``curated/data`` kept, then drop
    the work rows."""
    rows = kept_index_rows(curated, modality, snapshot)
    write_index(rows, index_dir, snapshot, dedup_cfg or DedupConfig())
    fs, path, _ = resolve(join(curated, WORK_DIR))
    remove(fs, path)


def replay_mix(corpus: str, new: str, replay_ratio: float) -> tuple[list[str], list[float]]:
    """``([new, *older], weights)``: ``new`` gets ``1 - replay_ratio`` of the batches (all of them
    when nothing older has train rows), the committed older snapshots of ``corpus`` (``snapshot=*``
    with a lineage stamp) share the rest by their train rows."""
    fs, path, _ = resolve(str(corpus))
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("snapshot="))
    old = []
    for name in names:
        d = join(corpus, name)
        st = read_json(join(d, "stats.json")) or {}
        rows = (st.get("splits") or {}).get("train", 0)
        if d.rstrip("/") != str(new).rstrip("/") and rows > 0 and (read_manifest(d) or {}).get("lineage"):
            old.append((d, rows))
    replay = replay_ratio if old else 0.0
    total_old = sum(n for _, n in old) or 1
    return [str(new)] + [d for d, _ in old], [1.0 - replay] + [replay * n / total_old for _, n in old]


def _work_rows(curated: str, columns: list[str] | None = None) -> pa.Table:
    return read_parquet(join(curated, WORK_ROWS_DIR), columns)


def _join_keys(t: pa.Table, modality: str) -> list[tuple]:
    cols = ["source", "key"] + (["start_s"] if modality == "video" else [])
    values = [t.column(c).to_pylist() for c in cols]
    return [tuple(round(v, 3) if isinstance(v, float) else v for v in row) for row in zip(*values)]


def kept_index_rows(curated: str, modality: str, namespace: str) -> pa.Table:
    """Index rows (INDEX_COLUMNS, ``start_s`` for video, the VERIFY_COLUMNS the work rows hold) of
    the rows ``curated/data`` kept, from its ``_work`` rows; the row_id is namespaced so the same
    (source, key) in two snapshots never collides."""
    video = ["start_s"] if modality == "video" else []
    data = read_parquet(join(curated, "data"), ["source", "key"] + video)
    kept = set(_join_keys(data, modality))
    work = _work_rows(curated)
    work = work.filter(pc.is_null(work.column("reason")))
    mask = pa.array([k in kept for k in _join_keys(work, modality)], pa.bool_())
    extra = [c for c in VERIFY_COLUMNS if c in work.column_names and modality == "image"]
    rows = work.filter(mask).select(INDEX_COLUMNS + video + extra)
    if modality == "video":  # one row per clip: a clip's caption rows (MSR-VTT style) share its media
        first: dict[tuple, int] = {}
        for i, k in enumerate(_join_keys(rows, modality)):
            first.setdefault(k, i)
        rows = rows.take(pa.array(sorted(first.values()), pa.int64()))
    rid = pa.array([make_sample_id(namespace, r) for r in rows.column("row_id").to_pylist()], pa.string())
    return rows.set_column(0, "row_id", rid)


def _cross_drops(new: pa.Table, old: pa.Table, a: np.ndarray, b: np.ndarray, d: np.ndarray,
                 cfg: DedupConfig) -> pa.Table:
    """The new rows that duplicate a stored row (EVIDENCE_SCHEMA: row_id, reason, keeper, evidence).
    Exact (same content hash, or sample_id with ``exact: pair``) first; then near: a pair within
    the radius is verified on the thumbnails when both rows have one (dedup_verify), else decided
    on the hashes within ``unverified_max_hamming``. The keeper is the best stored match by the
    keeper rule (the held-out set first). Pairs of stored rows, and of new rows, are never formed:
    the stored rows are the corpus, the new rows were deduplicated by their own curate run."""
    rank = np.empty(old.num_rows, np.int64)
    rank[keeper_order(old)] = np.arange(old.num_rows)
    out: dict[int, tuple[str, int, str]] = {}  # new row -> (reason, stored row, evidence)
    if cfg.exact != "off":
        key = "content_hash" if cfg.exact == "media" else "sample_id"
        best: dict[str, int] = {}
        for i, v in enumerate(old.column(key).to_pylist()):
            if v and (v not in best or rank[i] < rank[best[v]]):
                best[v] = i
        for j, v in enumerate(new.column(key).to_pylist()):
            if v in best:
                out[j] = ("duplicate", best[v], f"exact={cfg.exact}")
    keep = np.array([x not in out for x in a.tolist()], bool)
    a, b, d = a[keep], b[keep], d[keep]
    if len(a):
        ok = d <= cfg.unverified_max_hamming
        residual, limit = np.full(len(a), np.nan), np.full(len(a), np.nan)
        if cfg.verify and "thumb" in new.column_names and "thumb" in old.column_names:
            blobs = new.column("thumb").to_pylist() + old.column("thumb").to_pylist()
            both = np.array([blobs[x] is not None and blobs[new.num_rows + y] is not None for x, y in zip(a, b)], bool)
            if both.any():
                v = verify_candidates(blobs, a[both], b[both] + new.num_rows, cfg, cfg.verify_chunk_pairs)
                ok[both], residual[both] = v[0], v[1]
                if len(v) > 2:  # the residual the pair had to stay under
                    limit[both] = v[2]
        for x, y, dist, res, lim in sorted(zip(a[ok].tolist(), b[ok].tolist(), d[ok].tolist(), residual[ok].tolist(),
                                               limit[ok].tolist()), key=lambda p: (p[0], rank[p[1]])):
            if x not in out:  # the best-ranked verified stored match of new row x
                out[x] = ("near_duplicate", y, f"hamming={dist}" + ("" if res != res else f" residual={res:.1f}")
                          + ("" if lim != lim else f" limit={lim:.1f}"))
    rows = sorted(out)
    return pa.table({"row_id": new.column("row_id").take(pa.array(rows, pa.int64())),
                     "reason": pa.array([out[j][0] for j in rows], pa.string()),
                     "keeper": old.column("sample_id").take(pa.array([out[j][1] for j in rows], pa.int64())),
                     "evidence": pa.array([out[j][2] for j in rows], pa.string())}, schema=EVIDENCE_SCHEMA)


def dedup_against_index(curated: str, index_dir: str, snapshot: str, modality: str, dedup_cfg: DedupConfig,
                        stats: dict | None = None) -> dict:
    """Reject rows of ``curated`` (snapshot ``snapshot``) that duplicate a row of the index's other
    files (older snapshots, the held-out set). Returns {"duplicate": n, "near_duplicate": n,
    "heldout": n}; rewrites data/, rejects/, stats.json. ``stats``, if given, receives the index
    size, the key pairs joined, the pairs within the radius, the stored rows read and the seconds."""
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    new = kept_index_rows(curated, modality, snapshot)
    counts = {"duplicate": 0, "near_duplicate": 0, "heldout": 0}
    if new.num_rows == 0:
        return counts
    old, a, b, d = candidates(index_dir, snapshot, new, dedup_cfg, stats)
    t1 = time.perf_counter()
    stats.update(new_rows=new.num_rows, candidates_s=round(t1 - t0, 3))
    if old is None:
        return counts
    drops = _cross_drops(new, old, a, b, d, dedup_cfg)
    stats.update(dedup_s=round(time.perf_counter() - t1, 3))
    if drops.num_rows == 0:
        return counts
    heldout_ids = set(old.filter(pc.less(old.column("priority"), 0)).column("sample_id").to_pylist())
    by_rid = {r: i for i, r in enumerate(new.column("row_id").to_pylist())}
    dropped = new.take(pa.array([by_rid[r] for r in drops.column("row_id").to_pylist()], pa.int64()))
    rejects = pa.table({"source": dropped.column("source"), "key": dropped.column("key"),
                        "stage": pa.array(["dedup"] * drops.num_rows), "reason": drops.column("reason"),
                        "detail": drop_details(drops)}).cast(REJECT_SCHEMA)
    write_parquet(rejects, join(curated, "rejects", "cross_snapshot.parquet"))
    removed = _rewrite_data(curated, set(_join_keys(dropped, modality)), modality)
    for reason, keeper in zip(drops.column("reason").to_pylist(), drops.column("keeper").to_pylist()):
        counts[reason] += 1
        counts["heldout"] += keeper in heldout_ids
    _correct_stats(curated, removed, drops.column("reason").to_pylist(), modality)
    return counts


def _rewrite_data(curated: str, gone: set, modality: str) -> pa.Table:
    """Drop rows keyed in ``gone`` from every data/ file (each rewritten atomically); return the
    removed rows' (split, caption, input_ids) for the stats correction."""
    removed = []
    for f in parquet_files(join(curated, "data")):
        t = read_parquet(f)
        mask = pa.array([k in gone for k in _join_keys(t, modality)], pa.bool_())
        if not pc.any(mask).as_py():
            continue
        removed.append(t.filter(mask).select(["sample_id", "split", "caption", "input_ids"]))
        write_parquet(t.filter(pc.invert(mask)), f)
    return pa.concat_tables(removed)


def _correct_stats(curated: str, removed: pa.Table, reasons: list[str], modality: str) -> None:
    st: dict[str, Any] = read_json(join(curated, "stats.json"))
    n = removed.num_rows
    st["kept"] -= n
    for r in reasons:
        st["rejected"][r] = st["rejected"].get(r, 0) + 1
    st["rejected_total"] = sum(st["rejected"].values())
    st["rejected_by_stage"]["dedup"] = st["rejected_by_stage"].get("dedup", 0) + len(reasons)
    for s in removed.column("split").to_pylist():
        st["splits"][s] -= 1
    # Subtract the removed rows' caption histograms (bins are fixed, counts add up exactly).
    work = _work_rows(curated, ["sample_id", "orig_width", "orig_height"])
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
    write_json_atomic(join(curated, "stats.json"), st)


__all__ = ["INDEX_COLUMNS", "VERIFY_COLUMNS", "HELDOUT", "curate_snapshot", "index_snapshot", "kept_index_rows",
           "band_rows", "write_index", "dedup_against_index", "replay_mix"]
