"""Near-duplicate verification: descriptors computed in the curate pass, and the pair check.

    d = compute_descriptors(rgb_image)     # {"phash", "crop_hashes", "thumb"} of the curated image
    ok, residual, info = verify_pairs(thumbs_a, thumbs_b, cfg)   # (N, 64, 64, 3) uint8 each

A 64-bit pHash says two images look alike at the lowest frequencies; on plain backgrounds with
small objects many distinct images do, and the more images a corpus holds, the more of them
land within a few bits of each other (bench/dedup_distinct.py). So a pHash match only nominates
a pair; this module decides it, on a 64x64 colour thumbnail stored per image (``thumb``: JPEG,
quality 90, no chroma subsampling, ~2 KB):

1. *Alignment*: a copy may be cropped by a few percent per side and rescaled. For each axis the
   crop box of the source that best explains the other image is found by matching 1-D grey
   projections (column / row means at 32 px, NCC) over a grid of boxes (``verify_max_crop`` per
   side, ``verify_crop_steps`` steps), in both directions (either image may be the crop of the
   other); the better direction's source is resampled to its box (area weights).
2. *Residual*: a single brightness gain (``verify_max_gain``, no offset, so colours must agree)
   is fitted, and the mean absolute difference is taken over each 8x8-pixel block; the pair's
   ``residual`` is the worst block (grey levels). A re-encoded, resized or brightened copy
   differs a little everywhere; a look-alike (another emoji of the same shape, another object
   at the same place) differs a lot somewhere, which a whole-image similarity would average away.
3. *Evidence needed*: ``info`` is the smaller of the two thumbnails' grey standard deviations.
   A pair is a duplicate only when ``info >= verify_min_info`` and ``residual <=
   min(verify_max_residual, verify_residual_per_info * info)``: the less an image shows, the
   closer the match must be, and a near-uniform image (one colour, a tiny object on a plain
   background) never matches on its own.

The views ``crop_hashes`` (pHashes of the four corner-anchored 95% crops) let LSH nominate
cropped copies (pipelines/dedup_lsh.py). Thresholds are chosen on bench/dedup_quality.py and
bench/dedup_distinct.py. Tested in tests/test_dedup.py.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

THUMB_PX = 64
BLOCK_PX = 8
CROP_VIEW = 0.95  # the crop views' side, as a fraction of the image's


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)[:8]  # only the 8 lowest frequencies are kept: (8, 32)
_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash_of_grey32(g: np.ndarray) -> int:
    """64-bit DCT pHash of a 32x32 grey array as a signed int64 (bit 63 = top-left coefficient):
    2-D DCT-II, top-left 8x8, bits above the median (Zauner 2010; the ``imagehash.phash`` recipe)."""
    low = _DCT32 @ np.asarray(g, np.float64) @ _DCT32.T
    low = np.round(low, 6)  # float noise must not decide bits of flat regions
    bits = (low > np.median(low)).ravel()
    value = int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))
    return value - (1 << 64) if value >= (1 << 63) else value


def crop_boxes(w: int, h: int) -> list[tuple[float, float, float, float]]:
    """The four corner-anchored crops of side ``CROP_VIEW`` (left, top, right, bottom in pixels)."""
    cw, ch = w * CROP_VIEW, h * CROP_VIEW
    return [(x, y, x + cw, y + ch) for y in (0.0, h - ch) for x in (0.0, w - cw)]


def compute_descriptors(im: Image.Image) -> dict:
    """The dedup descriptors of a curated RGB image, from its pixels (no re-read of the input):
    ``phash`` (int64), ``crop_hashes`` (4 int64 pHashes of the corner crops), ``thumb`` (bytes)."""
    grey = im.convert("L")
    box = Image.Resampling.BOX
    phash = phash_of_grey32(np.asarray(grey.resize((32, 32), box)))
    crops = [phash_of_grey32(np.asarray(grey.resize((32, 32), box, box=b))) for b in crop_boxes(*im.size)]
    buf = io.BytesIO()
    im.resize((THUMB_PX, THUMB_PX), box).save(buf, "JPEG", quality=90, subsampling=0)
    return {"phash": phash, "crop_hashes": crops, "thumb": buf.getvalue()}


def decode_thumbs(blobs: list[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnail bytes → (n, 64, 64, 3) uint8 and a validity mask (missing/undecodable → False)."""
    out = np.zeros((len(blobs), THUMB_PX, THUMB_PX, 3), np.uint8)
    ok = np.zeros(len(blobs), bool)
    for i, b in enumerate(blobs):
        if not b:
            continue
        try:
            a = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        except Exception:  # noqa: BLE001 - a broken thumbnail is no evidence, never an error
            continue
        if a.shape == out.shape[1:]:
            out[i], ok[i] = a, True
    return out, ok


# --------------------------------------------------------------------------- alignment
def _box_weights(n_src: int, lo: float, hi: float, n_out: int) -> np.ndarray:
    """(n_out, n_src) area weights: output pixel i averages the source over its share of [lo, hi]."""
    e = lo + (hi - lo) * np.arange(n_out + 1) / n_out
    a0 = np.clip(e[:-1, None] * n_src, 0, n_src)
    a1 = np.clip(e[1:, None] * n_src, 0, n_src)
    j = np.arange(n_src)[None]
    ov = np.clip(np.minimum(a1, j + 1) - np.maximum(a0, j), 0, None)
    return ov / np.maximum(ov.sum(1, keepdims=True), 1e-12)


