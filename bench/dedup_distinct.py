"""Benchmark: false near-duplicate drops at scale, on a corpus distinct by construction.

    .venv/bin/python bench/dedup_distinct.py --sizes 20000,200000 [--rows-cache DIR] [--via-jpeg]
        [--set max_candidates_per_row=8 ...]   # DedupConfig fields over the defaults
        [--plant QUALITY_ROWS.parquet]          # planted copies among the distinct rows

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

``--plant`` mixes in the rows of bench/dedup_quality.py (its ``--rows-cache`` file: 4,488 real
pictures with 3,204 planted copy pairs): recall of planted copies among n distinct look-alikes,
where over-full band buckets and the per-row candidate cap act (the quality set alone is too
sparse for them); scored as in dedup_quality.py, and the false drops counted on the distinct rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup_quality import per_transform_recall, score  # noqa: E402
from dedup_sources import collage_plans, draw_collage, source_objects  # noqa: E402

from core.config import load_config  # noqa: E402
from pipelines.dedup import DedupConfig, find_duplicates_local  # noqa: E402
from pipelines.dedup_verify import compute_descriptors  # noqa: E402
from pipelines.images import ImageConfig, process_image  # noqa: E402
from pipelines.schema import make_sample_id  # noqa: E402

_OBJECTS: list = []  # the source pictures, set before the pool forks (workers inherit them)
_COLUMNS = ("row_id", "sample_id", "source", "key", "caption", "content_hash", "hashes", "crop_hashes", "thumb", "area")


def _rows_of(job: tuple[int, list, bool]) -> dict[str, list]:
    """Draw and describe one chunk of collages: (first index, [(pair, plan)], via_jpeg) → columns."""
    first, plans, via_jpeg = job
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    cfg = ImageConfig()
    for i, (pair, plan) in enumerate(plans, start=first):
        im = draw_collage(_OBJECTS, plan)
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
        cols["caption"].append(f"{_OBJECTS[pair[0]][0]} and {_OBJECTS[pair[1]][0]}")
        cols["content_hash"].append(content)
        cols["hashes"].append([d["phash"]])
        cols["crop_hashes"].append(d["crop_hashes"])
        cols["thumb"].append(d["thumb"])
        cols["area"].append(area)
    return cols


def build_rows(n: int, seed: int, via_jpeg: bool, workers: int = 1) -> pa.Table:
    """The first ``n`` collages of the seed's stream with their descriptors; the random choices
    are drawn in order here and the drawing runs on ``workers`` processes: the same rows."""
    _OBJECTS[:] = source_objects(seed)
    plans = list(collage_plans(_OBJECTS, n, seed))
    chunk = 2000
    jobs = [(s, plans[s:s + chunk], via_jpeg) for s in range(0, n, chunk)]
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for k, part in enumerate(pool.imap(_rows_of, jobs) if pool else map(_rows_of, jobs)):
            for c in _COLUMNS:
                cols[c].extend(part[c])
            if (k + 1) % 10 == 0:
                print(f"built {min(n, (k + 1) * chunk)}/{n}", file=sys.stderr, flush=True)
    return pa.table(cols)


def false_drops(table: pa.Table, cfg: DedupConfig, planted: tuple[pa.Table, dict] | None = None) -> dict:
    """Drops of the distinct rows (all false); with ``planted`` (quality rows, origin by key), the
    table gets them appended and the result also scores the planted copies."""
    n_distinct = table.num_rows
    if planted is not None:
        base = table.select(planted[0].column_names)
        table = pa.concat_tables([base, planted[0].cast(base.schema)])
    stats: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    drops = find_duplicates_local(table, cfg, with_evidence=True, stats=stats)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    distinct_ids = table.column("row_id").slice(0, n_distinct)
    false = drops.filter(pc.is_in(drops.column("row_id"), distinct_ids))
    near = false.filter(pc.equal(false.column("reason"), "near_duplicate"))
    out = {"dropped": false.num_rows, "near_duplicate": near.num_rows,
           "false_drop_rate": round(false.num_rows / n_distinct, 5), **stats, "dedup_s": round(seconds, 2),
           "dedup_cpu_s": round(cpu, 2), "load_avg_1m": round(os.getloadavg()[0], 1),
           "examples": near.slice(0, 5).to_pylist()}
    if planted is not None:
        keys = table.column("key").to_pylist()
        origin = {**{k: -1 - i for i, k in enumerate(keys[:n_distinct])}, **planted[1]}
        # distinct keys carry no "_": score() counts them as rows, never as planted pairs
        quality_drops = drops.filter(pc.invert(pc.is_in(drops.column("row_id"), distinct_ids)))
        out["planted"] = {**score(table, quality_drops, origin),
                          "recall_by_transform": per_transform_recall(table, quality_drops, planted[1])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000", help="comma-separated corpus sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--via-jpeg", action="store_true", help="build rows through images.process_image")
    ap.add_argument("--rows-cache", default=None, help="directory for the built rows (rows_<n>.parquet)")
    ap.add_argument("--skip-phash-only", action="store_true")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes drawing the collages")
    ap.add_argument("--plant", default=None, help="bench/dedup_quality.py rows (--rows-cache file) to mix in")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a DedupConfig field over the defaults (int, float or bool), repeatable")
    args = ap.parse_args()
    results = []
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    tag = f"{args.seed}{'_jpeg' if args.via_jpeg else ''}"
    planted = None
    if args.plant:
        rows = pq.read_table(args.plant)
        info = json.loads(rows.schema.metadata[b"info"])
        planted = (rows.replace_schema_metadata(None), {k: int(v) for k, v in info["origin"].items()})
    for n in sizes:
        path = os.path.join(args.rows_cache, f"rows_{n}_{tag}.parquet") if args.rows_cache else None
        t0 = time.time()
        # the collage stream is sequential: the first n rows of a bigger cached corpus are this one
        bigger = [m for m in sizes if m >= n and args.rows_cache
                  and os.path.exists(os.path.join(args.rows_cache, f"rows_{m}_{tag}.parquet"))]
        if bigger:
            table = pq.read_table(os.path.join(args.rows_cache, f"rows_{min(bigger)}_{tag}.parquet")).slice(0, n)
        else:
            table = build_rows(n, args.seed, args.via_jpeg, args.workers)
            if path:
                os.makedirs(args.rows_cache, exist_ok=True)
                pq.write_table(table, path)
        build_s = time.time() - t0
        default = load_config(DedupConfig, None, args.set)
        res = {"rows": table.num_rows, "build_s": round(build_s, 1), "via_jpeg": args.via_jpeg,
               "default": {"overrides": args.set, "max_hamming": default.max_hamming, "lsh_bands": default.lsh_bands,
                           "verify_max_residual": default.verify_max_residual,
                           **false_drops(table, default, planted)}}
        if not args.skip_phash_only:
            old = dataclasses.replace(default, verify=False, crop_views=False, lsh_bands=24)
            res["phash_only"] = {"max_hamming": 8, "lsh_bands": 24, **false_drops(table, old)}
        res["load_avg_1m"] = round(os.getloadavg()[0], 1)
        print(json.dumps(res), file=sys.stderr, flush=True)
        results.append(res)
    print(json.dumps({"bench": "dedup_distinct", "target_false_drop_rate": 0.005, "results": results}, indent=2))


if __name__ == "__main__":
    main()
