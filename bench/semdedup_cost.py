"""Benchmark: the cost of semantic dedup (pipelines/semdedup.py) per 1k images, at 2k and 20k rows.

    .venv/bin/python bench/semdedup_cost.py --sizes 2000,20000 [--cache DIR] [--out bench/results/semdedup_cost.json]

Images: the distinct-by-construction collages of real pictures of bench/dedup_sources.py (emoji,
digits, faces, photo crops on plain backgrounds, 256 px shorter side), stored as JPEG q90 as the
curate pass stores them. The generator is prefix-stable, so the first 2k rows of the 20k corpus
are the 2k corpus: rows are embedded once, up to the largest size, 32 at a time (the curate
process batch) with ``semdedup.embed_batch`` in this process (one torch thread, as one curate
worker: JPEG decode, resize to 224, MobileNetV2, pooling, float16), and the embeddings are
cached as Parquet (``--cache``). Then, per size, the dedup-pass stage on the first N rows in this
process (``semantic_drops_local``: faiss k-means with the default clusters, the within-cluster
pairs) with the default threshold, and the drop counts at stricter thresholds. Every collage is
distinct, so the drops are look-alikes (same plain background, similar objects), not copies:
they show what a threshold removes from a corpus without copies.

Prints JSON: per size, embed seconds per 1k images (one core), k-means and cluster seconds and
their per-1k share, clusters, the largest cluster, drops per threshold; the load average of the
machine (shared) before and after each measurement.
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


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def embed_rows(n: int, seed: int, cfg: SemanticConfig, cache: Path | None) -> tuple[pa.Table, dict]:
    """``n`` collages → (row_id, sample_id, source, key, area, embedding); the embed time of the
    rows embedded now (cached rows cost nothing and are not timed)."""
    path = cache / f"semdedup_rows_{seed}.parquet" if cache else None
    have = pq.read_table(path) if path and path.exists() else None
    start = have.num_rows if have is not None else 0
    timing = {"embedded_now": 0, "embed_s": 0.0, "load_before": load1()}
    if start < n:
        cols: dict[str, list] = {c: [] for c in ("row_id", "sample_id", "source", "key", "area", EMBEDDING_COLUMN)}
        pending: list = []

        def flush() -> None:
            blobs = []
            for _, im in pending:
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=90)
                blobs.append(buf.getvalue())
            t = pa.table({"image": pa.array(blobs, pa.binary()), "reason": pa.nulls(len(blobs), pa.string())})
            t0 = time.perf_counter()
            out = embed_batch(t, cfg)
            timing["embed_s"] += time.perf_counter() - t0
            cols[EMBEDDING_COLUMN].extend(out.column(EMBEDDING_COLUMN).to_pylist())
            pending.clear()

        for i, (_, im) in enumerate(collages(source_objects(seed), n, seed)):
            if i < start:
                continue
            key = f"{i:07d}"
            cols["row_id"].append(make_sample_id("semdedup", key))
            cols["sample_id"].append(make_sample_id("semdedup-sample", key))
            cols["source"].append("collages")
            cols["key"].append(key)
            cols["area"].append(im.size[0] * im.size[1])
            pending.append((key, im))
            if len(pending) == BATCH:
                flush()
            if (i + 1) % 1000 == 0:
                print(f"embedded {i + 1}/{n} ({timing['embed_s']:.0f} s, load {load1()})", file=sys.stderr)
        if pending:
            flush()
        new = pa.table(cols)
        have = new if have is None else pa.concat_tables([have, new])
        timing["embedded_now"] = new.num_rows
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(have, path)
    timing.update(embed_s=round(timing["embed_s"], 2), load_after=load1())
    return have.slice(0, n), timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="0.95,0.97,0.99", help="the first is timed; the others count drops")
    ap.add_argument("--cache", default="/tmp/mm_semdedup_bench", help="embeddings cache ('' for none)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    thresholds = [float(t) for t in args.thresholds.split(",")]
    cfg = SemanticConfig(enabled=True, threshold=thresholds[0])
    rows, timing = embed_rows(sizes[-1], args.seed, cfg, Path(args.cache) if args.cache else None)
    per_1k_embed = round(timing["embed_s"] / timing["embedded_now"] * 1000, 2) if timing["embedded_now"] else None
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
        results.append({
            "rows": n, "clusters": stats["clusters"], "largest_cluster": stats["largest_cluster"],
            "kmeans_s": stats["kmeans_s"], "clusters_s": stats["clusters_s"], "dedup_s": round(dedup_s, 3),
            "dedup_s_per_1k": round(dedup_s / n * 1000, 3), "embed_s_per_1k": per_1k_embed,
            "total_s_per_1k": round(per_1k_embed + dedup_s / n * 1000, 2) if per_1k_embed else None,
            "dropped_by_threshold": by_threshold,
            "dropped_rate_at_default": round(drops.num_rows / n, 5),
            "examples": drops.slice(0, 3).to_pylist(),
            "load_avg_1m": {"before": load_before, "after": load1()},
        })
    out = {"bench": "semdedup_cost", "model": "torchvision mobilenet_v2 ImageNet (features, GAP, 1280-d)",
           "image_px": cfg.image_px, "torch_threads": 1, "batch_rows": BATCH,
           "embedding": {"rows_embedded": timing["embedded_now"], "embed_s": timing["embed_s"],
                         "embed_s_per_1k": per_1k_embed,
                         "load_avg_1m": {"before": timing["load_before"], "after": timing["load_after"]}},
           "cpu_count": os.cpu_count(), "results": results,
           "command": "python bench/semdedup_cost.py " + " ".join(sys.argv[1:])}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
