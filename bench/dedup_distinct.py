"""Benchmark: false near-duplicate drops at scale, on a corpus distinct by construction.

    .venv/bin/python bench/dedup_distinct.py --sizes 20000,200000 [--rows-cache DIR] [--via-jpeg]
        [--set max_candidates_per_row=8 ...]   # DedupConfig fields over the defaults

Corpus: collages of two real pictures (Noto emoji, scikit-learn digits, LFW patches, random crops
of the scikit-learn / scikit-image photos) on a plain background at random scale and place, no
pair of sources used twice (bench/dedup_sources.py). Every collage is distinct, so every
``near_duplicate`` drop is a false drop; ``duplicate`` (same decoded pixels) cannot occur.

Each collage gets the dedup descriptors of the curate pass (``dedup_verify.compute_descriptors``
on the curated pixels: pHash, crop views, thumbnail); ``--via-jpeg`` encodes it as JPEG q90 and
runs the whole ``images.process_image`` instead (the same descriptors, slower to build). Rows
are cached as Parquet per size (``--rows-cache``). Then the dedup stage runs on the rows in this
process (``find_duplicates_local``: the algorithm's cost, no Ray) with the default config, and
with the configuration before verification (``phash_only``: pHash LSH within 8 bits decides
alone) for comparison. Prints JSON: per size, rows, false drops and rate, candidate edges,
seconds. Target: <= 0.5% dropped at 200k.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup_sources import collages, source_objects  # noqa: E402

from core.config import load_config  # noqa: E402
from pipelines.dedup import DedupConfig, find_duplicates_local  # noqa: E402
from pipelines.dedup_verify import compute_descriptors  # noqa: E402
from pipelines.images import ImageConfig, process_image  # noqa: E402
from pipelines.schema import make_sample_id  # noqa: E402


def build_rows(n: int, seed: int, via_jpeg: bool) -> pa.Table:
    objects = source_objects(seed)
    cols: dict[str, list] = {c: [] for c in ("row_id", "sample_id", "source", "key", "caption", "content_hash",
                                             "hashes", "crop_hashes", "thumb", "area")}
    cfg = ImageConfig()
    for i, (pair, im) in enumerate(collages(objects, n, seed)):
        key = f"{i:07d}"
        if via_jpeg:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            r = process_image(buf.getvalue(), f"{key}.jpg", cfg)
            d, content, area = r, r["pixel_hash"].hex(), r["orig_width"] * r["orig_height"]
        else:
            d, content, area = compute_descriptors(im), make_sample_id("px", im.tobytes()), im.size[0] * im.size[1]
        cols["row_id"].append(make_sample_id("distinct", key))
        cols["sample_id"].append(make_sample_id("sid", key))
        cols["source"].append("distinct")
        cols["key"].append(key)
        cols["caption"].append(f"{objects[pair[0]][0]} and {objects[pair[1]][0]}")
        cols["content_hash"].append(content)
        cols["hashes"].append([d["phash"]])
        cols["crop_hashes"].append(d["crop_hashes"])
        cols["thumb"].append(d["thumb"])
        cols["area"].append(area)
        if (i + 1) % 20000 == 0:
            print(f"built {i + 1}/{n}", file=sys.stderr, flush=True)
    return pa.table(cols)


def false_drops(table: pa.Table, cfg: DedupConfig) -> dict:
    stats: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    drops = find_duplicates_local(table, cfg, with_evidence=True, stats=stats)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    near = drops.filter(pc.equal(drops.column("reason"), "near_duplicate"))
    return {"dropped": drops.num_rows, "near_duplicate": near.num_rows,
            "false_drop_rate": round(drops.num_rows / table.num_rows, 5), **stats, "dedup_s": round(seconds, 2),
            "dedup_cpu_s": round(cpu, 2), "load_avg_1m": round(os.getloadavg()[0], 1),
            "examples": near.slice(0, 5).to_pylist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000", help="comma-separated corpus sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--via-jpeg", action="store_true", help="build rows through images.process_image")
    ap.add_argument("--rows-cache", default=None, help="directory for the built rows (rows_<n>.parquet)")
    ap.add_argument("--skip-phash-only", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a DedupConfig field over the defaults (int, float or bool), repeatable")
    args = ap.parse_args()
    results = []
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    tag = f"{args.seed}{'_jpeg' if args.via_jpeg else ''}"
    for n in sizes:
        path = os.path.join(args.rows_cache, f"rows_{n}_{tag}.parquet") if args.rows_cache else None
        t0 = time.time()
        # the collage stream is sequential: the first n rows of a bigger cached corpus are this one
        bigger = [m for m in sizes if m >= n and args.rows_cache
                  and os.path.exists(os.path.join(args.rows_cache, f"rows_{m}_{tag}.parquet"))]
        if bigger:
            table = pq.read_table(os.path.join(args.rows_cache, f"rows_{min(bigger)}_{tag}.parquet")).slice(0, n)
        else:
            table = build_rows(n, args.seed, args.via_jpeg)
            if path:
                os.makedirs(args.rows_cache, exist_ok=True)
                pq.write_table(table, path)
        build_s = time.time() - t0
        default = load_config(DedupConfig, None, args.set)
        res = {"rows": table.num_rows, "build_s": round(build_s, 1), "via_jpeg": args.via_jpeg,
               "default": {"overrides": args.set, "max_hamming": default.max_hamming, "lsh_bands": default.lsh_bands,
                           "verify_max_residual": default.verify_max_residual, **false_drops(table, default)}}
        if not args.skip_phash_only:
            old = dataclasses.replace(default, verify=False, crop_views=False, lsh_bands=24)
            res["phash_only"] = {"max_hamming": 8, "lsh_bands": 24, **false_drops(table, old)}
        res["load_avg_1m"] = round(os.getloadavg()[0], 1)
        print(json.dumps(res), file=sys.stderr, flush=True)
        results.append(res)
    print(json.dumps({"bench": "dedup_distinct", "target_false_drop_rate": 0.005, "results": results}, indent=2))


if __name__ == "__main__":
    main()
