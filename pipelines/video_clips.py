"""Video inputs to clip rows: plan clip spans, sample and encode their frames, the curate batch function.

    rows = process_video_batch(records, cfg.video, cfg.captions)   # INPUT_SCHEMA -> VIDEO_WORK_SCHEMA

Video curation is image curation with extra stages in front: ``process_video_batch`` turns a
batch of input records (one video each, as bytes or as a URI read through ``pyarrow.fs``)
into clip rows — sampled JPEG frames with their timestamps, the clip's span and caption, a
pHash per frame — or into reject rows with a reason. Caption cleaning, dedup, tokenising and
writing are the image stages, run on those rows by ``pipelines/curate.py``.

Per input (after the probe of pipelines/video.py):
1. clip spans: from annotation spans or subtitles (``meta``) when present, else shot
   boundaries (pipelines/video_shots.py), then cut to ``[min_clip_s, max_clip_s]``.
2. frames: per clip, ``frames_per_clip`` times (or ``sample_fps``), decoded in one ordered walk
   over the stream (``video.iter_frames_at``), resized and JPEG-encoded, a pHash per frame.
   A clip whose frames are near-identical is ``static``.

Clip-level drops (``static``, ``too_short``) of an input that keeps other clips are rows with
``clip_index >= 0`` and a ``reason``: curate counts them under ``stats["clips"]``; an input
with no clip left becomes one input reject (``clip_index == -1``) with its clips' reason.
Dedup and the input-level accounting after it are in pipelines/video_accounting.py.

Tested in tests/test_video.py (``.venv/bin/pytest tests/test_video.py -q``) on videos PyAV
writes in the test.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass

import pyarrow as pa

from pipelines.captions import CaptionConfig, normalize_for_dedup, process_caption
from pipelines.images import hamming
from pipelines.schema import make_sample_id
from pipelines.subtitles import Segment, SubtitleError, merge_segments, parse_subtitles
from pipelines.video import (
    VideoConfig,
    VideoProbe,
    VideoReject,
    encode_frame,
    iter_frames_at,
    open_video,
    prepare_decoder,
    probe_video,
    short_error,
    validate_probe,
)
from pipelines.video_shots import detect_shots


def sample_times(start_s: float, end_s: float, cfg: VideoConfig) -> list[float]:
    """Times to sample in ``[start_s, end_s)``: bin centres, so no sample sits on a cut."""
    dur = end_s - start_s
    if cfg.sample_fps > 0:
        n = min(cfg.max_frames_per_clip, max(1, int(dur * cfg.sample_fps)))
    else:
        n = cfg.frames_per_clip
    return [start_s + (i + 0.5) * dur / n for i in range(n)]


# --------------------------------------------------------------------------- clip spans

def spans_from_cuts(cuts: list[float], duration_s: float, cfg: VideoConfig) -> tuple[list[tuple[float, float]], int]:
    """Shots between cuts, split evenly when longer than ``max_clip_s``; shots shorter than
    ``min_clip_s`` are dropped. Returns ``(spans, n_too_short)``."""
    bounds = [0.0, *sorted(c for c in cuts if 0.0 < c < duration_s), duration_s]
    spans: list[tuple[float, float]] = []
    short = 0
    for a, b in zip(bounds, bounds[1:]):
        dur = b - a
        if dur < cfg.min_clip_s:
            short += 1
            continue
        n = max(1, math.ceil(dur / cfg.max_clip_s - 1e-9))
        spans.extend((a + i * dur / n, a + (i + 1) * dur / n) for i in range(n))
    return spans, short


def spans_from_segments(segments: list[Segment], duration_s: float,
                        cfg: VideoConfig) -> tuple[list[Segment], Counter]:
    """Timed text (subtitles, annotations) to clip segments inside the video.

    Segments are clamped to the video, short ones merged (``merge_segments``), then those still
    shorter than ``min_clip_s`` dropped as ``too_short``, those starting after the end as
    ``out_of_range``; longer than ``max_clip_s`` keeps the first ``max_clip_s`` (the text
    describes its start).
    """
    dropped: Counter = Counter()
    inside = []
    for s in segments:
        if s.start_s >= duration_s:
            dropped["out_of_range"] += 1
            continue
        inside.append(Segment(max(0.0, s.start_s), min(duration_s, s.end_s), s.text))
    out = []
    for s in merge_segments(inside, cfg.min_clip_s, cfg.max_clip_s, cfg.max_gap_s):
        if s.duration_s < cfg.min_clip_s:
            dropped["too_short"] += 1
            continue
        out.append(Segment(s.start_s, min(s.end_s, s.start_s + cfg.max_clip_s), s.text))
    return out, dropped


# --------------------------------------------------------------------------- frames

def is_static(phashes: list[int], max_hamming: int) -> bool:
    """All frames within ``max_hamming`` bits of the first: nothing moves (slides, black screens)."""
    return len(phashes) > 1 and all(hamming(h, phashes[0]) <= max_hamming for h in phashes[1:])


@dataclass(frozen=True)
class Clip:
    start_s: float
    end_s: float
    frames: list[bytes]
    frame_times_s: list[float]
    phashes: list[int]
    width: int
    height: int
    captions: list[str]


def extract_clips(container, stream, probe: VideoProbe, plan: list[tuple[float, float, list[str]]],
                  cfg: VideoConfig, keyframes_s: list[float] | None = None) -> list[Clip]:
    """Decode the sampled frames of every planned clip in one ordered walk over the stream
    (seeking where it pays), resize, JPEG-encode and hash them."""
    targets = sorted((t, ci) for ci, (a, b, _) in enumerate(plan) for t in sample_times(a, b, cfg))
    got: list[list[tuple]] = [[] for _ in plan]
    last: tuple | None = None
    walk = iter_frames_at(container, stream, [t for t, _ in targets], probe, cfg.seek_gap_s, keyframes_s)
    for (_, ci), (ft, frame) in zip(targets, walk):
        if last is None or last[0] != ft:  # overlapping spans may share a frame: encode it once
            last = (round(ft, 4), *encode_frame(frame, cfg))
        got[ci].append(last)
    clips = []
    for (a, b, caps), fr in zip(plan, got):
        clips.append(Clip(a, b, [f[1] for f in fr], [f[0] for f in fr], [f[4] for f in fr],
                          fr[0][2] if fr else 0, fr[0][3] if fr else 0, caps))
    return clips


# --------------------------------------------------------------------------- per input

def _meta(raw) -> dict:
    if not raw:
        return {}
    try:
        m = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _timed_segments(meta: dict) -> tuple[list[Segment] | None, Counter]:
    """Annotation spans or parsed subtitles from the record's meta, or None (use shots)."""
    spans = meta.get("spans")
    if spans:
        segs = []
        dropped: Counter = Counter()
        for sp in spans:
            try:
                a, b, text = float(sp[0]), float(sp[1]), str(sp[2])
            except (TypeError, ValueError, IndexError):
                dropped["bad_timestamp"] += 1
                continue
            if a < 0 or b <= a or not (math.isfinite(a) and math.isfinite(b)):
                dropped["bad_timestamp"] += 1
                continue
            segs.append(Segment(a, b, text))
        return sorted(segs, key=lambda s: s.start_s), dropped
    if meta.get("subtitles") is not None:
        try:
            segs, dropped = parse_subtitles(str(meta["subtitles"]), meta.get("subtitles_format"))
        except SubtitleError as e:
            raise VideoReject(f"subtitles_{e.reason}", e.detail) from None
        return segs, Counter(dropped)
    return None, Counter()


