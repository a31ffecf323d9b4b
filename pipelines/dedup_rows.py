"""Row plumbing for the distributed dedup (pipelines/dedup.py): per-batch Ray Data map functions
that shard, filter and project the work rows, and the thumbnail/colour-layout sources that fetch
only the rows a candidate pair names.

Split out of pipelines/dedup.py, which re-exports ``thumbs_from`` and ``ThumbSource``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.dedup_lsh import row_hash64
from pipelines.dedup_verify import layout_of_thumbs

#: rids (int64, row_hash64 of row_id) -> Table(rid, thumb) of those rows, or None
ThumbSource = Callable[[pa.Array], "pa.Table | None"]
_HEAVY = ("hashes", "caption", "crop_hashes", "thumb", "layout")


def _add_shard(batch: pa.Table, column: str, shards: int) -> pa.Table:
    values = batch.column(column).to_pylist()
    shard = [zlib.crc32(v.encode()) % shards if v else 0 for v in values]
    return batch.append_column("shard", pa.array(shard, pa.int64()))


def _without(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("row_id"), value_set=ids)))


def _rows_with_rid(batch: pa.Table, rids: pa.Array) -> pa.Table:
    mask = pc.is_in(pa.array(row_hash64(batch.column("row_id"))), value_set=rids)
    return batch.filter(mask).drop_columns([c for c in _HEAVY if c in batch.column_names])


class _DatasetThumbs:
    """A ThumbSource over a Ray Dataset with ``row_id`` and ``thumb``; ``layouts(rids)`` computes
    the rows' colour signatures where the thumbnails are, so only (rid, 2 floats) reach the driver."""

    def __init__(self, ds, light: dict):
        self.ds, self.light = ds, light

    def __call__(self, rids: pa.Array) -> pa.Table | None:
        return _collect(self.ds.map_batches(_thumbs_with_rid, fn_kwargs={"rids": rids}, **self.light), None)

    def layouts(self, rids: pa.Array) -> pa.Table:
        t = _collect(self.ds.map_batches(_layouts_with_rid, fn_kwargs={"rids": rids}, **self.light), None)
        return t if t is not None else _layout_with_rid(None)


def _layouts_with_rid(batch: pa.Table, rids: pa.Array) -> pa.Table:
    return _layout_with_rid(_thumbs_with_rid(batch, rids))


def thumbs_from(ds, light: dict) -> ThumbSource:
    """A ThumbSource over a Ray Dataset with ``row_id`` and ``thumb`` (read lazily, so a projection
    of Parquet work rows reads only those two columns, once per call, keeping the pairs' rows)."""
    return _DatasetThumbs(ds, light)


def _layouts(thumbs: ThumbSource, rids: pa.Array) -> pa.Table:
    """(rid, layout) of the rows ``rids``: computed where the thumbnails are when the source can
    (``thumbs_from``), else from the thumbnails it returns."""
    if hasattr(thumbs, "layouts"):
        return thumbs.layouts(rids)
    return _layout_with_rid(thumbs(rids))


def _layout_with_rid(t: pa.Table | None) -> pa.Table:
    """(rid, thumb) rows -> (rid, layout); None (no rows) -> an empty (rid, layout) table."""
    if t is None:
        t = pa.table({"rid": pa.array([], pa.int64()), "thumb": pa.array([], pa.binary())})
    lay = layout_of_thumbs(t.column("thumb").to_pylist())
    return pa.table({"rid": t.column("rid"), "layout": pa.array(list(lay), pa.list_(pa.float32()))})


def _add_layout(batch: pa.Table, layouts: pa.Table) -> pa.Table:
    """Rows + their ``layout`` column (null where ``layouts`` lacks the row)."""
    rid = row_hash64(batch.column("row_id"))
    idx = pc.index_in(pa.array(rid), value_set=layouts.column("rid"))
    return batch.append_column("layout", layouts.column("layout").take(idx))


def _thumbs_with_rid(batch: pa.Table, rids: pa.Array) -> pa.Table:
    rid = pa.array(row_hash64(batch.column("row_id")))
    mask = pc.is_in(rid, value_set=rids)
    return pa.table({"rid": rid.filter(mask), "thumb": batch.column("thumb").filter(mask)})


def _collect(ds, schema: pa.Schema | None) -> pa.Table | None:
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
              for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return schema.empty_table() if schema is not None else None
    return pa.concat_tables(tables, promote_options="default")
