"""Real offline images for the dedup benchmarks, and distinct-by-construction collages of them.

    objects = source_objects(seed=0)            # list of (kind, RGB uint8 array): real pictures
    for im in collages(objects, 20_000, seed=0): ...   # PIL images, no pair of sources used twice

Sources (all offline, see ../shared/DATA.md): the photos of scikit-learn (``load_sample_images``)
and scikit-image (``skimage.data``) cut into random crops, the 200 LFW faces bundled with
scikit-image, scikit-learn's 1,797 handwritten digits (8x8, upscaled) and the Noto colour emoji
(Debian ``fonts-noto-color-emoji``). A collage is two different sources, each at a random
scale (12-60% of the canvas' shorter side) and place, on a plain background of a random colour,
on a canvas of random aspect ratio whose shorter side is 256 px (the curated size, so
``images.process_image`` does not resize it). No unordered pair of sources is used twice, so
every collage is distinct and every duplicate a dedup finds among them is a false drop. Plain
backgrounds and small objects are the hard case for low-frequency perceptual hashes.

Used by bench/dedup_distinct.py (false drops at scale) and bench/dedup_quality.py (real photos).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "retina", "horse",
                  "coins", "moon", "motorcycle_left", "immunohistochemistry", "brick", "grass", "gravel", "cell",
                  "microaneurysms", "page", "text", "clock")
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_LIST = "/usr/share/unicode/emoji/emoji-test.txt"


def real_photos() -> list[np.ndarray]:
    """The photos shipped with scikit-learn and scikit-image (RGB uint8)."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, np.uint8) for p in load_sample_images().images]
    try:
        import skimage.data as sd
    except ImportError:
        return photos
    for name in SKIMAGE_PHOTOS:
        try:
            a = getattr(sd, name)()
        except Exception:  # noqa: BLE001 - an image that needs a download is skipped
            continue
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        if a.dtype != np.uint8:
            a = (np.clip(a / max(1e-9, float(a.max())), 0, 1) * 255).astype(np.uint8)
        photos.append(np.asarray(a[..., :3], np.uint8))
    return photos


def faces(px: int = 100) -> list[np.ndarray]:
    """The 200 LFW faces bundled with scikit-image, enlarged to ``px`` (grey as RGB)."""
    try:
        import skimage.data as sd

        lfw = sd.lfw_subset()
    except Exception:  # noqa: BLE001
        return []
    return [np.stack([np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((px, px), Image.BICUBIC))] * 3, -1)
            for f in lfw]


def digits() -> list[np.ndarray]:
    """scikit-learn's 1,797 handwritten digits, 8x8 grey (ink dark on white) as RGB."""
    from sklearn.datasets import load_digits

    d = load_digits().images  # 0..16, ink high
    return [np.stack([(255 - x * 255 / 16).astype(np.uint8)] * 3, -1) for x in d]


def emoji(n: int | None = None) -> list[np.ndarray]:
    """Noto colour emoji, one picture per emoji (no skin-tone / ZWJ variants), 136x128 on white."""
    if n == 0 or not (os.path.exists(EMOJI_FONT) and os.path.exists(EMOJI_LIST)):
        return []
    chars = []
    for line in open(EMOJI_LIST, encoding="utf-8"):
        if "; fully-qualified" not in line:
            continue
        cps = [int(c, 16) for c in line.split(";")[0].split()]
        if any(0x1F3FB <= c <= 0x1F3FF or c == 0x200D for c in cps):
            continue
        chars.append("".join(chr(c) for c in cps))
    font = ImageFont.truetype(EMOJI_FONT, 109)
    out = []
    for ch in chars:
        im = Image.new("RGBA", (136, 128), (255, 255, 255, 255))
        ImageDraw.Draw(im).text((0, 0), ch, font=font, embedded_color=True)
        arr = np.asarray(im.convert("RGB"))
        if arr.min() < 250:  # glyph rendered
            out.append(arr)
        if n is not None and len(out) >= n:
            break
    return out


def photo_crops(n: int, seed: int) -> list[np.ndarray]:
    """``n`` random crops (10-50% of the shorter side, aspect 0.5-2) of the real photos."""
    photos = real_photos()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = photos[int(rng.integers(len(photos)))]
        h, w = p.shape[:2]
        side = rng.uniform(0.1, 0.5) * min(h, w)
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        ch, cw = max(8, int(side / np.sqrt(aspect))), max(8, int(side * np.sqrt(aspect)))
        ch, cw = min(ch, h), min(cw, w)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(np.ascontiguousarray(p[y:y + ch, x:x + cw]))
    return out


def source_objects(seed: int = 0, n_photo_crops: int = 3000) -> list[tuple[str, np.ndarray]]:
    """Every source picture with its kind: emoji, digits, faces and random photo crops."""
    return ([("emoji", e) for e in emoji()] + [("digit", d) for d in digits()] + [("face", f) for f in faces()]
            + [("photo", p) for p in photo_crops(n_photo_crops, seed)])


def collage_plans(objects: list[tuple[str, np.ndarray]], n: int, seed: int = 0,
                  short_px: int = 256) -> Iterator[tuple[tuple[int, int], tuple]]:
    """The random choices of ``n`` collages, without drawing them: ((source i, source j), plan)
    with two different sources each and no pair twice; ``draw_collage(objects, plan)`` draws one.
    Split so that the drawing can run on several cores and give the same corpus."""
    rng = np.random.default_rng(seed)
    n_obj = len(objects)
    if n > n_obj * (n_obj - 1) // 2:
        raise ValueError(f"{n} collages need more than {n_obj} sources")
    used: set[tuple[int, int]] = set()
    made = 0
    while made < n:
        i, j = (int(x) for x in rng.choice(n_obj, 2, replace=False))
        pair = (min(i, j), max(i, j))
        if pair in used:
            continue
        used.add(pair)
        aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.6))))
        w, h = (round(short_px * aspect), short_px) if rng.random() < 0.5 else (short_px, round(short_px * aspect))
        background = tuple(int(c) for c in rng.integers(0, 256, 3))
        placed = []
        for k in (i, j):
            oh, ow = objects[k][1].shape[:2]
            side = rng.uniform(0.12, 0.6) * short_px
            s = side / max(oh, ow)
            size = (max(2, round(ow * s)), max(2, round(oh * s)))
            x, y = int(rng.integers(0, max(1, w - size[0]))), int(rng.integers(0, max(1, h - size[1])))
            placed.append((k, size, x, y))
        made += 1
        yield pair, ((w, h), background, tuple(placed))


def draw_collage(objects: list[tuple[str, np.ndarray]], plan: tuple) -> Image.Image:
    (w, h), background, placed = plan
    canvas = Image.new("RGB", (w, h), background)
    for k, size, x, y in placed:
        canvas.paste(Image.fromarray(objects[k][1]).resize(size, Image.BICUBIC), (x, y))
    return canvas


def collages(objects: list[tuple[str, np.ndarray]], n: int, seed: int = 0,
             short_px: int = 256) -> Iterator[tuple[tuple[int, int], Image.Image]]:
    """``n`` collages ((source i, source j), image): two different sources each, no pair twice."""
    for pair, plan in collage_plans(objects, n, seed, short_px):
        yield pair, draw_collage(objects, plan)


__all__ = ["real_photos", "faces", "digits", "emoji", "photo_crops", "source_objects", "collage_plans", "draw_collage",
           "collages"]
