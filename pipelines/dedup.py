"""Corpus-wide deduplication with Ray Data: exact, near-duplicate media (pHash LSH), near-duplicate captions.

    drops = find_duplicates(rows_ds, DedupConfig())   # pyarrow Table: row_id, reason, keeper

Input rows carry the generic dedup columns (``curate.WORK_COLUMNS``): ``row_id`` (unique per
row), ``sample_id``, ``content_hash`` (exact media key), ``hashes`` (list<int64> of perceptual
hashes: one for an image, one per sampled frame for a video clip), ``area`` (original pixels),
``source``/``key`` (for "earliest"), ``caption`` and optionally ``priority`` (lower wins; a
refresh gives the existing corpus priority 0 and new shards 1 so old rows are never dropped).

**Keeper rule** (the same for every kind of duplicate; deterministic, so reruns agree):
lowest ``priority``, then largest ``area`` (resolution), then earliest ``(source, key)`` in
lexicographic order, then smallest ``sample_id``.

1. *Exact*: rows with the same ``content_hash`` (``exact="media"``: same decoded pixels, any
   caption) or the same ``sample_id`` (``exact="pair"``: same pixels and normalised caption).
   Reason ``duplicate``.
2. *Near-duplicate media* among the exact keepers: two rows are near duplicates when their hash
   lists have the same length and every position is within ``max_hamming`` bits. Candidates come
   from LSH banding (bit sampling, Indyk-Motwani): each of ``lsh_bands`` bands reads
   ``lsh_band_bits`` fixed pseudo-random bit positions of every hash; rows sharing a band value
   are candidates, verified exactly, and joined into connected components with union-find.
   Within a component, members are visited in keeper-rule order and a member is dropped only
   when it has a verified edge to a keeper (no chaining: every dropped row is within
   ``max_hamming`` of the keeper named in its ``detail``). Reason ``near_duplicate``. A pair at distance d is missed with
   probability (1 - C(64-d, b)/C(64, b))^bands; the defaults (24 bands x 16 bits) find d <= 5
   with p > 0.99 and d = 8 with p ~ 0.9 (bench/dedup_quality.py measures it on real photos).
3. *Near-duplicate captions* (off by default for image-text): MinHash over character shingles,
   LSH bands of ``caption_band_rows`` rows, candidates verified by estimated Jaccard.

Scale: the band rows (key, row hash, hash list) are grouped with Ray Data ``groupby`` on a hash
shard of the band key (``lsh_shards`` groups) and every shard is processed vectorised in numpy
(one ``map_groups`` call per shard instead of one Python call per band value); union-find over
the verified edges runs on the driver and only touches rows that have a near duplicate. Work is
O(n * bands) plus the candidate pairs; a band value shared by more than ``max_bucket_rows`` rows
(blank images) is verified on a sorted window instead of all pairs. Never O(n^2).

Tested in tests/test_dedup.py; quality and scaling in bench/dedup_quality.py.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DROP_SCHEMA = pa.schema([pa.field("row_id", pa.string()), pa.field("reason", pa.string()),
                         pa.field("keeper", pa.string())])
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class DedupConfig:
    exact: Literal["media", "pair", "off"] = "media"
    near: bool = True
    max_hamming: int = 8                 # bits, per hash (64-bit pHash)
    lsh_bands: int = 24
    lsh_band_bits: int = 16
    lsh_seed: int = 0
    lsh_shards: int = 64                 # groupby groups the band rows are spread over
    max_bucket_rows: int = 2000          # larger band buckets: sorted-window verification
    bucket_window_rows: int = 64
    near_captions: bool = False
    caption_shingle_chars: int = 5
    caption_num_perm: int = 64
    caption_band_rows: int = 4           # MinHash rows per band (num_perm / rows = bands)
    caption_min_jaccard: float = 0.8
    num_partitions: int = 4              # Ray Data shuffle partitions for the groupbys
    local_max_rows: int = 100_000        # up to this many candidates, dedup runs in the driver

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming < 64:
            raise ValueError("max_hamming must be in [0, 63]")
        if not 1 <= self.lsh_band_bits <= 32 or self.lsh_bands < 1:
            raise ValueError("lsh_band_bits must be in [1, 32] and lsh_bands >= 1")
        if self.caption_num_perm % self.caption_band_rows:
            raise ValueError("caption_num_perm must be a multiple of caption_band_rows")
        if not 0.0 < self.caption_min_jaccard <= 1.0:
            raise ValueError("caption_min_jaccard must be in (0, 1]")


# --------------------------------------------------------------------------- keeper rule
def keeper_order(t: pa.Table, first: str | None = None) -> np.ndarray:
    """Row indices of ``t`` sorted best-first by the keeper rule (after column ``first``, if given)."""
    prio = t.column("priority") if "priority" in t.column_names else pa.nulls(t.num_rows, pa.int64()).fill_null(0)
    keys = pa.table({
        "first": t.column(first) if first else pa.nulls(t.num_rows, pa.int8()).fill_null(0),
        "prio": prio, "neg_area": pc.negate(t.column("area").cast(pa.int64())),
        "order": pc.binary_join_element_wise(t.column("source"), t.column("key"), "\x00"),
        "sample_id": t.column("sample_id")})
    return pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in keys.column_names]).to_numpy()


def row_hash64(row_ids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """A 64-bit int per row id (row ids are hex BLAKE2b digests: their first 16 hex digits)."""
    if isinstance(row_ids, list):
        row_ids = pa.array(row_ids, pa.string())
    if isinstance(row_ids, pa.ChunkedArray):
        row_ids = row_ids.combine_chunks()
    if len(row_ids) == 0:
        return np.zeros(0, np.int64)
    head = pc.utf8_slice_codeunits(row_ids.cast(pa.string()), 0, 16)
    offsets = np.frombuffer(head.buffers()[1], np.int32)[head.offset:head.offset + len(head) + 1]
    if not (np.diff(offsets) == 16).all():  # not all hex digests: decode one by one
        return np.array([int(r[:16], 16) for r in row_ids.to_pylist()], dtype=np.uint64).view(np.int64)
    raw = np.frombuffer(head.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 16)
    digits = _HEX[raw].astype(np.uint64)
    value = np.zeros(len(raw), np.uint64)
    for k in range(16):
        value = (value << np.uint64(4)) | digits[:, k]
    return value.view(np.int64)


_HEX = np.zeros(256, np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def exact_groups(t: pa.Table, key: str) -> pa.Table:
    """Within one shard: every row of a ``key`` group but the keeper → (row_id, duplicate, keeper)."""
    if t.num_rows == 0:
        return DROP_SCHEMA.empty_table()
    t = t.take(pa.array(keeper_order(t, first=key)))
    codes = pc.dictionary_encode(t.column(key)).combine_chunks().indices.to_numpy(zero_copy_only=False)
    starts = np.r_[True, codes[1:] != codes[:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(codes)), 0))
    dup = np.flatnonzero(~starts)
    return pa.table({"row_id": t.column("row_id").take(pa.array(dup)),
                     "reason": pa.array(["duplicate"] * len(dup), pa.string()),
                     "keeper": t.column("sample_id").take(pa.array(run_start[dup]))}, schema=DROP_SCHEMA)


# --------------------------------------------------------------------------- LSH banding
def band_positions(cfg: DedupConfig) -> np.ndarray:
    """(bands, band_bits) bit positions: fixed by ``lsh_seed``, distinct within a band."""
    rng = np.random.default_rng(cfg.lsh_seed)
    return np.stack([rng.permutation(64)[: cfg.lsh_band_bits] for _ in range(cfg.lsh_bands)])


def hash_matrix(hashes: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """list<int64> column → (n, max_len) uint64 matrix (zero padded) and the lengths."""
    arr = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    width = int(lengths.max(initial=0)) or 1
    m = np.zeros((len(arr), width), dtype=np.uint64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    rows = np.repeat(np.arange(len(arr)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    m[rows, cols] = flat
    return m, lengths


def band_keys(m: np.ndarray, lengths: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, band key) for every (row, hash position, band): int64 keys that mix the list
    length, the position in the list, the band number and the band's bit values."""
    n, width = m.shape
    bands, bits = positions.shape
    one = np.uint64(1)
    out_rows, out_keys = [], []
    for p in range(width):
        valid = np.nonzero(lengths > p)[0]
        if len(valid) == 0:
            continue
        h = m[valid, p]
        head = (lengths[valid].astype(np.uint64) << np.uint64(56)) | (np.uint64(p) << np.uint64(48))
        keys = np.empty((len(valid), bands), dtype=np.uint64)
        for j in range(bands):  # bands x bits vector ops over n rows: no (n, bands, bits) tensor
            v = head | (np.uint64(j) << np.uint64(40))
            for k, pos in enumerate(positions[j]):
                v |= ((h >> np.uint64(pos)) & one) << np.uint64(k)
            keys[:, j] = v
        out_rows.append(np.repeat(valid, bands))
        out_keys.append(keys.ravel().view(np.int64))
    if not out_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_rows), np.concatenate(out_keys)


