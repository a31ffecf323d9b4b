"""Incremental curation: a snapshot of new inputs, deduplicated against the corpus curated before it.

    stats = curate_snapshot(new_uris, staging, cfg)          # run_curate, its work rows kept
    dups = dedup_against_index(staging, corpus + "/_index", "20260101T0000", "image", cfg.dedup)
    index_snapshot(staging, corpus + "/_index", "20260101T0000", "image", cfg.dedup)   # then the work rows go

Every path may be local or a URI (``s3://``, ``gs://``: pyarrow.fs through core.storage).

**The index** (``CORPUS/_index`` for ``mm refresh``) holds, per snapshot, the kept rows' dedup
columns in ``snapshot=ID.parquet`` (``heldout.parquet`` for the held-out set, ``HELDOUT``):
``INDEX_COLUMNS`` (content hash, pHash sequence, area, caption ...) and, for images, the
verification descriptors ``crop_hashes`` and ``thumb`` (a ~2 KB JPEG thumbnail, so a cross-snapshot
near duplicate is verified exactly as within a snapshot; about 2 KB per indexed image), in row
groups of ``ROW_GROUP_ROWS``; row ids are namespaced by snapshot so the same (source, key) in two
snapshots never collides. Beside it, in its *banded form*, ``bands/snapshot=ID.parquet``: one row
per LSH band key of every row (the pHash bands and crop-view bands of pipelines/dedup_lsh.py, and
an exact key per content hash), sorted by key, with the row's position in the snapshot file. Its
metadata records the band parameters; a bands file written with other parameters (or missing:
an index written before bands existed) is rebuilt from its snapshot file once.

**A refresh's cost follows the new data** (``dedup_against_index``): only the new snapshot's rows
are banded; their keys are joined with each stored bands file (a sorted search over the stored
key column) into (new row, stored row) pairs; a pair sharing a band key is kept when its hashes
are within ``max_hamming`` (only the stored hash columns are read for that), a pair sharing an
exact key always; only the stored rows of kept pairs are read whole (thumbnails included, by row
group). Then, with curation's rules and code: an exact pair drops the new row; a near pair is
verified on the thumbnails (``dedup_verify.verify_candidates``; decided on the hashes within
``unverified_max_hamming`` where a row has none: video clips, index rows written before
thumbnails were indexed); the keeper is the best stored match by ``dedup.keeper_order`` (the
held-out set first, priority -1, then the snapshots, 0). Pairs of two stored rows or of two new
rows are never formed: the stored rows are the corpus, the new rows were deduplicated by their
own curate run. A stored bucket larger than ``max_bucket_rows`` contributes
``bucket_window_rows`` rows, as the sorted window does within a snapshot.

A new row that duplicates an indexed one moves from ``data/`` to
``rejects/cross_snapshot.parquet`` (reason ``duplicate``/``near_duplicate``; ``detail``: the
keeper's sample_id, then the evidence, as curate writes it: ``dedup.drop_details``) and ``stats.json`` is corrected (counts, splits, histograms) so the accounting
invariant still holds. The kept rows' dedup columns and original sizes come from the curate run's
work rows (``curate.WORK_ROWS_DIR``, kept by ``curate_snapshot``); ``index_snapshot`` writes the
index files and then removes them. ``replay_mix`` names the corpora (and their mix weights) a model
continued on a new snapshot trains on: the new snapshot, and the older committed ones replayed in
proportion to their train rows. Used by ``mm refresh`` (jobs/refresh.py). Tested in
tests/test_incremental.py and tests/test_refresh.py; the cost in bench/refresh_cost.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.lineage import read_json, read_manifest, write_json_atomic
from core.storage import exists, join, remove, resolve
from pipelines import stats as stats_mod
from pipelines.curate import WORK_DIR, WORK_ROWS_DIR, CurateConfig, run_curate
from pipelines.dedup import EVIDENCE_SCHEMA, DedupConfig, drop_details, keeper_order
from pipelines.dedup_lsh import band_keys, band_positions, hash_distance, hash_matrix
from pipelines.dedup_verify import verify_candidates
from pipelines.schema import REJECT_SCHEMA, make_sample_id

INDEX_COLUMNS = ["row_id", "sample_id", "source", "key", "content_hash", "hashes", "area", "caption"]
VERIFY_COLUMNS = ["crop_hashes", "thumb"]  # image rows: the near-duplicate verification descriptors
HELDOUT = "heldout"  # the snapshot id of the held-out set in the index
ROW_GROUP_ROWS = 512  # index rows per row group: a candidate costs reading at most one group
BANDS_DIR = "bands"
_EXACT = np.uint64(0xFF) << np.uint64(56)  # the key space of exact keys (band keys hold a list length < 255 there)


def curate_snapshot(sources: list[str], out: str, cfg: CurateConfig) -> dict:
    """``run_curate`` that keeps the work rows this module reads (Ray already initialised)."""
    keep = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, keep_work=True))
    return run_curate(sources, str(out), keep)


# --------------------------------------------------------------------------- parquet at a path or URI
def _read(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path, _ = resolve(str(uri))
    return pq.read_table(path, filesystem=fs, columns=columns)


def _write(table: pa.Table, uri: str, **kw) -> None:
    """One Parquet file, atomically: a temp file renamed locally, one object (a single upload) on a store."""
    fs, path, _ = resolve(str(uri))
    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = path.rsplit("/", 1)
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.tmp"
        pq.write_table(table, tmp, filesystem=fs, **kw)
        fs.move(tmp, path)
        return
    pq.write_table(table, path, filesystem=fs, **kw)


def _files(uri: str, prefix: str = "", suffix: str = ".parquet") -> list[str]:
    """The files directly under ``uri`` whose names start with ``prefix``, as paths/URIs, sorted."""
    fs, path, scheme = resolve(str(uri))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return [join(uri, n) for n in names if n.startswith(prefix) and n.endswith(suffix) and not n.startswith(".")]


# --------------------------------------------------------------------------- the index
def _index_path(index_dir: str, snapshot: str) -> str:
    return join(index_dir, f"{HELDOUT}.parquet" if snapshot == HELDOUT else f"snapshot={snapshot}.parquet")


def _bands_path(index_file: str) -> str:
    parent, name = str(index_file).rsplit("/", 1)
    return join(parent, BANDS_DIR, name)


def _band_params(cfg: DedupConfig) -> dict:
    return {"lsh_bands": cfg.lsh_bands, "lsh_band_bits": cfg.lsh_band_bits, "lsh_seed": cfg.lsh_seed,
            "crop_views": cfg.crop_views, "version": 1}


def _exact_keys(content_hashes: list[str | None]) -> np.ndarray:
    h = np.array([int.from_bytes(hashlib.blake2b((c or "").encode(), digest_size=8).digest(), "little")
                  for c in content_hashes], np.uint64)
    return ((h >> np.uint64(8)) | _EXACT).view(np.int64)


def band_rows(rows: pa.Table, cfg: DedupConfig) -> pa.Table:
    """The banded form of index rows: (band, row) for every pHash band key and crop-view band key
    (pipelines/dedup_lsh.py's key space) and the exact (content hash) key of each row; ``row`` is
    the position in ``rows``; sorted by key."""
    m, lengths = hash_matrix(rows.column("hashes"))
    positions = band_positions(cfg)
    r, k = band_keys(m, lengths, positions)
    parts_r, parts_k = [r, np.arange(rows.num_rows)], [k, _exact_keys(rows.column("content_hash").to_pylist())]
    if cfg.crop_views and "crop_hashes" in rows.column_names:
        vm, vlen = hash_matrix(rows.column("crop_hashes"))
        vr, vk = band_keys(vm, np.where(lengths == 1, vlen, 0), positions, as_length=np.ones_like(lengths))
        parts_r.append(vr)
        parts_k.append(vk)
    keys, pos = np.concatenate(parts_k), np.concatenate(parts_r).astype(np.int32)
    order = np.argsort(keys, kind="stable")
    return pa.table({"band": keys[order], "row": pos[order]})


def write_index(rows: pa.Table, index_dir: str, snapshot: str, cfg: DedupConfig) -> None:
    """Index ``rows`` (``kept_index_rows``' columns) as ``snapshot``: the bands file first, the
    snapshot file last (a bands file without its snapshot file is ignored)."""
    path = _index_path(index_dir, snapshot)
    bands = band_rows(rows, cfg)
    meta = {"params": _band_params(cfg), "rows": rows.num_rows}
    _write(bands.replace_schema_metadata({"mm_bands": json.dumps(meta, sort_keys=True)}), _bands_path(path),
           compression="zstd")
    _write(rows, path, row_group_size=ROW_GROUP_ROWS)


def _stored_bands(path: str, cfg: DedupConfig) -> pa.Table:
    """The bands of index file ``path``, rebuilt (and rewritten) when missing or of other parameters."""
    bp = _bands_path(path)
    try:
        bands = _read(bp)
        meta = json.loads((bands.schema.metadata or {}).get(b"mm_bands", b"{}"))
    except (OSError, pa.ArrowInvalid):
        bands, meta = None, {}
    if bands is not None and meta.get("params") == _band_params(cfg):
        return bands
    rows = _read(path)
    meta = {"params": _band_params(cfg), "rows": rows.num_rows}
    bands = band_rows(rows, cfg).replace_schema_metadata({"mm_bands": json.dumps(meta, sort_keys=True)})
    _write(bands, bp, compression="zstd")
    return bands


def _key_pairs(stored: pa.Table, new_keys: np.ndarray, new_rows: np.ndarray,
               cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(new row, stored row) pairs sharing a key: the join of the new rows' keys with the stored
    sorted key column; a stored bucket larger than ``max_bucket_rows`` gives ``bucket_window_rows``
    of its rows."""
    sk = stored.column("band").to_numpy()
    lo, hi = np.searchsorted(sk, new_keys, "left"), np.searchsorted(sk, new_keys, "right")
    count = hi - lo
    count = np.where(count > cfg.max_bucket_rows, cfg.bucket_window_rows, count)
    total = int(count.sum())
    idx = np.repeat(lo, count) + (np.arange(total) - np.repeat(np.cumsum(count) - count, count))
    return np.repeat(new_rows, count), stored.column("row").to_numpy()[idx].astype(np.int64)


def _pair_distance(new: pa.Table, old: pa.Table, a: np.ndarray, b: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Distance of (new row a, old row b) pairs: pHash sequences, crop views against hashes
    (dedup_lsh.hash_distance; 65 where the sequence lengths differ)."""
    m, lengths = hash_matrix(pa.concat_arrays([_arr(new, "hashes"), _arr(old, "hashes")]))
    if cfg.crop_views and "crop_hashes" in new.column_names and "crop_hashes" in old.column_names:
        vm, vlen = hash_matrix(pa.concat_arrays([_arr(new, "crop_hashes"), _arr(old, "crop_hashes")]))
        vlen = np.where(lengths == 1, vlen, 0)
    else:
        vm, vlen = np.zeros((len(m), 0), np.uint64), np.zeros(len(m), np.int64)
    return hash_distance(m, lengths, a, b + new.num_rows, vm, vlen)


def _arr(t: pa.Table, name: str) -> pa.Array:
    return t.column(name).combine_chunks().cast(pa.list_(pa.int64()))


def _read_positions(uri: str, positions: np.ndarray, columns: list[str] | None) -> pa.Table:
    """Rows at ``positions`` of a Parquet file, reading only the row groups that hold them."""
    fs, path, _ = resolve(str(uri))
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], np.int64)
        starts = np.r_[0, np.cumsum(sizes)]
        groups = np.unique(np.searchsorted(starts, positions, "right") - 1)
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        t = pf.read_row_groups(groups.tolist(), columns=cols)
    base = np.r_[0, np.cumsum(sizes[groups])][:-1]  # where each read group starts in ``t``
    g = np.searchsorted(groups, np.searchsorted(starts, positions, "right") - 1)
    return t.take(pa.array(base[g] + positions - starts[groups[g]]))


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
    return _read(join(curated, WORK_ROWS_DIR), columns)


def _join_keys(t: pa.Table, modality: str) -> list[tuple]:
    cols = ["source", "key"] + (["start_s"] if modality == "video" else [])
    values = [t.column(c).to_pylist() for c in cols]
    return [tuple(round(v, 3) if isinstance(v, float) else v for v in row) for row in zip(*values)]


def kept_index_rows(curated: str, modality: str, namespace: str) -> pa.Table:
    """Index rows (INDEX_COLUMNS, ``start_s`` for video, the VERIFY_COLUMNS the work rows hold) of
    the rows ``curated/data`` kept, from its ``_work`` rows; the row_id is namespaced so the same
    (source, key) in two snapshots never collides."""
    video = ["start_s"] if modality == "video" else []
    data = _read(join(curated, "data"), ["source", "key"] + video)
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


def _candidates(index_dir: str, snapshot: str, new: pa.Table, cfg: DedupConfig,
                stats: dict) -> tuple[pa.Table | None, np.ndarray, np.ndarray, np.ndarray]:
    """The stored index rows (other snapshots, the held-out set) that may duplicate a row of
    ``new`` (with a ``priority`` column), and the (new row, stored row, distance) pairs within
    ``max_hamming``. Stored rows sharing an exact key are read; of those sharing a band key only the
    hash columns are read, and whole rows (thumbnails included) only for pairs within the radius."""
    own = _index_path(index_dir, snapshot)
    files = [f for f in _files(index_dir, "snapshot=") if f != own]
    files += [_index_path(index_dir, HELDOUT)] if exists(_index_path(index_dir, HELDOUT)) else []
    nb = band_rows(new, cfg)
    new_keys, new_rows = nb.column("band").to_numpy(), nb.column("row").to_numpy().astype(np.int64)
    exact_key = (new_keys.view(np.uint64) >> np.uint64(56)) == np.uint64(0xFF)
    out, pairs_a, pairs_b, pairs_d = [], [], [], []
    stored_rows = key_pairs = offset = 0
    columns = INDEX_COLUMNS + ["start_s"] + VERIFY_COLUMNS
    for f in files:
        bands = _stored_bands(f, cfg)
        stored_rows += json.loads(bands.schema.metadata[b"mm_bands"])["rows"]
        _, eb = _key_pairs(bands, new_keys[exact_key], new_rows[exact_key], cfg)
        ha, hb = _key_pairs(bands, new_keys[~exact_key], new_rows[~exact_key], cfg) if cfg.near else (eb[:0], eb[:0])
        key_pairs += len(ha)
        hd = np.zeros(0, np.int64)
        if len(hb):
            ha, hb = np.unique(np.stack([ha, hb]), axis=1)  # a pair found by several bands once
            pos = np.unique(hb)
            hd = _pair_distance(new, _read_positions(f, pos, ["hashes", "crop_hashes"]), ha,
                                np.searchsorted(pos, hb), cfg)
            ok = hd <= cfg.max_hamming
            ha, hb, hd = ha[ok], hb[ok], hd[ok]
        pos = np.unique(np.r_[eb, hb])
        if len(pos) == 0:
            continue
        t = _read_positions(f, pos, columns)
        prio = -1 if f == _index_path(index_dir, HELDOUT) else 0
        out.append(t.append_column("priority", pa.array(np.full(t.num_rows, prio, np.int64))))
        pairs_a.append(ha)
        pairs_b.append(offset + np.searchsorted(pos, hb))
        pairs_d.append(hd)
        offset += t.num_rows
    old = pa.concat_tables(out, promote_options="default") if out else None
    stats.update(index_files=len(files), index_rows=stored_rows, key_pairs=key_pairs,
                 near_pairs=int(sum(len(x) for x in pairs_a)), candidate_rows=offset)
    return old, _cat(pairs_a), _cat(pairs_b), _cat(pairs_d)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


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
    old, a, b, d = _candidates(index_dir, snapshot, new, dedup_cfg, stats)
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
    _write(rejects, join(curated, "rejects", "cross_snapshot.parquet"))
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
    for f in _files(join(curated, "data")):
        t = _read(f)
        mask = pa.array([k in gone for k in _join_keys(t, modality)], pa.bool_())
        if not pc.any(mask).as_py():
            continue
        removed.append(t.filter(mask).select(["sample_id", "split", "caption", "input_ids"]))
        _write(t.filter(pc.invert(mask)), f)
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
