"""The input ledger of a growing corpus: which inputs were curated into which snapshot, and what is new.

    found = discover(["incoming/"], read_ledger(corpus))      # {"new": [...], "changed": [...], "unchanged": n}
    write_ledger_rows(corpus, found["new"] + found["changed"], snapshot="20260101T0000")

``CORPUS/_ledger.parquet`` holds one row per input file (tar shard, manifest, folder) per snapshot:
uri, kind, size, mtime_ns, checksum, snapshot, recorded_at. An input whose size and mtime match a
ledger row is unchanged without being read; otherwise it is checksummed (in parallel Ray tasks,
``curate.checksum_inputs``), and it is new or changed when no ledger row has that checksum. A
folder's mtime is its newest file's and its checksum a digest of its listing. Writing the rows
of a snapshot replaces that snapshot's rows (idempotent) and is atomic (temp file + rename
locally, one PUT on an object store). ``corpus`` is a local path or a URI (``s3://``...).

Used by ``mm refresh`` (jobs/refresh.py). Tested in tests/test_ledger.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.lineage import now_utc
from core.storage import is_local, join, read_bytes, write_bytes

log = logging.getLogger(__name__)

LEDGER_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("kind", pa.string()),
                           pa.field("size", pa.int64()), pa.field("mtime_ns", pa.int64()),
                           pa.field("checksum", pa.string()), pa.field("snapshot", pa.string()),
                           pa.field("recorded_at", pa.string())])


def ledger_path(corpus: str | os.PathLike) -> str:
    return join(corpus, "_ledger.parquet")


def read_ledger(corpus: str | os.PathLike) -> pa.Table:
    blob = read_bytes(ledger_path(corpus))
    return pq.read_table(pa.BufferReader(blob)).cast(LEDGER_SCHEMA) if blob is not None else LEDGER_SCHEMA.empty_table()


def write_ledger_rows(corpus: str | os.PathLike, rows: list[dict], snapshot: str) -> None:
    """Append ``rows`` for ``snapshot`` (replacing any rows of that snapshot: idempotent), atomically."""
    old = read_ledger(corpus)
    old = old.filter(pc.not_equal(old.column("snapshot"), snapshot))
    now = now_utc()
    new = pa.Table.from_pylist([{**{k: r[k] for k in ("uri", "kind", "size", "mtime_ns", "checksum")},
                                 "snapshot": snapshot, "recorded_at": now} for r in rows], schema=LEDGER_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables([old, new]), buf)
    write_bytes(ledger_path(corpus), buf.getvalue().to_pybytes())


def discover(sources: Sequence[str], ledger: pa.Table, ensure_ray=lambda: None) -> dict:
    """Inputs under ``sources`` → {"new": [...], "changed": [...], "unchanged": n}; each input a
    ledger-shaped dict. Files whose size and mtime match the ledger are not read."""
    import pyarrow.fs as pafs

    from pipelines.curate import checksum_inputs
    from pipelines.listing import expand_sources

    files = []
    for src in sources:
        try:
            files += expand_sources([src])
        except ValueError as e:  # an empty folder; on an object store an empty prefix does not exist
            if "holds no inputs" not in str(e) and not (not is_local(src) and "does not exist" in str(e)):
                raise
            log.info("source %s holds no inputs yet", src)
    known = {(r["uri"], r["size"], r["mtime_ns"]): r["checksum"] for r in ledger.to_pylist()}
    sums_by_uri: dict[str, set] = {}
    for r in ledger.to_pylist():
        sums_by_uri.setdefault(r["uri"], set()).add(r["checksum"])
    records, to_hash = [], []
    for f in files:
        info = f.fs.get_file_info(f.path)
        mtime = int(info.mtime_ns or 0)
        if f.kind == "folder":  # a folder's mtime says little: its checksum is a cheap listing digest
            mtime = max((i.mtime_ns or 0 for i in f.fs.get_file_info(pafs.FileSelector(f.path, recursive=True))),
                        default=0)
        rec = {"uri": f.uri, "kind": f.kind, "size": int(f.size), "mtime_ns": mtime,
               "checksum": known.get((f.uri, int(f.size), mtime))}
        records.append(rec)
        if rec["checksum"] is None:
            to_hash.append(f)
    if to_hash:
        ensure_ray()  # checksums are computed in parallel Ray tasks
        sums = {r["uri"]: r["checksum"] for r in checksum_inputs(to_hash)}
        for rec in records:
            rec["checksum"] = rec["checksum"] or sums[rec["uri"]]
    out: dict = {"new": [], "changed": [], "unchanged": 0}
    for rec in records:
        seen = sums_by_uri.get(rec["uri"])
        if seen is None:
            out["new"].append(rec)
        elif rec["checksum"] not in seen:
            out["changed"].append(rec)
        else:
            out["unchanged"] += 1
    return out



__all__ = ["LEDGER_SCHEMA", "read_ledger", "write_ledger_rows", "discover"]
