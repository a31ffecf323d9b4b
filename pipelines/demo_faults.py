"""Demo corpus faults: near duplicates (checked by pHash), corrupt media and bad captions to plant.

    jpeg = near_duplicate(arr, original_jpeg, rng, "crop")        # within NEAR_MAX_BITS of the original
    ext, data = corrupt_media(arr, rng, "truncated_jpeg")          # bytes no decoder accepts
    text = bad_caption(rng, i)                                     # empty, a file name, a URL, markup ...

Near duplicates are made the way web copies differ (``NEAR_KINDS``: re-encoded at a lower JPEG
quality, resized, cropped by 1-2 %, brightness-shifted) and drawn again until their pHash lies
within ``NEAR_MAX_BITS`` of the original's, so a pHash dedup at the usual radius should find
every one. pipelines/demo_corpus.py plants them under known keys. Tested in
tests/test_demo_corpus.py.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.demo_render import encode_image, resize_image


def _dct_matrix(n: int) -> np.ndarray:
    x = np.arange(n)
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x[None, :] + 1) * x[:, None] / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d  # (n, n) orthonormal DCT-II


_DCT32 = _dct_matrix(32)
NEAR_MAX_BITS = 4  # planted near duplicates lie this close to their original (see near_duplicate)


def phash_bits(data: bytes, resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """The standard 64-bit DCT pHash as (64,) bools: grey, 32x32, 2-D DCT, top-left 8x8 > median."""
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((32, 32), resample), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    return (low > np.median(low)).ravel()


def _phash_distance(a: bytes, b: bytes) -> int:
    """The larger Hamming distance of the two common pHash variants (LANCZOS or BOX downsizing)."""
    return max(int((phash_bits(a, r) != phash_bits(b, r)).sum())
               for r in (Image.Resampling.LANCZOS, Image.Resampling.BOX))


def near_duplicate(arr: np.ndarray, original: bytes, rng: np.random.Generator, kind: str) -> bytes:
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
        return encode_image(arr, "jpeg", int(rng.integers(30, 55)))
    if kind == "resize":
        s = rng.choice([-1, 1]) * rng.uniform(0.06, 0.15) + 1.0
        return encode_image(resize_image(arr, round(w * s), round(h * s)), "jpeg", 85)
    if kind == "crop":  # 1-2% of each axis (>= 1 px), split at random between its two ends
        cw, ch = _crop_px(rng, w), _crop_px(rng, h)
        left, top = int(rng.integers(cw + 1)), int(rng.integers(ch + 1))
        right, bottom = cw - left, ch - top
        return encode_image(np.ascontiguousarray(arr[top:h - bottom, left:w - right]), "jpeg", 88)
    if kind == "brightness":
        shifted = arr.astype(float) * rng.uniform(0.92, 1.08) + rng.uniform(-8, 8)
        return encode_image(np.clip(np.rint(shifted), 0, 255).astype(np.uint8), "jpeg", 88)
    raise ValueError(kind)


def _crop_px(rng: np.random.Generator, side: int) -> int:
    return max(1, round(side * rng.uniform(0.01, 0.02)))


NEAR_KINDS = ("reencode", "resize", "crop", "brightness")
CORRUPT_KINDS = ("truncated_jpeg", "random_bytes", "zero_bytes", "broken_png_header")


def corrupt_media(arr: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[str, bytes]:
    """(extension, bytes) of media that no decoder accepts."""
    if kind == "truncated_jpeg":
        data = encode_image(arr, "jpeg", 90)
        return "jpg", data[: int(len(data) * rng.uniform(0.3, 0.6))]
    if kind == "random_bytes":
        return "jpg", rng.bytes(int(rng.integers(2000, 6000)))
    if kind == "zero_bytes":
        return "jpg", b""
    if kind == "broken_png_header":
        data = bytearray(encode_image(arr, "png"))
        data[1:8] = b"XNG\x00\x00\x00\x00"  # the 8-byte PNG signature garbled
        return "png", bytes(data)
    raise ValueError(kind)


def bad_caption(rng: np.random.Generator, i: int) -> str:
    n = int(rng.integers(1000, 9999))
    return ("", "   \n\t ", "image", f"IMG_{n}.jpg", f"https://example.com/photos/{n}.jpg",
            "<div><br/></div>")[i % 6]


__all__ = ["NEAR_MAX_BITS", "NEAR_KINDS", "CORRUPT_KINDS", "phash_bits", "near_duplicate", "corrupt_media",
           "bad_caption"]
