"""Benchmark: the cost of semantic dedup (pipelines/semdedup.py) per 1k images, at 2k and 20k rows.

    .venv/bin/python bench/semdedup_cost.py --sizes 2000,20000 [--cache DIR] [--out bench/results/semdedup_cost.json]

Images: the distinct-by-construction collages of real pictures of bench/dedup_sources.py (emoji,
digits, faces, photo crops on plain backgrounds, 256 px shorter side), stored as JPEG q90 as the
curate pass stores them. The generator is prefix-stable, so the first 2k rows of the 20k corpus
are the 2k corpus: rows are embedded once, up to the largest size, 32 at a time (the curate
process batch) with ``semdedup.embed_batch`` in this process (one torch thread, as one curate
worker: JPEG decode, resize to 224, MobileNetV2, pooling, float16), each row keeping its share of
its batch's seconds, in resumable Parquet parts (``--cache``). Then, per size, the dedup-pass
stage on the first N rows in this process (``semantic_drops_local``: faiss k-means with the
default clusters, the within-cluster pairs) with the default threshold, and the drop counts at stricter thresholds. Every collage is
distinct, so the drops are look-alikes (same plain background, similar objects), not copies:
they show what a threshold removes from a corpus without copies.

Prints JSON: per size, embed seconds per 1k images (one core), k-means and cluster seconds and
their per-1k share, clusters, the largest cluster, drops per threshold; the load average of the
machine (shared by other jobs: seconds are wall time of one process) while embedding and around
the dedup stage.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup_sources import collages, source_objects  # noqa: E402

from pipelines.dedup import SemanticConfig  # noqa: E402
from pipelines.schema import make_sample_id  # noqa: E402
from pipelines.semdedup import EMBEDDING_COLUMN, embed_batch, semantic_drops_local  # noqa: E402

BATCH = 32  # images per curate process batch (execution.batch_rows)
PART = 500  # rows per cache file


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def embed_rows(n: int, seed: int, cfg: SemanticConfig, cache: Path) -> pa.Table:
    """The first ``n`` collages → (row_id, sample_id, source, key, area, embedding, embed_s,
    load1): ``embed_s`` is each row's share of its batch's ``embed_batch`` seconds, ``load1`` the
    load average when its part was written. Parts of PART rows are cached under ``cache``, so
    an interrupted run resumes and a larger size reuses the smaller one's rows."""
    cache.mkdir(parents=True, exist_ok=True)
    parts = sorted(cache.glob(f"seed{seed}-part-*.parquet"))
    have = sum(pq.read_metadata(p).num_rows for p in parts)
    cols: dict[str, list] = {}
    pending: list = []

    def reset() -> None:
        cols.clear()
        cols.update({c: [] for c in ("row_id", "sample_id", "source", "key", "area", EMBEDDING_COLUMN, "embed_s")})

    def flush() -> None:
        blobs = []
        for im in pending:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        t = pa.table({"image": pa.array(blobs, pa.binary()), "reason": pa.nulls(len(blobs), pa.string())})
        t0 = time.perf_counter()
        out = embed_batch(t, cfg)
        dt = time.perf_counter() - t0
        cols[EMBEDDING_COLUMN].extend(out.column(EMBEDDING_COLUMN).to_pylist())
        cols["embed_s"].extend([dt / len(blobs)] * len(blobs))
        pending.clear()

    reset()
    if have < n:
        for i, (_, im) in enumerate(collages(source_objects(seed), n, seed)):
            if i < have:
                continue
            key = f"{i:07d}"
            cols["row_id"].append(make_sample_id("semdedup", key))
            cols["sample_id"].append(make_sample_id("semdedup-sample", key))
            cols["source"].append("collages")
            cols["key"].append(key)
            cols["area"].append(im.size[0] * im.size[1])
            pending.append(im)
            if len(pending) == BATCH or i + 1 == n or (i + 1) % PART == 0:
                flush()
            if (i + 1) % PART == 0 or i + 1 == n:
                t = pa.table(cols).append_column("load1", pa.array([load1()] * len(cols["row_id"]), pa.float64()))
                pq.write_table(t, cache / f"seed{seed}-part-{i + 1:08d}.parquet")
                print(f"embedded {i + 1}/{n} ({sum(cols['embed_s']):.0f} s this part, load {load1()})",
                      file=sys.stderr)
                reset()
    parts = sorted(cache.glob(f"seed{seed}-part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).slice(0, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="0.95,0.97,0.99", help="the first is timed; the others count drops")
    ap.add_argument("--cache", default="/tmp/mm_semdedup_bench", help="embeddings cache (resumable)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    thresholds = [float(t) for t in args.thresholds.split(",")]
    cfg = SemanticConfig(enabled=True, threshold=thresholds[0])
    rows = embed_rows(sizes[-1], args.seed, cfg, Path(args.cache))
    results = []
    for n in sizes:
        table = rows.slice(0, n)
        load_before = load1()
        stats: dict = {}
        t0 = time.perf_counter()
        drops = semantic_drops_local(table, cfg, stats)
        dedup_s = time.perf_counter() - t0
        by_threshold = {f"{thresholds[0]:g}": drops.num_rows}
        for th in thresholds[1:]:
            by_threshold[f"{th:g}"] = semantic_drops_local(table, SemanticConfig(enabled=True, threshold=th)).num_rows
        embed_s = sum(table.column("embed_s").to_pylist())
        loads = table.column("load1").to_pylist()
        results.append({
            "rows": n, "embed_s": round(embed_s, 1), "embed_s_per_1k": round(embed_s / n * 1000, 2),
            "clusters": stats["clusters"], "largest_cluster": stats["largest_cluster"],
            "kmeans_s": stats["kmeans_s"], "clusters_s": stats["clusters_s"], "dedup_s": round(dedup_s, 3),
            "dedup_s_per_1k": round(dedup_s / n * 1000, 3),
            "total_s_per_1k": round((embed_s + dedup_s) / n * 1000, 2),
            "dropped_by_threshold": by_threshold,
            "dropped_rate_at_default": round(drops.num_rows / n, 5),
            "examples": drops.slice(0, 3).to_pylist(),
            "load_avg_1m": {"while_embedding_min": min(loads), "while_embedding_max": max(loads),
                            "dedup_before": load_before, "dedup_after": load1()},
        })
    out = {"bench": "semdedup_cost", "model": "torchvision mobilenet_v2 ImageNet (features, GAP, 1280-d)",
           "image_px": cfg.image_px, "torch_threads": 1, "batch_rows": BATCH, "threshold": cfg.threshold,
           "cpu_count": os.cpu_count(), "results": results,
           "command": "python bench/semdedup_cost.py " + " ".join(sys.argv[1:])}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
