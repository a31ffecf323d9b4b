"""Curate load test: many small samples on a small machine with a capped object store.

    .venv/bin/python bench/curate_load.py --sizes 20000,200000 --object-store-mb 80 > load.json

For each size: writes that many small real JPEGs (demo-corpus pictures through Pillow, a few
planted rejects and duplicates) in WebDataset shards, then runs ``run_curate`` in a fresh child
process whose Ray has ``--num-cpus`` CPUs and an object store of ``--object-store-mb``. The parent
samples the child's whole process tree (driver, raylet, GCS, workers) every second and reports
the peak RSS and PSS (PSS splits the shared object-store pages fairly; RSS counts them once per
process that touched them). Spilling is read from Ray's own counters at the end.

Prints one JSON document: per size, seconds, samples/s, peak RSS/PSS (MiB), spilled MiB, the
accounting (inputs, kept, rejected, invariant_ok) and the ratio of each peak to the smallest
size's. Results are summarised in docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def make_corpus(root: Path, n: int, per_shard: int = 10_000, px: int = 32) -> None:
    import hostile

    root.mkdir(parents=True, exist_ok=True)
    for s in range(-(-n // per_shard)):
        members = []
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            # one demo picture per sample: its own smooth background, so no two are pHash near
            # duplicates (checked: 0 pairs within 8 bits among 2,000; a shared base picture plus
            # pixel noise made 99% of them near duplicates)
            data = hostile.encode(hostile.picture(i, px=px), "jpg", quality=85)
            if i % 997 == 3:
                data = data[: len(data) // 3]          # truncated: a reject
            members += [(f"{i:08d}.jpg", data), (f"{i:08d}.txt", f"sample {i} of a small shape".encode())]
        hostile.write_tar(root / f"{s:05d}.tar", members)


def child(src: str, out: str, num_cpus: int, store_mb: int) -> None:
    """Runs in a fresh process: its own local Ray with a capped object store."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from core.config import load_config
    from core.runtime import init_ray
    from pipelines.curate import CurateConfig, run_curate

    ray.init(num_cpus=num_cpus, object_store_memory=store_mb << 20, include_dashboard=False,
             logging_level="ERROR")
    init_ray()  # the job's DataContext settings (no-progress timeout, no progress bars)
    cfg = load_config(CurateConfig, None, ["images.image_px=32", "images.min_side_px=16",
                                           "output.rows_per_file=50000"])
    t0 = time.time()
    st = run_curate([src], out, cfg)
    seconds = time.time() - t0
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB, (\d+) objects", summary)
    print(json.dumps({"seconds": round(seconds, 1), "inputs": st["inputs"], "kept": st["kept"],
                      "rejected": st["rejected"], "invariant_ok": st["invariant_ok"],
                      "spilled_mib": int(m.group(1)) if m else 0, "spilled_objects": int(m.group(2)) if m else 0,
                      "store_summary": " ".join(summary.split())[:400]}))


def _tree_memory(pid: int) -> tuple[float, float]:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    rss = pss = 0
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
        except psutil.Error:
            continue
    return rss / 2**20, pss / 2**20


def run_size(n: int, work: Path, num_cpus: int, store_mb: int) -> dict:
    src, out = work / f"src_{n}", work / f"out_{n}"
    t0 = time.time()
    make_corpus(src, n)
    gen_s = time.time() - t0
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(work / "ray")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(src), str(out), str(num_cpus), str(store_mb)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"rss": 0.0, "pss": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss, pss = _tree_memory(proc.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(1.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        return {"samples": n, "error": stderr[-1500:]}
    res = json.loads(stdout.strip().splitlines()[-1])
    res.update(samples=n, generate_s=round(gen_s, 1), samples_per_s=round(n / res["seconds"], 1),
               peak_rss_mib=round(peak["rss"]), peak_pss_mib=round(peak["pss"]))
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,200000", help="comma-separated sample counts")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--object-store-mb", type=int, default=80)
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir, removed)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mmload", dir="/tmp"))
    results = [run_size(int(n), work, args.num_cpus, args.object_store_mb) for n in args.sizes.split(",")]
    ok = [r for r in results if "error" not in r]
    if ok:
        for r in ok:
            r["rss_vs_smallest"] = round(r["peak_rss_mib"] / ok[0]["peak_rss_mib"], 2)
            r["pss_vs_smallest"] = round(r["peak_pss_mib"] / ok[0]["peak_pss_mib"], 2)
    print(json.dumps({"num_cpus": args.num_cpus, "object_store_mb": args.object_store_mb, "results": results},
                     indent=2))
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
