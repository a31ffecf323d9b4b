"""Benchmark: ``mm curate --modality video`` against the raw PyAV decode loop; peak memory vs length.

    .venv/bin/python bench/curate_videos.py                       # 8 videos, prints one JSON object
    .venv/bin/python bench/curate_videos.py --videos 4 --no-memory

1. Writes M real H.264 videos (PyAV/libx264, 640x360, 25 fps, 10-60 s; scenes of moving texture,
   a caption file each) into ``--work``.
2. Raw limit, one process on one core: for every clip span (the even splits into at most
   ``max_clip_s`` that curate makes with ``video.shot_detector=none``) seek to the clip, decode
   the sampled frames, resize and JPEG-encode them. Plain PyAV + Pillow, none of our code.
3. ``mm curate WORK --out OUT --modality video --set video.shot_detector=none`` on all cores
   (a subprocess: Ray start, read, decode, dedup, tokenizer, write, stats). clips/s from its
   stats.json, over the whole command and over its process stage alone;
   ratio = curate clips/s / (raw clips/s x cores). Target: >= 0.7.
4. The same command with shot detection on (the default), for information: it adds one full
   sequential decode per video.
5. Our per-input stage alone on one core (``process_video_batch`` on the same videos, same
   spans): its cost per clip against the raw loop, without Ray's fixed costs.
6. Resident memory while processing one 10 s and one 10 min video (the default config, each in
   a fresh process, the file read lazily, RSS sampled every 5 ms): it should not grow with length.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PALETTES = [(200, 40, 40), (40, 170, 60), (40, 60, 210), (220, 200, 40), (150, 50, 200), (30, 200, 200)]
WORDS = ["a red", "a green", "a blue", "a yellow", "a purple", "a cyan"]


def write_video(path: Path, seconds: float, seed: int, size=(640, 360), fps: int = 25, scene_s: float = 7.0) -> None:
    """H.264 video: scenes of blocky texture scrolling sideways, a bright square moving across."""
    w, h = size
    rng = np.random.default_rng(seed)
    block = 40
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    n = int(seconds * fps)
    tex = None
    for i in range(n):
        if i % int(scene_s * fps) == 0:
            base = np.array(PALETTES[rng.integers(len(PALETTES))], np.int16)
            noise = rng.integers(-70, 70, (h // block + 1, 2 * w // block + 2, 3), dtype=np.int16)
            tex = np.clip(base + noise, 0, 255).astype(np.uint8).repeat(block, 0).repeat(block, 1)
        off = (i * 2) % (w + 1)
        img = np.ascontiguousarray(tex[:h, off:off + w])
        x = (i * 5) % (w - 40)
        img[h // 3:h // 3 + 40, x:x + 40] = 255
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def make_corpus(work: Path, n_videos: int) -> list[tuple[Path, float]]:
    work.mkdir(parents=True, exist_ok=True)
    durations = [float(round(d)) for d in np.linspace(10, 60, n_videos)]
    out = []
    for i, dur in enumerate(durations):
        p = work / f"video{i:03d}.mp4"
        if not p.exists():
            write_video(p, dur, seed=i)
        (work / f"video{i:03d}.txt").write_text(f"{WORDS[i % len(WORDS)]} texture scrolling past a white square, take {i}")
        out.append((p, dur))
    return out


def even_spans(duration_s: float, max_clip_s: float) -> list[tuple[float, float]]:
    n = max(1, int(np.ceil(duration_s / max_clip_s - 1e-9)))
    return [(duration_s * k / n, duration_s * (k + 1) / n) for k in range(n)]


def raw_loop(videos: list[Path], frames_per_clip: int, frame_px: int, max_clip_s: float, quality: int) -> dict:
    """The raw limit on one core: seek to each clip, decode its sampled frames, resize, JPEG."""
    t0 = time.perf_counter()
    clips = frames = 0
    for path in videos:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = 1
            duration = float(s.duration * s.time_base)
            half = 0.5 / float(s.average_rate)
            w, h = s.codec_context.width, s.codec_context.height
            scale = frame_px / min(w, h)
            size = (round(w * scale), round(h * scale)) if scale < 1 else (w, h)
            for a, b in even_spans(duration, max_clip_s):
                c.seek(int(a / s.time_base), stream=s)
                it = c.decode(s)
                f = None
                for k in range(frames_per_clip):
                    t = a + (k + 0.5) * (b - a) / frames_per_clip
                    while f is None or f.time < t - half:
                        f = next(it)
                    buf = io.BytesIO()
                    f.to_image(width=size[0], height=size[1], interpolation="AREA").save(buf, "JPEG", quality=quality)
                    frames += 1
                clips += 1
    sec = time.perf_counter() - t0
    return {"clips": clips, "frames": frames, "seconds": round(sec, 3), "clips_per_s": round(clips / sec, 3)}


def run_curate(src: Path, out: Path, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobs.cli", "curate", str(src), "--out", str(out), "--modality", "video"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mm curate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    st = json.loads((out / "stats.json").read_text())
    clips = st["clips"]["kept"]
    return {"command": "mm " + " ".join(cmd[3:]), "inputs": st["inputs"], "kept_inputs": st["kept_inputs"],
            "clips": clips, "rejected": st["rejected"], "wall_s": round(wall, 3),
            "process_s": round(st["seconds"]["process"], 3),
            "clips_per_s_wall": round(clips / wall, 3), "clips_per_s_process": round(clips / st["seconds"]["process"], 3)}


_MEASURE = r"""
import json, sys, threading, time
import psutil
from pipelines.captions import CaptionConfig
from pipelines.video import VideoConfig
from pipelines.video_clips import process_video
proc, peak, done = psutil.Process(), [0], threading.Event()
def sample():  # the resident set every 5 ms while the video is processed
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
before = proc.memory_info().rss
t = threading.Thread(target=sample)
t.start()
probe, clips, drops = process_video(None, sys.argv[1], "a caption for the clip", {}, VideoConfig(), CaptionConfig())
done.set()
t.join()
print(json.dumps({"clips": len(clips), "duration_s": probe.duration_s, "rss_before_mb": before / 2**20,
                  "peak_rss_during_mb": peak[0] / 2**20, "peak_minus_before_mb": (peak[0] - before) / 2**20}))
