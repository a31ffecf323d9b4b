"""The built-in demo corpus: real WebDataset shards, a folder source and MP4s, with planted faults.

``mm demo`` calls ``generate_demo_corpus(out_dir)`` and then curates what it wrote, so the real
ingestion path runs end to end: img2dataset-style tars, a folder with ``.txt`` sidecars and
video2dataset-style tars of H.264 MP4s (encoded with PyAV).

Content has structure a model can learn. Images: a shape (``SHAPES``, the label) in a colour
(``COLOURS``), small or large, at one of five positions, on a photo-like background (a random
smooth luminance/chroma field plus mild noise) with jittered size, position and rotation, so
that distinct samples are not perceptual-hash near duplicates. Captions come from templated
paraphrases (``caption_for``). Videos: a shape moving left, right, up or down; the label is
the direction (``DIRECTIONS``) and the caption names colour, shape and motion.

Planted problems sit under known keys and are listed in the returned summary (also written to
``out_dir/demo_corpus.json``): image ``planted`` = exact duplicates, near duplicates (lower
JPEG quality, resized, cropped, brightness-shifted), bad captions, corrupt media and a missing
caption; ``video_planted`` = re-encoded near duplicates and corrupt MP4s (truncated, random
bytes). ``n_images`` / ``n_videos`` count the clean distinct samples; planted ones are extra.

Everything derives from a seeded numpy RNG and tar/MP4 metadata is fixed, so the same
arguments give byte-identical files. Run: ``python -m pipelines.demo_corpus OUT_DIR``;
test: ``pytest tests/test_demo_corpus.py``.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")
COLOURS = {  # nominal sRGB; each sample jitters it
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 215, 40),
    "orange": (240, 135, 25),
    "purple": (145, 50, 185),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
DIRECTIONS = ("left", "right", "up", "down")  # the video label: where the shape moves

# Zero-shot prompts (CLIP-style templates); ``{c}`` is a class name from SHAPES / DIRECTIONS.
CLASS_PROMPTS = ("a {c}", "a picture of a {c}", "a photo of a {c}", "a {c} shape", "a drawing of a {c}")
VIDEO_CLASS_PROMPTS = ("moving {c}", "a shape moving {c}", "something moving {c}",
                       "a video of a shape moving {c}")

IMAGES_PER_SHARD = 200
VIDEOS_PER_SHARD = 24
MAX_FOLDER_IMAGES = 20
_SS = 4  # supersampling factor for anti-aliased shape edges
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
            "centre": (0.5, 0.5)}  # (x, y) as fractions of the frame
_RADIUS = {"small": (0.09, 0.12), "large": (0.17, 0.21)}  # of the frame side
_MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image coords: y down

_STREAM_PLAN, _STREAM_IMAGE, _STREAM_PLANT, _STREAM_VIDEO = range(4)  # independent RNG streams


# ---------------------------------------------------------------------------------------------
# captions

_SHAPE_WORDS = {
    "circle": ("circle", "circle", "round shape", "disc"),
    "square": ("square", "square", "square shape", "block"),
    "triangle": ("triangle", "triangle", "triangular shape"),
    "cross": ("cross", "cross", "plus sign", "plus shape"),
    "star": ("star", "star", "star shape", "five-pointed star"),
    "diamond": ("diamond", "diamond", "rhombus", "diamond shape"),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_POS_PHRASES = {
    "left": ("on the left", "to the left of the frame", "at the left side", "in the left half"),
    "right": ("on the right", "to the right of the frame", "at the right side", "in the right half"),
    "top": ("at the top", "near the top edge", "in the upper part of the frame"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower part of the frame"),
    "centre": ("in the centre", "in the middle", "at the center of the frame"),
}
_POS_HEADS = {"left": ("left side", "left"), "right": ("right side", "right"), "top": ("top", "upper part"),
              "bottom": ("bottom", "lower part"), "centre": ("centre", "middle")}
_IMAGE_TEMPLATES = (
    "{a_size} {size} {colour} {shape} {pos}",
    "{pos_head}: {a_size} {size} {colour} {shape}",
    "{colour} {shape}, {size}, {pos}",
    "a photo of {a_size} {size} {colour} {shape} {pos}",
    "there is {a_colour} {colour} {shape} {pos}; it is {size}",
    "{Pos}, {a_size} {size} {shape} in {colour}",
    "{a_colour} {colour} {shape} ({size}) {pos} on a textured background",
)
_DIR_PHRASES = {
    "left": ("moving left", "moving to the left", "sliding left", "going left", "travelling to the left"),
    "right": ("moving right", "moving to the right", "sliding right", "going right", "travelling to the right"),
    "up": ("moving up", "moving upward", "sliding up", "going up", "rising"),
    "down": ("moving down", "moving downward", "sliding down", "going down", "falling"),
}
_VIDEO_TEMPLATES = (
    "{a_colour} {colour} {shape} {dir}",
    "{a_size} {size} {colour} {shape} {dir} across the frame",
    "a video of {a_colour} {colour} {shape} {dir}",
    "the {colour} {shape} is {dir}",
    "{colour} {shape}, {size}, {dir}",
)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def caption_for(attrs: dict, rng: np.random.Generator) -> str:
    """One templated paraphrase of an image's attributes (shape, colour, size, position).

    ``{"shape": "circle", "colour": "red", "size": "large", "position": "left"}`` gives e.g.
    "left side: a big red circle" or "red round shape, large, to the left of the frame".
    """
    size, colour = _pick(rng, _SIZE_WORDS[attrs["size"]]), attrs["colour"]
    pos = _pick(rng, _POS_PHRASES[attrs["position"]])
    words = {"shape": _pick(rng, _SHAPE_WORDS[attrs["shape"]]), "size": size, "colour": colour,
             "a_size": _a(size), "a_colour": _a(colour), "pos": pos, "Pos": pos[0].upper() + pos[1:],
             "pos_head": _pick(rng, _POS_HEADS[attrs["position"]])}
    return _pick(rng, _IMAGE_TEMPLATES).format(**words)


def video_caption_for(attrs: dict, rng: np.random.Generator) -> str:
    """One templated paraphrase of a video's attributes (shape, colour, size, direction)."""
    size, colour = _pick(rng, _SIZE_WORDS[attrs["size"]]), attrs["colour"]
    words = {"shape": _pick(rng, _SHAPE_WORDS[attrs["shape"]]), "size": size, "colour": colour,
             "a_size": _a(size), "a_colour": _a(colour), "dir": _pick(rng, _DIR_PHRASES[attrs["direction"]])}
    return _pick(rng, _VIDEO_TEMPLATES).format(**words)