def shard_of(keys: np.ndarray, shards: int) -> np.ndarray:
    mixed = (keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (mixed % np.uint64(shards)).astype(np.int64)


def candidate_pairs(keys: np.ndarray, max_bucket_rows: int, window: int,
                    order_by: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j by position) of rows sharing a key: all pairs in buckets up to
    ``max_bucket_rows``, a sliding window of ``window`` rows (sorted by ``order_by``) above it."""
    if len(keys) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx = np.argsort(keys, kind="stable")
    k = keys[idx]
    starts = np.nonzero(np.r_[True, k[1:] != k[:-1]])[0]
    sizes = np.diff(np.r_[starts, len(k)])
    a_all, b_all = [], []
    small = (sizes >= 2) & (sizes <= max_bucket_rows)
    for s in np.unique(sizes[small]):
        st = starts[small & (sizes == s)]
        ii, jj = np.triu_indices(int(s), k=1)
        a_all.append(idx[(st[:, None] + ii[None]).ravel()])
        b_all.append(idx[(st[:, None] + jj[None]).ravel()])
    for st, s in zip(starts[sizes > max_bucket_rows], sizes[sizes > max_bucket_rows]):
        members = idx[st:st + s]
        if order_by is not None:
            members = members[np.argsort(order_by[members], kind="stable")]
        for off in range(1, min(window, s - 1) + 1):
            a_all.append(members[:-off])
            b_all.append(members[off:])
    if not a_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a_all), np.concatenate(b_all)


def within_hamming(m: np.ndarray, lengths: np.ndarray, a: np.ndarray, b: np.ndarray, max_hamming: int) -> np.ndarray:
    """Verified pairs: same list length and every position within ``max_hamming`` bits."""
    if len(a) == 0:
        return np.zeros(0, bool)
    dist = np.bitwise_count(m[a] ^ m[b]).max(axis=1)
    return (lengths[a] == lengths[b]) & (dist <= max_hamming)


def unique_edges(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs as unique undirected edges (lo, hi); a pair found by several bands once."""
    if len(a) == 0:
        return a, b
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


class UnionFind:
    """Disjoint sets over arbitrary hashable ids, path halving + union by size."""

    def __init__(self):
        self.parent: dict = {}
        self.size: dict = {}

    def find(self, x):
        parent = self.parent
        if x not in parent:
            parent[x], self.size[x] = x, 1
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x, y) -> bool:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return False
        if self.size[rx] < self.size[ry]:
            rx, ry = ry, rx
        self.parent[ry] = rx
        self.size[rx] += self.size[ry]
        return True

    def components(self) -> dict:
        groups: dict = {}
        for x in self.parent:
            groups.setdefault(self.find(x), []).append(x)
        return groups


