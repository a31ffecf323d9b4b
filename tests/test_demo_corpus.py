"""The demo corpus: deterministic real files, valid shards and MP4s, and faults exactly where it says.

Run: ``pytest tests/test_demo_corpus.py`` (about 12 s, most of it starting Ray).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.demo_captions import CLASS_PROMPTS, caption_for, video_caption_for, zeroshot_prompts
from pipelines.demo_corpus import generate_demo_corpus
from pipelines.demo_faults import NEAR_MAX_BITS
from pipelines.demo_render import COLOURS, DIRECTIONS, SHAPES

SMALL = {"n_images": 220, "n_videos": 6, "image_px": 64, "video_px": 32, "seed": 3}
MEDIA_EXTS = ("jpg", "png", "mp4")


# ---------------------------------------------------------------------------------------------
# helpers

def _phash_matrix(n: int = 32) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): row u is cos(pi (2x + 1) u / 2n), scaled."""
    x = np.arange(n)
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x[None, :] + 1) * x[:, None] / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


_DCT = _phash_matrix()


def phash(data: bytes) -> np.ndarray:
    """The standard 64-bit DCT pHash: grey, 32x32, 2-D DCT, top-left 8x8, bits = coef > median."""
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((32, 32), Image.Resampling.LANCZOS), float)
    coef = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    return coef > np.median(coef)  # (64,) bool


def read_shards(paths) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, checking the WebDataset layout on the way (members of a key adjacent)."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in paths:
        last = None
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                assert m.isfile() and "/" not in m.name and m.mtime == 0, m.name
                key, ext = m.name.split(".", 1)
                assert key == last or key not in samples, f"{key} members are not adjacent in {path}"
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
                last = key
    return samples


def caption_of(members: dict[str, bytes]) -> str | None:
    if "json" in members:
        return json.loads(members["json"])["caption"]
    return members["txt"].decode() if "txt" in members else None


def media_of(members: dict[str, bytes]) -> bytes:
    return next(members[e] for e in MEDIA_EXTS if e in members)


def planted_keys(planted: dict) -> set[str]:
    keys = set(planted["bad_captions"]) | set(planted["corrupt_media"]) | set(planted["missing_caption"])
    return keys | {d for d, _ in planted["exact_duplicates"]} | {d for d, _ in planted["near_duplicates"]}


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def probe_mp4(data: bytes) -> tuple[str, str, int, int, float, int]:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return s.codec_context.name, s.codec_context.pix_fmt, s.width, s.height, float(s.average_rate), len(frames)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo_corpus(out, **SMALL)
    return out, summary, read_shards(summary["image_sources"][:-1]), read_shards(summary["video_sources"])


# ---------------------------------------------------------------------------------------------
# tests

