"""Benchmark: image curation throughput — `mm curate` on all cores vs the raw loop on one core.

    .venv/bin/python bench/curate_images.py --n 20000 [--data-dir /tmp/bench_images] [--px 640]

Makes N photo-like samples (smooth colour fields, textured noise and shapes, 640x480 by default:
web photos as img2dataset sees them; 80% JPEG q90, 20% PNG) in WebDataset tars of 1,000, then
measures in the same run:

  (a) the raw single-process loop over the same bytes: decode -> resize -> JPEG encode -> pHash
      -> caption clean -> tokenise (the library functions, no Ray, no I/O), on one core;
  (b) ``mm curate`` on all cores (``python -m jobs.curate``: Ray start, read, process, dedup,
      tokenizer training, Parquet writes, stats), wall clock of the command, and the plan time
      that run_curate reports (without Ray start and interpreter start-up);

and prints JSON with samples/s and ratio = (b) / ((a) x cores). Target: ratio >= 0.8 at N=20k.
Peak RSS of the Ray processes (workers + raylet + driver) is sampled with psutil during (b).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("red", "green", "blue", "small", "large", "bright", "dark", "city", "forest", "beach", "street", "dog",
         "cat", "car", "house", "mountain", "river", "people", "sunset", "morning", "old", "new", "photo", "view")


def make_sample(i: int, px: int) -> tuple[str, bytes, bytes]:
    rng = np.random.default_rng(i)
    w, h = px, px * 3 // 4
    small = rng.random((h // 40 + 2, w // 40 + 2, 3)) * 255
    img = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    arr = np.asarray(img, np.float32) + rng.normal(0, 8, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    ext = "png" if i % 5 == 4 else "jpg"
    img.save(buf, "PNG" if ext == "png" else "JPEG", quality=90)
    caption = "a " + " ".join(rng.choice(WORDS, int(rng.integers(4, 12)))) + f" number {i}"
    return ext, buf.getvalue(), caption.encode()


def _shard(args) -> str:
    path, start, count, px = args
    with tarfile.open(path, "w") as t:
        for i in range(start, start + count):
            ext, data, cap = make_sample(i, px)
            for name, blob in ((f"{i:09d}.{ext}", data), (f"{i:09d}.txt", cap)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(blob), 0
                t.addfile(info, io.BytesIO(blob))
    return path


def make_corpus(data_dir: Path, n: int, px: int, per_shard: int = 1000) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / f"corpus_{n}_{px}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    jobs = [(str(data_dir / f"{s:05d}.tar"), s * per_shard, min(per_shard, n - s * per_shard), px)
            for s in range(-(-n // per_shard))]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        shards = list(pool.map(_shard, jobs))
    marker.write_text(json.dumps(shards))
    return shards


def raw_loop(shards: list[str], limit: int, tok_dir: str, image_px: int) -> dict:
    """(a): the per-sample work in one process, bytes already in memory."""
    from pipelines.captions import CaptionConfig, process_caption
    from pipelines.images import ImageConfig, process_image
    from pipelines.tokenize import encode_captions

    samples = []
    for shard in shards:
        with tarfile.open(shard) as t:
            members = {m.name: t.extractfile(m).read() for m in t if m.isreg()}
        for name, data in sorted(members.items()):
            if not name.endswith(".txt"):
                samples.append((name, data, members[name.rsplit(".", 1)[0] + ".txt"]))
        if len(samples) >= limit:
            break
    samples = samples[:limit]
    icfg, ccfg = ImageConfig(image_px=image_px), CaptionConfig()
    encode_captions(["warm up"], tok_dir, 32)
    t0 = time.perf_counter()
    for name, data, cap in samples:
        text, _ = process_caption(cap, ccfg)
        process_image(data, name, icfg)
        encode_captions([text], tok_dir, 32)
    dt = time.perf_counter() - t0
    return {"samples": len(samples), "seconds": round(dt, 2), "samples_per_s": round(len(samples) / dt, 1)}


class RssSampler(threading.Thread):
    """Peak summed RSS of the command and its descendants (driver, GCS, raylet, Ray workers)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, False

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop:
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.5)


def run_curate_cmd(shards: list[str], out: Path, image_px: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobs.curate", *shards, "--out", str(out), "--set", f"images.image_px={image_px}",
           *extra]
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop = True
    if proc.returncode != 0:
        raise SystemExit(f"mm curate failed ({proc.returncode}):\n{stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    return {"wall_s": round(wall, 2), "plan_s": stats["seconds"]["total"], "stage_s": stats["seconds"],
            "inputs": stats["inputs"], "kept": stats["kept"], "rejected": stats["rejected"],
            "peak_rss_mb": round(sampler.peak / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--px", type=int, default=640)
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--raw-n", type=int, default=1000, help="samples for the single-core loop")
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "mm_bench_images"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    t0 = time.time()
    shards = make_corpus(Path(args.data_dir), args.n, args.px)
    gen_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        b = run_curate_cmd(shards, out, args.image_px, [x for o in args.overrides for x in ("--set", o)])
        a = raw_loop(shards, args.raw_n, str(out / "tokenizer"), args.image_px)
    b_rate = args.n / b["wall_s"]
    b_plan_rate = args.n / b["plan_s"]
    result = {
        "bench": "curate_images", "n": args.n, "source_px": [args.px, args.px * 3 // 4], "image_px": args.image_px,
        "cores": cores, "load_avg_1m": round(os.getloadavg()[0], 1), "generate_s": round(gen_s, 1),
        "raw_loop_1core": a,
        "mm_curate": {**b, "samples_per_s": round(b_rate, 1), "plan_samples_per_s": round(b_plan_rate, 1)},
        "ratio": round(b_rate / (a["samples_per_s"] * cores), 3),
        "ratio_plan_only": round(b_plan_rate / (a["samples_per_s"] * cores), 3),
        "target_ratio": 0.8,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
