"""Exact and near-duplicate removal: LSH banding, verification, union-find, keeper rule."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.dedup import (
    DROP_SCHEMA,
    DedupConfig,
    UnionFind,
    band_keys,
    band_positions,
    candidate_pairs,
    find_duplicates,
    find_duplicates_local,
    hash_matrix,
    keeper_order,
    minhash_signatures,
    within_hamming,
)
from pipelines.schema import make_sample_id


def flip(h: int, bits: list[int]) -> int:
    u = h & 0xFFFFFFFFFFFFFFFF
    for b in bits:
        u ^= 1 << b
    return u - (1 << 64) if u >= (1 << 63) else u


def rows_table(specs: list[dict]) -> pa.Table:
    """specs: key, hashes, area, optional content_hash/caption/source."""
    rows = []
    for s in specs:
        source = s.get("source", "src")
        rows.append({
            "row_id": make_sample_id(source, s["key"]), "sample_id": make_sample_id("sid", s["key"]),
            "source": source, "key": s["key"], "caption": s.get("caption", f"caption {s['key']}"),
            "content_hash": s.get("content_hash", make_sample_id("px", s["key"])),
            "hashes": s["hashes"], "area": s.get("area", 100),
        })
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("row_id", pa.string()), ("sample_id", pa.string()), ("source", pa.string()), ("key", pa.string()),
        ("caption", pa.string()), ("content_hash", pa.string()), ("hashes", pa.list_(pa.int64())),
        ("area", pa.int64())]))


def by_key(t: pa.Table, drops: pa.Table) -> dict[str, tuple[str, str]]:
    keys = dict(zip(t.column("row_id").to_pylist(), t.column("key").to_pylist()))
    sid_key = dict(zip(t.column("sample_id").to_pylist(), t.column("key").to_pylist()))
    return {keys[r]: (reason, sid_key[k]) for r, reason, k in
            zip(drops.column("row_id").to_pylist(), drops.column("reason").to_pylist(),
                drops.column("keeper").to_pylist())}


def test_union_find_components():
    uf = UnionFind()
    for a, b in [(1, 2), (3, 4), (2, 3), (5, 6)]:
        uf.union(a, b)
    comps = sorted(sorted(c) for c in uf.components().values())
    assert comps == [[1, 2, 3, 4], [5, 6]]
    assert not uf.union(1, 4)


def test_band_keys_shape_and_collision_on_equal_hashes():
    cfg = DedupConfig(lsh_bands=4, lsh_band_bits=8)
    m, lengths = hash_matrix(pa.array([[5], [5], [1, 2]], pa.list_(pa.int64())))
    rows, keys = band_keys(m, lengths, band_positions(cfg))
    assert len(rows) == 4 + 4 + 8
    k0, k1 = keys[rows == 0], keys[rows == 1]
    assert (k0 == k1).all()
    assert not set(keys[rows == 2]) & set(k0)  # a 2-hash row never shares a bucket with a 1-hash row


def test_candidate_pairs_and_windowed_big_buckets():
    keys = np.array([7, 7, 7, 1, 2, 2])
    a, b = candidate_pairs(keys, max_bucket_rows=10, window=2)
    assert {tuple(sorted(p)) for p in zip(a, b)} == {(0, 1), (0, 2), (1, 2), (4, 5)}
    a, b = candidate_pairs(np.zeros(100, np.int64), max_bucket_rows=10, window=3)
    assert len(a) == 99 + 98 + 97  # a sliding window, not 4950 pairs


def test_within_hamming_multi_hash():
    m, lengths = hash_matrix(pa.array([[0, 0], [0b111, 0], [0b111, 0b1111111111]], pa.list_(pa.int64())))
    ok = within_hamming(m, lengths, np.array([0, 0]), np.array([1, 2]), 3)
    assert ok.tolist() == [True, False]  # every position must be within max_hamming


def test_keeper_rule_largest_then_earliest():
    t = rows_table([{"key": "b", "hashes": [1], "area": 50}, {"key": "c", "hashes": [1], "area": 200},
                    {"key": "a", "hashes": [1], "area": 200}])
    assert [t.column("key")[i].as_py() for i in keeper_order(t)] == ["a", "c", "b"]


def test_exact_media_and_pair_modes():
    t = rows_table([
        {"key": "k1", "hashes": [1], "content_hash": "aa", "caption": "x"},
        {"key": "k2", "hashes": [1], "content_hash": "aa", "caption": "y"},
        {"key": "k3", "hashes": [99999], "content_hash": "bb"},
    ])
    d = by_key(t, find_duplicates_local(t, DedupConfig(near=False)))
    assert d == {"k2": ("duplicate", "k1")}
    assert find_duplicates_local(t, DedupConfig(near=False, exact="pair")).num_rows == 0


def _planted(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
    specs = [{"key": f"o{i:05d}", "hashes": [int(h)], "area": 100} for i, h in enumerate(base)]
    planted = {}
    for i in range(0, n, 10):  # every tenth original gets a copy 1-5 bits away, at lower resolution
        bits = rng.choice(64, int(rng.integers(1, 6)), replace=False).tolist()
        specs.append({"key": f"d{i:05d}", "hashes": [flip(int(base[i]), bits)], "area": 50})
        planted[f"d{i:05d}"] = f"o{i:05d}"
    return specs, planted


def test_near_duplicates_found_with_keeper_in_detail():
    specs, planted = _planted(400)
    t = rows_table(specs)
    d = by_key(t, find_duplicates_local(t, DedupConfig()))
    assert {k: v[1] for k, v in d.items()} == planted
    assert all(v[0] == "near_duplicate" for v in d.values())


def test_near_chain_does_not_drop_far_members():
    h = 0x0F0F0F0F0F0F0F0F
    cfg = DedupConfig(max_hamming=3, lsh_bands=32, lsh_band_bits=8)
    # a ~ b ~ c (3 bits each) but a and c are 6 bits apart: keep a (largest) and c, drop b
    t = rows_table([{"key": "a", "hashes": [h], "area": 30}, {"key": "b", "hashes": [flip(h, [1, 2, 3])], "area": 20},
                    {"key": "c", "hashes": [flip(h, [1, 2, 3, 40, 41, 42])], "area": 10}])
    assert by_key(t, find_duplicates_local(t, cfg)) == {"b": ("near_duplicate", "a")}
    # with b the largest, both neighbours go to b
    t = rows_table([{"key": "a", "hashes": [h], "area": 10}, {"key": "b", "hashes": [flip(h, [1, 2, 3])], "area": 30},
                    {"key": "c", "hashes": [flip(h, [1, 2, 3, 40, 41, 42])], "area": 20}])
    assert by_key(t, find_duplicates_local(t, cfg)) == {"a": ("near_duplicate", "b"), "c": ("near_duplicate", "b")}


def test_caption_minhash_near_duplicates():
    t = rows_table([
        {"key": "a", "hashes": [1], "caption": "a red car parked on a quiet street at night"},
        {"key": "b", "hashes": [1 << 40], "caption": "a red car parked on a quiet street at night!"},
        {"key": "c", "hashes": [1 << 20], "caption": "two dogs playing with a ball in the park"},
    ])
    cfg = DedupConfig(near=False, near_captions=True, caption_min_jaccard=0.7)
    d = by_key(t, find_duplicates_local(t, cfg))
    assert d == {"b": ("near_duplicate", "a")}
    sig = minhash_signatures(["same text here", "same text here", "different words"], cfg)
    assert (sig[0] == sig[1]).all() and (sig[0] != sig[2]).mean() > 0.5


def test_ray_path_equals_local_path(ray_session):
    import ray

    specs, planted = _planted(300, seed=3)
    specs += [{"key": "x1", "hashes": [5], "content_hash": "same"}, {"key": "x2", "hashes": [5], "content_hash": "same"}]
    t = rows_table(specs)
    local = find_duplicates_local(t, DedupConfig())
    ray_cfg = DedupConfig(local_max_rows=0, lsh_shards=8, num_partitions=2)
    distributed = find_duplicates(ray.data.from_arrow(t).repartition(4), ray_cfg)
    assert distributed.schema == DROP_SCHEMA
    assert sorted(distributed.to_pylist(), key=str) == sorted(local.to_pylist(), key=str)
    assert by_key(t, local)["x2"] == ("duplicate", "x1")


@pytest.mark.parametrize("bad", [{"max_hamming": 64}, {"lsh_band_bits": 0}, {"caption_num_perm": 10}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        DedupConfig(**bad)