"""


def stage_one_core(videos: list[Path]) -> dict:
    """Our per-input stage (process_video_batch: probe, fixed spans, seek, decode, resize, JPEG,
    pHash, rows) on the same videos in this one process: its cost per clip against the raw loop."""
    import pyarrow as pa

    from pipelines.captions import CaptionConfig
    from pipelines.video import VideoConfig
    from pipelines.video_clips import process_video_batch

    cfg = VideoConfig(shot_detector="none")
    t0 = time.perf_counter()
    clips = 0
    for p in videos:
        t = pa.Table.from_pylist([{"source": "bench", "key": p.stem, "media_uri": str(p),
                                   "caption_raw": "texture scrolling past a white square"}])
        out = process_video_batch(t, cfg, CaptionConfig())
        clips += sum(1 for r, c in zip(out.column("reason").to_pylist(), out.column("caption_index").to_pylist())
                     if r is None and c == 0)
    sec = time.perf_counter() - t0
    return {"clips": clips, "seconds": round(sec, 3), "clips_per_s": round(clips / sec, 3)}


def measure_memory(work: Path) -> dict:
    out = {}
    for name, seconds in (("10s", 10.0), ("600s", 600.0)):
        p = work / f"memory_{name}.mp4"
        if not p.exists():
            write_video(p, seconds, seed=100, scene_s=15.0)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _MEASURE, str(p)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(file_mb=round(p.stat().st_size / 2**20, 1), seconds=round(time.perf_counter() - t0, 2))
        out[name] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--work", default="/tmp/mm_bench_videos")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-shots-run", action="store_true", help="skip the run with shot detection")
    ap.add_argument("--no-curate", action="store_true", help="only the one-core loops and memory")
    ap.add_argument("--one-core-every", type=int, default=1,
                    help="time the one-core loops (raw and ours) on every K-th video only: a per-clip rate "
                         "over the same spread of lengths, at 1/K of the time (an hour of video: K=4)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.video import VideoConfig

    vc = VideoConfig()
    work = Path(args.work)
    t0 = time.perf_counter()
    corpus = make_corpus(work / "videos", args.videos)
    gen_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    sample = [p for p, _ in corpus][::max(1, args.one_core_every)]
    raw = raw_loop(sample, vc.frames_per_clip, vc.frame_px, vc.max_clip_s, vc.jpeg_quality)
    result = {
        "bench": "curate_videos", "videos": len(corpus), "durations_s": [d for _, d in corpus],
        "size": "640x360", "codec": "h264", "cores": cores, "generate_s": round(gen_s, 1),
        "config": {"frames_per_clip": vc.frames_per_clip, "frame_px": vc.frame_px, "max_clip_s": vc.max_clip_s},
        "video_seconds": sum(d for _, d in corpus), "one_core_loops_on_videos": len(sample),
        "raw_one_core": raw,
        "load_avg_1min_at_start": round(os.getloadavg()[0], 1),
    }
    stage = stage_one_core(sample)
    stage["ratio_to_raw"] = round(stage["clips_per_s"] / raw["clips_per_s"], 3)
    result["stage_one_core"] = stage
    if args.no_curate:
        args.no_shots_run = True
    out = work / "out_fixed"
    shutil.rmtree(out, ignore_errors=True)
    limit = raw["clips_per_s"] * cores
    result["raw_x_cores_clips_per_s"] = round(limit, 3)
    result["target_ratio"] = 0.7
    if not args.no_curate:
        cur = run_curate(work / "videos", out, ["video.shot_detector=none"])
        cur["ratio_wall"] = round(cur["clips_per_s_wall"] / limit, 3)
        cur["ratio_process"] = round(cur["clips_per_s_process"] / limit, 3)
        result["curate_fixed_spans"] = cur
    if not args.no_shots_run:
        out2 = work / "out_shots"
        shutil.rmtree(out2, ignore_errors=True)
        result["curate_shot_detection"] = run_curate(work / "videos", out2, [])
    if not args.no_memory:
        result["memory"] = measure_memory(work)
    result["peak_rss_driver_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 1)  # a shared machine: other work competes
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
