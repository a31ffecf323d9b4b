"""Benchmark: per-core rates of each curate stage, the inputs of docs/COST_MODEL.md.

    .venv/bin/python bench/cost_rates.py --corpus-dir /tmp/mm_bench_images/collage_640 [--n 1000]

Measures, in this process on one core (no Ray, bytes in memory), on the real-content collages of
bench/curate_images.py (run it first: it builds the corpus):

* ``process``: ``images.process_image`` + caption clean per sample (checks, scaled decode, resize,
  JPEG encode, pHash, crop hashes, thumbnail) — what a curate process task does per input;
* ``tokenise``: ``tokenize.encode_captions`` in batches of 1,024 captions (the write pass);
* ``write``: Parquet writes of the output rows (curated JPEG, ids, tokens) to a local file;
* ``dedup``: the dedup stage per row (``dedup.find_duplicates_local`` on the descriptors of the
  same samples) — on a cluster this stage is a shuffle of the LSH band keys, so its bytes per row
  are reported too (``band_key_bytes_per_row``).

Prints JSON: samples (rows) per CPU-second for each, and the bytes per row of the stored columns.
CPU time (``time.process_time``), so a loaded machine inflates it less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.captions import CaptionConfig, process_caption  # noqa: E402
from pipelines.dedup import DedupConfig, find_duplicates_local  # noqa: E402
from pipelines.images import ImageConfig, process_image  # noqa: E402
from pipelines.tokenize import TokenizerConfig, build_tokenizer, encode_captions  # noqa: E402


def load(corpus_dir: Path, n: int) -> list[tuple[str, bytes, bytes]]:
    samples = []
    for shard in sorted(corpus_dir.glob("*.tar")):
        with tarfile.open(shard) as t:
            members = {m.name: t.extractfile(m).read() for m in t if m.isreg()}
        samples += [(k, v, members[k.rsplit(".", 1)[0] + ".txt"]) for k, v in sorted(members.items())
                    if not k.endswith(".txt")]
        if len(samples) >= n:
            break
    return samples[:n]


def timed(fn) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus-dir", default=str(Path(tempfile.gettempdir()) / "mm_bench_images" / "collage_640"))
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    samples = load(Path(args.corpus_dir), args.n)
    if not samples:
        raise SystemExit(f"no tar shards in {args.corpus_dir}: run bench/curate_images.py first")
    icfg, ccfg = ImageConfig(), CaptionConfig()

    def process():
        rows = []
        for name, data, cap in samples:
            text, _ = process_caption(cap, ccfg)
            rows.append((text, process_image(data, name, icfg)))
        return rows

    process_s, rows = timed(process)
    captions = [t for t, _ in rows]
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(iter(captions), TokenizerConfig(), Path(tmp) / "tok")
        tok = str(Path(tmp) / "tok")
        encode_captions(["warm up"], tok, 32)
        tok_s, ids = timed(lambda: [x for i in range(0, len(captions), 1024)
                                    for x in encode_captions(captions[i:i + 1024], tok, 32)])
        table = pa.table({"sample_id": [f"{i:032x}" for i in range(len(rows))], "caption": captions,
                          "image": [r["image"] for _, r in rows], "input_ids": ids,
                          "width": [r["width"] for _, r in rows], "height": [r["height"] for _, r in rows]})
        write_s, _ = timed(lambda: pq.write_table(table, Path(tmp) / "data.parquet"))
        stored = os.path.getsize(Path(tmp) / "data.parquet")
    dedup_rows = pa.table({
        "row_id": [f"{i:032x}" for i in range(len(rows))], "sample_id": [f"{i:032x}" for i in range(len(rows))],
        "content_hash": [f"{i:032x}" for i in range(len(rows))], "caption": captions,
        "hashes": [[r["phash"]] for _, r in rows], "crop_hashes": [r["crop_hashes"] for _, r in rows],
        "thumb": [r["thumb"] for _, r in rows], "area": [r["orig_width"] * r["orig_height"] for _, r in rows],
        "source": ["s"] * len(rows), "key": [str(i) for i in range(len(rows))]})
    cfg = DedupConfig()
    dedup_s, _ = timed(lambda: find_duplicates_local(dedup_rows, cfg))
    n = len(rows)
    views = 1 + len(rows[0][1]["crop_hashes"])
    print(json.dumps({
        "bench": "cost_rates", "samples": n, "load_avg_1m": round(os.getloadavg()[0], 1),
        "per_cpu_second": {"process": round(n / process_s, 1), "tokenise": round(n / tok_s, 1),
                           "write": round(n / write_s, 1), "dedup_local": round(n / dedup_s, 1)},
        "bytes_per_row": {"stored_output": round(stored / n), "input_media": round(sum(len(d) for _, d, _ in samples) / n),
                          "thumb": round(sum(len(r["thumb"]) for _, r in rows) / n)},
        "band_key_bytes_per_row": views * cfg.lsh_bands * (8 + 16),  # (band key int64, row_id 16 B) per band per view
        "lsh_bands": cfg.lsh_bands, "hash_views": views,
    }, indent=2))


if __name__ == "__main__":
    main()
