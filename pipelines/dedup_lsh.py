"""Candidate pairs for near-duplicate removal: LSH banding over perceptual hashes and MinHash.

    bands = make_hash_bands(rows, cfg)           # (shard, band key, row hash, hashes, views, view?)
    edges = hash_shard_edges(bands_of_one_shard, cfg)   # candidate edges (a, b, dist, score)

Perceptual hashes (bit sampling, Indyk-Motwani): each of ``lsh_bands`` bands reads
``lsh_band_bits`` fixed pseudo-random bit positions of every hash; rows sharing a band value are
candidates. An image row may carry *views* besides its hash (``crop_hashes``: the pHashes of its
four corner-anchored 95% crops, pipelines/dedup_verify.py): they are banded in the same key space
as the hash and meet the hashes of their bucket (never other views), so a copy cropped by up to
~5% per side still meets its original; a candidate's distance is the smallest over (hash, hash),
(hash, view) and (view, hash). A pair at distance d
is missed with probability (1 - C(64-d, b)/C(64, b))^bands. Multi-frame rows (video clips) are
compared position by position (same list length, every position within ``max_hamming``).

Bounded work: a band bucket of more than ``max_bucket_rows`` entries (hashes and views; such
buckets appear as the corpus grows denser) is paired on a sliding window of
``bucket_window_rows`` in the order of each entry's own hash, rotated per band (``window_order``,
ties by row: the same pairs in process and on Ray), instead of all pairs; and with ``max_candidates_per_row`` = K a candidate pair is kept only if it is among the
K nearest (hash distance, ties by row id) of one of its rows (``nearest_per_row``): at most 2K
pairs a row reach verification, and a true copy is a row's nearest candidate.

Captions: MinHash over character shingles, LSH bands of ``caption_band_rows`` rows, candidates
kept by estimated Jaccard. A band value shared by more than ``max_bucket_rows`` rows (blank
images) is paired on a sorted window instead of all pairs: never O(n^2).

Used by pipelines/dedup.py; tested in tests/test_dedup.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EDGE_SCHEMA = pa.schema([pa.field("a", pa.int64()), pa.field("b", pa.int64()),
                         pa.field("dist", pa.int64()), pa.field("score", pa.float64())])
BAND_SCHEMA = pa.schema([pa.field("shard", pa.int64()), pa.field("band", pa.int64()),
                         pa.field("rid", pa.int64()), pa.field("vec", pa.list_(pa.int64())),
                         pa.field("views", pa.list_(pa.int64())), pa.field("view", pa.bool_()),
                         pa.field("own", pa.int64())])


_HEX = np.zeros(256, np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


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


def band_positions(cfg) -> np.ndarray:
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


def layout_cells(layout: np.ndarray | None, n: int, cfg) -> np.ndarray | None:
    """(n, lsh_bands) uint64 cell codes of the rows' colour signatures (``layout``: (n, 2)
    chromaticity, dedup_verify.layout_signature; NaN: none), or None when off. Band j cuts each
    coordinate into cells of ``lsh_layout_cell`` units at its own random offset, so a pair whose
    signatures are delta apart shares band j's cell with probability (1 - |dx|/w)(1 - |dy|/w):
    a copy (a few units) almost always, images of other colours rarely. Rows without a
    signature share code 0 (they meet each other as before, never a row that has one)."""
    if layout is None or cfg.lsh_layout_cell <= 0:
        return None
    width = float(cfg.lsh_layout_cell)
    offsets = np.random.default_rng(cfg.lsh_seed + 2).uniform(0.0, width, (cfg.lsh_bands, 2))
    lay = np.asarray(layout, np.float64).reshape(n, 2)
    ok = np.isfinite(lay).all(axis=1)
    q = np.floor((np.where(ok[:, None], lay, 0.0)[:, None, :] + offsets[None]) / width).astype(np.int64)  # (n, bands, 2)
    code = (q[..., 0] * 1024 + q[..., 1] + 1).astype(np.uint64)
    return np.where(ok[:, None], code, np.uint64(0))


def band_keys(m: np.ndarray, lengths: np.ndarray, positions: np.ndarray,
              as_length: np.ndarray | None = None, cells: np.ndarray | None = None,
              first_band: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(row index, band key) for every (row, hash position, band): int64 keys that mix the list
    length (``as_length`` if given: views key as the one-hash rows they belong to), the position
    in the list, the band number and the band's bit values; with ``cells`` ((n, lsh_bands) from
    ``layout_cells``; bands numbered from ``first_band``) also the row's colour cell in that band."""
    n, width = m.shape
    bands, bits = positions.shape
    key_len = lengths if as_length is None else as_length
    one = np.uint64(1)
    out_rows, out_keys = [], []
    for p in range(width):
        valid = np.nonzero(lengths > p)[0]
        if len(valid) == 0:
            continue
        h = m[valid, p]
        pos = 0 if as_length is not None else p
        head = (key_len[valid].astype(np.uint64) << np.uint64(56)) | (np.uint64(pos) << np.uint64(48))
        keys = np.empty((len(valid), bands), dtype=np.uint64)
        for j in range(bands):  # bands x bits vector ops over n rows: no (n, bands, bits) tensor
            v = head | (np.uint64(first_band + j) << np.uint64(40))
            for k, bit in enumerate(positions[j]):
                v |= ((h >> np.uint64(bit)) & one) << np.uint64(k)
            if cells is not None:  # bits [band bits, 40): a cell code collision only adds candidates
                v |= (cells[valid, first_band + j] << np.uint64(bits)) & np.uint64((1 << 40) - 1)
            keys[:, j] = v
        out_rows.append(np.repeat(valid, bands))
        out_keys.append(keys.ravel().view(np.int64))
    if not out_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_rows), np.concatenate(out_keys)


