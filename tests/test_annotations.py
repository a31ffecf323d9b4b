"""MSR-VTT style JSON and WebVid style CSV readers: records, caption rules, missing videos."""

from __future__ import annotations

import json

import pytest

from pipelines.annotations import (
    choose_captions,
    index_videos,
    is_annotation_file,
    read_annotations,
    read_msrvtt,
    read_webvid,
)
from pipelines.inputs import INPUT_SCHEMA


@pytest.fixture()
def videos(tmp_path):
    # Lookup is by file name only: these readers never decode (tests/test_video.py does).
    d = tmp_path / "videos"
    (d / "sub").mkdir(parents=True)
    for name in ("video0.mp4", "video1.webm", "sub/video2.mkv", "notes.txt"):
        (d / name).write_bytes(b"x")
    return d


def _meta(row):
    return json.loads(row["meta"] or "{}")


def test_index_videos(videos):
    idx = index_videos(str(videos))
    assert idx["video0"].endswith("videos/video0.mp4")
    assert idx["video2"] == idx["sub/video2"]
    assert "notes" not in idx
    assert index_videos(str(videos / "nope")) == {}


def test_msrvtt_official_shape_all_captions(tmp_path, videos):
    data = {
        "videos": [{"video_id": "video0", "category": 9, "start time": 137.7, "end time": 149.4},
                   {"video_id": "video1", "category": 3}, {"video_id": "video7"}],
        "sentences": [{"video_id": "video0", "caption": "a man talks", "sen_id": 0},
                      {"video_id": "video0", "caption": "someone speaks", "sen_id": 1},
                      {"video_id": "video1", "caption": "a cat plays", "sen_id": 2},
                      {"video_id": "video7", "caption": "missing video", "sen_id": 3}],
    }
    path = tmp_path / "train_val_videodatainfo.json"
    path.write_text(json.dumps(data))
    t = read_msrvtt(str(path), videos_dir=str(videos))
    assert t.schema == INPUT_SCHEMA
    rows = {r["key"]: r for r in t.to_pylist()}
    assert set(rows) == {"video0", "video1", "video7"}  # one input per video id
    v0 = rows["video0"]
    assert v0["media_uri"].endswith("video0.mp4") and v0["error"] is None
    assert _meta(v0)["captions"] == ["a man talks", "someone speaks"]
    assert _meta(v0)["category"] == 9
    assert "spans" not in _meta(v0)  # MSR-VTT times refer to YouTube, not to the clip file
    assert rows["video1"]["caption_raw"] == "a cat plays"
    assert rows["video7"]["error"] == "missing_media" and rows["video7"]["media_uri"] is None


@pytest.mark.parametrize("rule,expect", [("first", ["b"]), ("longest", ["longer one"]), ("all", ["b", "longer one", "c"])])
def test_caption_rules(tmp_path, videos, rule, expect):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"video0": ["b", "longer one", "", "c"]}))
    rows = read_msrvtt(str(path), videos_dir=str(videos), caption_rule=rule).to_pylist()
    meta = _meta(rows[0])
    got = meta.get("captions", [rows[0]["caption_raw"]])
    assert got == expect


def test_random_rule_is_deterministic_per_video():
    caps = [f"c{i}" for i in range(10)]
    picks = {choose_captions(f"video{i}", caps, "random")[0] for i in range(30)}
    assert len(picks) > 1
    assert choose_captions("video3", caps, "random") == choose_captions("video3", caps, "random")
    with pytest.raises(ValueError, match="valid choices"):
        choose_captions("v", caps, "best")


def test_list_shape_and_activitynet_spans(tmp_path, videos):
    (tmp_path / "a.json").write_text(json.dumps([{"video": "video1.webm", "caption": ["x y", "z w"]}]))
    rows = read_msrvtt(str(tmp_path / "a.json"), videos_dir=str(videos), caption_rule="first").to_pylist()
    assert [(r["key"], r["caption_raw"]) for r in rows] == [("video1", "x y")]
    (tmp_path / "b.json").write_text(json.dumps(
        {"video2": {"duration": 20.0, "timestamps": [[0.5, 4.0], [5.0, 9.5]], "sentences": ["one", "two"]}}))
    rows = read_msrvtt(str(tmp_path / "b.json"), videos_dir=str(videos)).to_pylist()
    assert _meta(rows[0])["spans"] == [[0.5, 4.0, "one"], [5.0, 9.5, "two"]]


def test_video_without_captions_is_a_reject(tmp_path, videos):
    (tmp_path / "a.json").write_text(json.dumps({"video0": []}))
    row = read_msrvtt(str(tmp_path / "a.json"), videos_dir=str(videos)).to_pylist()[0]
    assert row["error"] == "missing_caption"


def test_corrupt_annotation_file_is_one_reject_record(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    rows = read_msrvtt(str(tmp_path / "a.json")).to_pylist()
    assert [(r["key"], r["error"]) for r in rows] == [("#file", "corrupt_annotations")]
    (tmp_path / "b.json").write_text("42")
    assert read_msrvtt(str(tmp_path / "b.json")).to_pylist()[0]["error"] == "corrupt_annotations"


def test_annotation_files_are_recognised(tmp_path):
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    (tmp_path / "w.csv").write_text("videoid,contentUrl,duration,page_dir,name\n1,u,PT1S,p,x\n")
    (tmp_path / "m.csv").write_text("url,caption\nhttp://x/a.jpg,a cat\n")
    (tmp_path / "a.json").write_text("{}")
    assert is_annotation_file(fs, str(tmp_path / "w.csv"))
    assert not is_annotation_file(fs, str(tmp_path / "m.csv"))  # an image manifest stays one
    assert is_annotation_file(fs, str(tmp_path / "a.json"))
    assert read_annotations(str(tmp_path / "a.json")).num_rows == 0


def test_webvid_csv(tmp_path, videos):
    (videos / "p1").mkdir()
    (videos / "p1" / "1001.mp4").write_bytes(b"x")
    (videos / "1002.mp4").write_bytes(b"x")
    csv = ("videoid,contentUrl,duration,page_dir,name\n"
           "1001,https://example.com/1001.mp4,PT00H00M12S,p1,Aerial view of a lake\n"
           "1002,https://example.com/1002.mp4,PT00H00M08S,p2,\"Caf\xe9, people, sun\"\n"
           f"1003,{videos / 'video0.mp4'},PT00H00M05S,p3,Local file\n"
           "1004,https://example.com/1004.mp4,PT00H00M05S,p4,Not downloaded\n").encode("cp1252")
    (tmp_path / "results_2M_val.csv").write_bytes(csv)
    rows = {r["key"]: r for r in read_webvid(str(tmp_path / "results_2M_val.csv"), str(videos)).to_pylist()}
    assert rows["1001"]["media_uri"].endswith("p1/1001.mp4")
    assert rows["1001"]["caption_raw"] == "Aerial view of a lake"
    assert rows["1002"]["caption_raw"] == "Café, people, sun"  # cp1252 caption, decoded not crashed
    assert rows["1003"]["media_uri"].endswith("video0.mp4")
    assert rows["1004"]["error"] == "missing_media" and "not fetched" in rows["1004"]["error_detail"]


def test_webvid_without_videoid_column_fails_clearly(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="videoid"):
        read_webvid(str(tmp_path / "x.csv"))