# --------------------------------------------------------------------------- shard functions (map_groups)
_EDGE_SCHEMA = pa.schema([pa.field("a", pa.int64()), pa.field("b", pa.int64())])
_BAND_SCHEMA = pa.schema([pa.field("shard", pa.int64()), pa.field("band", pa.int64()),
                          pa.field("rid", pa.int64()), pa.field("vec", pa.list_(pa.int64()))])


def make_hash_bands(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Rows → band rows (shard, band key, row hash, hash list) for the perceptual-hash LSH."""
    m, lengths = hash_matrix(batch.column("hashes"))
    rows, keys = band_keys(m, lengths, band_positions(cfg))
    rid = row_hash64(batch.column("row_id"))
    vec = batch.column("hashes").combine_chunks().take(pa.array(rows, pa.int64()))
    return pa.table({"shard": shard_of(keys, cfg.lsh_shards), "band": keys, "rid": rid[rows], "vec": vec},
                    schema=_BAND_SCHEMA)


def hash_shard_edges(t: pa.Table, cfg: DedupConfig) -> pa.Table:
    """One shard of band rows → its verified near-duplicate edges (unique pairs of row hashes)."""
    if t.num_rows < 2:
        return _EDGE_SCHEMA.empty_table()
    m, lengths = hash_matrix(t.column("vec"))
    rid = t.column("rid").to_numpy()
    a, b = candidate_pairs(t.column("band").to_numpy(), cfg.max_bucket_rows, cfg.bucket_window_rows,
                           order_by=m[:, 0].view(np.int64))
    return _edge_table(rid, a, b, within_hamming(m, lengths, a, b, cfg.max_hamming))


def _edge_table(rid: np.ndarray, a: np.ndarray, b: np.ndarray, verified: np.ndarray) -> pa.Table:
    """Verified candidate pairs (a, b) of shard rows → unique edges between distinct rows."""
    keep = verified & (rid[a] != rid[b])
    ea, eb = unique_edges(rid[a[keep]], rid[b[keep]])
    return pa.table({"a": ea, "b": eb}, schema=_EDGE_SCHEMA)


def minhash_signatures(captions: list[str | None], cfg: DedupConfig) -> np.ndarray:
    """(n, num_perm) MinHash signatures of character shingles: h(x) = (a*x + b) mod (2^31 - 1)."""
    prime = np.uint64((1 << 31) - 1)
    rng = np.random.default_rng(cfg.lsh_seed + 1)
    a = rng.integers(1, (1 << 31) - 1, cfg.caption_num_perm, dtype=np.uint64)
    b = rng.integers(0, (1 << 31) - 1, cfg.caption_num_perm, dtype=np.uint64)
    out = np.full((len(captions), cfg.caption_num_perm), int(prime), dtype=np.uint64)
    k = cfg.caption_shingle_chars
    for i, text in enumerate(captions):
        text = " ".join((text or "").casefold().split())
        if not text:
            continue
        shingles = {text[j:j + k] for j in range(max(1, len(text) - k + 1))}
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % int(prime)
                      for s in shingles], dtype=np.uint64)
        out[i] = ((a[:, None] * x[None] + b[:, None]) % prime).min(axis=1)  # a*x < 2^62: no overflow
    return out


def make_caption_bands(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    sig = minhash_signatures(batch.column("caption").to_pylist(), cfg)
    rows_per_band = cfg.caption_band_rows
    n_bands = cfg.caption_num_perm // rows_per_band
    rid = row_hash64(batch.column("row_id"))
    keys = np.empty((len(sig), n_bands), dtype=np.int64)
    for j in range(n_bands):
        part = sig[:, j * rows_per_band:(j + 1) * rows_per_band]
        mixed = np.bitwise_xor.reduce(part * (np.arange(1, rows_per_band + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)),
                                      axis=1)
        keys[:, j] = ((mixed >> np.uint64(8)) | (np.uint64(j) << np.uint64(56))).view(np.int64)
    rows = np.repeat(np.arange(len(sig)), n_bands)
    vec = pa.array(list(sig.view(np.int64)), pa.list_(pa.int64())).take(pa.array(rows, pa.int64()))
    flat = keys.ravel()
    return pa.table({"shard": shard_of(flat, cfg.lsh_shards), "band": flat, "rid": rid[rows], "vec": vec},
                    schema=_BAND_SCHEMA)


def caption_shard_edges(t: pa.Table, cfg: DedupConfig) -> pa.Table:
    if t.num_rows < 2:
        return _EDGE_SCHEMA.empty_table()
    sig, _ = hash_matrix(t.column("vec"))
    rid = t.column("rid").to_numpy()
    a, b = candidate_pairs(t.column("band").to_numpy(), cfg.max_bucket_rows, cfg.bucket_window_rows)
    return _edge_table(rid, a, b, (sig[a] == sig[b]).mean(axis=1) >= cfg.caption_min_jaccard)


# --------------------------------------------------------------------------- orchestration
ROW_COLUMNS = ["row_id", "sample_id", "source", "key", "content_hash", "hashes", "area", "caption"]


def find_duplicates(rows, cfg: DedupConfig) -> pa.Table:
    """``rows``: Ray Dataset of candidate rows (ROW_COLUMNS, optional ``priority``).
    Returns a pyarrow Table (DROP_SCHEMA) of every row to drop, with its keeper's sample_id.
    Up to ``local_max_rows`` rows the same shard functions run in this process (a Ray shuffle
    costs seconds of fixed overhead); above it every grouping is a Ray Data groupby."""
    rows = rows.materialize()
    if rows.count() <= cfg.local_max_rows:
        table = _collect(rows, None)
        return find_duplicates_local(table if table is not None else pa.table({}), cfg)
    drops: list[pa.Table] = []
    survivors = rows
    if cfg.exact != "off":
        key = _exact_key(cfg)
        exact = (survivors
                 .map_batches(_add_shard, fn_kwargs={"column": key, "shards": cfg.lsh_shards},
                              batch_format="pyarrow", num_cpus=0.5)
                 .groupby("shard", num_partitions=cfg.num_partitions)
                 .map_groups(exact_groups, fn_kwargs={"key": key}, batch_format="pyarrow", num_cpus=0.5))
        exact_drops = _collect(exact, DROP_SCHEMA)
        drops.append(exact_drops)
        if exact_drops.num_rows:
            survivors = survivors.map_batches(_without, fn_kwargs={"ids": exact_drops.column("row_id")},
                                              batch_format="pyarrow", num_cpus=0.5).materialize()
    for make, edges_fn in _near_stages(cfg):
        edges = _collect(survivors.map_batches(make, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", num_cpus=0.5)
                         .groupby("shard", num_partitions=cfg.num_partitions)
                         .map_groups(edges_fn, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", num_cpus=0.5),
                         _EDGE_SCHEMA)
        graph = _union(edges)
        members = _collect(survivors.map_batches(_rows_with_rid, fn_kwargs={"rids": pa.array(list(graph[1]), pa.int64())},
                                                 batch_format="pyarrow", num_cpus=0.5), None)
        near = component_drops(members, graph)
        drops.append(near)
        if near.num_rows:
            survivors = survivors.map_batches(_without, fn_kwargs={"ids": near.column("row_id")},
                                              batch_format="pyarrow", num_cpus=0.5).materialize()
    return pa.concat_tables(drops) if drops else DROP_SCHEMA.empty_table()


def find_duplicates_local(table: pa.Table, cfg: DedupConfig) -> pa.Table:
    """The same stages on one in-memory table (small corpora, tests, the refresh's new shards)."""
    if table.num_rows == 0:
        return DROP_SCHEMA.empty_table()
    drops: list[pa.Table] = []
    if cfg.exact != "off":
        exact = exact_groups(table, _exact_key(cfg))
        drops.append(exact)
        table = _without(table, exact.column("row_id"))
    for make, edges_fn in _near_stages(cfg):
        bands = make(table, cfg)
        bands = bands.take(pc.sort_indices(bands, [("shard", "ascending")]))
        shard = bands.column("shard").to_numpy()
        bounds = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1], True])
        edges = [edges_fn(bands.slice(lo, hi - lo), cfg) for lo, hi in zip(bounds[:-1], bounds[1:])]
        graph = _union(pa.concat_tables(edges) if edges else _EDGE_SCHEMA.empty_table())
        near = component_drops(_rows_with_rid(table, pa.array(list(graph[1]), pa.int64())), graph)
        drops.append(near)
        table = _without(table, near.column("row_id"))
    return pa.concat_tables(drops) if drops else DROP_SCHEMA.empty_table()