def band_of_key(keys: np.ndarray) -> np.ndarray:
    """The band number ``band_keys`` put in bits [40, 48) of each key."""
    return ((keys.view(np.uint64) >> np.uint64(40)) & np.uint64(0xFF)).astype(np.int64)


def shard_of(keys: np.ndarray, shards: int) -> np.ndarray:
    mixed = (keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (mixed % np.uint64(shards)).astype(np.int64)


def window_order(own: np.ndarray, band: np.ndarray | int) -> np.ndarray:
    """The order of an over-full bucket's entries in band ``band``: each entry's own hash (the
    hash or view the key was cut from), rotated by a band-dependent amount so that each band's
    window meets other neighbours. One definition for both paths (local_hash_edges and
    hash_shard_edges), so the in-process and the Ray dedup pair the same entries."""
    own = np.asarray(own).view(np.uint64)
    r = ((7 + 23 * np.asarray(band, np.int64)) % 64).astype(np.uint64)
    right = np.where(r == 0, np.uint64(0), own >> ((np.uint64(64) - r) % np.uint64(64)))  # no shift by 64
    return ((own << r) | right).view(np.int64)


def candidate_pairs(keys: np.ndarray, max_bucket_rows: int, window: int,
                    order_by: np.ndarray | None = None, ties: tuple[np.ndarray, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j by position) of rows sharing a key: all pairs in buckets up to
    ``max_bucket_rows``, a sliding window of ``window`` rows above it, sorted by ``order_by``, then
    by ``ties`` (first = most significant; e.g. row hash, is-view) so that equal hashes are ordered
    the same whatever the rows' positions."""
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
    big = sizes > max_bucket_rows
    if big.any():  # over-full buckets: each member meets the next ``window`` ones in ``order_by`` order
        in_big = np.repeat(big, sizes)
        members = idx[in_big]
        mk = k[in_big]
        if order_by is not None:
            members = members[np.lexsort((*(t[members] for t in reversed(ties)), order_by[members], mk))]
        for off in range(1, window + 1):
            same = mk[off:] == mk[:-off]
            if not same.any():
                break
            a_all.append(members[:-off][same])
            b_all.append(members[off:][same])
    if not a_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a_all), np.concatenate(b_all)


def hash_distance(m: np.ndarray, lengths: np.ndarray, a: np.ndarray, b: np.ndarray,
                  views: np.ndarray | None = None, n_views: np.ndarray | None = None) -> np.ndarray:
    """Distance of candidate pairs: the largest per-position Hamming distance (65 when the list
    lengths differ); for one-hash rows with views, the smallest over (hash, hash), (hash, view)
    and (view, hash)."""
    if len(a) == 0:
        return np.zeros(0, np.int64)
    if m.shape[1] == 1:
        dist = np.bitwise_count(m[a, 0] ^ m[b, 0]).astype(np.int64)
    else:
        dist = np.bitwise_count(m[a] ^ m[b]).max(axis=1).astype(np.int64)
    if views is not None and views.shape[1]:
        # a missing view slot holds the row's own hash: its distance is then the (hash, hash)
        # one, already in the minimum, so no per-pair mask (the hot loop of candidate generation)
        own = m[:, 0]
        filled = np.where(np.arange(views.shape[1])[None] < n_views[:, None], views, own[:, None])
        va = np.bitwise_count(filled[a] ^ own[b][:, None]).min(axis=1)
        vb = np.bitwise_count(filled[b] ^ own[a][:, None]).min(axis=1)
        one = (lengths[a] == 1) & (lengths[b] == 1)
        dist = np.where(one, np.minimum(dist, np.minimum(va, vb)), dist)
    return np.where(lengths[a] == lengths[b], dist, 65)


def within_hamming(m: np.ndarray, lengths: np.ndarray, a: np.ndarray, b: np.ndarray, max_hamming: int) -> np.ndarray:
    """Pairs with the same list length and every position within ``max_hamming`` bits."""
    return hash_distance(m, lengths, a, b) <= max_hamming


def unique_edges(a: np.ndarray, b: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pairs as unique undirected edges (lo, hi) with the smallest value of each ``values`` array
    (a pair found by several bands or views once, at its best distance)."""
    if len(a) == 0:
        return (a, b, *values)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((*[v for v in values[::-1]], hi, lo))
    lo, hi = lo[order], hi[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    return (lo[first], hi[first], *[v[order][first] for v in values])


def nearest_per_row(a: np.ndarray, b: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Mask of the edges (a, b, dist) that are among the ``k`` nearest of at least one endpoint
    (by ``dist``, ties broken by the other endpoint's id: deterministic). At most 2 k edges a row
    survive, so verification is linear in rows; an edge nearest for a row stays nearest in any
    subset of edges that holds it, so capping per shard and again after merging shards keeps
    exactly what one global cap keeps. ``k`` <= 0: every edge."""
    n = len(a)
    if k <= 0 or n == 0:
        return np.ones(n, bool)
    node = np.r_[a, b]
    other = np.r_[b, a]
    order = np.lexsort((other, np.r_[dist, dist], node))
    sn = node[order]
    start = np.flatnonzero(np.r_[True, sn[1:] != sn[:-1]])
    rank = np.arange(2 * n) - np.repeat(start, np.diff(np.r_[start, 2 * n]))
    keep = np.zeros(2 * n, bool)
    keep[order[rank < k]] = True
    return keep[:n] | keep[n:]


def _list_or_empty(batch: pa.Table, name: str, n: int) -> pa.Array:
    if name in batch.column_names:
        col = batch.column(name)
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return pa.array([[] for _ in range(n)], pa.list_(pa.int64()))


def layout_keys_on(cfg) -> bool:
    """Colour cells in the band keys: only with verification on (without it the hashes decide
    alone, unscreened) and a cell width set."""
    return bool(cfg.verify and cfg.lsh_layout_cell > 0)


def row_layout(batch: pa.Table, cfg) -> np.ndarray | None:
    """The rows' colour signatures for ``layout_cells``: the ``layout`` column (list<float32> of
    2), else computed from ``thumb``; None when verification is off (the hashes decide alone,
    unscreened) or the rows carry neither."""
    if not layout_keys_on(cfg):
        return None
    if "layout" in batch.column_names:
        col = batch.column("layout")
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        out = np.full((len(col), 2), np.nan, np.float32)
        for i, v in enumerate(col.to_pylist()):
            if v is not None and len(v) == 2 and None not in v:
                out[i] = v
        return out
    if "thumb" in batch.column_names:
        from pipelines.dedup_verify import layout_of_thumbs

        return layout_of_thumbs(batch.column("thumb").to_pylist())
    return None


def make_hash_bands(batch: pa.Table, cfg, bands: tuple[int, int] | None = None) -> pa.Table:
    """Rows → band rows (shard, band key, row hash, hash list, views) for the perceptual-hash LSH;
    ``bands`` = (lo, hi): only those bands (one round of the distributed dedup)."""
    lo, hi = bands or (0, cfg.lsh_bands)
    positions = band_positions(cfg)[lo:hi]
    hashes = batch.column("hashes").combine_chunks()
    views = _list_or_empty(batch, "crop_hashes", batch.num_rows) if cfg.crop_views else \
        pa.array([[] for _ in range(batch.num_rows)], pa.list_(pa.int64()))
    m, lengths = hash_matrix(hashes)
    cells = layout_cells(row_layout(batch, cfg), batch.num_rows, cfg)
    rows, keys = band_keys(m, lengths, positions, cells=cells, first_band=lo)
    vm, vlen = hash_matrix(views)
    vlen = np.where(lengths == 1, vlen, 0)  # views belong to one-hash rows (images) only
    vrows, vkeys = band_keys(vm, vlen, positions, as_length=np.ones_like(lengths), cells=cells, first_band=lo)
    rows, keys = np.concatenate([rows, vrows]), np.concatenate([keys, vkeys])
    rid = row_hash64(batch.column("row_id"))
    take = pa.array(rows, pa.int64())
    is_view = np.r_[np.zeros(len(rows) - len(vrows), bool), np.ones(len(vrows), bool)]
    n_bands = hi - lo
    own = np.r_[m[rows[:len(rows) - len(vrows)], _list_position(lengths, n_bands)],
                vm[vrows, _list_position(vlen, n_bands)]].view(np.int64)
    return pa.table({"shard": shard_of(keys, cfg.lsh_shards), "band": keys, "rid": rid[rows],
                     "vec": hashes.take(take), "views": views.take(take), "view": is_view, "own": own},
                    schema=BAND_SCHEMA)


def hash_shard_edges(t: pa.Table, cfg) -> pa.Table:
    """One shard of band rows → its candidate edges within ``max_hamming`` (unique row-hash pairs
    with their distance; ``score`` is filled by verification)."""
    if t.num_rows < 2:
        return EDGE_SCHEMA.empty_table()
    m, lengths = hash_matrix(t.column("vec"))
    vm, vlen = hash_matrix(t.column("views"))
    rid = t.column("rid").to_numpy()
    keys = t.column("band").to_numpy()
    view = t.column("view").to_numpy(zero_copy_only=False)
    a, b = candidate_pairs(keys, cfg.max_bucket_rows, cfg.bucket_window_rows,
                           order_by=window_order(t.column("own").to_numpy(), band_of_key(keys)),
                           ties=(rid, view))
    keep = (rid[a] != rid[b]) & ~(view[a] & view[b])  # a view meets hashes, never another view
    a, b = a[keep], b[keep]
    dist = hash_distance(m, lengths, a, b, vm, vlen)
    ok = dist <= cfg.max_hamming
    ea, eb, ed = unique_edges(rid[a[ok]], rid[b[ok]], dist[ok])
    near = nearest_per_row(ea, eb, ed, cfg.max_candidates_per_row)
    ea, eb, ed = ea[near], eb[near], ed[near]
    return pa.table({"a": ea, "b": eb, "dist": ed, "score": np.full(len(ea), np.nan)}, schema=EDGE_SCHEMA)


def _probe_pairs(keys: np.ndarray, probe_keys: np.ndarray, max_bucket_rows: int,
                 window: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i into ``keys``, j into ``probe_keys``) with equal keys: every hash meets every
    view in its bucket (a view never needs to meet a view); at most ``window`` views per hash
    where the views' bucket holds more than ``max_bucket_rows``."""
    if len(keys) == 0 or len(probe_keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(probe_keys, kind="stable")
    sorted_keys = probe_keys[order]
    lo = np.searchsorted(sorted_keys, keys, "left")
    count = np.searchsorted(sorted_keys, keys, "right") - lo
    count = np.where(count > max_bucket_rows, window, count)
    total = int(count.sum())
    a = np.repeat(np.arange(len(keys)), count)
    offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    return a, order[np.repeat(lo, count) + offset]


def _list_position(lengths: np.ndarray, bands: int) -> np.ndarray:
    """The list position of each entry ``band_keys`` returns (its loop order: position, row, band)."""
    width = int(lengths.max(initial=0))
    return np.concatenate([np.full(int((lengths > p).sum()) * bands, p, np.int64) for p in range(width)] or
                          [np.zeros(0, np.int64)])


def _unique_row_edges(a: np.ndarray, b: np.ndarray, dist: np.ndarray, rid: np.ndarray) -> tuple[np.ndarray, ...]:
    """``unique_edges`` of row positions (a, b) with their distances, returned as row-hash edges
    (lo, hi, dist): the same edges, found by one sort of packed int64 keys instead of a three-key
    lexsort (at 200k rows, ~20M raw edges: 8.8 s of the candidate step before)."""
    n = len(rid)
    if len(a) == 0 or n >= 1 << 27:  # (pair, distance) would not fit one int64
        return unique_edges(rid[a], rid[b], dist)
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    packed = np.unique(((lo * n + hi) << 7) | dist.astype(np.int64))  # dist <= 65 < 2^7
    pair = packed >> 7
    first = np.r_[True, pair[1:] != pair[:-1]]  # the smallest distance of each pair
    pair, d = pair[first], (packed[first] & 127)
    ra, rb = rid[pair // n], rid[pair % n]
    return np.minimum(ra, rb), np.maximum(ra, rb), d


def local_hash_edges(batch: pa.Table, cfg) -> pa.Table:
    """The candidate edges of ``make_hash_bands`` + ``hash_shard_edges`` over one in-memory table,
    one band at a time: memory O(rows x views), not O(rows x views x bands) band rows."""
    m, lengths = hash_matrix(batch.column("hashes"))
    if cfg.crop_views and "crop_hashes" in batch.column_names:
        vm, vlen = hash_matrix(batch.column("crop_hashes"))
        vlen = np.where(lengths == 1, vlen, 0)
    else:
        vm, vlen = np.zeros((len(m), 0), np.uint64), np.zeros(len(m), np.int64)
    rid = row_hash64(batch.column("row_id"))
    positions = band_positions(cfg)
    cells = layout_cells(row_layout(batch, cfg), batch.num_rows, cfg)
    ea, eb, ed = [], [], []
    for j in range(cfg.lsh_bands):
        rows, keys = band_keys(m, lengths, positions[j:j + 1], cells=cells, first_band=j)
        vrows, vkeys = band_keys(vm, vlen, positions[j:j + 1], as_length=np.ones_like(lengths), cells=cells,
                                 first_band=j)
        # a bucket of up to max_bucket_rows entries (hashes and views): every hash meets every
        # hash and view; a fuller one (a dense region: grows with the corpus): each entry meets
        # the next bucket_window_rows in the order of its own hash, rotated per band
        _, inv, cnt = np.unique(np.r_[keys, vkeys], return_inverse=True, return_counts=True)
        full = cnt[inv] > cfg.max_bucket_rows
        hs, vs = np.flatnonzero(~full[:len(keys)]), np.flatnonzero(~full[len(keys):])
        a, b = candidate_pairs(keys[hs], len(keys) + len(vkeys), 1)
        va, vb = _probe_pairs(keys[hs], vkeys[vs], len(keys) + len(vkeys), 1)  # hash x view only
        a, b = [np.concatenate([rows[hs[a]], rows[hs[va]]]), np.concatenate([rows[hs[b]], vrows[vs[vb]]])]
        if full.any():
            own = window_order(np.r_[m[rows, _list_position(lengths, 1)], vm[vrows, _list_position(vlen, 1)]], j)
            ent_row, ent_view = np.r_[rows, vrows][full], np.r_[np.zeros(len(keys), bool), np.ones(len(vkeys), bool)][full]
            fa, fb = candidate_pairs(np.r_[keys, vkeys][full], 1, cfg.bucket_window_rows, order_by=own[full],
                                     ties=(rid[ent_row], ent_view))
            fa, fb = fa[~(ent_view[fa] & ent_view[fb])], fb[~(ent_view[fa] & ent_view[fb])]
            swap = ent_view[fa]  # hash first: hash_distance reads the views of the row, not the entry
            fa, fb = np.where(swap, fb, fa), np.where(swap, fa, fb)
            a, b = np.r_[a, ent_row[fa]], np.r_[b, ent_row[fb]]
        keep = a != b
        a, b = a[keep], b[keep]
        dist = hash_distance(m, lengths, a, b, vm, vlen)
        ok = dist <= cfg.max_hamming
        ea.append(a[ok])
        eb.append(b[ok])
        ed.append(dist[ok])
    ea, eb, ed = _unique_row_edges(np.concatenate(ea), np.concatenate(eb), np.concatenate(ed), rid) if ea else ([], [], [])
    if len(ea):
        near = nearest_per_row(ea, eb, ed, cfg.max_candidates_per_row)
        ea, eb, ed = ea[near], eb[near], ed[near]
    return pa.table({"a": np.asarray(ea, np.int64), "b": np.asarray(eb, np.int64), "dist": np.asarray(ed, np.int64),
                     "score": np.full(len(ea), np.nan)}, schema=EDGE_SCHEMA)


# --------------------------------------------------------------------------- captions (MinHash)
def minhash_signatures(captions: list[str | None], cfg) -> np.ndarray:
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


def make_caption_bands(batch: pa.Table, cfg) -> pa.Table:
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
    return pa.table({"shard": shard_of(flat, cfg.lsh_shards), "band": flat, "rid": rid[rows], "vec": vec,
                     "views": pa.array([[]] * len(rows), pa.list_(pa.int64())),
                     "view": np.zeros(len(rows), bool),
                     "own": np.zeros(len(rows), np.int64)}, schema=BAND_SCHEMA)  # caption buckets window unordered


def caption_shard_edges(t: pa.Table, cfg) -> pa.Table:
    """One shard of caption band rows → edges whose estimated Jaccard reaches ``caption_min_jaccard``."""
    if t.num_rows < 2:
        return EDGE_SCHEMA.empty_table()
    sig, _ = hash_matrix(t.column("vec"))
    rid = t.column("rid").to_numpy()
    a, b = candidate_pairs(t.column("band").to_numpy(), cfg.max_bucket_rows, cfg.bucket_window_rows)
    jac = (sig[a] == sig[b]).mean(axis=1) if len(a) else np.zeros(0)
    keep = (jac >= cfg.caption_min_jaccard) & (rid[a] != rid[b])
    ea, eb, neg = unique_edges(rid[a[keep]], rid[b[keep]], -jac[keep])
    return pa.table({"a": ea, "b": eb, "dist": np.full(len(ea), -1, np.int64), "score": -neg}, schema=EDGE_SCHEMA)


__all__ = ["EDGE_SCHEMA", "BAND_SCHEMA", "band_positions", "layout_cells", "layout_keys_on", "row_layout", "hash_matrix", "band_keys", "shard_of",
           "candidate_pairs", "nearest_per_row", "hash_distance", "within_hamming", "unique_edges", "make_hash_bands",
           "hash_shard_edges", "local_hash_edges", "minhash_signatures", "make_caption_bands", "caption_shard_edges"]
