"""Benchmark: near-duplicate quality on real photos, and dedup scaling (10k -> 100k -> 1M hashes).

    .venv/bin/python bench/dedup_quality.py [--emoji 1000] [--scale 10000,100000,1000000]

Quality. Distinct images: 2x2 tiles of the real photos shipped by scikit-learn
(``load_sample_images``) and scikit-image (``skimage.data``: astronaut, coffee, chelsea, rocket,
...), the 200 LFW faces bundled with scikit-image (enlarged to 100 px), and Noto colour emoji
(Debian ``fonts-noto-color-emoji``) — faces and emoji are deliberately hard negatives: many
look alike at low frequencies. Planted copies of every photo tile, face and every 4th emoji:
JPEG re-encode at quality 30, resize x0.8 and x1.2, crop of up to 5% per side, brightness
+-10%, and one combination. Every image goes through ``images.process_image`` (the curate
defaults), then ``dedup.find_duplicates_local`` with the default config; pairs are scored:
  recall    = planted (copy, original) pairs that end with the same keeper / planted pairs
  precision = predicted same-keeper pairs whose members share an origin / predicted pairs
  removal_recall = redundant rows removed (per origin: all but one) / redundant rows
  drop_precision = dropped rows whose keeper shares their origin / dropped rows
Rows carry the descriptors of the curate pass (``crop_hashes``, ``thumb``), so the default
config verifies every candidate; ``phash_only`` is the configuration before verification (pHash
LSH within 8 bits decides alone). Targets: pair recall >= 0.95 (crops >= 0.9) at drop precision
>= 0.99. A sweep over ``max_hamming`` and ``verify_max_residual`` shows the trade-off.

Scaling. Random 64-bit hashes plus 5% planted copies 1-6 bits away, deduplicated by the same
shard functions in one process (``--scale-mode local``, the algorithm's cost) or through the Ray
Data path (``--scale-mode ray``: band rows grouped with groupby + map_groups on a local Ray);
prints seconds per size and the ratio time(10n)/time(n) (target <= 12).
``--skip-quality`` runs the scaling part only.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup_sources import emoji, faces, real_photos  # noqa: E402

from core.config import load_config  # noqa: E402
from pipelines.dedup import DedupConfig, find_duplicates, find_duplicates_local  # noqa: E402
from pipelines.images import ImageConfig, ImageReject, process_image  # noqa: E402
from pipelines.schema import make_sample_id  # noqa: E402


def tiles(arr: np.ndarray) -> list[np.ndarray]:
    h, w = arr.shape[:2]
    return [arr[y * h // 2:(y + 1) * h // 2, x * w // 2:(x + 1) * w // 2] for y in range(2) for x in range(2)]


def jpeg(im: Image.Image, q: int = 92) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def variants(arr: np.ndarray, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    im = Image.fromarray(arr)
    w, h = im.size

    def crop(x: Image.Image) -> Image.Image:
        cw, ch = x.size
        f = rng.uniform(0.0, 0.05, 4)
        return x.crop((int(f[0] * cw), int(f[1] * ch), cw - int(f[2] * cw), ch - int(f[3] * ch)))

    def bright(x: Image.Image) -> Image.Image:
        return ImageEnhance.Brightness(x).enhance(float(rng.choice([0.9, 1.1])))

    return [
        ("jpeg_q30", jpeg(im, 30)),
        ("resize_0.8", jpeg(im.resize((round(w * 0.8), round(h * 0.8)), Image.BICUBIC))),
        ("resize_1.2", jpeg(im.resize((round(w * 1.2), round(h * 1.2)), Image.BICUBIC))),
        ("crop_5pct", jpeg(crop(im))),
        ("brightness_10pct", jpeg(bright(im))),
        ("combo", jpeg(bright(crop(im.resize((round(w * 0.85), round(h * 0.85)), Image.BICUBIC))), 50)),
    ]


def build_rows(seed: int, n_emoji: int) -> tuple[pa.Table, dict]:
    rng = np.random.default_rng(seed)
    cfg = ImageConfig()
    bases = [("photo", t) for p in real_photos() for t in tiles(p)] + [("face", f) for f in faces()] \
        + [("emoji", e) for e in emoji(n_emoji)]
    rows, origin, kinds = [], {}, {}
    for b, (kind, arr) in enumerate(bases):
        items = [("original", jpeg(Image.fromarray(arr)))]
        if kind != "emoji" or b % 4 == 0:
            items += variants(arr, rng)
        for v, data in items:
            try:
                r = process_image(data, "x.jpg", cfg)
            except ImageReject:
                continue
            key = f"{kind}{b:05d}_{v}"
            rows.append({"row_id": make_sample_id("bench", key), "sample_id": make_sample_id("sid", key),
                         "source": "bench", "key": key, "caption": key,
                         "content_hash": r["pixel_hash"].hex(), "hashes": [r["phash"]],
                         "crop_hashes": r["crop_hashes"], "thumb": r["thumb"],
                         "area": r["orig_width"] * r["orig_height"]})
            origin[key], kinds[key] = b, kind
    return pa.Table.from_pylist(rows), {"origin": origin, "kinds": kinds, "bases": len(bases)}


def score(table: pa.Table, drops: pa.Table, origin: dict) -> dict:
    sid_key = dict(zip(table.column("sample_id").to_pylist(), table.column("key").to_pylist()))
    id_key = dict(zip(table.column("row_id").to_pylist(), table.column("key").to_pylist()))
    comps: dict[str, set] = {}
    for rid, keeper in zip(drops.column("row_id").to_pylist(), drops.column("keeper").to_pylist()):
        comps.setdefault(sid_key[keeper], {sid_key[keeper]}).add(id_key[rid])
    comp_of = {k: c for c, members in comps.items() for k in members}
    pred = {tuple(sorted(p)) for members in comps.values() for p in combinations(members, 2)}
    true_pred = sum(origin[a] == origin[b] for a, b in pred)
    planted = [(k, f"{k.split('_', 1)[0]}_original") for k in origin if not k.endswith("_original")]
    planted = [(c, o) for c, o in planted if o in origin]
    found = sum(comp_of.get(c) is not None and comp_of.get(c) == comp_of.get(o) for c, o in planted)
    pairs = list(zip(drops.column("row_id").to_pylist(), drops.column("keeper").to_pylist()))
    drops_ok = sum(origin[id_key[r]] == origin[sid_key[k]] for r, k in pairs)
    group: dict[int, int] = {}
    for k in origin:
        group[origin[k]] = group.get(origin[k], 0) + 1
    removed: dict[int, int] = {}
    false_by_kind: dict[str, int] = {}
    for r, k in pairs:
        if origin[id_key[r]] == origin[sid_key[k]]:
            removed[origin[id_key[r]]] = removed.get(origin[id_key[r]], 0) + 1
        else:
            kind = id_key[r].split("_", 1)[0].rstrip("0123456789")
            false_by_kind[kind] = false_by_kind.get(kind, 0) + 1
    redundant = sum(n - 1 for n in group.values())
    removal = sum(min(removed.get(g, 0), n - 1) for g, n in group.items())
    return {"planted_pairs": len(planted), "found": found, "recall": round(found / max(1, len(planted)), 4),
            "predicted_pairs": len(pred), "true_predicted_pairs": true_pred,
            "precision": round(true_pred / max(1, len(pred)), 4),
            "dropped": drops.num_rows, "dropped_with_true_keeper": drops_ok,
            "drop_precision": round(drops_ok / max(1, drops.num_rows), 4),
            "redundant_copies": redundant, "removal_recall": round(removal / max(1, redundant), 4),
            "false_drops_by_kind": false_by_kind}


def per_transform_recall(table: pa.Table, drops: pa.Table, origin: dict) -> dict:
    """Recall of each planted transform separately."""
    sid_key = dict(zip(table.column("sample_id").to_pylist(), table.column("key").to_pylist()))
    id_key = dict(zip(table.column("row_id").to_pylist(), table.column("key").to_pylist()))
    comp = {id_key[r]: sid_key[k] for r, k in zip(drops.column("row_id").to_pylist(), drops.column("keeper").to_pylist())}
    out: dict[str, list[int]] = {}
    for key in origin:
        base, v = key.split("_", 1)
        orig = f"{base}_original"
        if v == "original" or orig not in origin:
            continue
        s = out.setdefault(v, [0, 0])
        s[0] += comp.get(key, key) == comp.get(orig, orig)
        s[1] += 1
    return {k: round(a / b, 4) for k, (a, b) in sorted(out.items())}


def scaling(sizes: list[int], seed: int, mode: str, bands: int | None = None, band_bits: int | None = None) -> list[dict]:
    """Dedup time for random hashes + 5% planted copies; ``mode`` "local" runs the shard
    functions in this process (the algorithm's cost), "ray" the Ray Data groupby path."""
    if mode == "ray":
        import ray

        from core.runtime import init_ray

        init_ray(None)
    results = []
    cfg = DedupConfig(local_max_rows=0)
    if bands or band_bits:
        cfg = DedupConfig(local_max_rows=0, lsh_bands=bands or cfg.lsh_bands, lsh_band_bits=band_bits or cfg.lsh_band_bits)
    for n in sizes:
        rng = np.random.default_rng(seed)
        base = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
        n_copy = n // 20
        idx = rng.integers(0, n, n_copy)
        flips = np.zeros(n_copy, np.uint64)
        for j in range(n_copy):
            for b in rng.choice(64, int(rng.integers(1, 7)), replace=False):
                flips[j] |= np.uint64(1) << np.uint64(int(b))
        copies = (base[idx].view(np.uint64) ^ flips).view(np.int64)
        hashes = np.concatenate([base, copies])
        keys = [f"{i:09d}" for i in range(len(hashes))]
        ids = [make_sample_id("scale", k) for k in keys]
        t = pa.table({"row_id": ids, "sample_id": ids, "source": ["s"] * len(ids), "key": keys,
                      "caption": [""] * len(ids), "content_hash": ids,
                      "hashes": pa.array(hashes.reshape(-1, 1).tolist(), pa.list_(pa.int64())),
                      "area": pa.array(np.full(len(ids), 100), pa.int64())})
        if mode == "ray":
            ds = ray.data.from_arrow(t).repartition(max(2, len(ids) // 50_000)).materialize()
            t0 = time.perf_counter()
            drops = find_duplicates(ds, cfg)
        else:
            t0 = time.perf_counter()
            drops = find_duplicates_local(t, cfg)
        dt = time.perf_counter() - t0
        results.append({"mode": mode, "lsh_bands": cfg.lsh_bands, "lsh_band_bits": cfg.lsh_band_bits, "hashes": len(ids), "seconds": round(dt, 2), "dropped": drops.num_rows,
                        "planted_copies": int(n_copy), "load_avg_1m": round(os.getloadavg()[0], 1)})
        print(json.dumps(results[-1]), file=sys.stderr)
    for prev, cur in zip(results, results[1:]):
        cur["time_ratio_vs_prev"] = round(cur["seconds"] / prev["seconds"], 2)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--emoji", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", default="10000,100000,1000000", help="comma-separated sizes; empty to skip")
    ap.add_argument("--scale-mode", choices=("local", "ray"), default="local")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--rows-cache", default=None, help="parquet file: reuse the processed rows (built if absent)")
    ap.add_argument("--lsh-bands", type=int, default=None, help="scaling only: override dedup.lsh_bands")
    ap.add_argument("--lsh-band-bits", type=int, default=None, help="scaling only: override dedup.lsh_band_bits")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="quality: a DedupConfig field over the defaults, repeatable")
    args = ap.parse_args()
    sizes = [int(x) for x in args.scale.split(",") if x.strip()]
    if args.skip_quality:
        print(json.dumps({"bench": "dedup_scaling", "scaling": scaling(sizes, args.seed, args.scale_mode,
                                                                       args.lsh_bands, args.lsh_band_bits)}, indent=2))
        return
    t0 = time.time()
    if args.rows_cache and os.path.exists(args.rows_cache):
        import pyarrow.parquet as pq

        table = pq.read_table(args.rows_cache)
        info = json.loads(table.schema.metadata[b"info"])
        info["origin"] = {k: int(v) for k, v in info["origin"].items()}
    else:
        table, info = build_rows(args.seed, args.emoji)
        if args.rows_cache:
            import pyarrow.parquet as pq

            pq.write_table(table.replace_schema_metadata({"info": json.dumps(info)}), args.rows_cache)
    kinds = info["kinds"]
    build_s = time.time() - t0
    default = load_config(DedupConfig, None, args.set)
    t1 = time.time()
    drops = find_duplicates_local(table, default)
    dedup_s = time.time() - t1
    result = {"bench": "dedup_quality", "images": table.num_rows, "distinct_bases": info["bases"],
              "by_kind": {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))},
              "build_s": round(build_s, 1), "dedup_s": round(dedup_s, 2),
              "default": {"overrides": args.set, "max_hamming": default.max_hamming, "lsh_bands": default.lsh_bands,
                          "verify_max_residual": default.verify_max_residual, **score(table, drops, info["origin"])},
              "recall_by_transform": per_transform_recall(table, drops, info["origin"])}
    # before verification (issue 20): pHash LSH within 8 bits decides alone, no crop views
    old = DedupConfig(verify=False, crop_views=False, lsh_bands=24)
    d = find_duplicates_local(table, old)
    result["phash_only"] = {"max_hamming": 8, "lsh_bands": 24, **score(table, d, info["origin"]),
                            "recall_by_transform": per_transform_recall(table, d, info["origin"])}
    result["sweep"] = []
    for mh, res in ((8, 16.0), (8, 20.0), (8, 24.0), (10, 22.0), (12, 22.0)):
        d = find_duplicates_local(table, dataclasses.replace(default, max_hamming=mh, verify_max_residual=res))
        result["sweep"].append({"max_hamming": mh, "verify_max_residual": res, **score(table, d, info["origin"]),
                                "recall_by_transform": per_transform_recall(table, d, info["origin"])})
    result["targets"] = {"recall": 0.95, "drop_precision": 0.99, "crop_recall": 0.9}
    if sizes:
        result["scaling"] = scaling(sizes, args.seed, args.scale_mode, args.lsh_bands, args.lsh_band_bits)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
