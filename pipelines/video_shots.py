"""Shot boundaries: where a video cuts, from the distance between frames sampled at a fixed rate.

    cuts_s = detect_shots(container, stream, probe, cfg, keyframes_s)   # one sequential decode

A cut is where frames sampled at ``shot_sample_fps`` differ past ``shot_threshold``: half the L1
distance between per-channel colour histograms (``shot_detector: histogram``) or the pHash
Hamming distance / 64 (``phash``). Shots become clip spans in pipelines/video_clips.py, which
uses this module when a video has no timed text (annotation spans, subtitles).

Tested in tests/test_video.py (``test_shot_detection_finds_the_cuts``) on videos with known cuts
that PyAV writes in the test.
"""

from __future__ import annotations

import av
import numpy as np

from pipelines.images import compute_phash, hamming
from pipelines.video import VideoConfig, VideoProbe, VideoReject, frame_time_s, short_error


def _small_rgb(frame: av.VideoFrame, side: int = 64) -> np.ndarray:
    w, h = frame.width, frame.height
    scale = side / max(w, h)
    return frame.to_ndarray(width=max(2, int(w * scale) // 2 * 2), height=max(2, int(h * scale) // 2 * 2),
                            format="rgb24", interpolation="AREA")


def histogram_distance(a: np.ndarray, b: np.ndarray, bins: int = 16) -> float:
    """Half the L1 distance between per-channel colour histograms: 0 same, 1 disjoint."""
    def hist(x: np.ndarray) -> np.ndarray:
        q = (x.reshape(-1, 3).astype(np.int32) * bins) // 256
        h = np.concatenate([np.bincount(q[:, c], minlength=bins) for c in range(3)]).astype(np.float64)
        return h / h.sum()

    return float(0.5 * np.abs(hist(a) - hist(b)).sum())


def detect_shots(container, stream, probe: VideoProbe, cfg: VideoConfig,
                 keyframes_s: list[float] | None = None) -> list[float]:
    """Cut times (s): where frames sampled at ``shot_sample_fps`` differ past ``shot_threshold``.

    One sequential decode of the stream. The frames between two samples are held (at most
    fps / shot_sample_fps of them) so that a detected cut is placed on the first frame that
    looks like the new shot rather than on the sample after it. Raises
    ``VideoReject("truncated")`` when frames stop well before the declared duration. Key frame
    times are appended to ``keyframes_s`` when given (they tell the frame sampler where seeking
    pays).
    """
    if cfg.shot_detector == "phash":
        def signature(f):
            return compute_phash(f.to_image(width=64, height=64, interpolation="AREA"))

        def distance(a, b):
            return hamming(a, b) / 64
    else:
        signature, distance = _small_rgb, histogram_distance
    step = 1.0 / cfg.shot_sample_fps
    cuts: list[float] = []
    prev = None
    between: list[tuple[float, av.VideoFrame]] = []
    next_t = 0.0
    last_t = 0.0
    error = ""
    n_frames = 0
    container.seek(0)
    try:
        for frame in container.decode(stream):
            n_frames += 1
            t = frame_time_s(frame, probe.start_s)
            if t is None:
                continue
            if keyframes_s is not None and frame.key_frame:
                keyframes_s.append(t)
            if t < next_t:
                between.append((t, frame))
                continue
            last_t = t
            next_t = t + step
            cur = signature(frame)
            if prev is not None and distance(prev, cur) > cfg.shot_threshold:
                # first in-between frame nearer the new shot than the old one
                cut = next((bt for bt, bf in between
                            if distance(signature(bf), cur) < distance(signature(bf), prev)), t)
                cuts.append(cut)
            prev = cur
            between = []
    except av.FFmpegError as e:  # data that stops mid-packet: judged by where the frames end
        if n_frames == 0:
            raise VideoReject("undecodable", short_error(e)) from None
        error = f"; {short_error(e)}"
    if last_t < probe.duration_s - max(1.0, 2 * step, 0.05 * probe.duration_s):
        raise VideoReject("truncated", f"frames end at {last_t:.2f} s of a declared "
                                       f"{probe.duration_s:.2f} s{error}")
    return cuts


__all__ = ["histogram_distance", "detect_shots"]
