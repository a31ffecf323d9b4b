"""Hostile and broken input: no crash, no hang, every input accounted for, nothing written outside --out.

    .venv/bin/pytest tests/test_hostile_inputs.py -q            # property tests (no Ray), ~25 s
    .venv/bin/pytest tests/test_hostile_inputs.py -q -m slow    # one `mm curate` over every hostile class,
                                                                # the long MP4 fuzz run

Base media are real (demo-corpus pictures through Pillow, demo videos through PyAV); the
damage is generated in tests/hostile.py. Property tests (hypothesis, derandomized so CI is
stable) drive the pure stage functions with byte flips and truncations; the end-to-end test
curates one corpus holding every hostile class through ``mm curate`` on the session's Ray and
checks the accounting invariant from the Parquet files themselves.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402

from pipelines.captions import CaptionConfig  # noqa: E402
from pipelines.images import IMAGE_WORK_SCHEMA, ImageConfig, ImageReject, process_image, process_image_batch  # noqa: E402
from pipelines.inputs import INPUT_SCHEMA  # noqa: E402

BASE = hostile.base_images(seed=3, px=64)
CFG = ImageConfig(image_px=32, min_side_px=16)
BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F)}


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _outcome(data: bytes, name: str) -> tuple[str, str | None]:
    """('kept', None) or ('reject', reason); anything but ImageReject propagates (a crash)."""
    try:
        out = process_image(data, name, CFG)
    except ImageReject as e:
        return "reject", e.reason
    # A kept image is a real, decodable JPEG of the promised size.
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(out["image"]))
    im.load()
    assert im.format == "JPEG" and im.size == (out["width"], out["height"])
    assert min(im.size) <= CFG.image_px and out["orig_width"] > 0 and out["orig_height"] > 0
    return "kept", None


# -- corrupt media: byte flips and truncations of real files (property-based) ----------------------
@fuzz(120)
@given(fmt=st.sampled_from(sorted(BASE)), seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 64),
       cut=st.floats(0.0, 1.0), mode=st.sampled_from(["flip", "truncate", "both"]))
def test_flipped_and_truncated_images_are_kept_or_rejected_never_crash(fmt, seed, flips, cut, mode):
    rng = np.random.default_rng(seed)
    data = BASE[fmt]
    if mode in ("flip", "both"):
        data = hostile.flip_bytes(data, rng, flips)
    if mode in ("truncate", "both"):
        data = hostile.truncate(data, cut)
    kind, reason = _outcome(data, f"x.{fmt}")
    if kind == "reject":
        assert reason in {"empty_file", "unsupported_format", "decode_error", "truncated", "decompression_bomb",
                          "too_small", "bad_aspect_ratio", "animated"}


@pytest.mark.parametrize("case, expect", [
    ("bomb_png_12k", {"decompression_bomb"}),                       # 144 Mpx of zeros in ~20 kB
    ("bomb_png_20k", {"decompression_bomb"}),                       # past Pillow's own limit too
    ("png_header_65535", {"decompression_bomb"}),
    ("jpeg_header_65000", {"decompression_bomb"}),
    ("png_header_zero", {"decode_error"}),
    ("jpeg_header_zero", {"decode_error"}),
    ("png_header_smaller", {"decode_error", "truncated", "kept"}),
    ("png_header_taller", {"decode_error", "truncated", "kept"}),   # see docs/RELIABILITY.md: kept, padded
    ("jpeg_header_taller", {"decode_error", "truncated", "kept"}),
    ("jpeg_header_smaller", {"kept"}),
    ("empty", {"empty_file"}),
    ("mp4_as_jpg", {"unsupported_format"}),
])
def test_bombs_huge_zero_and_lying_headers(case, expect):
    png, jpg = BASE["png"], BASE["jpg"]
    data = {
        "bomb_png_12k": lambda: hostile.png_bomb(12_000),
        "bomb_png_20k": lambda: hostile.png_bomb(20_000),
        "png_header_65535": lambda: hostile.png_with_size(png, 65535, 65535),
        "jpeg_header_65000": lambda: hostile.jpeg_with_size(jpg, 65000, 65000),
        "png_header_zero": lambda: hostile.png_with_size(png, 0, 0),
        "jpeg_header_zero": lambda: hostile.jpeg_with_size(jpg, 0, 0),
        "png_header_smaller": lambda: hostile.png_with_size(png, 40, 40),
        "png_header_taller": lambda: hostile.png_with_size(png, 64, 200),
        "jpeg_header_taller": lambda: hostile.jpeg_with_size(jpg, 64, 200),
        "jpeg_header_smaller": lambda: hostile.jpeg_with_size(jpg, 40, 40),
        "empty": lambda: b"",
        "mp4_as_jpg": lambda: hostile.base_mp4(seed=1, n_frames=4),
    }[case]()
    kind, reason = _outcome(data, "x.jpg" if "jpeg" in case or case == "mp4_as_jpg" else "x.png")
    assert (reason if kind == "reject" else "kept") in expect


# -- hostile captions through the image stage (property-based) ---------------------------------------
def _records(captions: list[bytes | str | None], media: bytes) -> pa.Table:
    rows = [{"source": "s", "key": f"k{i}", "media": media, "media_name": "x.png",
             "caption_raw": c if not isinstance(c, bytes) else c.decode("utf-8", "surrogateescape"),
             "meta": None, "url": None, "error": None, "error_detail": None} for i, c in enumerate(captions)]
    for r in rows:  # the readers hand over str; a lone surrogate is what invalid UTF-8 can become
        if isinstance(r["caption_raw"], str):
            r["caption_raw"] = r["caption_raw"].encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def _assert_clean_caption(text: str) -> None:
    assert "\x00" not in text and not (set(text) & BIDI), repr(text[:80])
    assert all(unicodedata.category(ch) not in ("Cc", "Cs", "Co", "Cn") for ch in text), repr(text[:80])
    assert text == text.strip() and "  " not in text


@fuzz(150)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=300),
                          st.text(alphabet=st.sampled_from(sorted(BIDI) + ["\x00", "a", " ", "<", ">", "&", "\ufeff",
                                                                           "\u200b", "\u0301"]), max_size=200)),
                min_size=1, max_size=8))
def test_any_caption_gives_one_row_per_input_and_clean_text(captions):
    table = process_image_batch(_records(captions, BASE["png"]), CFG, CaptionConfig())
    assert table.schema == IMAGE_WORK_SCHEMA and table.num_rows == len(captions)
    for row in table.to_pylist():
        assert (row["reason"] is None) == (row["sample_id"] is not None)
        if row["reason"] is None:
            _assert_clean_caption(row["caption"])


def test_named_hostile_captions():
    names = sorted(hostile.HOSTILE_CAPTIONS)
    table = process_image_batch(_records([hostile.HOSTILE_CAPTIONS[n] for n in names], BASE["png"]), CFG,
                                CaptionConfig())
    got = dict(zip(names, table.to_pylist()))
    assert got["huge"]["reason"] == "caption_too_long"
    assert got["only_controls"]["reason"] in ("empty_caption", "caption_too_short")
    for name in ("invalid_utf8", "nul", "rtl", "html_script", "deep_html", "ansi"):
        assert got[name]["reason"] is None, (name, got[name]["reason"], got[name]["detail"])
        _assert_clean_caption(got[name]["caption"])
    assert "script" not in got["html_script"]["caption"] and "onerror" not in got["html_script"]["caption"]
    assert got["rtl"]["caption"] == "a yellow star on black ground"


# -- corrupt video (property-based; PyAV decodes for real) ---------------------------------------------
MP4 = hostile.base_mp4(seed=2, px=48, n_frames=24, fps=12)


def _video_batch(blobs: list[bytes]) -> pa.Table:
    rows = [{"source": "s", "key": f"v{i}", "media": b, "media_name": "v.mp4", "caption_raw": "a red square moving left",
             "meta": None, "url": None, "error": None, "error_detail": None} for i, b in enumerate(blobs)]
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def _fuzz_video(seed: int, flips: int, cut: float, mode: str) -> None:
    from pipelines.video import VideoConfig
    from pipelines.video_clips import process_video_batch

    rng = np.random.default_rng(seed)
    data = MP4
    if mode in ("flip", "both"):
        data = hostile.flip_bytes(data, rng, flips)
    if mode in ("truncate", "both"):
        data = hostile.truncate(data, cut)
    out = process_video_batch(_video_batch([data]), VideoConfig(), CaptionConfig())
    inputs = {r["input_id"] for r in out.to_pylist()}
    assert len(inputs) == 1  # one input, however many clip rows
    rows = out.to_pylist()
    kept = [r for r in rows if r["reason"] is None]
    assert kept or any(r["clip_index"] == -1 for r in rows)  # kept clips, or one input reject
    for r in kept:
        assert r["frames"] and len(r["frames"]) == len(r["frame_times_s"])


@fuzz(12)
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 200), cut=st.floats(0.0, 1.0),
       mode=st.sampled_from(["flip", "truncate", "both"]))
def test_flipped_and_truncated_mp4_never_crash(seed, flips, cut, mode):
    _fuzz_video(seed, flips, cut, mode)


@pytest.mark.slow
@fuzz(150)
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 400), cut=st.floats(0.0, 1.0),
       mode=st.sampled_from(["flip", "truncate", "both"]))
def test_flipped_and_truncated_mp4_never_crash_long(seed, flips, cut, mode):
    _fuzz_video(seed, flips, cut, mode)


# -- one curate run over every hostile class --------------------------------------------------------
SECRET = "TOPSECRET-6f1d2a-do-not-read"


def _hostile_corpus(root: Path) -> dict:
    """src/ (tar shards, folder, manifests), outside/ (must never be read), expectations."""
    src, outside = root / "src", root / "outside"
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET)
    (outside / "outside.jpg").write_bytes(hostile.base_images(90)["jpg"])
    (outside / "dir").mkdir()
    hostile.write_folder_sample(outside / "dir", "inner", hostile.base_images(91)["png"], "png", SECRET.encode())
    rng = np.random.default_rng(0)
    seeds = iter(range(100, 200))

    def pic(fmt: str = "png") -> bytes:  # a distinct picture per sample: no accidental duplicates
        return hostile.base_images(next(seeds))[fmt]

    expect: dict[tuple[str, str], str | set] = {}

    # shard 0: good samples with hostile captions, corrupt media, bombs, traversal and special members
    m0: list[tuple] = []
    pics = {name: pic() for name in hostile.HOSTILE_CAPTIONS}
    for name, cap in sorted(hostile.HOSTILE_CAPTIONS.items()):
        m0 += [(f"cap_{name}.png", pics[name]), (f"cap_{name}.txt", cap)]
    corrupt = {
        "flip_jpg": hostile.flip_bytes(pic("jpg"), rng, 40), "flip_png": hostile.flip_bytes(pic("png"), rng, 5),
        "flip_webp": hostile.flip_bytes(pic("webp"), rng, 20), "half_jpg": hostile.truncate(pic("jpg"), 0.5),
        "half_png": hostile.truncate(pic("png"), 0.5), "head_webp": hostile.truncate(pic("webp"), 0.1),
        "bomb": hostile.png_bomb(12_000), "huge_hdr": hostile.png_with_size(pic("png"), 65535, 65535),
        "zero_hdr": hostile.jpeg_with_size(pic("jpg"), 0, 0),
        "taller_hdr": hostile.png_with_size(pic("png"), 64, 200),
        "mp4_as_jpg": hostile.base_mp4(seed=5, n_frames=4), "empty": b"",
    }
    for k, data in corrupt.items():
        ext = "jpg" if k.endswith("jpg") or k in ("zero_hdr", "mp4_as_jpg", "empty") else (
            "webp" if k.endswith("webp") else "png")
        m0 += [(f"bad_{k}.{ext}", data), (f"bad_{k}.txt", f"a corrupt sample called {k}".encode())]
    m0 += [
        ("../../evil.jpg", pic("jpg")), ("../../evil.txt", b"a member that tries to climb out"),
        ("/abs/evil2.jpg", pic("webp")), ("/abs/evil2.txt", b"an absolute member name"),
        ("a/b/../../../evil3.png", pic("jpg")), ("a/b/../../../evil3.txt", b"dot dot inside the name"),
        ("nested/deeper/still/deep.jpg", pic("jpg")), ("nested/deeper/still/deep.txt", b"a nested member"),
        ("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"), ("link.txt", b"a symlink member"),
        ("hard.jpg", b"", tarfile.LNKTYPE, "nested/deeper/still/deep.jpg"), ("hard.txt", b"a hard link member"),
        ("fifo.jpg", b"", tarfile.FIFOTYPE, ""), ("fifo.txt", b"a fifo member"),
        ("dev.jpg", b"", tarfile.CHRTYPE, ""), ("dev.txt", b"a device member"),
        ("somedir", b"", tarfile.DIRTYPE, ""),
    ]
    hostile.write_tar(src / "shards" / "00000.tar", m0)
    # shard 1: keys that also exist in shard 0 (same and other content), and a split key group
    hostile.write_tar(src / "shards" / "00001.tar", [
        ("cap_nul.png", pics["nul"]),
        ("cap_nul.txt", hostile.HOSTILE_CAPTIONS["nul"]),                 # same content: a duplicate
        ("cap_rtl.png", pic("png")), ("cap_rtl.txt", b"another picture under a reused key"),
        ("split.jpg", pic("webp")), ("other.jpg", pic("jpg")), ("other.txt", b"a plain sample"),
        ("split.txt", b"the caption of a split key group"),
    ])
    # folder: good samples, symlinks out of it, a link loop, a dangling link
    folder = src / "folder"
    folder.mkdir(parents=True)
    for i in range(4):
        hostile.write_folder_sample(folder, f"f{i}", pic("png"), "png", f"folder picture {i}".encode())
    hostile.write_folder_sample(folder, "nul_cap", pics["nul"], "png", hostile.HOSTILE_CAPTIONS["nul"])
    (folder / "leak.jpg").symlink_to(outside / "outside.jpg")
    (folder / "leak.txt").write_text("a link to a picture outside the source")
    (folder / "f9.jpg").write_bytes(pic("jpg"))
    (folder / "f9.txt").symlink_to(outside / "secret.txt")
    (folder / "outdir").symlink_to(outside / "dir")
    (folder / "loop").symlink_to(folder)
    (folder / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (folder / "dangling.txt").write_text("a dangling link")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "pipe.txt").write_text("a named pipe: opening it would block forever")
    # manifests with missing columns and wrong types
    man = src / "manifests"
    man.mkdir()
    pq.write_table(pa.table({"caption": pa.array([1, 2, None], pa.int64()),
                             "image": pa.array([pic("jpg"), b"", None], pa.binary())}), man / "int_caption.parquet")
    pq.write_table(pa.table({"text": ["no media column at all", "still none"]}), man / "no_media.parquet")
    (man / "mixed.jsonl").write_text("\n".join([
        json.dumps({"caption": "a path that climbs out", "path": "../../outside/outside.jpg"}),
        json.dumps({"caption": ["a", "list"], "path": 7}),
        json.dumps(["not", "an", "object"]),
        "{not json",
        json.dumps({"caption": None, "url": None}),
        json.dumps({"caption": "an image by absolute path", "path": str(outside / "dir" / "inner.png")}),
    ]) + "\n")
    (man / "ragged.csv").write_text('caption,path\n"unterminated,quote\nonly one field\n,,,,\n')
    expect.update({
        ("00000.tar", "cap_huge"): "caption_too_long", ("00000.tar", "bad_bomb"): "decompression_bomb",
        ("00000.tar", "bad_huge_hdr"): "decompression_bomb", ("00000.tar", "bad_empty"): "empty_file",
        ("00000.tar", "link"): "unsupported_member", ("00000.tar", "fifo"): "unsupported_member",
        ("00000.tar", "dev"): "unsupported_member", ("00000.tar", "hard"): "unsupported_member",
        ("00000.tar", "../../evil"): "kept", ("00000.tar", "/abs/evil2"): "kept",
        ("00000.tar", "nested/deeper/still/deep"): "kept",
        ("00001.tar", "cap_rtl"): "kept", ("00001.tar", "other"): "kept",
        ("folder", "leak"): "unsupported_member", ("folder", "f9"): "missing_caption",
        ("folder", "pipe"): "unsupported_member", ("folder", "dangling"): "unsupported_member",
        ("folder", "f0"): "kept",
    })
    return expect


def _outcomes(out: Path) -> dict[tuple[str, str], str]:
    data, rejects = hostile.read_keys(out)
    got = {(Path(s).name, k): "kept" for s, k in data}
    got.update({(Path(s).name, k): r for s, k, r in rejects})
    return got


@pytest.mark.slow  # one full `mm curate` on Ray: ~45-180 s on the shared 2-core machine
def test_hostile_corpus_curates_with_every_input_accounted_and_nothing_outside_out(ray_session, tmp_path, monkeypatch):
    from jobs.curate import main

    expect = _hostile_corpus(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    before = hostile.snapshot(tmp_path)
    rc = main([str(tmp_path / "src" / d) for d in ("shards", "folder", "manifests")]
              + ["--out", str(out), "--set", "images.image_px=32", "--set", "images.min_side_px=16"])
    assert rc == 0
    after = hostile.snapshot(tmp_path, skip=(out,))
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:5]
    for p in ("/evil.jpg", "/abs", str(tmp_path.parent / "evil.jpg"), str(tmp_path.parent.parent / "evil.jpg")):
        assert not os.path.exists(p), p

    stats = hostile.check_accounting(out)
    got = _outcomes(out)
    for key, want in expect.items():
        assert got.get(key) == want, (key, got.get(key), want)
    # nothing under the link loop or the linked directory became an input; the secret was never read
    # the same picture and caption under one key in two shards and in the folder: one kept, two duplicates
    nul = sorted(got[k] for k in (("00000.tar", "cap_nul"), ("00001.tar", "cap_nul"), ("folder", "nul_cap")))
    assert nul == ["duplicate", "duplicate", "kept"], nul
    assert got[("00001.tar", "split")] == "missing_caption" and got[("00001.tar", "split#2")] == "missing_media"
    assert not [k for (s, k) in got if s == "folder" and (k.startswith("loop/") or k.startswith("outdir/"))]
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    # every kept caption is clean text; the manifest rows with wrong types are rejects, not crashes
    for f in (out / "data").glob("*.parquet"):
        for cap in pq.read_table(f, columns=["caption"]).column("caption").to_pylist():
            _assert_clean_caption(cap)
    manifest_rows = [v for (s, _), v in got.items() if s.endswith((".parquet", ".jsonl", ".csv"))]
    assert len(manifest_rows) >= 10 and stats["inputs"] == len(got)