def test_same_arguments_give_identical_bytes(tmp_path):
    kw = {"n_images": 40, "n_videos": 4, "image_px": 48, "video_px": 32, "seed": 7}
    a, b = generate_demo_corpus(tmp_path / "a", **kw), generate_demo_corpus(tmp_path / "b", **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 10
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "demo_corpus.json":  # holds absolute paths
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert json.dumps(a).replace(str(tmp_path / "a"), "X") == json.dumps(b).replace(str(tmp_path / "b"), "X")
    c = generate_demo_corpus(tmp_path / "c", **{**kw, "seed": 8})
    assert Path(c["image_sources"][0]).read_bytes() != Path(a["image_sources"][0]).read_bytes()


def test_counts_layout_and_summary(corpus):
    out, summary, images, videos = corpus
    counts, planted = summary["counts"], summary["planted"]
    assert json.loads((out / "demo_corpus.json").read_text()) == summary
    assert summary["classes"] == list(SHAPES) and len(SHAPES) >= 5 and len(COLOURS) >= 6
    assert summary["video_classes"] == list(DIRECTIONS)
    assert all(Path(p).exists() for p in summary["image_sources"] + summary["video_sources"])
    assert len(summary["image_sources"]) == counts["image_shards"] + 1 == 3  # 2 shards + the folder

    # n_images counts the clean distinct samples (tars + folder); planted ones are extra
    folder = Path(summary["image_sources"][-1])
    sidecars = sorted(folder.rglob("*.txt"))
    assert len(sidecars) == counts["images_folder"] == 20
    assert all(p.with_suffix(".jpg").exists() and p.read_text().strip() for p in sidecars)
    assert any(p.parent != folder for p in sidecars)  # recursive
    bad = planted_keys(planted)
    clean = [k for k in images if k not in bad]
    assert len(clean) + counts["images_folder"] == counts["images_clean"] == SMALL["n_images"]
    assert len(images) == counts["image_tar_samples"] and counts["image_inputs"] == len(images) + 20
    n_each = round(0.05 * SMALL["n_images"])
    for name in ("exact_duplicates", "near_duplicates", "bad_captions", "corrupt_media"):
        assert len(planted[name]) == n_each, name
    assert len(planted["missing_caption"]) >= 1
    flat = [k for v in planted.values() for k in (v if not v or isinstance(v[0], str) else [p[0] for p in v])]
    assert len(flat) == len(set(flat)) and set(flat) <= set(images)  # one fault per key, all present

    # clean samples: one media member, a caption, label == a shape named in the caption's colour
    exts = Counter()
    for k in clean:
        m = images[k]
        exts.update(e for e in m if e in MEDIA_EXTS)
        assert sum(e in m for e in MEDIA_EXTS) == 1 and caption_of(m).strip(), k
        if "json" in m:
            meta = json.loads(m["json"])
            assert meta["label"] in SHAPES and any(c in meta["caption"] for c in COLOURS)
    assert exts["jpg"] > exts["png"] > 0.15 * len(clean)  # a mix of JPEG and PNG
    assert 0 < sum("txt" in images[k] for k in clean) < 0.15 * len(clean)  # a few .txt captions
    labels = Counter(json.loads(images[k]["json"])["label"] for k in clean if "json" in images[k])
    assert set(labels) == set(SHAPES) and max(labels.values()) - min(labels.values()) <= 0.1 * len(clean)

    vp = summary["video_planted"]
    assert len(videos) == counts["video_inputs"] == SMALL["n_videos"] + len(vp["near_duplicates"]) + len(
        vp["corrupt_media"])
    assert 2 <= len(vp["near_duplicates"]) <= 3 and 4 <= len(vp["corrupt_media"]) <= 6


def test_planted_caption_faults(corpus):
    _, summary, images, _ = corpus
    planted = summary["planted"]
    for k in planted["bad_captions"]:
        c = caption_of(images[k]).strip()
        assert c in ("", "image", "<div><br/></div>") or c.startswith(("IMG_", "https://")), c
        decode_image(media_of(images[k]))  # the media itself is fine
    for k in planted["missing_caption"]:
        assert set(images[k]) == {"jpg"}
        decode_image(images[k]["jpg"])
    for dup, orig in planted["exact_duplicates"]:
        assert images[dup] == images[orig]  # same media bytes and same caption member


def test_corrupt_images_really_fail_to_decode(corpus):
    _, summary, images, _ = corpus
    sizes = []
    for k in summary["planted"]["corrupt_media"]:
        data = media_of(images[k])
        sizes.append(len(data))
        with pytest.raises((OSError, SyntaxError, ValueError)):
            decode_image(data)
        assert caption_of(images[k]).strip()  # only the media is broken
    assert 0 in sizes  # the zero-byte file


def test_videos_decode_with_pyav_and_corrupt_ones_fail(corpus):
    _, summary, _, videos = corpus
    vp = summary["video_planted"]
    bad = {k for k, _ in vp["near_duplicates"]} | set(vp["corrupt_media"])
    directions = Counter()
    for k in set(videos) - bad:
        codec, pix_fmt, w, h, fps, n = probe_mp4(videos[k]["mp4"])
        assert (codec, pix_fmt, w, h) == ("h264", "yuv420p", SMALL["video_px"], SMALL["video_px"])
        assert fps in (8, 10, 12) and 2.0 < n / fps <= 2.5, (fps, n)  # curation drops clips under 2 s
        meta = json.loads(videos[k]["json"])
        directions[meta["label"]] += 1
        assert any(c in meta["caption"] for c in COLOURS)
    assert set(directions) <= set(DIRECTIONS) and len(directions) >= 3
    for dup, orig in vp["near_duplicates"]:
        d, o = probe_mp4(videos[dup]["mp4"]), probe_mp4(videos[orig]["mp4"])
        assert d[2] != o[2] and d[4:] == o[4:]  # another resolution, same fps and frame count
        assert videos[dup]["mp4"] != videos[orig]["mp4"]
    for k in vp["corrupt_media"]:
        with pytest.raises(av.error.FFmpegError):
            probe_mp4(videos[k]["mp4"])


def test_clean_images_are_distinct_and_near_duplicates_are_near(corpus):
    _, summary, images, _ = corpus
    planted = summary["planted"]
    bad = planted_keys(planted)
    folder = Path(summary["image_sources"][-1])
    media = [media_of(images[k]) for k in images if k not in bad] + [p.read_bytes() for p in folder.rglob("*.jpg")]
    hashes = np.stack([phash(m) for m in media])  # (N, 64)
    i, j = np.triu_indices(len(hashes), 1)
    dist = (hashes[i] != hashes[j]).sum(1)
    assert (dist <= 10).mean() < 0.01, np.bincount(dist)[:16]

    near = [(phash(media_of(images[d])) != phash(media_of(images[o]))).sum() for d, o in planted["near_duplicates"]]
    assert np.mean(np.array(near) <= 12) >= 0.9 and np.median(near) <= NEAR_MAX_BITS, near
    assert all(images[d] != images[o] for d, o in planted["near_duplicates"])  # not byte copies


def test_one_shard_reads_with_ray_webdataset(corpus, ray_session):
    _, summary, images, _ = corpus
    with tarfile.open(summary["image_sources"][0]) as tf:
        keys = {m.name.split(".", 1)[0] for m in tf.getmembers()}
    rows = ray_session.data.read_webdataset(summary["image_sources"][0], decoder=None).take_all()
    assert {r["__key__"] for r in rows} == keys and len(rows) == len(keys)
    for r in rows:
        media = [r.get(e) for e in ("jpg", "png") if isinstance(r.get(e), bytes)]
        assert media == [media_of(images[r["__key__"]])]


def test_captions_are_templated_paraphrases():
    rng = np.random.default_rng(0)
    attrs = {"shape": "circle", "colour": "red", "size": "large", "position": "left"}
    caps = {caption_for(attrs, rng) for _ in range(200)}
    assert len(caps) > 20 and all("red" in c for c in caps)
    assert sum("circle" in c for c in caps) > len(caps) / 3  # the class name itself dominates
    vcaps = {video_caption_for({**attrs, "direction": "right"}, rng) for _ in range(200)}
    assert len(vcaps) > 10 and all("red" in c and "right" in c for c in vcaps)
    prompts = zeroshot_prompts()
    assert list(prompts) == list(SHAPES) and prompts["star"][0] == CLASS_PROMPTS[0].format(c="star")


def test_regenerates_over_itself_but_not_over_foreign_files(tmp_path):
    kw = {"n_images": 30, "n_videos": 3, "image_px": 32, "video_px": 16}
    big = generate_demo_corpus(tmp_path / "d", **{**kw, "n_images": 450})
    small = generate_demo_corpus(tmp_path / "d", **kw)
    assert big["counts"]["image_shards"] == 3 and small["counts"]["image_shards"] == 1
    assert sorted(str(p) for p in (tmp_path / "d" / "images").iterdir()) == small["image_sources"][:1]
    (tmp_path / "e" / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        generate_demo_corpus(tmp_path / "e", **kw)


def test_default_size_is_distinct(tmp_path):
    summary = generate_demo_corpus(tmp_path)
    images = read_shards(summary["image_sources"][:-1])
    bad = planted_keys(summary["planted"])
    hashes = np.stack([phash(media_of(m)) for k, m in images.items() if k not in bad])
    i, j = np.triu_indices(len(hashes), 1)
    assert ((hashes[i] != hashes[j]).sum(1) <= 10).mean() < 0.01
    assert summary["counts"]["images_clean"] == 600 and summary["counts"]["videos_clean"] == 48
