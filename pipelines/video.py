"""Video I/O with PyAV: the ``video`` config, open and probe a container, decode frames at given times.

    with open_video(media=data) as container:          # or uri="s3://bucket/x.mp4"
        probe = probe_video(container)                 # codec, size, fps, duration, VFR, audio
        validate_probe(probe, cfg)                     # VideoReject(reason) when no clip can come of it
        for t, frame in iter_frames_at(container, container.streams.video[0], times_s, probe, cfg.seek_gap_s):
            jpeg, w, h, phash = encode_frame(frame, cfg)

A container is never read whole: PyAV reads through a seekable file (bytes, or a ``pyarrow.fs``
file for a URI). Probe rejects: ``undecodable``, ``no_video_stream`` (audio-only files too),
``not_a_video`` (a still image under a video name), ``zero_duration``, ``too_long``,
``bad_resolution``, ``too_short``. Variable frame rate is fine: every time here comes from frame
timestamps, never from frame index / fps. Frames at given times are reached by seeking near
each time and decoding forward, so memory does not grow with the video's length; a stream that
ends before its declared duration is ``truncated``. Frames are resized and JPEG-encoded with a
pHash each.

The video stage is three modules: this one (I/O), pipelines/video_shots.py (shot boundaries) and
pipelines/video_clips.py (clip spans, frames per clip, the curate batch function); dedup and the
input-level accounting after it are in pipelines/video_accounting.py.

Tested in tests/test_video.py (``.venv/bin/pytest tests/test_video.py -q``) on videos PyAV
writes in the test.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import av

from pipelines.images import compute_phash
from pipelines.schema import Reject

# Demuxers that mean "a still image", whatever the file is called.
_IMAGE_FORMATS = ("image2", "jpeg_pipe", "png_pipe", "webp_pipe", "gif", "bmp_pipe", "tiff_pipe")


@dataclass(frozen=True)
class VideoConfig:
    """The ``video`` section of the curate config."""

    frames_per_clip: int = 8  # frames sampled uniformly over each clip (when sample_fps == 0)
    sample_fps: float = 0.0  # > 0: sample at this rate instead, at most max_frames_per_clip
    max_frames_per_clip: int = 32
    frame_px: int = 224  # frames are resized like images (see pipelines/images.py) to this size
    jpeg_quality: int = 90
    min_clip_s: float = 2.0
    max_clip_s: float = 20.0  # longer shots are split evenly; longer timed spans keep their first max_clip_s
    max_gap_s: float = 1.0  # subtitle segments further apart than this are not merged
    max_clips_per_video: int = 200
    shot_detector: Literal["histogram", "phash", "none"] = "histogram"
    shot_threshold: float = 0.4  # histogram: half L1 distance in [0, 1]; phash: Hamming / 64
    shot_sample_fps: float = 4.0
    drop_static: bool = True
    static_max_hamming: int = 4  # a clip whose frames all lie this close to the first is static
    min_side_px: int = 32
    max_side_px: int = 8192
    max_aspect_ratio: float = 6.0
    max_duration_s: float = 6 * 3600.0
    seek_gap_s: float = 5.0  # seek only past this gap (and past the GOP seen so far); else decode on
    decode_threads: int = 1  # FFmpeg threads per decode; Ray gives each task one CPU
    videos_per_task: int = 1  # inputs per process batch: videos are slow, spread them over the cores

    def __post_init__(self):
        if self.frames_per_clip < 1 or self.max_frames_per_clip < 1:
            raise ValueError("frames_per_clip and max_frames_per_clip must be >= 1")
        if not 0 < self.min_clip_s <= self.max_clip_s:
            raise ValueError("need 0 < min_clip_s <= max_clip_s")
        if self.sample_fps < 0 or self.shot_sample_fps <= 0:
            raise ValueError("sample_fps must be >= 0 and shot_sample_fps > 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in [1, 100]")


class VideoReject(Reject):
    """An input or clip that cannot be used; ``reason`` is the reject reason."""


@dataclass(frozen=True)
class VideoProbe:
    container: str
    codec: str
    width: int
    height: int
    fps: float  # average frame rate
    duration_s: float
    start_s: float  # stream start time; frame times below are relative to it
    vfr: bool  # average and nominal frame rates disagree (variable frame rate)
    has_audio: bool
    bit_rate: int


# --------------------------------------------------------------------------- open / probe

@contextmanager
def open_video(media: bytes | None = None, uri: str | None = None) -> Iterator[av.container.InputContainer]:
    """Open a video from bytes or from a URI (local path, ``s3://`` ...) via ``pyarrow.fs``.

    Either way PyAV reads through a seekable file, so only the parts decoded are read.
    """
    f = None
    try:
        if media is not None:
            f = io.BytesIO(media)
        elif uri is not None:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
            f = fs.open_input_file(path)
        else:
            raise VideoReject("missing_media", "no bytes and no uri")
        try:
            container = av.open(f, mode="r", metadata_errors="ignore")
        except (av.FFmpegError, ValueError, OSError) as e:
            raise VideoReject("undecodable", short_error(e)) from None
        try:
            yield container
        finally:
            container.close()
    except FileNotFoundError as e:
        raise VideoReject("missing_media", short_error(e)) from None
    finally:
        if f is not None:
            f.close()


def probe_video(container: av.container.InputContainer) -> VideoProbe:
    """Stream metadata; raises ``VideoReject`` when there is no usable video stream."""
    fmt = container.format.name
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise VideoReject("no_video_stream", f"streams: {', '.join(kinds) or 'none'}")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if fmt in _IMAGE_FORMATS or fmt.endswith("_pipe"):
        raise VideoReject("not_a_video", f"a still image ({fmt}, {ctx.name})")
    tb = float(stream.time_base) if stream.time_base else 0.0
    start_s = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if stream.duration and tb:
        duration_s = float(stream.duration * tb)
    elif container.duration:
        duration_s = container.duration / av.time_base - max(0.0, start_s)
    else:
        duration_s = _scan_duration(container, stream, start_s)
    avg = float(stream.average_rate) if stream.average_rate else 0.0
    nominal = float(stream.base_rate or stream.guessed_rate or 0) or avg
    fps = avg or nominal
    vfr = bool(avg and nominal and abs(avg - nominal) / nominal > 0.01)
    return VideoProbe(container=fmt, codec=ctx.name, width=int(ctx.width or 0), height=int(ctx.height or 0),
                      fps=round(fps, 3), duration_s=round(duration_s, 3), start_s=start_s, vfr=vfr,
                      has_audio=bool(container.streams.audio), bit_rate=int(container.bit_rate or 0))


def _scan_duration(container, stream, start_s: float) -> float:
    """Duration from packet timestamps when the container does not say (demux only, no decode)."""
    end = 0.0
    try:
        for pkt in container.demux(stream):
            if pkt.pts is not None and pkt.time_base:
                end = max(end, float((pkt.pts + (pkt.duration or 0)) * pkt.time_base))
    except av.FFmpegError:
        pass
    container.seek(0)
    return max(0.0, end - start_s)


def validate_probe(p: VideoProbe, cfg: VideoConfig) -> None:
    """Raise ``VideoReject`` for metadata no clip can come from."""
    if not p.width or not p.height or min(p.width, p.height) < cfg.min_side_px \
            or max(p.width, p.height) > cfg.max_side_px \
            or max(p.width, p.height) / min(p.width, p.height) > cfg.max_aspect_ratio:
        raise VideoReject("bad_resolution", f"{p.width}x{p.height}")
    if not p.duration_s or p.duration_s <= 0 or not math.isfinite(p.duration_s):
        raise VideoReject("zero_duration", f"duration {p.duration_s}")
    if p.duration_s > cfg.max_duration_s:
        raise VideoReject("too_long", f"{p.duration_s:.1f} s > {cfg.max_duration_s:.0f} s")
    if p.duration_s < cfg.min_clip_s:
        raise VideoReject("too_short", f"{p.duration_s:.2f} s < min_clip_s {cfg.min_clip_s}")


# --------------------------------------------------------------------------- decoding

def prepare_decoder(stream, cfg: VideoConfig) -> None:
    """FFmpeg threading of one decode (``decode_threads``; Ray gives each task one CPU)."""
    ctx = stream.codec_context
    ctx.thread_count = max(1, cfg.decode_threads)
    ctx.thread_type = "AUTO" if cfg.decode_threads > 1 else "SLICE"


def frame_time_s(frame, start_s: float) -> float | None:
    """A decoded frame's time in seconds from the stream start; None when it has no timestamp."""
    return None if frame.time is None else float(frame.time) - start_s


def iter_frames_at(container, stream, times_s: list[float], probe: VideoProbe, seek_gap_s: float,
                   keyframes_s: list[float] | None = None) -> Iterator[tuple[float, av.VideoFrame]]:
    """Yield ``(frame_time_s, frame)``: the first frame at or after each target time (or less
    than half a frame before it).

    Targets must be non-decreasing (seconds from the stream start). Between targets the decoder
    either decodes forward or seeks to the key frame before the next target: with the key frame
    times known (``keyframes_s``, seen by ``detect_shots``) it seeks exactly when that key frame
    lies past the current position; otherwise when the target is more than ``seek_gap_s``
    ahead and further than the current group of pictures is long already (no key frame was
    seen since ``last_kf``, so a seek would most likely land behind the current position). One decoded frame is held at a time. Raises ``VideoReject("truncated")`` when the
    stream ends before a target inside the declared duration.
    """
    half_frame = 0.5 / probe.fps if probe.fps else 0.02
    frames = None
    cur: tuple[float, av.VideoFrame] | None = None
    last_kf = 0.0
    for t in times_s:
        if frames is None or cur is None:
            jump = True
        elif keyframes_s:
            i = bisect.bisect_right(keyframes_s, t + half_frame) - 1
            jump = i >= 0 and keyframes_s[i] > cur[0] + half_frame
        else:
            jump = t - cur[0] > max(seek_gap_s, cur[0] - last_kf)
        if jump:
            frames, cur = _seek_near(container, stream, t, probe, half_frame)
            if cur is not None and cur[1].key_frame:
                last_kf = cur[0]
        while cur is None or cur[0] < t - half_frame:
            nxt, error = _pull(frames, cur, half_frame, probe.start_s, t)
            if nxt is None:
                # The last frame is fine for targets within one frame of the end.
                if cur is not None and t - cur[0] <= max(4 * half_frame, 0.25):
                    break
                last = f"{cur[0]:.2f}" if cur else "none"
                raise VideoReject("truncated", f"stream ends before {t:.2f} s (last frame {last} s, "
                                               f"declared {probe.duration_s:.2f} s){error}")
            cur = nxt
            if cur[1].key_frame:
                last_kf = cur[0]
        yield cur


def _pull(frames, prev, half_frame: float, start_s: float, t: float) -> tuple[tuple | None, str]:
    """The next decoded ``(time_s, frame)``, or ``(None, error)`` at the end of the data."""
    try:
        frame = next(frames)
    except StopIteration:
        return None, ""
    except av.FFmpegError as e:  # a cut-off last packet: the data ends here
        return None, f"; {short_error(e)}"
    ft = frame_time_s(frame, start_s)
    if ft is None:  # no timestamp: place it one frame after the previous one
        ft = (prev[0] + 2 * half_frame) if prev else t
    return (ft, frame), ""


def _seek_near(container, stream, t: float, probe: VideoProbe, half_frame: float):
    """Seek to the key frame before ``t``; where the index is coarse (MPEG-PS seeks by byte
    position) and lands after ``t``, seek again 1, 2, 4 ... s earlier. Returns the frame
    iterator and its first frame."""
    back = 0.0
    while True:
        target = max(0.0, t - back)
        container.seek(max(0, int((target + probe.start_s) / stream.time_base)), stream=stream,
                       backward=True, any_frame=False)
        frames = container.decode(stream)
        first, _ = _pull(frames, None, half_frame, probe.start_s, t)
        if first is None or first[0] <= t + half_frame or target == 0.0:
            return frames, first
        back = max(1.0, 2 * back)


# --------------------------------------------------------------------------- frames

def frame_size(width: int, height: int, frame_px: int) -> tuple[int, int]:
    """Output size of a frame: shorter side to ``frame_px``, never enlarged — the geometry of
    ``images.resize_shorter_side`` (same rounding), so clips and images match."""
    short = min(width, height)
    if short <= frame_px:
        return width, height
    s = frame_px / short
    return max(1, round(width * s)), max(1, round(height * s))


def encode_frame(frame: av.VideoFrame, cfg: VideoConfig) -> tuple[bytes, int, int, int]:
    """Decoded frame -> (JPEG bytes, width, height, pHash).

    The resize happens inside the YUV->RGB conversion (swscale, area averaging): one pass over
    the frame instead of a full-size RGB copy then a Pillow resize, ~20x faster on 720p.
    """
    w, h = frame_size(frame.width, frame.height, cfg.frame_px)
    img = frame.to_image(width=w, height=h, interpolation="AREA")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), w, h, compute_phash(img)


def short_error(e: BaseException) -> str:
    """The first line of an error (at most 300 characters), for a reject's ``detail``."""
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


__all__ = ["VideoConfig", "VideoReject", "VideoProbe", "open_video", "probe_video", "validate_probe",
           "prepare_decoder", "frame_time_s", "iter_frames_at", "frame_size", "encode_frame", "short_error"]