def zeroshot_prompts(classes=SHAPES, templates=CLASS_PROMPTS) -> dict[str, list[str]]:
    """Class name -> its prompts, e.g. ``{"circle": ["a circle", "a picture of a circle", ...]}``."""
    return {c: [t.format(c=c) for t in templates] for c in classes}


# ---------------------------------------------------------------------------------------------
# rendering

def _smooth_field(rng: np.random.Generator, px: int, k: int, amp: float) -> np.ndarray:
    """A random low-frequency field (px, px): a cosine series up to k-1 half-cycles per axis.

    Its low DCT coefficients are what a perceptual hash sees, so random ones make the hashes
    of distinct backgrounds independent.
    """
    t = (np.arange(px) + 0.5) / px
    basis = np.cos(np.pi * np.arange(k)[:, None] * t[None, :])  # (k, px)
    falloff = 1.0 / (1.0 + 0.35 * np.add.outer(np.arange(k), np.arange(k)))
    coef = rng.normal(size=(k, k)) * falloff * amp
    coef[0, 0] = 0.0
    return basis.T @ coef @ basis


def _background(rng: np.random.Generator, px: int, rgb: np.ndarray, luma_amp: float) -> np.ndarray:
    """Photo-like background (px, px, 3) float: muted base colour, smooth light and tint, noise.

    Its mean brightness sits away from the shape's (``rgb``), so the shape also shows in grey,
    which is all a perceptual hash (and a colour-blind filter) sees.
    """
    shape_luma = float(rgb @ (0.299, 0.587, 0.114))
    base = rng.uniform(*((140, 195) if shape_luma < 128 else (55, 110))) + rng.normal(0, 14, 3)
    luma = _smooth_field(rng, px, 8, luma_amp)
    tint = np.stack([_smooth_field(rng, px, 4, 6.0) for _ in range(3)], axis=-1)
    return base + luma[..., None] + tint + rng.normal(0, 3.0, (px, px, 3))


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    elif shape == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "cross":
        w = 0.3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    elif shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        rr = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = list(zip(rr * np.cos(a), rr * np.sin(a)))
    else:
        raise ValueError(f"unknown shape {shape!r}; valid choices: {', '.join(SHAPES)}")
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in pts]


