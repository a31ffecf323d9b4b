"""Benchmark: a refresh's cross-snapshot dedup cost follows the new data, not the corpus.

    .venv/bin/python bench/refresh_cost.py --base 2000,20000 --new 200 [--rows-cache /tmp/dd/rows] \
        [--out bench/results/refresh_cost.json]

Corpus: the collages of bench/dedup_sources.py (two real pictures on a plain background, distinct
by construction) with the descriptors of the curate pass (``dedup_distinct.build_rows``: pHash,
crop views, thumbnail), cached as Parquet (``--rows-cache``). For each base size the base rows are
indexed as ten snapshots (``incremental.write_index``: rows + bands), as a corpus grown by ten
refreshes would be. The new snapshot is the same for every base size (``--new`` rows, 10 % of the
smallest base by default): new distinct collages, 10 % exact copies of base rows (same content
hash) and 5 % near copies (same descriptors, another content hash), written in the layout curate
leaves (data/, the work rows, stats.json).

Measured, median of ``--repeat`` runs on a fresh copy of the new snapshot:
* ``banded``: ``incremental.dedup_against_index`` (band the new rows, join on the stored band
  keys, read the stored rows met, dedup + verify them with the new rows, rewrite data/ and
  stats.json), then ``write_index`` of the new rows (what commit adds);
* ``full``: what a refresh did before the banded index — ``find_duplicates_local`` over every
  index row plus the new rows (the pHash-only index of then: no thumbnails) — and, for reference,
  the same over rows with thumbnails (verification over the whole corpus).
Both run in this process (no Ray: at these sizes both paths are local); wall and CPU seconds
(the CPU seconds are the steadier on a shared machine). Curation of the new shards
and the training budget do not depend on the corpus size and are not part of this benchmark.
Prints JSON; ``--out`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup_distinct import build_rows  # noqa: E402

from pipelines import stats as stats_mod  # noqa: E402
from pipelines.curate import WORK_ROWS_DIR  # noqa: E402
from pipelines.dedup import DedupConfig, find_duplicates_local  # noqa: E402
from pipelines.incremental import INDEX_COLUMNS, VERIFY_COLUMNS, dedup_against_index, write_index  # noqa: E402
from pipelines.schema import make_sample_id  # noqa: E402


def corpus_rows(n: int, seed: int, cache: str | None) -> pa.Table:
    """``n`` collage rows of ``seed`` (the first n of a bigger cached set when there is one)."""
    if cache:
        found = sorted((int(f.split("_")[1]), f) for f in os.listdir(cache) if f.startswith("rows_")
                       and f.endswith(f"_{seed}.parquet") and int(f.split("_")[1]) >= n) if os.path.isdir(cache) else []
        if found:
            return pq.read_table(os.path.join(cache, found[0][1])).slice(0, n)
    t = build_rows(n, seed, via_jpeg=False)
    if cache:
        os.makedirs(cache, exist_ok=True)
        pq.write_table(t, os.path.join(cache, f"rows_{n}_{seed}.parquet"))
    return t


def new_snapshot_rows(base: pa.Table, n_new: int, seed: int) -> tuple[pa.Table, dict]:
    """``n_new`` rows: 10 % exact copies and 5 % near copies of the first base rows, the rest new
    distinct collages (another seed). Returns the rows and the expected drops by reason."""
    n_exact, n_near = n_new // 10, n_new // 20
    fresh = build_rows(n_new - n_exact - n_near, seed + 1000, via_jpeg=False)
    exact = base.slice(0, n_exact)
    near = base.slice(n_exact, n_near)
    near = near.set_column(near.schema.get_field_index("content_hash"), "content_hash",
                           pa.array([make_sample_id("near", c) for c in near.column("content_hash").to_pylist()]))
    rows = pa.concat_tables([t.select(fresh.column_names) for t in (fresh, exact, near)])
    keys = [f"new{i:06d}" for i in range(rows.num_rows)]
    rows = (rows.set_column(rows.schema.get_field_index("row_id"), "row_id",
                            pa.array([make_sample_id("new", k) for k in keys]))
            .set_column(rows.schema.get_field_index("sample_id"), "sample_id",
                        pa.array([make_sample_id("new-sid", k) for k in keys]))
            .set_column(rows.schema.get_field_index("source"), "source", pa.array(["new.tar"] * rows.num_rows))
            .set_column(rows.schema.get_field_index("key"), "key", pa.array(keys)))
    return rows, {"duplicate": n_exact, "near_duplicate": n_near}


def write_curated(root: Path, rows: pa.Table) -> None:
    """``rows`` as a curate output: data/, the work rows (kept: reason null), stats.json."""
    n = rows.num_rows
    side = np.sqrt(rows.column("area").to_numpy()).astype(np.int32)
    extra = {"orig_width": pa.array(side), "orig_height": pa.array(side), "reason": pa.nulls(n, pa.string()),
             "split": pa.array(["train"] * n), "input_ids": pa.array([[2, 7, 3]] * n, pa.list_(pa.int32()))}
    t = rows
    for k, v in extra.items():
        t = t.append_column(k, v)
    (root / "data").mkdir(parents=True)
    (root / "rejects").mkdir()
    (root / WORK_ROWS_DIR).mkdir(parents=True)
    pq.write_table(t.select(["sample_id", "source", "key", "caption", "input_ids", "split"]),
                   root / "data" / "part-0.parquet")
    pq.write_table(t.drop_columns(["split", "input_ids"]), root / WORK_ROWS_DIR / "part-0.parquet")
    st = stats_mod.build_stats(modality="image", inputs=n, kept=n, reject_counts={}, stage_counts={},
                               partials=stats_mod.histogram_partials(t).to_pylist())
    (root / "stats.json").write_text(stats_mod.dumps(st))


def measure(base: pa.Table, new: pa.Table, expected: dict, cfg: DedupConfig, repeat: int, work: Path) -> dict:
    index = work / "_index"
    t0 = time.perf_counter()
    for i, part in enumerate(np.array_split(np.arange(base.num_rows), 10)):
        rows = base.slice(int(part[0]), len(part)).select(INDEX_COLUMNS + VERIFY_COLUMNS)
        write_index(rows, str(index), f"base{i:02d}", cfg)
    build_s = time.perf_counter() - t0
    template = work / "template"
    write_curated(template, new)
    banded, banded_cpu, write_s, counts, stats = [], [], [], None, {}
    for r in range(repeat):
        snap = work / f"snapshot-{r}"
        shutil.copytree(template, snap)
        stats = {}
        t0, c0 = time.perf_counter(), time.process_time()
        counts = dedup_against_index(str(snap), str(index), "new", "image", cfg, stats)
        banded.append(time.perf_counter() - t0)
        banded_cpu.append(time.process_time() - c0)
        kept = pq.read_table(snap / "data").num_rows
        t0 = time.perf_counter()
        write_index(new.slice(0, kept), str(work / "_index_new"), f"new{r}", cfg)  # the commit's share
        write_s.append(time.perf_counter() - t0)
        shutil.rmtree(snap)
    index_mb = sum(f.stat().st_size for f in index.rglob("*.parquet")) / 2**20
    full_rows = pa.concat_tables([
        base.select(INDEX_COLUMNS + VERIFY_COLUMNS).append_column("priority", pa.array(np.zeros(base.num_rows, np.int64))),
        new.select(INDEX_COLUMNS + VERIFY_COLUMNS).append_column("priority", pa.array(np.ones(new.num_rows, np.int64)))])
    full, full_cpu = {}, {}
    for name, table in (("phash_only", full_rows.drop_columns(VERIFY_COLUMNS)), ("verified", full_rows)):
        t0, c0 = time.perf_counter(), time.process_time()
        find_duplicates_local(table, cfg)
        full[name] = round(time.perf_counter() - t0, 3)
        full_cpu[name] = round(time.process_time() - c0, 3)
    return {"base_rows": base.num_rows, "new_rows": new.num_rows, "index_mb": round(index_mb, 1),
            "index_build_s": round(build_s, 2),
            "banded": {"dedup_against_index_s": round(statistics.median(banded), 3),
                       "runs_s": [round(x, 3) for x in banded],
                       "write_index_new_s": round(statistics.median(write_s), 3),
                       "total_s": round(statistics.median(banded) + statistics.median(write_s), 3),
                       "dedup_against_index_cpu_s": round(statistics.median(banded_cpu), 3),
                       "last_run": stats},
            "full_redup_s": full, "full_redup_cpu_s": full_cpu, "dropped": counts, "expected_drops": expected,
            "false_drops": max(0, sum(counts[k] for k in ("duplicate", "near_duplicate")) - sum(expected.values()))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="2000,20000", help="comma-separated base corpus sizes")
    ap.add_argument("--new", type=int, default=None, help="new rows per refresh (default: 10%% of the smallest base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows-cache", default=None, help="directory of cached collage rows (rows_<n>_<seed>.parquet)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = sorted(int(x) for x in args.base.split(",") if x.strip())
    n_new = args.new or sizes[0] // 10
    cfg = DedupConfig()
    t0 = time.time()
    all_rows = corpus_rows(sizes[-1], args.seed, args.rows_cache)
    new, expected = new_snapshot_rows(all_rows, n_new, args.seed)
    print(f"rows ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="mm-refresh-cost-") as work:
            res = measure(all_rows.slice(0, n), new, expected, cfg, args.repeat, Path(work))
        res["load_avg_1m"] = round(os.getloadavg()[0], 1)
        print(json.dumps(res), file=sys.stderr, flush=True)
        results.append(res)
    small, big = results[0], results[-1]
    out = {"bench": "refresh_cost", "new_rows": n_new, "dedup": {"max_hamming": cfg.max_hamming,
                                                                  "lsh_bands": cfg.lsh_bands, "verify": cfg.verify},
           "results": results,
           "banded_cpu_ratio_big_over_small": round(big["banded"]["dedup_against_index_cpu_s"]
                                                    / max(1e-9, small["banded"]["dedup_against_index_cpu_s"]), 2),
           "full_verified_cpu_ratio_big_over_small": round(big["full_redup_cpu_s"]["verified"]
                                                           / max(1e-9, small["full_redup_cpu_s"]["verified"]), 2),
           "cpu_count": os.cpu_count()}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
