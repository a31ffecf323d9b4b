"""Benchmark: image curation throughput — `mm curate` on all cores vs the raw loop on one core.

    .venv/bin/python bench/curate_images.py --n 20000 [--data-dir /tmp/bench_images] [--px 640]

Makes N real-content samples in WebDataset tars of 1,000 (``--content collage``, the default:
collages of two real pictures, emoji, digits, LFW faces, sklearn/skimage photo crops, from
bench/dedup_sources.py, on a plain background, shorter side 480 px; ``--content synthetic``: the
older smooth colour fields with noise and shapes, 640x480), 80% JPEG q90 and 20% PNG, then
measures in the same run, for each size in ``--sizes``:

  (a) the raw single-process loop over the same bytes on one core: ``plain`` = Pillow decode ->
      resize -> JPEG encode -> pHash (the target's reference), and ``library`` = our per-sample
      functions (checks, scaled decode, descriptors, caption clean, tokenise), no Ray, no I/O;
  (b) ``mm curate`` on all cores (``python -m jobs.curate``: Ray start, read, process, dedup,
      tokenizer training, Parquet writes, stats), wall clock of the command, and the plan time
      that run_curate reports (without Ray start and interpreter start-up);

and prints JSON with samples/s and ratio = (b) / ((a plain) x cores). Target: ratio >= 0.8 at N=20k.
Peak PSS (proportional set size: shared pages counted once, unlike RSS) summed over the command's
whole process tree (driver, GCS, raylet, Ray workers: all descendants of the command) is sampled
with psutil every 0.5 s during (b); ``pss_growth`` compares consecutive sizes (targets: 20k <= 1.25
x 2k, 200k <= 1.2 x 20k).

    .venv/bin/python bench/curate_images.py --sizes 2000,20000 --raw-n 1000
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


_OBJECTS: list | None = None


def collage_samples(start: int, count: int, px: int):
    """``count`` collages (shard seed = ``start``): no pair of sources twice within a shard; a pair
    repeated across shards is still a different picture (scale, place, background)."""
    global _OBJECTS
    from bench.dedup_sources import collages, source_objects

    if _OBJECTS is None:
        _OBJECTS = source_objects(seed=0)
    for k, ((a, b), im) in enumerate(collages(_OBJECTS, count, seed=start, short_px=px * 3 // 4)):
        i = start + k
        buf = io.BytesIO()
        ext = "png" if i % 5 == 4 else "jpg"
        im.save(buf, "PNG" if ext == "png" else "JPEG", quality=90)
        caption = f"a collage of {_OBJECTS[a][0]} {a} and {_OBJECTS[b][0]} {b}, number {i}"
        yield ext, buf.getvalue(), caption.encode()


def _shard(args) -> str:
    path, start, count, px, content = args
    samples = (collage_samples(start, count, px) if content == "collage"
               else (make_sample(i, px) for i in range(start, start + count)))
    with tarfile.open(path, "w") as t:
        for i, (ext, data, cap) in zip(range(start, start + count), samples):
            for name, blob in ((f"{i:09d}.{ext}", data), (f"{i:09d}.txt", cap)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(blob), 0
                t.addfile(info, io.BytesIO(blob))
    return path


def make_corpus(data_dir: Path, n: int, px: int, content: str = "collage", per_shard: int = 1000) -> list[str]:
    """Shards for the first ``n`` samples; a larger size reuses the smaller one's shards."""
    data_dir = data_dir / f"{content}_{px}"
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / f"corpus_{n}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    jobs = [(str(data_dir / f"{s:05d}.tar"), s * per_shard, min(per_shard, n - s * per_shard), px, content)
            for s in range(-(-n // per_shard))]
    todo = [j for j in jobs if not (Path(j[0]).exists() and j[2] == per_shard)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_shard, todo))
    shards = [j[0] for j in jobs]
    marker.write_text(json.dumps(shards))
    return shards


def raw_loop(shards: list[str], limit: int, tok_dir: str, image_px: int) -> dict:
    """(a): the per-sample work in one process on one core, bytes already in memory, two ways:

    * ``plain`` — the loop the issue names, as a user would write it with Pillow: decode -> RGB ->
      resize the shorter side to ``image_px`` (bicubic) -> JPEG q90 encode -> 64-bit pHash. The
      ratio targets are against this one.
    * ``library`` — what one curate task does per sample (pipelines.images.process_image: checks,
      libjpeg-turbo scaled decode, resize, encode, pHash, crop hashes, thumbnail; caption clean;
      tokenise), no Ray, no I/O.
    """
    from pipelines.captions import CaptionConfig, process_caption
    from pipelines.images import ImageConfig, compute_phash, process_image, resize_shorter_side
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

    def plain(data: bytes) -> None:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        out = resize_shorter_side(im, image_px, resample="bicubic")  # as a user would write it
        out.save(io.BytesIO(), "JPEG", quality=90)
        compute_phash(out)

    icfg, ccfg = ImageConfig(image_px=image_px), CaptionConfig()
    encode_captions(["warm up"], tok_dir, 32)
    result = {"samples": len(samples)}
    for name, step in (("plain", lambda n, d, c: plain(d)),
                       ("library", lambda n, d, c: (process_image(d, n, icfg),
                                                    encode_captions([process_caption(c, ccfg)[0]], tok_dir, 32)))):
        t0 = time.perf_counter()
        for n, d, c in samples:
            step(n, d, c)
        dt = time.perf_counter() - t0
        result[name] = {"seconds": round(dt, 2), "samples_per_s": round(len(samples) / dt, 1)}
    return result


class PssSampler(threading.Thread):
    """Peak summed PSS of the command and its descendants (driver, GCS, raylet, Ray workers), what
    made it up at that moment (PSS MB and count per process title: ``ray::IDLE``,
    ``ray::MapBatches(...)``, raylet, ...) and the most processes seen at once."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, False
        self.at_peak: dict[str, list[int]] = {}
        self.most_processes = 0

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop:
            total, kinds = 0, {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    pss = p.memory_full_info().pss
                    title = (p.cmdline() or [p.name()])[0].split("/")[-1][:60]
                except psutil.Error:
                    continue
                total += pss
                k = kinds.setdefault(title, [0, 0])
                k[0], k[1] = k[0] + pss, k[1] + 1
            self.most_processes = max(self.most_processes, len(procs))
            if total > self.peak:
                self.peak = total
                self.at_peak = {t: [round(v[0] / 2**20), v[1]] for t, v in sorted(kinds.items(), key=lambda x: -x[1][0])}
            time.sleep(0.5)


def run_curate_cmd(shards: list[str], out: Path, image_px: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobs.curate", *shards, "--out", str(out), "--set", f"images.image_px={image_px}",
           *extra]
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop = True
    if proc.returncode != 0:
        raise SystemExit(f"mm curate failed ({proc.returncode}):\n{stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    return {"wall_s": round(wall, 2), "plan_s": stats["seconds"]["total"], "stage_s": stats["seconds"],
            "inputs": stats["inputs"], "kept": stats["kept"], "rejected": stats["rejected"],
            "peak_pss_mb": round(sampler.peak / 2**20), "peak_pss_by_process_mb_count": sampler.at_peak,
            "most_processes": sampler.most_processes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000", help="comma-separated corpus sizes, run in this order")
    ap.add_argument("--content", choices=("collage", "synthetic"), default="collage")
    ap.add_argument("--px", type=int, default=640, help="longer side of the source images")
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--raw-n", type=int, default=1000, help="samples for the single-core loop")
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "mm_bench_images"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    t0 = time.time()
    shards = {n: make_corpus(Path(args.data_dir), n, args.px, args.content) for n in sorted(sizes)}
    gen_s = time.time() - t0
    runs, a = {}, None
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            b = run_curate_cmd(shards[n], out, args.image_px, [x for o in args.overrides for x in ("--set", o)])
            if a is None:  # the raw loop once, with the first run's tokenizer
                a = raw_loop(shards[n], args.raw_n, str(out / "tokenizer"), args.image_px)
        rate, plan_rate = n / b["wall_s"], n / b["plan_s"]
        plain, lib = a["plain"]["samples_per_s"] * cores, a["library"]["samples_per_s"] * cores
        runs[str(n)] = {**b, "samples_per_s": round(rate, 1), "plan_samples_per_s": round(plan_rate, 1),
                        "ratio": round(rate / plain, 3), "ratio_plan_only": round(plan_rate / plain, 3),
                        "ratio_vs_library_loop": round(rate / lib, 3),
                        "load_avg_1m_after": round(os.getloadavg()[0], 1)}
    ordered = sorted(sizes)
    growth = {f"{m}->{n}": round(runs[str(n)]["peak_pss_mb"] / runs[str(m)]["peak_pss_mb"], 3)
              for m, n in zip(ordered, ordered[1:])}
    result = {
        "bench": "curate_images", "content": args.content, "sizes": sizes, "source_px_long": args.px,
        "image_px": args.image_px, "cores": cores, "load_avg_1m": round(os.getloadavg()[0], 1),
        "generate_s": round(gen_s, 1), "raw_loop_1core": a, "mm_curate": runs, "pss_growth": growth,
        "target_ratio": 0.8, "target_pss_growth": {"2000->20000": 1.25, "20000->200000": 1.2},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
