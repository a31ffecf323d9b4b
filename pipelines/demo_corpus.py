"""The built-in demo corpus: real WebDataset shards, a folder source and MP4s, with planted faults.

``mm demo`` calls ``generate_demo_corpus(out_dir)`` and then curates what it wrote, so the real
ingestion path runs end to end: img2dataset-style tars, a folder with ``.txt`` sidecars and
video2dataset-style tars of H.264 MP4s (encoded with PyAV).

Content has structure a model can learn. Images: a shape (``SHAPES``, the label) in a colour
(``COLOURS``), small or large, at one of five positions, on a photo-like background; captions
are templated paraphrases. Videos: a shape moving left, right, up or down; the label is the
direction (``DIRECTIONS``) and the caption names colour, shape and motion. The pixels are
pipelines/demo_render.py's, the captions pipelines/demo_captions.py's; this module plans the
samples (every class balanced), lays them out as shards and a folder, and writes them.

Planted problems (made by pipelines/demo_faults.py) sit under known keys and are listed in the
returned summary (also written to ``out_dir/demo_corpus.json``): image ``planted`` = exact
duplicates, near duplicates (lower JPEG quality, resized, cropped, brightness-shifted), bad
captions, corrupt media and a missing caption; ``video_planted`` = re-encoded near duplicates and
corrupt MP4s (truncated, random bytes). ``n_images`` / ``n_videos`` count the clean distinct
samples; planted ones are extra.

Everything derives from a seeded numpy RNG and tar/MP4 metadata is fixed, so the same
arguments give byte-identical files. Run: ``python -m pipelines.demo_corpus OUT_DIR``;
test: ``pytest tests/test_demo_corpus.py``.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from pipelines.demo_captions import CLASS_PROMPTS, VIDEO_CLASS_PROMPTS, caption_for, video_caption_for
from pipelines.demo_faults import CORRUPT_KINDS, NEAR_KINDS, bad_caption, corrupt_media, near_duplicate
from pipelines.demo_render import (
    COLOURS,
    DIRECTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    decode_mp4,
    encode_image,
    encode_mp4,
    render_image,
    render_video,
    resize_image,
)

IMAGES_PER_SHARD = 200
VIDEOS_PER_SHARD = 24
MAX_FOLDER_IMAGES = 20
_STREAM_PLAN, _STREAM_IMAGE, _STREAM_PLANT, _STREAM_VIDEO = range(4)  # independent RNG streams


# ---------------------------------------------------------------------------------------------
# writing

def _write_tar(path: Path, samples: list[dict]) -> None:
    """One WebDataset shard; members grouped by key, fixed metadata so the bytes are reproducible."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext, data in s["members"]:
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))


def _caption_json(caption: str, label: str) -> bytes:
    return json.dumps({"caption": caption, "label": label}, sort_keys=True).encode()


def _place_duplicates(base: list[dict], dups: list[dict], rng: np.random.Generator) -> list[dict]:
    """Insert each duplicate at a random position after its original (readers meet the original first)."""
    order = list(base)
    for d in dups:
        lo = next(i for i, s in enumerate(order) if s is d["original"]) + 1
        order.insert(int(rng.integers(lo, len(order) + 1)), d)
    return order


def _shard(samples: list[dict], per_shard: int, out: Path) -> list[str]:
    """Key samples img2dataset-style (5-digit shard + 4-digit index) and write the shards."""
    out.mkdir(parents=True)
    paths = []
    for s_idx in range(0, max(len(samples), 1), per_shard):
        shard = samples[s_idx:s_idx + per_shard]
        n = s_idx // per_shard
        for j, s in enumerate(shard):
            s["key"] = f"{n:05d}{j:04d}"
        path = out / f"shard-{n:06d}.tar"
        _write_tar(path, shard)
        paths.append(str(path))
    return paths


def plan_attributes(rng: np.random.Generator, n: int, axes: dict) -> list[dict]:
    """n attribute dicts; each axis cycles through shuffled copies of its values, so every
    class (and colour, size, ...) is balanced to within one sample while combinations vary."""
    columns = {}
    for name, values in axes.items():
        seq: list = []
        while len(seq) < n:
            seq += [values[i] for i in rng.permutation(len(values))]
        columns[name] = seq[:n]
    return [{name: columns[name][i] for name in axes} for i in range(n)]


def source_captions(summary: dict) -> list[str]:
    """The clean captions written under a summary's image and video sources, both modalities
    (tar members' ``.json`` "caption" or ``.txt``, the folder's ``.txt`` sidecars), planted bad
    captions left out. ``mm demo`` trains its one tokenizer on them, so that words found only in
    the video captions ("video", "moving", "sliding", "up") are in the vocabulary: a vocabulary of
    the image captions alone spells them in characters or maps them to [UNK]."""
    bad = set(summary["planted"]["bad_captions"]) | set(summary["video_planted"]["bad_captions"])
    out: list[str] = []
    for src in (*summary["image_sources"], *summary["video_sources"]):
        path = Path(src)
        if path.is_dir():
            out += [t.read_text().strip() for t in sorted(path.glob("*.txt")) if t.stem not in bad]
            continue
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if key in bad or ext not in ("json", "txt"):
                    continue
                raw = tf.extractfile(m).read()
                out.append(json.loads(raw)["caption"] if ext == "json" else raw.decode().strip())
    return out