def _clean_captions(captions: list[str | None], ccfg: CaptionConfig, drops: Counter) -> list[str]:
    """Clean and filter captions; the rejected ones are counted in ``drops`` by reason."""
    kept = []
    for raw in captions:
        text, bad = process_caption(raw, ccfg)
        if bad:
            drops[bad[0]] += 1
        else:
            kept.append(text)
    return kept


def _reject_from(drops: Counter) -> VideoReject:
    reason = drops.most_common(1)[0][0] if drops else "no_clips"
    return VideoReject(reason, "no clip kept: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))


def plan_clips(probe: VideoProbe, container, stream, caption_raw: str | None, meta: dict, cfg: VideoConfig,
               ccfg: CaptionConfig, drops: Counter,
               keyframes_s: list[float] | None = None) -> list[tuple[float, float, list[str]]]:
    """``[(start_s, end_s, clean captions)]`` from timed text, else from shots; drops counted.
    Key frame times seen while looking for shots are appended to ``keyframes_s``."""
    segs, seg_drops = _timed_segments(meta)
    drops.update({f"segment_{k}": v for k, v in seg_drops.items()})
    if segs is not None:
        clip_segs, d = spans_from_segments(segs, probe.duration_s, cfg)
        drops.update(d)
        plan = []
        for sg in clip_segs:
            caps = _clean_captions([sg.text], ccfg, drops)
            if caps:
                plan.append((sg.start_s, sg.end_s, caps))
        return plan
    raw_caps = [str(c) for c in meta.get("captions") or []] or [caption_raw]
    caption_drops: Counter = Counter()
    caps = _clean_captions(raw_caps, ccfg, caption_drops)
    if not caps:  # cheap check first: no usable caption, nothing decoded
        raise _reject_from(caption_drops)
    drops.update(caption_drops)
    cuts = detect_shots(container, stream, probe, cfg, keyframes_s) if cfg.shot_detector != "none" else []
    spans, short = spans_from_cuts(cuts, probe.duration_s, cfg)
    if short:
        drops["too_short"] += short
    return [(a, b, caps) for a, b in spans]


def process_video(media: bytes | None, uri: str | None, caption_raw: str | None, meta: dict,
                  cfg: VideoConfig, ccfg: CaptionConfig) -> tuple[VideoProbe, list[Clip], Counter]:
    """One input -> (probe, kept clips, clip drops by reason); raises ``VideoReject`` for the input.

    ``VideoReject.probe`` carries the probe when the failure came after it (for stats).
    """
    drops: Counter = Counter()
    probe = None
    try:
        with open_video(media, uri) as container:
            probe = probe_video(container)
            validate_probe(probe, cfg)
            stream = container.streams.video[0]
            prepare_decoder(stream, cfg)
            keyframes_s: list[float] = []
            plan = plan_clips(probe, container, stream, caption_raw, meta, cfg, ccfg, drops, keyframes_s)
            if len(plan) > cfg.max_clips_per_video:
                drops["over_max_clips"] += len(plan) - cfg.max_clips_per_video
                plan = plan[: cfg.max_clips_per_video]
            clips = []
            for clip in extract_clips(container, stream, probe, plan, cfg, keyframes_s):
                if cfg.drop_static and is_static(clip.phashes, cfg.static_max_hamming):
                    drops["static"] += 1
                    continue
                clips.append(clip)
        if not clips:
            raise _reject_from(drops)
    except VideoReject as e:
        e.probe = probe
        raise
    return probe, clips, drops


# --------------------------------------------------------------------------- the curate stage
#: Work rows of the video stage: the image work row (``images.IMAGE_WORK_SCHEMA``) with the clip
#: columns instead of ``image``, plus ``input_id``, ``clip_id``, ``clip_index``,
#: ``caption_index`` and the ``probe`` JSON (on one row per input, for stats).
VIDEO_WORK_SCHEMA = pa.schema([
    pa.field("row_id", pa.string()), pa.field("input_id", pa.string()), pa.field("clip_id", pa.string()),
    pa.field("sample_id", pa.string()), pa.field("source", pa.string()), pa.field("key", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("frames", pa.list_(pa.binary())), pa.field("frame_times_s", pa.list_(pa.float32())),
    pa.field("start_s", pa.float32()), pa.field("end_s", pa.float32()),
    pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("phash", pa.int64()),
    pa.field("label", pa.string()), pa.field("content_hash", pa.string()),
    pa.field("hashes", pa.list_(pa.int64())), pa.field("area", pa.int64()),
    pa.field("orig_width", pa.int32()), pa.field("orig_height", pa.int32()),
    pa.field("clip_index", pa.int32()), pa.field("caption_index", pa.int32()), pa.field("probe", pa.string()),
    pa.field("stage", pa.string()), pa.field("reason", pa.string()), pa.field("detail", pa.string()),
])
"""Row kinds: ``reason`` null: a kept candidate, one row per (clip, caption); ``reason`` set and
``clip_index == -1``: the input is rejected; ``clip_index >= 0``: clips (or captions) of an
input that kept others were dropped (``detail`` holds how many; one row per reason)."""


def process_video_batch(batch: pa.Table, cfg: VideoConfig, captions: CaptionConfig) -> pa.Table:
    """Input records (``inputs.INPUT_SCHEMA``) -> ``VIDEO_WORK_SCHEMA`` rows; ``batch_format="pyarrow"``.

    The media is ``media`` (bytes, e.g. a tar member) or ``media_uri`` (a path/URI opened
    lazily through ``pyarrow.fs``); a reader ``error`` passes through as the reject reason.
    ``content_hash`` (exact duplicates) hashes the clip's frames, ``hashes`` (near duplicates)
    is its sequence of frame pHashes, ``sample_id`` hashes the frames with the normalised
    caption. The first caption row of a clip has ``row_id == clip_id``: dedup runs on those.
    """
    n = batch.num_rows
    cols = {c: (batch.column(c).to_pylist() if c in batch.column_names else [None] * n)
            for c in ("source", "key", "media", "media_uri", "caption_raw", "meta", "error", "error_detail")}
    rows: dict[str, list] = {f.name: [] for f in VIDEO_WORK_SCHEMA}

    def emit(**kw):
        for name in rows:
            rows[name].append(kw.get(name))

    for i in range(n):
        source, key, meta_raw = cols["source"][i], cols["key"][i], cols["meta"][i]
        meta = _meta(meta_raw)
        input_id = make_sample_id(source, key)
        base = {"source": source, "key": key, "input_id": input_id, "label": _label(meta)}
        if cols["error"][i]:
            emit(**base, row_id=input_id, clip_index=-1, stage="read", reason=cols["error"][i],
                 detail=cols["error_detail"][i])
            continue
        try:
            probe, clips, drops = process_video(cols["media"][i], cols["media_uri"][i], cols["caption_raw"][i],
                                                meta, cfg, captions)
        except VideoReject as e:
            p = getattr(e, "probe", None)
            emit(**base, row_id=input_id, clip_index=-1, stage="video", reason=e.reason, detail=e.detail,
                 probe=json.dumps(asdict(p)) if p else None)
            continue
        except Exception as e:  # noqa: BLE001 - one bad file never stops a run
            emit(**base, row_id=input_id, clip_index=-1, stage="video", reason="undecodable",
                 detail=f"{type(e).__name__}: {short_error(e)}")
            continue
        probe_json = json.dumps(asdict(probe))
        for ci, clip in enumerate(clips):
            frames_id = make_sample_id(b"frames", *clip.frames)
            clip_id = make_sample_id(input_id, "clip", str(ci))
            seen: set[str] = set()
            for cap in clip.captions:
                norm = normalize_for_dedup(cap)
                if norm in seen:  # the same caption twice would give two rows one sample_id
                    drops["duplicate_caption"] += 1
                    continue
                j = len(seen)
                seen.add(norm)
                emit(**base, row_id=clip_id if j == 0 else make_sample_id(clip_id, str(j)), clip_id=clip_id,
                     caption=cap, sample_id=make_sample_id(frames_id, norm), content_hash=frames_id,
                     frames=clip.frames, frame_times_s=clip.frame_times_s, start_s=clip.start_s,
                     end_s=clip.end_s, width=clip.width, height=clip.height,
                     phash=clip.phashes[len(clip.phashes) // 2], hashes=clip.phashes,
                     area=probe.width * probe.height, orig_width=probe.width, orig_height=probe.height,
                     clip_index=ci, caption_index=j, probe=probe_json, stage="video")
                probe_json = None  # one probe per input: stats count videos, not rows
        for reason, count in sorted(drops.items()):
            emit(**base, row_id=make_sample_id(input_id, "drop", reason), clip_index=len(clips), stage="clip",
                 reason=reason, detail=str(count))
    return pa.Table.from_pydict(rows, schema=VIDEO_WORK_SCHEMA)


def _label(meta: dict) -> str | None:
    value = meta.get("label")
    return None if value is None else str(value)


__all__ = ["Clip", "VIDEO_WORK_SCHEMA", "sample_times", "spans_from_cuts", "spans_from_segments", "is_static",
           "extract_clips", "plan_clips", "process_video", "process_video_batch"]
