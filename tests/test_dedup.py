"""Exact and near-duplicate removal: LSH banding, verification, union-find, keeper rule."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageEnhance

from pipelines.dedup import (
    DROP_SCHEMA,
    EVIDENCE_SCHEMA,
    DedupConfig,
    UnionFind,
    find_duplicates,
    find_duplicates_local,
    keeper_order,
)
from pipelines.dedup_lsh import (
    _unique_row_edges,
    band_keys,
    band_positions,
    candidate_pairs,
    hash_distance,
    hash_matrix,
    minhash_signatures,
    unique_edges,
    within_hamming,
)
from pipelines.dedup_verify import block_means, compute_descriptors, information, verify_pairs
from pipelines.images import ImageConfig, process_image
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


def test_hash_distance_with_missing_views_is_the_minimum_over_present_ones():
    # row 0 has one crop view and three empty (zero-padded) slots; row 2's hash is 1 bit from
    # zero, so a slot read as a view would give 1 instead of the true 5
    m, lengths = hash_matrix(pa.array([[0xFF00], [0x00F3], [0x0001], [0, 1]], pa.list_(pa.int64())))
    vm, vlen = hash_matrix(pa.array([[0x00F0], [], [], []], pa.list_(pa.int64())))
    vm = np.pad(vm, ((0, 0), (0, 3)))
    d = hash_distance(m, lengths, np.array([0, 1, 0, 2, 0]), np.array([1, 0, 2, 0, 3]), vm, vlen)
    assert d.tolist() == [2, 2, 5, 5, 65]  # (view, hash) both ways; list lengths differ: 65


def test_unique_row_edges_matches_unique_edges():
    rng = np.random.default_rng(0)
    rid = rng.integers(-(1 << 62), 1 << 62, 50)
    a, b = rng.integers(0, 50, 2000), rng.integers(0, 50, 2000)
    d = rng.integers(0, 11, 2000)
    keep = a != b
    a, b, d = a[keep], b[keep], d[keep]
    want = set(zip(*(x.tolist() for x in unique_edges(rid[a], rid[b], d))))
    got = set(zip(*(x.tolist() for x in _unique_row_edges(a, b, d, rid))))
    assert got == want and len(want) < len(a)


def test_block_means_and_information_are_the_plain_definitions():
    t = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    want = t.reshape(3, 8, 8, 8, 8, 3).astype(np.float64).mean(axis=(2, 4)).reshape(3, -1)
    assert np.array_equal(block_means(t), want.astype(np.float32))
    grey = t.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(information(t), grey.reshape(3, -1).std(axis=1), atol=1e-3)


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


# 4-bit bands put ~20 of the 300 rows in every bucket: over max_bucket_rows 4, so each bucket is
# paired on its window, whose order both paths must share (dedup_lsh.window_order).
@pytest.mark.parametrize("overrides", [{}, {"lsh_band_bits": 4, "max_bucket_rows": 4, "bucket_window_rows": 2},
                                       {"band_rows_per_round": 302 * 5 * 10}],  # rounds of 10, 10, 10, 2 bands
                         ids=["default", "over-full-buckets", "rounds-of-10-bands"])
def test_ray_path_equals_local_path(ray_session, overrides):
    import ray

    specs, planted = _planted(300, seed=3)
    specs += [{"key": "x1", "hashes": [5], "content_hash": "same"}, {"key": "x2", "hashes": [5], "content_hash": "same"}]
    t = rows_table(specs)
    views = [[flip(h[0], [i, 20 + i, 40 + i]) for i in range(4)] for h in t.column("hashes").to_pylist()]
    t = t.append_column("crop_hashes", pa.array(views, pa.list_(pa.int64())))  # the crop views' entries too
    local = find_duplicates_local(t, DedupConfig(**overrides))
    ray_cfg = DedupConfig(local_max_rows=0, lsh_shards=8, num_partitions=2, **overrides)
    distributed = find_duplicates(ray.data.from_arrow(t).repartition(4), ray_cfg)
    assert distributed.schema == DROP_SCHEMA
    assert sorted(distributed.to_pylist(), key=str) == sorted(local.to_pylist(), key=str)
    assert by_key(t, local)["x2"] == ("duplicate", "x1")


@pytest.mark.parametrize("bad", [{"max_hamming": 64}, {"lsh_band_bits": 0}, {"lsh_bands": 256}, {"band_rows_per_round": 0}, {"caption_num_perm": 10},
                                 {"verify_max_gain": 0.5}, {"verify_max_crop": 0.5},
                                 {"unverified_max_hamming": 64}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        DedupConfig(**bad)


# --------------------------------------------------------------------------- verification on real images
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(p, np.uint8) for p in load_sample_images().images]


def _jpeg(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _lookalike(photo: np.ndarray, box: tuple[int, int, int, int], digit: np.ndarray, bg=(235, 235, 235)) -> Image.Image:
    """A real photo crop and a real handwritten digit on a plain background, at a fixed layout:
    every look-alike shares the background and the places, only the pictures differ."""
    canvas = Image.new("RGB", (320, 256), bg)
    canvas.paste(Image.fromarray(photo[box[1]:box[3], box[0]:box[2]]).resize((110, 90), Image.BICUBIC), (30, 40))
    d = Image.fromarray((255 - digit * 255 / 16).astype(np.uint8)).resize((70, 70), Image.NEAREST).convert("RGB")
    canvas.paste(d, (200, 120))
    return canvas


def _crop(im: Image.Image, f: tuple[float, float, float, float]) -> Image.Image:
    w, h = im.size
    return im.crop((int(f[0] * w), int(f[1] * h), w - int(f[2] * w), h - int(f[3] * h)))


def _rows(images: dict[str, bytes]) -> pa.Table:
    """Every image through the curate pass (images.process_image) → dedup rows with descriptors."""
    rows = []
    for key, data in images.items():
        r = process_image(data, f"{key}.jpg", ImageConfig())
        rows.append({"row_id": make_sample_id("src", key), "sample_id": make_sample_id("sid", key), "source": "src",
                     "key": key, "caption": key, "content_hash": r["pixel_hash"].hex(), "hashes": [r["phash"]],
                     "crop_hashes": r["crop_hashes"], "thumb": r["thumb"], "area": r["orig_width"] * r["orig_height"]})
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def planted_corpus():
    """12 distinct look-alikes (same background, same layout, different photo crop and digit) and
    copies of four of them: JPEG q30, resized x0.8, cropped 4%/1%/3%/2%, brightened +10%."""
    from sklearn.datasets import load_digits

    photos, digits = _photos(), load_digits().images
    rng = np.random.default_rng(0)
    originals = {}
    for i in range(12):
        p = photos[i % 2]
        x, y = int(rng.integers(0, p.shape[1] - 200)), int(rng.integers(0, p.shape[0] - 160))
        originals[f"a{i:02d}"] = _lookalike(p, (x, y, x + 200, y + 160), digits[i])
    images = {k: _jpeg(v) for k, v in originals.items()}
    o = originals
    copies = {"a00_q30": (_jpeg(o["a00"], 30), "a00"),
              "a01_small": (_jpeg(o["a01"].resize((256, 205), Image.BICUBIC)), "a01"),
              "a02_crop": (_jpeg(_crop(o["a02"], (0.04, 0.01, 0.03, 0.02))), "a02"),
              "a03_bright": (_jpeg(ImageEnhance.Brightness(o["a03"]).enhance(1.1)), "a03")}
    images.update({k: v[0] for k, v in copies.items()})
    return _rows(images), {k: v[1] for k, v in copies.items()}


def test_exactly_the_planted_copies_go(planted_corpus, ray_session):
    import ray

    t, planted = planted_corpus
    local = find_duplicates_local(t, DedupConfig(), with_evidence=True)
    assert local.schema == EVIDENCE_SCHEMA
    assert {k: v[1] for k, v in by_key(t, local).items()} == planted
    assert all(r.startswith("hamming=") and "residual=" in r for r in local.column("evidence").to_pylist())
    distributed = find_duplicates(ray.data.from_arrow(t).repartition(3),
                                  DedupConfig(local_max_rows=0, lsh_shards=8, num_partitions=2))
    assert distributed.schema == DROP_SCHEMA
    assert sorted(distributed.to_pylist(), key=str) == sorted(local.select(DROP_SCHEMA.names).to_pylist(), key=str)


def test_colour_screens_keep_exactly_the_planted_copies(planted_corpus):
    """The optional colour screens (``lsh_layout_cell`` in the band keys, ``verify_layout_screen``
    before alignment; off by default) only remove candidates: the copies still go, the look-alikes
    still stay, whether the rows carry their thumbnails or a ThumbSource supplies them (the Ray
    path's layout: thumbnails stay in the work rows)."""
    from pipelines.dedup_lsh import row_hash64

    t, planted = planted_corpus
    cfg = DedupConfig(max_hamming=12, lsh_layout_cell=32.0, verify_layout_screen=1.5)
    assert {k: v[1] for k, v in by_key(t, find_duplicates_local(t, cfg)).items()} == planted
    thumbs = pa.table({"rid": pa.array(row_hash64(t.column("row_id")), pa.int64()), "thumb": t.column("thumb")})

    def source(rids: pa.Array) -> pa.Table:
        return thumbs.filter(pa.compute.is_in(thumbs.column("rid"), value_set=rids))

    split = find_duplicates_local(t.drop_columns(["thumb"]), cfg, thumbs=source)
    assert {k: v[1] for k, v in by_key(t, split).items()} == planted


def test_lookalikes_are_candidates_that_verification_keeps(planted_corpus):
    t, planted = planted_corpus
    hash_only = by_key(t, find_duplicates_local(t, DedupConfig(verify=False, max_hamming=12, unverified_max_hamming=12)))
    # the pHashes alone take look-alikes for copies; the thumbnails tell them apart
    assert set(hash_only) - set(planted), "the look-alikes should be pHash candidates (test too easy)"
    verified = by_key(t, find_duplicates_local(t, DedupConfig(max_hamming=12)))
    assert {k: v[1] for k, v in verified.items()} == planted


def _descriptor_rows(images: dict[str, Image.Image]) -> pa.Table:
    rows = []
    for key, im in images.items():
        d = compute_descriptors(im.convert("RGB"))
        rows.append({"row_id": make_sample_id("src", key), "sample_id": make_sample_id("sid", key), "source": "src",
                     "key": key, "caption": key, "content_hash": make_sample_id("px", key), "hashes": [d["phash"]],
                     "crop_hashes": d["crop_hashes"], "thumb": d["thumb"], "area": im.size[0] * im.size[1] * 100})
    return pa.Table.from_pylist(rows)


def test_degenerate_images_never_keep_unrelated_images():
    """One colour, a 1-pixel-wide line, a tiny picture: they carry the largest ``area`` so the keeper
    rule would prefer them, and their pHashes sit next to those of plain images with small
    objects; none of them may drop another image, and none is dropped on so little evidence."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    white = Image.new("RGB", (256, 256), (255, 255, 255))
    line = white.copy()
    line.paste((0, 0, 0), (128, 0, 129, 256))
    degenerate = {"one_colour": white, "black": Image.new("RGB", (256, 256), (0, 0, 0)),
                  "one_px_wide": Image.new("RGB", (1, 256), (90, 90, 90)), "line": line,
                  "tiny": Image.fromarray(np.full((2, 2, 3), 250, np.uint8))}
    small_objects = {}
    for i in range(6):  # a real digit, 24 px, on white: a low-information image
        im = white.copy()
        im.paste(Image.fromarray((255 - digits[i] * 255 / 16).astype(np.uint8)).resize((24, 24)).convert("RGB"),
                 (100 + 5 * i, 110))
        small_objects[f"digit{i}"] = im
    t = _descriptor_rows({**degenerate, **small_objects})
    t = t.set_column(t.column_names.index("area"), "area",
                     pa.array([10**9 if k in degenerate else 100 for k in t.column("key").to_pylist()], pa.int64()))
    drops = by_key(t, find_duplicates_local(t, DedupConfig(max_hamming=20, lsh_bands=64, lsh_band_bits=8)))
    assert not any(keeper in degenerate for _, keeper in drops.values()), drops
    assert not drops, drops  # distinct pictures, and no pair has enough evidence to say otherwise


def test_verify_pairs_needs_information_and_agreeing_colours():
    photo = Image.fromarray(_photos()[0]).resize((256, 192))
    a = np.asarray(Image.open(io.BytesIO(compute_descriptors(photo)["thumb"])))
    q30 = Image.open(io.BytesIO(_jpeg(photo, 30))).convert("RGB")
    b = np.asarray(Image.open(io.BytesIO(compute_descriptors(q30)["thumb"])))
    flat = np.full_like(a, 128)
    swapped = a[..., ::-1].copy()  # same shapes, other colours
    ok, residual, info = verify_pairs(np.stack([a, a, a]), np.stack([b, flat, swapped]), DedupConfig())
    assert ok.tolist() == [True, False, False]
    assert residual[0] < residual[2] and info[1] == 0


def test_nearest_per_row_keeps_each_rows_k_nearest():
    from pipelines.dedup_lsh import nearest_per_row

    # row 0 meets 1..6 at distances 6..1; rows 1..6 also form a chain 1-2, 2-3, ... at distance 9
    a = np.r_[np.zeros(6, np.int64), np.arange(1, 6)]
    b = np.r_[np.arange(1, 7), np.arange(2, 7)]
    d = np.r_[np.arange(6, 0, -1), np.full(5, 9)]
    keep = nearest_per_row(a, b, d, 1)
    kept = {(int(x), int(y)) for x, y, k in zip(a, b, keep) if k}
    assert kept == {(0, i) for i in range(1, 7)}  # each row's nearest is 0: the chain goes
    # with two, row i keeps 0 and its neighbour (ties broken by the smaller other id)
    keep = nearest_per_row(a, b, d, 2)
    assert keep.all()
    keep = nearest_per_row(a, b, np.r_[d[:6], 9, 9, 8, 9, 9], 2)  # 3-4 nearer: 2-3 is no end's two nearest
    assert {(int(x), int(y)) for x, y, k in zip(a, b, keep) if not k} == {(2, 3)}
    assert nearest_per_row(a, b, d, 0).all()
    keep = nearest_per_row(a, b, d, 1)
    assert (nearest_per_row(a[::-1], b[::-1], d[::-1], 1) == keep[::-1]).all()  # order-independent


def test_candidate_cap_and_full_buckets_keep_exactly_the_planted_copies(planted_corpus):
    """The per-row cap (``max_candidates_per_row``) and windowed over-full buckets bound the
    candidates; the copies are each row's nearest candidates, so they still go, and only them."""
    t, planted = planted_corpus
    base = DedupConfig(max_hamming=12, max_candidates_per_row=0, max_bucket_rows=1_000_000)
    full, capped, windowed = {}, {}, {}
    assert {k: v[1] for k, v in by_key(t, find_duplicates_local(t, base, stats=full)).items()} == planted
    cfg = dataclasses.replace(base, max_candidates_per_row=1)
    assert {k: v[1] for k, v in by_key(t, find_duplicates_local(t, cfg, stats=capped)).items()} == planted
    assert capped["candidate_edges"] < full["candidate_edges"]  # the cap bites
    assert capped["candidate_edges"] <= 2 * t.num_rows
    cfg = dataclasses.replace(base, max_bucket_rows=2, bucket_window_rows=2)
    assert {k: v[1] for k, v in by_key(t, find_duplicates_local(t, cfg, stats=windowed)).items()} == planted
    assert windowed["candidate_edges"] < full["candidate_edges"]


def test_decode_thumbs_reads_jpeg_and_other_formats_and_skips_broken():
    """JPEG thumbnails decode through libjpeg-turbo exactly as Pillow decodes them; another
    format still decodes (Pillow); a missing, broken or wrongly sized one is invalid, not an error."""
    from pipelines.dedup_verify import THUMB_PX, decode_thumbs

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (THUMB_PX, THUMB_PX, 3), dtype=np.uint8))
    jpg, png, small = io.BytesIO(), io.BytesIO(), io.BytesIO()
    im.save(jpg, "JPEG", quality=90, subsampling=0)
    im.save(png, "PNG")
    im.resize((8, 8)).save(small, "JPEG")
    out, ok = decode_thumbs([jpg.getvalue(), png.getvalue(), None, b"not an image", small.getvalue()])
    assert ok.tolist() == [True, True, False, False, False]
    assert (out[0] == np.asarray(Image.open(io.BytesIO(jpg.getvalue())).convert("RGB"))).all()
    assert (out[1] == np.asarray(im)).all()
    assert not out[2:].any()