def _rng(seed: int, stream: int, i: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, i])


def _prepare_out(out: Path) -> None:
    """Regenerate in place only over a previous demo corpus; never delete someone else's files."""
    ours = ("images", "images_folder", "videos")
    if any((out / d).exists() for d in ours) and not (out / "demo_corpus.json").exists():
        raise FileExistsError(f"{out} already holds images/ or videos/ that are not a demo corpus")
    for d in ours:
        shutil.rmtree(out / d, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    # claim the directory first, so that a run that dies half-way can simply be rerun
    (out / "demo_corpus.json").write_text('{"complete": false}\n')


def generate_demo_corpus(out_dir: str | Path, *, n_images: int = 600, n_videos: int = 48, image_px: int = 64,
                         video_px: int = 64, seed: int = 0) -> dict:
    """Write the demo corpus under ``out_dir`` and return (and save) its summary; see the module doc."""
    if n_images < 2 or n_videos < 2 or image_px < 16 or video_px < 16:
        raise ValueError("need n_images >= 2, n_videos >= 2, image_px >= 16 and video_px >= 16")
    out = Path(out_dir).absolute()
    _prepare_out(out)
    video_px += video_px % 2  # yuv420p wants even sides
    images = _generate_images(out, n_images, image_px, seed)
    videos = _generate_videos(out, n_videos, video_px, seed)
    summary = {
        "image_sources": images.pop("sources"),
        "video_sources": videos.pop("sources"),
        "counts": {**images.pop("counts"), **videos.pop("counts")},
        "planted": images.pop("planted"),
        "video_planted": videos.pop("planted"),
        "classes": list(SHAPES),
        "video_classes": list(DIRECTIONS),
        "templates": list(CLASS_PROMPTS),  # zero-shot prompts, as pipelines/labelled.py names them
        "video_templates": list(VIDEO_CLASS_PROMPTS),
        "params": {"n_images": n_images, "n_videos": n_videos, "image_px": image_px, "video_px": video_px,
                   "seed": seed},
    }
    (out / "demo_corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _generate_images(out: Path, n_images: int, px: int, seed: int) -> dict:
    n_folder = min(MAX_FOLDER_IMAGES, n_images // 5)
    n_tar = n_images - n_folder
    n_plant = max(1, round(0.05 * n_images))
    n_missing = max(1, round(0.01 * n_images))
    plan_rng = _rng(seed, _STREAM_PLAN)
    axes = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS}
    attrs = plan_attributes(plan_rng, n_images + 3 * n_plant + n_missing, axes)

    clean, arrays = [], []
    for i in range(n_images):
        rng = _rng(seed, _STREAM_IMAGE, i)
        arr = render_image(attrs[i], rng, px)
        fmt = "png" if rng.random() < 0.3 and i < n_tar else "jpg"
        media = encode_image(arr, "png" if fmt == "png" else "jpeg", int(rng.integers(85, 96)))
        caption, label = caption_for(attrs[i], rng), attrs[i]["shape"]
        text = ("txt", caption.encode()) if i < n_tar and rng.random() < 0.05 else (
            "json", _caption_json(caption, label))
        clean.append({"kind": "clean", "members": [(fmt, media), text], "caption": caption, "attrs": attrs[i]})
        arrays.append(arr)

    # the folder source: x.jpg + x.txt, a third of them one level down
    folder = out / "images_folder"
    for j, s in enumerate(clean[n_tar:]):
        path = folder / ("more" if j % 3 == 2 else "") / f"img_{j:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s["members"][0][1])
        path.with_suffix(".txt").write_text(s["caption"] + "\n")

    rng = _rng(seed, _STREAM_PLANT)
    originals = rng.choice(n_tar, size=min(2 * n_plant, n_tar), replace=False)
    exact_of, near_of = originals[:n_plant], originals[n_plant:]
    exact = [{"kind": "exact", "original": clean[i], "members": list(clean[i]["members"])} for i in exact_of]
    near = []
    for j, i in enumerate(near_of):
        media = near_duplicate(arrays[i], clean[i]["members"][0][1], rng, NEAR_KINDS[j % len(NEAR_KINDS)])
        caption = caption_for(clean[i]["attrs"], rng) if rng.random() < 0.5 else clean[i]["caption"]
        near.append({"kind": "near", "original": clean[i],
                     "members": [("jpg", media), ("json", _caption_json(caption, clean[i]["attrs"]["shape"]))]})

    # fresh, otherwise valid samples that carry exactly one fault each
    extra, k = [], n_images
    for kind, count in (("bad_caption", n_plant), ("corrupt", n_plant), ("missing_caption", n_missing)):
        for j in range(count):
            a, r = attrs[k], _rng(seed, _STREAM_IMAGE, k)
            arr, k = render_image(a, r, px), k + 1
            good = _caption_json(caption_for(a, r), a["shape"])
            if kind == "bad_caption":
                bad = bad_caption(r, j)
                text = ("txt", bad.encode()) if j % 4 == 3 else ("json", _caption_json(bad, a["shape"]))
                members = [("jpg", encode_image(arr, "jpeg", 90)), text]
            elif kind == "corrupt":
                members = [corrupt_media(arr, r, CORRUPT_KINDS[j % len(CORRUPT_KINDS)]), ("json", good)]
            else:
                members = [("jpg", encode_image(arr, "jpeg", 90))]
            extra.append({"kind": kind, "members": members})

    base = clean[:n_tar] + extra
    base = [base[i] for i in plan_rng.permutation(len(base))]
    dups = exact + near
    dups = [dups[i] for i in plan_rng.permutation(len(dups))]
    order = _place_duplicates(base, dups, plan_rng)
    shards = _shard(order, IMAGES_PER_SHARD, out / "images")

    planted = {
        "exact_duplicates": [[d["key"], d["original"]["key"]] for d in exact],
        "near_duplicates": [[d["key"], d["original"]["key"]] for d in near],
        "bad_captions": [s["key"] for s in extra if s["kind"] == "bad_caption"],
        "corrupt_media": [s["key"] for s in extra if s["kind"] == "corrupt"],
        "missing_caption": [s["key"] for s in extra if s["kind"] == "missing_caption"],
    }
    counts = {"images_clean": n_images, "images_clean_tar": n_tar, "images_folder": n_folder,
              "image_tar_samples": len(order), "image_inputs": len(order) + n_folder, "image_shards": len(shards),
              **{f"images_{k}": len(v) for k, v in planted.items()}}
    return {"sources": [*shards, *([str(folder)] if n_folder else [])], "planted": planted, "counts": counts}


def _generate_videos(out: Path, n_videos: int, px: int, seed: int) -> dict:
    plan_rng = _rng(seed, _STREAM_PLAN, 1)
    axes = {"direction": DIRECTIONS, "shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}
    attrs = plan_attributes(plan_rng, n_videos, axes)
    clean = []
    for i in range(n_videos):
        rng = _rng(seed, _STREAM_VIDEO, i)
        fps = int(rng.choice([8, 10, 12]))
        # 2.1-2.5 s: pipelines/video_clips.py drops clips under min_clip_s (2 s by default) as too_short
        frames = render_video(attrs[i], rng, px, n_frames=int(round(fps * rng.uniform(2.1, 2.5))))
        caption = video_caption_for(attrs[i], rng)
        clean.append({"kind": "clean", "attrs": attrs[i], "caption": caption,
                      "members": [("mp4", encode_mp4(frames, fps, crf=int(rng.integers(18, 24)))),
                                  ("json", _caption_json(caption, attrs[i]["direction"]))]})

    n_plant = 3 if n_videos >= 40 else 2
    rng = _rng(seed, _STREAM_PLANT, 1)
    near = []
    for i in rng.choice(n_videos, size=min(n_plant, n_videos), replace=False):
        frames, fps = decode_mp4(clean[i]["members"][0][1])
        side = int(round(px * rng.choice([0.75, 1.25]) / 2)) * 2
        bit_rate = 8 * len(clean[i]["members"][0][1]) * fps / len(frames) * rng.choice([0.5, 2.0])
        data = encode_mp4([resize_image(f, side, side) for f in frames], fps, bit_rate=int(bit_rate))
        caption = video_caption_for(clean[i]["attrs"], rng)
        near.append({"kind": "near", "original": clean[i],
                     "members": [("mp4", data), ("json", _caption_json(caption, clean[i]["attrs"]["direction"]))]})
    corrupt = []
    for j in range(2 * n_plant):
        src = clean[int(rng.integers(n_videos))]
        data = (src["members"][0][1][: int(len(src["members"][0][1]) * rng.uniform(0.3, 0.7))] if j % 2 == 0
                else rng.bytes(int(rng.integers(4000, 12000))))
        caption = video_caption_for(src["attrs"], rng)
        corrupt.append({"kind": "corrupt",
                        "members": [("mp4", data), ("json", _caption_json(caption, src["attrs"]["direction"]))]})

    base = clean + corrupt
    base = [base[i] for i in plan_rng.permutation(len(base))]
    order = _place_duplicates(base, near, plan_rng)
    shards = _shard(order, VIDEOS_PER_SHARD, out / "videos")
    planted = {"exact_duplicates": [], "near_duplicates": [[d["key"], d["original"]["key"]] for d in near],
               "bad_captions": [], "corrupt_media": [s["key"] for s in corrupt], "missing_caption": []}
    counts = {"videos_clean": n_videos, "video_inputs": len(order), "video_shards": len(shards),
              "videos_near_duplicates": len(near), "videos_corrupt_media": len(corrupt)}
    return {"sources": shards, "planted": planted, "counts": counts}


if __name__ == "__main__":
    import argparse
    import time

    p = argparse.ArgumentParser(description="Write the demo corpus (see module docstring).")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t0 = time.perf_counter()
    s = generate_demo_corpus(a.out_dir, seed=a.seed)
    print(json.dumps(s["counts"], indent=2), f"\n{time.perf_counter() - t0:.1f} s")