def _shape_alpha(shape: str, px: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage mask (px, px) in [0, 1]; centre and radius as fractions of px."""
    n = px * _SS
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([(cx - r) * n, (cy - r) * n, (cx + r) * n, (cy + r) * n], fill=255)
    else:
        draw.polygon([(x * n, y * n) for x, y in _outline(shape, cx, cy, r, angle)], fill=255)
    return np.asarray(canvas.resize((px, px), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _shape_rgb(rng: np.random.Generator, colour: str) -> np.ndarray:
    return np.clip(np.array(COLOURS[colour], float) * rng.uniform(0.85, 1.08) + rng.normal(0, 10, 3), 0, 255)


def _composite(bg: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    out = bg * (1.0 - alpha[..., None]) + rgb * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_image(attrs: dict, rng: np.random.Generator, px: int) -> np.ndarray:
    """An RGB image (px, px, 3) uint8 of one shape on a random background, with jitter."""
    rgb = _shape_rgb(rng, attrs["colour"])
    bg = _background(rng, px, rgb, luma_amp=24.0)
    cx, cy = np.array(_CENTRES[attrs["position"]]) + rng.uniform(-0.05, 0.05, 2)
    r = rng.uniform(*_RADIUS[attrs["size"]])
    alpha = _shape_alpha(attrs["shape"], px, cx, cy, r, np.deg2rad(rng.uniform(-12, 12)))
    return _composite(bg, alpha, rgb)


def render_video(attrs: dict, rng: np.random.Generator, px: int, n_frames: int) -> list[np.ndarray]:
    """Frames (px, px, 3) uint8 of a shape crossing a static background in ``attrs["direction"]``.

    The background is calmer and the shape bigger than in images, so the motion moves the
    frames' perceptual hashes (a curator drops clips whose frames all hash alike as static).
    """
    rgb = _shape_rgb(rng, attrs["colour"])
    bg = _background(rng, px, rgb, luma_amp=14.0)
    r = rng.uniform(*_RADIUS[attrs["size"]]) * 1.15
    dx, dy = _MOVES[attrs["direction"]]
    travel = rng.uniform(0.5, 0.65)
    start = np.array([0.5 - dx * travel / 2, 0.5 - dy * travel / 2]) + rng.uniform(-0.15, 0.15, 2) * (
        [dy != 0, dx != 0])  # jitter across the motion only
    angle = np.deg2rad(rng.uniform(-12, 12))
    frames = []
    for i in range(n_frames):
        cx, cy = start + np.array([dx, dy]) * travel * i / max(n_frames - 1, 1)
        alpha = _shape_alpha(attrs["shape"], px, cx, cy, r, angle)
        frames.append(_composite(bg + rng.normal(0, 1.5, bg.shape), alpha, rgb))
    return frames


# ---------------------------------------------------------------------------------------------
# encoding

def _encode_image(arr: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _encode_mp4(frames: list[np.ndarray], fps: int, *, crf: int = 23, bit_rate: int | None = None) -> bytes:
    """H.264 yuv420p MP4 bytes, reproducible to the byte.

    With x264's assembly paths the same frames gave different bitstreams from run to run at
    32-80 px (seen; most likely reads of uninitialised memory past the planes PyAV allocates);
    with its C paths (``asm=0``) they did not, at well under a second for the whole corpus.
    One thread and ``+bitexact`` keep the rest fixed.
    """
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        options = {"preset": "veryfast", "threads": "1", "x264-params": "asm=0"}
        if bit_rate is None:
            options["crf"] = str(crf)
        else:
            stream.bit_rate = bit_rate
        stream.options = options
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _decode_mp4(data: bytes) -> tuple[list[np.ndarray], int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = int(round(float(stream.average_rate)))
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], fps


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.LANCZOS))


# ---------------------------------------------------------------------------------------------
# planted problems

def _dct_matrix(n: int) -> np.ndarray:
    x = np.arange(n)
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x[None, :] + 1) * x[:, None] / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d  # (n, n) orthonormal DCT-II


_DCT32 = _dct_matrix(32)
NEAR_MAX_BITS = 4  # planted near duplicates lie this close to their original (see _near_duplicate)


def phash_bits(data: bytes, resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """The standard 64-bit DCT pHash as (64,) bools: grey, 32x32, 2-D DCT, top-left 8x8 > median."""
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((32, 32), resample), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    return (low > np.median(low)).ravel()


def _phash_distance(a: bytes, b: bytes) -> int:
    """The larger Hamming distance of the two common pHash variants (LANCZOS or BOX downsizing)."""
    return max(int((phash_bits(a, r) != phash_bits(b, r)).sum())
               for r in (Image.Resampling.LANCZOS, Image.Resampling.BOX))


def _near_duplicate(arr: np.ndarray, original: bytes, rng: np.random.Generator, kind: str) -> bytes:
    """A perceptually identical variant of ``arr`` as JPEG bytes (the way web copies differ).

    Drawn again (up to 16 times) until its pHash is within NEAR_MAX_BITS of the original's, so
    every planted pair is one a pHash dedup at the usual 8-bit radius, LSH banding included,
    should find: even a 1-pixel crop of a 64-px image can move a pHash by 8 bits.
    """
    best = (65, b"")
    for _ in range(16):
        data = _transform(arr, rng, kind)
        best = min(best, (_phash_distance(original, data), data), key=lambda t: t[0])
        if best[0] <= NEAR_MAX_BITS:
            break
    return best[1]


def _transform(arr: np.ndarray, rng: np.random.Generator, kind: str) -> bytes:
    h, w = arr.shape[:2]
    if kind == "reencode":
        return _encode_image(arr, "jpeg", int(rng.integers(30, 55)))
    if kind == "resize":
        s = rng.choice([-1, 1]) * rng.uniform(0.06, 0.15) + 1.0
        return _encode_image(_resize(arr, round(w * s), round(h * s)), "jpeg", 85)
    if kind == "crop":  # 1-2% of each axis (>= 1 px), split at random between its two ends
        cw, ch = _crop_px(rng, w), _crop_px(rng, h)
        left, top = int(rng.integers(cw + 1)), int(rng.integers(ch + 1))
        right, bottom = cw - left, ch - top
        return _encode_image(np.ascontiguousarray(arr[top:h - bottom, left:w - right]), "jpeg", 88)
    if kind == "brightness":
        shifted = arr.astype(float) * rng.uniform(0.92, 1.08) + rng.uniform(-8, 8)
        return _encode_image(np.clip(np.rint(shifted), 0, 255).astype(np.uint8), "jpeg", 88)
    raise ValueError(kind)


def _crop_px(rng: np.random.Generator, side: int) -> int:
    return max(1, round(side * rng.uniform(0.01, 0.02)))


_NEAR_KINDS = ("reencode", "resize", "crop", "brightness")
_CORRUPT_KINDS = ("truncated_jpeg", "random_bytes", "zero_bytes", "broken_png_header")


def _corrupt(arr: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[str, bytes]:
    """(extension, bytes) of media that no decoder accepts."""
    if kind == "truncated_jpeg":
        data = _encode_image(arr, "jpeg", 90)
        return "jpg", data[: int(len(data) * rng.uniform(0.3, 0.6))]
    if kind == "random_bytes":
        return "jpg", rng.bytes(int(rng.integers(2000, 6000)))
    if kind == "zero_bytes":
        return "jpg", b""
    if kind == "broken_png_header":
        data = bytearray(_encode_image(arr, "png"))
        data[1:8] = b"XNG\x00\x00\x00\x00"  # the 8-byte PNG signature garbled
        return "png", bytes(data)
    raise ValueError(kind)


def _bad_caption(rng: np.random.Generator, i: int) -> str:
    n = int(rng.integers(1000, 9999))
    return ("", "   \n\t ", "image", f"IMG_{n}.jpg", f"https://example.com/photos/{n}.jpg",
            "<div><br/></div>")[i % 6]


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


def _attr_plan(rng: np.random.Generator, n: int, axes: dict) -> list[dict]:
    """n attribute dicts; each axis cycles through shuffled copies of its values, so every
    class (and colour, size, ...) is balanced to within one sample while combinations vary."""
    columns = {}
    for name, values in axes.items():
        seq: list = []
        while len(seq) < n:
            seq += [values[i] for i in rng.permutation(len(values))]
        columns[name] = seq[:n]
    return [{name: columns[name][i] for name in axes} for i in range(n)]


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
    attrs = _attr_plan(plan_rng, n_images + 3 * n_plant + n_missing, axes)

    clean, arrays = [], []
    for i in range(n_images):
        rng = _rng(seed, _STREAM_IMAGE, i)
        arr = render_image(attrs[i], rng, px)
        fmt = "png" if rng.random() < 0.3 and i < n_tar else "jpg"
        media = _encode_image(arr, "png" if fmt == "png" else "jpeg", int(rng.integers(85, 96)))
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
        media = _near_duplicate(arrays[i], clean[i]["members"][0][1], rng, _NEAR_KINDS[j % len(_NEAR_KINDS)])
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
                bad = _bad_caption(r, j)
                text = ("txt", bad.encode()) if j % 4 == 3 else ("json", _caption_json(bad, a["shape"]))
                members = [("jpg", _encode_image(arr, "jpeg", 90)), text]
            elif kind == "corrupt":
                members = [_corrupt(arr, r, _CORRUPT_KINDS[j % len(_CORRUPT_KINDS)]), ("json", good)]
            else:
                members = [("jpg", _encode_image(arr, "jpeg", 90))]
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
    attrs = _attr_plan(plan_rng, n_videos, axes)
    clean = []
    for i in range(n_videos):
        rng = _rng(seed, _STREAM_VIDEO, i)
        fps = int(rng.choice([8, 10, 12]))
        # 2.1-2.5 s: pipelines/video.py drops clips under min_clip_s (2 s by default) as too_short
        frames = render_video(attrs[i], rng, px, n_frames=int(round(fps * rng.uniform(2.1, 2.5))))
        caption = video_caption_for(attrs[i], rng)
        clean.append({"kind": "clean", "attrs": attrs[i], "caption": caption,
                      "members": [("mp4", _encode_mp4(frames, fps, crf=int(rng.integers(18, 24)))),
                                  ("json", _caption_json(caption, attrs[i]["direction"]))]})

    n_plant = 3 if n_videos >= 40 else 2
    rng = _rng(seed, _STREAM_PLANT, 1)
    near = []
    for i in rng.choice(n_videos, size=min(n_plant, n_videos), replace=False):
        frames, fps = _decode_mp4(clean[i]["members"][0][1])
        side = int(round(px * rng.choice([0.75, 1.25]) / 2)) * 2
        bit_rate = 8 * len(clean[i]["members"][0][1]) * fps / len(frames) * rng.choice([0.5, 2.0])
        data = _encode_mp4([_resize(f, side, side) for f in frames], fps, bit_rate=int(bit_rate))
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