def _exact_key(cfg: DedupConfig) -> str:
    return "content_hash" if cfg.exact == "media" else "sample_id"


def _near_stages(cfg: DedupConfig) -> list:
    return ([(make_hash_bands, hash_shard_edges)] if cfg.near else []) + \
        ([(make_caption_bands, caption_shard_edges)] if cfg.near_captions else [])


def _union(edges: pa.Table) -> tuple[UnionFind, dict[int, set[int]]]:
    """Union-find components and the adjacency of the verified edges."""
    uf = UnionFind()
    adjacent: dict[int, set[int]] = {}
    for x, y in zip(edges.column("a").to_numpy().tolist(), edges.column("b").to_numpy().tolist()):
        uf.union(x, y)
        adjacent.setdefault(x, set()).add(y)
        adjacent.setdefault(y, set()).add(x)
    return uf, adjacent


def component_drops(members: pa.Table | None, graph: tuple[UnionFind, dict[int, set[int]]]) -> pa.Table:
    """Keepers per connected component, without chaining: members are visited in keeper-rule
    order; one with a verified edge to a keeper of its component is dropped in favour of the
    best such keeper, any other becomes a keeper itself. So every dropped row is within
    ``max_hamming`` of its keeper (A~B~C with A far from C keeps A and C, drops B)."""
    if members is None or members.num_rows == 0:
        return DROP_SCHEMA.empty_table()
    uf, adjacent = graph
    members = members.take(pa.array(keeper_order(members)))
    rid = row_hash64(members.column("row_id")).tolist()
    ids, sids = members.column("row_id").to_pylist(), members.column("sample_id").to_pylist()
    rank = {r: i for i, r in enumerate(rid)}
    keepers: set[int] = set()
    out_rows, out_keepers = [], []
    for i, r in enumerate(rid):
        best = min((rank[n] for n in adjacent.get(r, ()) if n in keepers and uf.find(n) == uf.find(r)),
                   default=None)
        if best is None:
            keepers.add(r)
        else:
            out_rows.append(ids[i])
            out_keepers.append(sids[best])
    return pa.table({"row_id": out_rows, "reason": ["near_duplicate"] * len(out_rows), "keeper": out_keepers},
                    schema=DROP_SCHEMA)


def _add_shard(batch: pa.Table, column: str, shards: int) -> pa.Table:
    values = batch.column(column).to_pylist()
    shard = [zlib.crc32(v.encode()) % shards if v else 0 for v in values]
    return batch.append_column("shard", pa.array(shard, pa.int64()))


def _without(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("row_id"), value_set=ids)))


def _rows_with_rid(batch: pa.Table, rids: pa.Array) -> pa.Table:
    mask = pc.is_in(pa.array(row_hash64(batch.column("row_id"))), value_set=rids)
    return batch.filter(mask).drop_columns([c for c in ("hashes", "caption") if c in batch.column_names])


def _collect(ds, schema: pa.Schema | None) -> pa.Table | None:
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
              for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return schema.empty_table() if schema is not None else None
    return pa.concat_tables(tables, promote_options="default")


__all__ = ["DedupConfig", "DROP_SCHEMA", "find_duplicates", "keeper_order", "exact_groups", "band_positions",
           "band_keys", "hash_matrix", "candidate_pairs", "within_hamming", "UnionFind", "unique_edges", "make_hash_bands",
           "hash_shard_edges", "minhash_signatures", "component_drops", "row_hash64"]
