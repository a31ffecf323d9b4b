"""The cross-snapshot dedup index: its files, their banded form, and the candidate pairs it gives.

    write_index(rows, corpus + "/_index", "20260101T0000", cfg.dedup)        # rows + bands
    old, a, b, d = candidates(corpus + "/_index", "20260102T0000", new_rows, cfg.dedup, stats)

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

**A refresh's cost follows the new data** (``candidates``): only the new snapshot's rows are
banded; their keys are joined with each stored bands file (a sorted search over the stored key
column) into (new row, stored row) pairs; a pair sharing a band key is kept when its hashes are
within ``max_hamming`` (only the stored hash columns are read for that), a pair sharing an exact
key always; only the stored rows of kept pairs are read whole (thumbnails included, by row
group), with their priority (the held-out set -1, the snapshots 0). A stored bucket larger than
``max_bucket_rows`` contributes ``bucket_window_rows`` rows, as the sorted window does within a
snapshot. What is done with the pairs (the decisions, the rewrite of ``data/``) is
pipelines/incremental.py. Tested in tests/test_incremental.py; the cost in bench/refresh_cost.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.storage import exists, join, resolve
from pipelines.dedup import DedupConfig
from pipelines.dedup_lsh import band_keys, band_positions, hash_distance, hash_matrix

INDEX_COLUMNS = ["row_id", "sample_id", "source", "key", "content_hash", "hashes", "area", "caption"]
VERIFY_COLUMNS = ["crop_hashes", "thumb"]  # image rows: the near-duplicate verification descriptors
HELDOUT = "heldout"  # the snapshot id of the held-out set in the index
ROW_GROUP_ROWS = 512  # index rows per row group: a candidate costs reading at most one group
BANDS_DIR = "bands"
_EXACT = np.uint64(0xFF) << np.uint64(56)  # the key space of exact keys (band keys hold a list length < 255 there)


# --------------------------------------------------------------------------- parquet at a path or URI
def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path, _ = resolve(str(uri))
    return pq.read_table(path, filesystem=fs, columns=columns)


def write_parquet(table: pa.Table, uri: str, **kw) -> None:
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


def parquet_files(uri: str, prefix: str = "", suffix: str = ".parquet") -> list[str]:
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
    write_parquet(bands.replace_schema_metadata({"mm_bands": json.dumps(meta, sort_keys=True)}), _bands_path(path),
           compression="zstd")
    write_parquet(rows, path, row_group_size=ROW_GROUP_ROWS)


def _stored_bands(path: str, cfg: DedupConfig) -> pa.Table:
    """The bands of index file ``path``, rebuilt (and rewritten) when missing or of other parameters."""
    bp = _bands_path(path)
    try:
        bands = read_parquet(bp)
        meta = json.loads((bands.schema.metadata or {}).get(b"mm_bands", b"{}"))
    except (OSError, pa.ArrowInvalid):
        bands, meta = None, {}
    if bands is not None and meta.get("params") == _band_params(cfg):
        return bands
    rows = read_parquet(path)
    meta = {"params": _band_params(cfg), "rows": rows.num_rows}
    bands = band_rows(rows, cfg).replace_schema_metadata({"mm_bands": json.dumps(meta, sort_keys=True)})
    write_parquet(bands, bp, compression="zstd")
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


def candidates(index_dir: str, snapshot: str, new: pa.Table, cfg: DedupConfig,
                stats: dict) -> tuple[pa.Table | None, np.ndarray, np.ndarray, np.ndarray]:
    """The stored index rows (other snapshots, the held-out set) that may duplicate a row of
    ``new`` (with a ``priority`` column), and the (new row, stored row, distance) pairs within
    ``max_hamming``. Stored rows sharing an exact key are read; of those sharing a band key only the
    hash columns are read, and whole rows (thumbnails included) only for pairs within the radius."""
    own = _index_path(index_dir, snapshot)
    files = [f for f in parquet_files(index_dir, "snapshot=") if f != own]
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


__all__ = ["INDEX_COLUMNS", "VERIFY_COLUMNS", "HELDOUT", "ROW_GROUP_ROWS", "BANDS_DIR", "read_parquet",
           "write_parquet", "parquet_files", "band_rows", "write_index", "candidates"]
