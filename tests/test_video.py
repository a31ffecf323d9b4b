"""Video stages on real files PyAV writes here: probe, rejects, shots, seeking, clips, the batch stage.

``write_video`` is also used by tests/test_curate_video.py: coloured scenes (one palette per
scene, so a histogram detector sees the cuts) of blocky texture scrolling sideways (so clips
are not static).
"""

from __future__ import annotations

import io
import json
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402

from pipelines.captions import CaptionConfig
from pipelines.video import (
    VideoConfig,
    VideoProbe,
    VideoReject,
    iter_frames_at,
    open_video,
    probe_video,
    validate_probe,
)
from pipelines.video_clips import (
    is_static,
    process_video_batch,
    sample_times,
    spans_from_cuts,
    spans_from_segments,
)
from pipelines.video_shots import detect_shots

PALETTES = [(200, 40, 40), (40, 170, 60), (40, 60, 210), (220, 200, 40), (150, 50, 200), (30, 200, 200)]


def write_video(path, seconds: float = 4.0, fps: int = 25, size=(320, 180), scenes: int = 1,
                codec: str = "libx264", fmt: str | None = None, static: bool = False, seed: int = 0,
                bit_rate: int | None = None, options: dict | None = None, audio: bool = False,
                speed_px: int = 3):
    """Write a real encoded video to ``path`` (a path or a BytesIO, then ``fmt`` is needed)."""
    w, h = size
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    block = max(4, w // 16)
    textures = []
    for k in range(scenes):
        base = np.array(PALETTES[(k + seed) % len(PALETTES)], np.int16)
        noise = rng.integers(-70, 70, (h // block + 1, 2 * w // block + 2, 3), dtype=np.int16)
        textures.append(np.clip(base + noise, 0, 255).astype(np.uint8).repeat(block, 0).repeat(block, 1))
    c = av.open(path, "w", format=fmt, options=options or {})
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if bit_rate:
        s.bit_rate = bit_rate
    a = None
    if audio:
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
    for i in range(n):
        sc = min(scenes - 1, i * scenes // n)
        off = 0 if static else (i * speed_px) % (w + 1)
        img = np.ascontiguousarray(textures[sc][:h, off:off + w])
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    if a is not None:
        for j in range(int(seconds * 16000 / 1024)):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, j * 1024
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    c.close()
    return path


def video_bytes(**kw) -> bytes:
    # A real file, not a BytesIO: mp4 "faststart" rewrites the file by name after writing.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / f"v.{kw.get('fmt', 'mp4')}")
        write_video(path, **kw)
        return Path(path).read_bytes()


CFG = VideoConfig(frames_per_clip=4, frame_px=64, min_clip_s=1.0, max_clip_s=5.0)


def _probe(data: bytes) -> VideoProbe:
    with open_video(data) as c:
        return probe_video(c)


def _reject(data: bytes, cfg: VideoConfig = CFG) -> str:
    with pytest.raises(VideoReject) as e:
        with open_video(data) as c:
            validate_probe(probe_video(c), cfg)
            s = c.streams.video[0]
            p = probe_video(c)
            detect_shots(c, s, p, cfg)
    return e.value.reason


def test_probe_from_bytes_and_from_a_file_agree(tmp_path):
    path = write_video(str(tmp_path / "a.mp4"), seconds=3.0, size=(320, 180))
    p = _probe(Path(path).read_bytes())
    assert (p.codec, p.width, p.height, p.fps, p.has_audio, p.vfr) == ("h264", 320, 180, 25.0, False, False)
    assert abs(p.duration_s - 3.0) < 0.05
    with open_video(uri=path) as c:
        assert probe_video(c) == p


def test_webm_vp9_with_a_wrong_extension_is_read_by_content(tmp_path):
    data = video_bytes(seconds=2.0, codec="libvpx-vp9", fmt="webm", size=(160, 96))
    (tmp_path / "really_webm.mp4").write_bytes(data)
    with open_video(uri=str(tmp_path / "really_webm.mp4")) as c:
        p = probe_video(c)
    assert p.codec == "vp9" and p.container.startswith("matroska") and abs(p.duration_s - 2.0) < 0.1


def test_rejects_with_reasons(tmp_path):
    good = video_bytes(seconds=3.0)
    assert _reject(good[: len(good) // 2]) == "undecodable"  # moov atom at the end: cut off
    assert _reject(b"this is not a video at all") == "undecodable"
    jpeg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(jpeg, "JPEG")
    assert _reject(jpeg.getvalue()) == "not_a_video"
    assert _reject(video_bytes(seconds=1.0, size=(16, 16))) == "bad_resolution"
    assert _reject(video_bytes(seconds=1.0, size=(640, 64))) == "bad_resolution"  # 10:1
    assert _reject(video_bytes(seconds=0.5)) == "too_short"
    # audio only
    assert _reject(hostile.audio_only_mp4(n_frames=20)) == "no_video_stream"
    assert _reject(b"") == "undecodable"


def test_truncated_stream_with_moov_in_front(tmp_path):
    data = video_bytes(seconds=6.0, options={"movflags": "faststart"})
    cut = data[: int(len(data) * 0.5)]
    p = _probe(cut)  # the header still declares 6 s
    assert abs(p.duration_s - 6.0) < 0.05
    assert _reject(cut) == "truncated"
    with open_video(cut) as c:  # the seek path notices too
        with pytest.raises(VideoReject, match="truncated"):
            list(iter_frames_at(c, c.streams.video[0], [0.5, 5.5], p, seek_gap_s=1.0))


def test_shot_detection_finds_the_cuts():
    data = video_bytes(seconds=9.0, scenes=3)
    with open_video(data) as c:
        p = probe_video(c)
        cuts = detect_shots(c, c.streams.video[0], p, CFG)
    assert len(cuts) == 2
    assert abs(cuts[0] - 3.0) <= 0.041 and abs(cuts[1] - 6.0) <= 0.041  # on the frame, not the sample
    with open_video(video_bytes(seconds=4.0, scenes=1)) as c:
        assert detect_shots(c, c.streams.video[0], probe_video(c), CFG) == []
    phash_cfg = VideoConfig(shot_detector="phash", shot_threshold=0.3, min_clip_s=1.0)
    with open_video(video_bytes(seconds=9.0, scenes=3, speed_px=1)) as c:  # pHash needs slow motion
        cuts = detect_shots(c, c.streams.video[0], probe_video(c), phash_cfg)
    assert [round(x) for x in cuts] == [3, 6]


def test_spans_from_cuts():
    cfg = VideoConfig(min_clip_s=2.0, max_clip_s=5.0)
    spans, short = spans_from_cuts([1.0, 4.0, 15.0], 16.5, cfg)
    # [0,1] too short; [4,15] = 11 s split evenly in 3; [15,16.5] too short
    assert short == 2
    assert spans[0] == (1.0, 4.0)
    assert [round(b - a, 3) for a, b in spans[1:]] == [3.667] * 3
    assert spans[-1][1] == 15.0


def test_spans_from_segments_clamp_merge_and_drop():
    from pipelines.subtitles import Segment

    cfg = VideoConfig(min_clip_s=2.0, max_clip_s=5.0)
    segs = [Segment(0.0, 1.0, "a"), Segment(1.2, 2.6, "b"), Segment(3.0, 12.0, "long"),
            Segment(13.0, 13.5, "tiny"), Segment(20.0, 22.0, "after end")]
    out, dropped = spans_from_segments(segs, 18.0, cfg)
    assert [(s.start_s, s.end_s, s.text) for s in out] == [(0.0, 2.6, "a b"), (3.0, 8.0, "long")]
    assert dropped == {"too_short": 1, "out_of_range": 1}


def test_sample_times_uniform_and_fps():
    assert sample_times(2.0, 6.0, VideoConfig(frames_per_clip=4)) == [2.5, 3.5, 4.5, 5.5]
    t = sample_times(0.0, 3.0, VideoConfig(sample_fps=2.0))
    assert len(t) == 6 and t[0] == 0.25
    assert len(sample_times(0.0, 100.0, VideoConfig(sample_fps=2.0, max_frames_per_clip=16))) == 16


@pytest.mark.parametrize("seek_gap_s", [0.0, 100.0])
def test_frames_at_times_by_seeking_or_decoding_forward(seek_gap_s):
    data = video_bytes(seconds=8.0, options={"g": "50"})  # a key frame every 2 s
    targets = [0.3, 0.31, 2.9, 5.02, 7.9]
    with open_video(data) as c:
        p = probe_video(c)
        got = [(t, f.time) for t, f in iter_frames_at(c, c.streams.video[0], targets, p, seek_gap_s)]
    for target, (t, ftime) in zip(targets, got):
        assert t == pytest.approx(ftime)
        assert target - 0.02 - 1e-6 <= t <= target + 0.04 + 1e-6  # the frame at (or just after) the target


def test_variable_frame_rate_uses_timestamps():
    buf = io.BytesIO()
    c = av.open(buf, "w", format="mp4")
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt = 160, 96, "yuv420p"
    s.codec_context.time_base = Fraction(1, 1000)
    t = 0.0
    for i in range(150):
        f = av.VideoFrame.from_ndarray(np.full((96, 160, 3), i % 255, np.uint8), format="rgb24")
        f.pts, f.time_base = int(round(t * 1000)), Fraction(1, 1000)
        for pkt in s.encode(f):
            c.mux(pkt)
        t += 0.02 if (i // 25) % 2 == 0 else 0.1  # bursts of 50 fps and 10 fps
    for pkt in s.encode():
        c.mux(pkt)
    c.close()
    with open_video(buf.getvalue()) as c:
        p = probe_video(c)
        assert p.vfr
        # frames at 0.5 and 0.6 s (a slow run), then 2.9 and 3.0 s; index / fps would be far off
        got = [round(t, 3) for t, _ in iter_frames_at(c, c.streams.video[0], [0.55, 2.95, 3.0], p, 1.0)]
    assert got == [0.6, 3.0, 3.0]


def test_is_static():
    assert is_static([5, 5, 7, 5], max_hamming=2)
    assert not is_static([5, 5, -1, 5], max_hamming=4)
    assert not is_static([5], max_hamming=4)


def _records(rows: list[dict]) -> pa.Table:
    cols = ["source", "key", "media", "media_uri", "media_name", "caption_raw", "meta", "error", "error_detail"]
    return pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows], schema=pa.schema([
        ("source", pa.string()), ("key", pa.string()), ("media", pa.binary()), ("media_uri", pa.string()),
        ("media_name", pa.string()), ("caption_raw", pa.string()), ("meta", pa.string()),
        ("error", pa.string()), ("error_detail", pa.string())]))


def test_process_video_batch_shots_subtitles_and_rejects(tmp_path):
    path = write_video(str(tmp_path / "three.mp4"), seconds=9.0, scenes=3)
    srt = ("1\n00:00:00,500 --> 00:00:01,200\nhello there\n\n"
           "2\n00:00:01,300 --> 00:00:02,900\nthe dog runs\n\n"
           "3\n00:00:05,000 --> 00:00:08,000\na <b>blue</b> scene\n\n"
           "4\n-00:00:01,000 --> 00:00:02,000\nbad time\n")
    recs = _records([
        {"source": "s", "key": "shots", "media_uri": path, "caption_raw": "three coloured scenes",
         "meta": json.dumps({"label": "demo"})},
        {"source": "s", "key": "subs", "media": Path(path).read_bytes(), "caption_raw": None,
         "meta": json.dumps({"subtitles": srt, "subtitles_format": "srt"})},
        {"source": "s", "key": "static", "media": video_bytes(seconds=3.0, static=True), "caption_raw": "a still"},
        {"source": "s", "key": "broken", "media": b"garbage", "caption_raw": "x y z"},
        {"source": "s", "key": "readerr", "error": "unsafe_path", "error_detail": "../../x.mp4"},
        {"source": "s", "key": "multi", "media_uri": path,
         "meta": json.dumps({"captions": ["first caption", "second caption"]})},
        {"source": "s", "key": "nocap", "media_uri": path, "caption_raw": "  "},
    ])
    out = process_video_batch(recs, CFG, CaptionConfig()).to_pylist()
    by = {}
    for r in out:
        by.setdefault(r["key"], []).append(r)
    assert set(by) == {"shots", "subs", "static", "broken", "readerr", "multi", "nocap"}

    kept = [r for r in by["shots"] if r["reason"] is None]
    assert [(round(r["start_s"], 1), round(r["end_s"], 1)) for r in kept] == [(0, 3), (3, 6), (6, 9)]
    for r in kept:
        assert len(r["frames"]) == 4 == len(r["frame_times_s"]) == len(r["hashes"])
        assert all(r["start_s"] <= t <= r["end_s"] for t in r["frame_times_s"])
        assert r["frames"][0][:2] == b"\xff\xd8" and min(r["width"], r["height"]) == 64
        assert r["caption"] == "three coloured scenes" and r["label"] == "demo"
    assert len({r["content_hash"] for r in kept}) == 3 and len({r["sample_id"] for r in kept}) == 3
    assert [json.loads(r["probe"])["codec"] if r["probe"] else None for r in kept] == ["h264", None, None]
    assert all(r["row_id"] == r["clip_id"] and r["caption_index"] == 0 for r in kept)

    subs = [r for r in by["subs"] if r["reason"] is None]
    assert [(round(r["start_s"], 3), round(r["end_s"], 3), r["caption"]) for r in subs] == [
        (0.5, 2.9, "hello there the dog runs"), (5.0, 8.0, "a blue scene")]
    drops = {r["reason"]: r["detail"] for r in by["subs"] if r["reason"]}
    assert drops == {"segment_bad_timestamp": "1"}  # counted, the input still has clips

    assert [(r["clip_index"], r["reason"]) for r in by["static"]] == [(-1, "static")]
    assert [(r["clip_index"], r["reason"]) for r in by["broken"]] == [(-1, "undecodable")]
    assert [(r["reason"], r["detail"]) for r in by["readerr"]] == [("unsafe_path", "../../x.mp4")]
    multi = [r for r in by["multi"] if r["reason"] is None]
    assert len(multi) == 6 and {r["caption"] for r in multi} == {"first caption", "second caption"}
    assert len({r["clip_id"] for r in multi}) == 3 and len({r["content_hash"] for r in multi}) == 3
    assert len({r["sample_id"] for r in multi}) == 6
    assert len({r["row_id"] for r in out}) == len(out)
    assert [(r["clip_index"], r["reason"]) for r in by["nocap"]] == [(-1, "empty_caption")]


def test_input_accounting_after_dedup():
    """Clip-level drops are stats; an input left without clips by dedup is one reject."""
    from pipelines.dedup import DROP_SCHEMA
    from pipelines.video_accounting import (
        account_partial,
        clip_candidates,
        reject_rows,
        sibling_drops,
        summarize_inputs,
    )
    from pipelines.video_clips import VIDEO_WORK_SCHEMA

    probe = json.dumps({"codec": "h264", "container": "mp4", "vfr": False, "has_audio": True,
                        "duration_s": 9.0, "fps": 25.0})

    def row(inp, clip, cap, reason=None, clip_index=0, detail=None, with_probe=False):
        return {"row_id": f"{inp}-{clip}-{cap}" if cap is not None else f"{inp}-{reason}", "input_id": inp,
                "clip_id": f"{inp}-{clip}-0" if cap is not None else None, "source": "s", "key": inp,
                "clip_index": clip_index, "caption_index": cap, "reason": reason, "detail": detail,
                "stage": "video" if reason is None or clip_index == -1 else "clip",
                "probe": probe if with_probe else None, "start_s": 0.0, "end_s": 3.0}

    rows = [
        row("a", 0, 0, with_probe=True), row("a", 0, 1), row("a", 1, 0),  # a: clip 1 is a duplicate
        row("a", None, None, reason="static", clip_index=2, detail="2"),
        row("b", 0, 0, with_probe=True), row("b", 0, 1),                   # b: its only clip is a duplicate
        row("c", None, None, reason="undecodable", clip_index=-1, detail="bad"),
    ]
    rows[-1]["row_id"] = "c"
    t = pa.Table.from_pylist([{f.name: r.get(f.name) for f in VIDEO_WORK_SCHEMA} for r in rows],
                             schema=VIDEO_WORK_SCHEMA)
    assert clip_candidates(t).column("row_id").to_pylist() == ["a-0-0", "a-1-0", "b-0-0"]
    clip_drops = pa.table({"row_id": ["a-1-0", "b-0-0"], "reason": ["near_duplicate", "duplicate"],
                           "keeper": ["K1", "K2"]}, schema=DROP_SCHEMA)
    drops = sibling_drops(t.select(["row_id", "clip_id", "reason"]), clip_drops)
    assert sorted(drops.column("row_id").to_pylist()) == ["a-1-0", "b-0-0", "b-0-1"]
    facts = account_partial(t, drops.column("row_id"))
    dup_rejects, extra = summarize_inputs(facts, drops)
    assert dup_rejects.to_pylist() == [{"source": "s", "key": "b", "stage": "dedup", "reason": "duplicate",
                                        "detail": "K2"}]
    assert extra["kept_inputs"] == 1
    assert extra["clips"]["kept"] == 1 and extra["clips"]["dropped"] == {"static": 2, "near_duplicate": 1}
    assert extra["video"]["probed"] == 2 and extra["video"]["codec"] == {"h264": 2}
    assert reject_rows(t).to_pylist() == [{"source": "s", "key": "c", "stage": "video", "reason": "undecodable",
                                           "detail": "bad"}]


@pytest.mark.parametrize("ext,codec,fmt", [("mkv", "libx264", "matroska"), ("mov", "libx264", "mov"),
                                           ("avi", "mpeg4", "avi"), ("mpg", "mpeg2video", "mpeg")])
def test_every_container_gives_clips(tmp_path, ext, codec, fmt):
    path = write_video(str(tmp_path / f"v.{ext}"), seconds=6.0, codec=codec, fmt=fmt, scenes=2, size=(160, 96))
    recs = _records([{"source": "s", "key": ext, "media_uri": path, "caption_raw": "two scenes of texture"}])
    out = process_video_batch(recs, CFG, CaptionConfig()).to_pylist()
    assert [r["reason"] for r in out] == [None, None]
    for r, (a, b) in zip(out, [(0.0, 3.0), (3.0, 6.0)]):
        assert abs(r["start_s"] - a) < 0.2 and abs(r["end_s"] - b) < 0.2  # MPEG-PS: 5.84 s declared
        assert all(r["start_s"] <= t <= r["end_s"] for t in r["frame_times_s"])