@lru_cache(maxsize=8)
def _box_grid(max_crop: float, steps: int, px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every box (lo, hi) with lo, 1 - hi in linspace(0, max_crop, steps): the (K, px, px)
    profile matrices and, for a ``px``-pixel warp, two source taps per output pixel (index, weights)."""
    cuts = np.linspace(0.0, max_crop, steps)
    boxes = [(lo, 1.0 - c) for lo in cuts for c in cuts]
    prof = np.stack([_box_weights(px, lo, hi, px) for lo, hi in boxes]).astype(np.float32)
    idx = np.zeros((len(boxes), px), np.int64)
    w = np.zeros((len(boxes), px), np.float32)
    for k, (lo, hi) in enumerate(boxes):
        m = _box_weights(px, lo, hi, px)  # an output pixel spans <= 1 source pixel: <= 2 taps
        first = np.argmax(m > 0, axis=1)
        idx[k], w[k] = first, m[np.arange(px), first]
    return prof, idx, w


def _unit(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    v = v - v.mean(axis=axes, keepdims=True)
    return v / np.maximum(np.sqrt((v * v).sum(axis=axes, keepdims=True)), 1e-6)


def _best_boxes(src: np.ndarray, dst: np.ndarray, prof: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair and axis, the box of ``src`` (N, P, P grey) whose projection best matches
    ``dst``'s: (row box, column box, summed profile NCC), (N,) each."""
    n, k, px = len(src), prof.shape[0], prof.shape[1]
    best, total = [], np.zeros(n, np.float32)
    for axis in (1, 2):  # 1: rows (y), profile = mean over x; 2: columns (x)
        ps = src.mean(axis=3 - axis)  # (N, 32)
        pd = _unit(dst.mean(axis=3 - axis), (1,))
        cand = _unit((prof.reshape(k * px, px) @ ps.T).reshape(k, px, n), (1,))  # (K, P, N)
        ncc = np.einsum("kin,ni->nk", cand, pd)
        best.append(ncc.argmax(axis=1))
        total += ncc.max(axis=1)
    return best[0], best[1], total


def _warp(src: np.ndarray, ky: np.ndarray, kx: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Resample each ``src`` (N, P, P, 3) to its boxes (rows ``ky``, columns ``kx``): 2 taps per axis."""
    n, px = src.shape[:2]
    rows = np.arange(n)[:, None]
    iy, wy = idx[ky], w[ky][:, :, None, None]  # (N, P)
    iy1 = np.minimum(iy + 1, px - 1)
    out = src[rows, iy] * wy + src[rows, iy1] * (1.0 - wy)
    ix, wx = idx[kx], w[kx][:, None, :, None]
    ix1 = np.minimum(ix + 1, px - 1)
    return out[rows, :, ix].transpose(0, 2, 1, 3) * wx + out[rows, :, ix1].transpose(0, 2, 1, 3) * (1.0 - wx)


def _block_residual(warped: np.ndarray, dst: np.ndarray, max_gain: float, block: int) -> np.ndarray:
    """Worst block's mean |dst - gain * warped| (grey levels) after one clipped gain per pair;
    ``block`` pixels square (an eighth of the side: 8 at 64 px, 4 at 32 px)."""
    n, px = dst.shape[:2]
    wf, df = warped.reshape(n, -1), dst.reshape(n, -1)
    gain = (wf * df).sum(1) / np.maximum((wf * wf).sum(1), 1e-6)
    gain = np.clip(gain, 1.0 / max_gain, max_gain)[:, None]
    r = np.abs(df - np.minimum(gain * wf, 255.0)).reshape(n, px // block, block, px // block, block, 3)
    return r.mean(axis=(2, 4, 5)).reshape(n, -1).max(axis=1)


def information(thumbs: np.ndarray) -> np.ndarray:
    """Grey standard deviation of each thumbnail (levels): how much an image shows."""
    grey = thumbs.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return grey.reshape(len(thumbs), -1).std(axis=1)


def pair_residuals(ta: np.ndarray, tb: np.ndarray, cfg, chunk: int = 128) -> np.ndarray:
    """Aligned worst-block residual of each pair, in grey levels: the crop box is searched in both
    directions on grey projections and the better direction is warped and compared."""
    prof, idx, w = _box_grid(float(cfg.verify_max_crop), int(cfg.verify_crop_steps), THUMB_PX)
    out = np.empty(len(ta), np.float32)
    grey = np.array([0.299, 0.587, 0.114], np.float32)
    for s in range(0, len(ta), chunk):
        a, b = ta[s:s + chunk].astype(np.float32), tb[s:s + chunk].astype(np.float32)
        ga, gb = a @ grey, b @ grey
        ky_ab, kx_ab, s_ab = _best_boxes(ga, gb, prof)  # a cropped to b
        ky_ba, kx_ba, s_ba = _best_boxes(gb, ga, prof)
        ab = s_ab >= s_ba
        ky, kx = np.where(ab, ky_ab, ky_ba), np.where(ab, kx_ab, kx_ba)
        ab = ab[:, None, None, None]
        out[s:s + chunk] = _block_residual(_warp(np.where(ab, a, b), ky, kx, idx, w), np.where(ab, b, a),
                                           cfg.verify_max_gain, BLOCK_PX)
    return out


def verify_pairs(ta: np.ndarray, tb: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ok, residual, info) for pairs of thumbnails (N, 64, 64, 3) uint8: see the module doc."""
    info = np.minimum(information(ta), information(tb))
    limit = np.minimum(cfg.verify_max_residual, cfg.verify_residual_per_info * info)
    residual = np.full(len(ta), np.inf, np.float32)
    enough = np.flatnonzero(info >= cfg.verify_min_info)  # too little to go on: no residual, kept
    if len(enough):
        residual[enough] = pair_residuals(ta[enough], tb[enough], cfg)
    ok = residual <= limit
    return ok, residual, info


__all__ = ["THUMB_PX", "phash_of_grey32", "crop_boxes", "compute_descriptors", "decode_thumbs", "information",
           "pair_residuals", "verify_pairs"]
