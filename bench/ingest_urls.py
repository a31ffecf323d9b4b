"""Benchmark: URL ingestion, `mm curate` vs img2dataset, against the same local HTTP server.

    .venv/bin/python bench/ingest_urls.py --n 3000 [--img2dataset PATH] [--data-dir DIR]

Writes N real-content JPEGs (bench/curate_images.py's collages of two real pictures on a plain
background, shorter side 480 px, JPEG q90) to a folder served by
``python -m http.server`` on 127.0.0.1 (a separate process, threaded), writes one URL list
(CSV: url, caption), then in the same run ingests it with

  (a) ``mm curate urls.csv --set sources.download_threads=T --set sources.download_per_host=T``
      (download in the plan, decode, validate, resize shorter side to 256, JPEG q90, pHash, dedup,
      tokenise, Parquet; T threads per worker process, as img2dataset's; the per-host cap is set to
      T because every URL here is on 127.0.0.1, a single host, and img2dataset has none), and
  (b) ``img2dataset --processes_count <cores> --image_size 256 --resize_mode keep_ratio
      --encode_quality 90 --output_format webdataset`` (download, resize, tar shards);

and prints JSON with both samples/s (successful samples / wall clock of the command) and the
ratio (a)/(b). Target >= 1.0 (issue 21; aim 1.5: img2dataset does no hashing, dedup or tokenising). img2dataset (PyPI, the ``bench`` extra) is best installed in its
own venv (its pins may fight ours): ``python -m venv /tmp/i2d && /tmp/i2d/bin/pip install
img2dataset`` and pass ``--img2dataset /tmp/i2d/bin/img2dataset``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from curate_images import collage_samples  # noqa: E402


def _write(args) -> None:
    folder, start, count, px = args
    from io import BytesIO

    from PIL import Image

    for i, (ext, data, _) in zip(range(start, start + count), collage_samples(start, count, px)):
        if ext != "jpg":  # every 5th is a PNG in the tar corpus; serve JPEG only, as most web images are
            buf = BytesIO()
            Image.open(BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=90)
            data = buf.getvalue()
        (Path(folder) / f"{i:07d}.jpg").write_bytes(data)


def make_images(folder: Path, n: int, px: int) -> None:
    marker = folder / f".done_collage_{n}_{px}"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    step = 250
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write, [(str(folder), s, min(step, n - s), px) for s in range(0, n, step)]))
    marker.write_text("ok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def count_img2dataset(out: Path) -> int:
    total = 0
    for stats in out.glob("*_stats.json"):
        total += json.loads(stats.read_text()).get("successes", 0)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--px", type=int, default=640)
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "mm_bench_urls"))
    ap.add_argument("--img2dataset", default=shutil.which("img2dataset") or "/tmp/i2d/bin/img2dataset")
    ap.add_argument("--threads", type=int, default=32,
                    help="img2dataset --thread_count and mm's sources.download_threads (per worker process)")
    ap.add_argument("--per-host", type=int, default=32,
                    help="mm curate sources.download_per_host: every URL is on 127.0.0.1, so the default "
                         "per-host politeness limit (8 per worker process) is raised to img2dataset's "
                         "threads per process (it has no per-host limit)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    data = Path(args.data_dir)
    t0 = time.time()
    make_images(data / "www", args.n, args.px)
    gen_s = time.time() - t0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(data / "www")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    result: dict = {"bench": "ingest_urls", "n": args.n, "source_px": [args.px, args.px * 3 // 4],
                    "image_px": args.image_px, "cores": cores, "generate_s": round(gen_s, 1),
                    "mm_settings": {"sources.download_threads": args.threads, "sources.download_per_host": args.per_host},
                    "img2dataset_settings": {"processes_count": cores, "thread_count": args.threads},
                    "load_avg_1m_start": round(os.getloadavg()[0], 1)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            urls = tmp / "urls.csv"
            urls.write_text("url,caption\n" + "".join(
                f"http://127.0.0.1:{port}/{i:07d}.jpg,a photo of sample number {i}\n" for i in range(args.n)))
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            wall, proc = timed([sys.executable, "-m", "jobs.curate", str(urls), "--out", str(tmp / "mm"),
                                "--set", f"images.image_px={args.image_px}",
                                "--set", f"sources.download_threads={args.threads}",
                                "--set", f"sources.download_per_host={args.per_host}"], ROOT, env)
            if proc.returncode != 0:
                raise SystemExit(f"mm curate failed:\n{proc.stderr[-3000:]}")
            stats = json.loads((tmp / "mm" / "stats.json").read_text())
            result["mm_curate"] = {"wall_s": round(wall, 2), "plan_s": stats["seconds"]["total"],
                                   "kept": stats["kept"], "rejected": stats["rejected"],
                                   "samples_per_s": round(stats["kept"] / wall, 1),
                                   "plan_samples_per_s": round(stats["kept"] / stats["seconds"]["total"], 1),
                                   "seconds": stats["seconds"], "load_avg_1m_after": round(os.getloadavg()[0], 1)}
            if Path(args.img2dataset).exists():
                wall, proc = timed([args.img2dataset, "--url_list", str(urls), "--input_format", "csv",
                                    "--url_col", "url", "--caption_col", "caption", "--output_folder",
                                    str(tmp / "i2d"), "--processes_count", str(cores), "--thread_count",
                                    str(args.threads), "--image_size", str(args.image_px), "--resize_mode",
                                    "keep_ratio", "--encode_quality", "90", "--output_format", "webdataset",
                                    "--enable_wandb", "False"], tmp)
                ok = count_img2dataset(tmp / "i2d")
                result["img2dataset"] = {"wall_s": round(wall, 2), "successes": ok, "returncode": proc.returncode,
                                         "samples_per_s": round(ok / wall, 1) if wall else None,
                                         "settings": {"processes_count": cores, "thread_count": args.threads},
                                         "load_avg_1m_after": round(os.getloadavg()[0], 1)}
                if proc.returncode != 0:
                    result["img2dataset"]["stderr_tail"] = proc.stderr[-1500:]
                if ok:
                    result["ratio"] = round(result["mm_curate"]["samples_per_s"] / result["img2dataset"]["samples_per_s"], 3)
            else:
                result["img2dataset"] = {"error": f"not found: {args.img2dataset} (pip install img2dataset)"}
    finally:
        server.terminate()
        server.wait()
    result["target_ratio"], result["aim_ratio"] = 1.0, 1.5
    result["load_avg_1m"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
