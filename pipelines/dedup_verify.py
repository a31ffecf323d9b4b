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
   projections (column / row means, NCC) over a grid of boxes (``verify_max_crop`` per side,
   every other of ``verify_crop_steps`` steps, then the 3x3 finer boxes around the best), in both
   directions (either image may be the crop of the other); the better direction's source is
   resampled to its box (area weights).
2. *Residual*: a single brightness gain (``verify_max_gain``, no offset, so colours must agree)
   is fitted, and the mean absolute difference is taken over each 8x8-pixel block; the pair's
   ``residual`` is the worst block (grey levels). A re-encoded, resized or brightened copy
   differs a little everywhere; a look-alike (another emoji of the same shape, another object
   at the same place) differs a lot somewhere, which a whole-image similarity would average away.
   Before that, a cheap screen (``coarse_difference``: 8x8 grid of colour block means, no
   alignment, at most ``verify_screen``) spares the alignment for pairs that differ grossly.
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

import contextlib
import io
from functools import lru_cache

import numpy as np
import simplejpeg
from PIL import Image

try:  # these products are small: BLAS threads spinning on a busy machine cost more than they give
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - optional (scikit-learn brings it)
    threadpool_limits = None

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
        try:  # thumbnails are JPEGs (compute_descriptors): libjpeg-turbo straight, as Pillow would, ~2x faster
            a = simplejpeg.decode_jpeg(b, colorspace="RGB")
        except Exception:  # noqa: BLE001 - not a JPEG after all: Pillow, whatever the format
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
def _box_grid(max_crop: float, steps: int, px: int) -> np.ndarray:
    """Every box (lo, hi) with lo, 1 - hi in linspace(0, max_crop, steps), as (S, S, px, px) area matrices."""
    cuts = np.linspace(0.0, max_crop, steps)
    return np.stack([[_box_weights(px, lo, 1.0 - c, px) for c in cuts] for lo in cuts]).astype(np.float32)


def _unit(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    v = v - v.mean(axis=axes, keepdims=True)
    return v / np.maximum(np.sqrt((v * v).sum(axis=axes, keepdims=True)), 1e-6)


def _best_boxes(src: np.ndarray, dst: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair and axis, the box of ``src`` (N, P, P grey) whose projection best matches
    ``dst``'s (NCC): every other grid step first, then the 3x3 finer boxes around the best.
    Returns the row and column box matrices (N, P, P) and the summed profile NCC (N,)."""
    n, px, steps = len(src), fine.shape[-1], fine.shape[0]
    half = (steps + 1) // 2
    rows = np.arange(n)[:, None]
    out, total = [], np.zeros(n, np.float32)
    for axis in (1, 2):  # 1: rows (y), profile = mean over x; 2: columns (x)
        ps = src.mean(axis=3 - axis)  # (N, P)
        pd = _unit(dst.mean(axis=3 - axis), (1,))
        cand = (fine.reshape(-1, px) @ ps.T).reshape(steps, steps, px, n)  # every box, one GEMM
        best = np.einsum("kin,ni->nk", _unit(cand[::2, ::2].reshape(-1, px, n), (1,)), pd).argmax(axis=1)
        ii = np.clip(2 * (best // half)[:, None] + np.repeat([-1, 0, 1], 3)[None], 0, steps - 1)  # (N, 9)
        jj = np.clip(2 * (best % half)[:, None] + np.tile([-1, 0, 1], 3)[None], 0, steps - 1)
        ncc = (_unit(cand[ii, jj, :, rows], (2,)) * pd[:, None]).sum(axis=2)  # (N, 9)
        pick = ncc.argmax(axis=1)
        out.append(fine[ii[np.arange(n), pick], jj[np.arange(n), pick]])
        total += ncc.max(axis=1)
    return out[0], out[1], total


def _warp(src: np.ndarray, my: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """Resample each ``src`` (N, P, P, 3) to its boxes: rows through ``my``, columns through ``mx``."""
    n, px = src.shape[:2]
    rows = np.matmul(my, src.reshape(n, px, px * 3)).reshape(n, px, px, 3)
    return np.matmul(mx[:, None], rows.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)


def _block_residual(warped: np.ndarray, dst: np.ndarray, max_gain: float, block: int) -> np.ndarray:
    """Worst block's mean |dst - gain * warped| (grey levels) after one clipped gain per pair;
    ``block`` pixels square (an eighth of the side: 8 at 64 px)."""
    n, px = dst.shape[:2]
    wf, df = warped.reshape(n, -1), dst.reshape(n, -1)
    gain = (wf * df).sum(1) / np.maximum((wf * wf).sum(1), 1e-6)
    gain = np.clip(gain, 1.0 / max_gain, max_gain)[:, None]
    r = np.abs(df - np.minimum(gain * wf, 255.0)).reshape(n, px // block, block, px // block, block, 3)
    return r.mean(axis=(2, 4, 5)).reshape(n, -1).max(axis=1)


def information(thumbs: np.ndarray) -> np.ndarray:
    """Grey standard deviation of each thumbnail (levels): how much an image shows."""
    if len(thumbs) == 0:
        return np.zeros(0, np.float32)
    f = thumbs.reshape(len(thumbs), -1, 3)
    grey = f[..., 0] * np.float32(0.299)  # channel by channel, in place: ~3x faster than a matmul + std
    grey += f[..., 1] * np.float32(0.587)
    grey += f[..., 2] * np.float32(0.114)
    grey -= grey.mean(axis=1, keepdims=True)
    np.square(grey, out=grey)
    return np.sqrt(grey.mean(axis=1))


def block_means(thumbs: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) → (N, 192) float32: the colour means of the 8x8 grid of blocks. Exact
    integer sums, eight slices at a time: a mean over strided axes was ~5x slower, and every
    candidate row's thumbnail passes here (15 s of the verification at 200k rows)."""
    n = len(thumbs)
    px = thumbs.reshape(n * 512, 8, 3)  # (row of a block, 8 pixels across, colour)
    across = px[:, 0].astype(np.uint16)
    for i in range(1, 8):
        across += px[:, i]
    rows = across.reshape(n, 8, 8, 8, 3)  # (block row, pixel row, block column, colour)
    total = rows[:, :, 0].copy()
    for i in range(1, 8):
        total += rows[:, :, i]  # <= 64 x 255: fits uint16
    return total.reshape(n, 192).astype(np.float32) / np.float32(64)


def layout_signature(means: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``block_means`` rows (N, 192) → (N, 2) float32: the chromaticity (r, g share of r + g + b,
    scaled to 0..255) of the image's mean colour, regularised towards grey by 16 levels so a dark
    image's noise moves it little. A brightness gain leaves it unchanged, a crop of a few percent
    or a re-encode moves it a few units; NaN where ``valid`` is False (no thumbnail)."""
    rgb = means.reshape(len(means), 64, 3).mean(axis=1, dtype=np.float32) + 16.0
    out = (255.0 * rgb[:, :2] / rgb.sum(axis=1, keepdims=True)).astype(np.float32)
    if valid is not None:
        out[~valid] = np.nan
    return out


def layout_of_thumbs(blobs: list[bytes | None]) -> np.ndarray:
    """Thumbnail bytes → ``layout_signature`` (N, 2), NaN for a missing or broken thumbnail."""
    out = np.full((len(blobs), 2), np.nan, np.float32)
    for s in range(0, len(blobs), 4096):
        t, ok = decode_thumbs(blobs[s:s + 4096])
        out[s:s + len(t)] = layout_signature(block_means(t), ok)
    return out


def _neighbourhood(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8, 3) block means → their min and max over each block's 3x3 neighbourhood."""
    p = np.pad(m, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    lo, hi = m.copy(), m.copy()
    for i in range(3):
        for j in range(3):
            np.minimum(lo, p[:, i:i + 8, j:j + 8], out=lo)
            np.maximum(hi, p[:, i:i + 8, j:j + 8], out=hi)
    return lo, hi


def layout_difference(a: np.ndarray, b: np.ndarray, cfg) -> np.ndarray:
    """A second screen before alignment, on ``block_means`` rows (N, 192): the worst block's
    distance (grey levels, mean over colours) from one image's block mean to the range its
    3x3 block neighbourhood spans in the other (after one gain), the smaller of both directions.
    A copy shifted by a crop of a few percent (under half a block) keeps each block mean inside
    that range; a look-alike has some block (an object, a colour) outside it."""
    n = len(a)
    if n == 0:
        return np.zeros(0, np.float32)
    gain = np.clip((a * b).sum(1) / np.maximum((a * a).sum(1), 1e-6), 1.0 / cfg.verify_max_gain, cfg.verify_max_gain)
    ga = np.minimum(gain[:, None] * a, 255.0).reshape(n, 8, 8, 3)
    gb = b.reshape(n, 8, 8, 3)
    out = None
    for x, y in ((ga, gb), (gb, ga)):
        lo, hi = _neighbourhood(x)
        d = (np.maximum(lo - y, 0) + np.maximum(y - hi, 0)).mean(axis=3).reshape(n, -1).max(axis=1)
        out = d if out is None else np.minimum(out, d)
    return out.astype(np.float32)


def coarse_difference(a: np.ndarray, b: np.ndarray, cfg) -> np.ndarray:
    """A cheap screen before alignment, on ``block_means`` rows (N, 192): mean |b - gain * a|
    (grey levels). A copy cropped by a few percent moves a block by less than half its side, so
    copies stay low while most look-alike candidates (other objects, other colours) do not."""
    gain = np.clip((a * b).sum(1) / np.maximum((a * a).sum(1), 1e-6), 1.0 / cfg.verify_max_gain, cfg.verify_max_gain)
    return np.abs(b - np.minimum(gain[:, None] * a, 255.0)).mean(axis=1)


def pair_residuals(ta: np.ndarray, tb: np.ndarray, cfg, chunk: int = 64) -> np.ndarray:
    """Aligned worst-block residual of each pair, in grey levels: the crop box is searched in both
    directions on grey projections and the better direction is warped and compared."""
    fine = _box_grid(float(cfg.verify_max_crop), int(cfg.verify_crop_steps), THUMB_PX)
    out = np.empty(len(ta), np.float32)
    grey = np.array([0.299, 0.587, 0.114], np.float32)
    for s in range(0, len(ta), chunk):
        a, b = ta[s:s + chunk].astype(np.float32), tb[s:s + chunk].astype(np.float32)
        ga, gb = a @ grey, b @ grey
        my_ab, mx_ab, s_ab = _best_boxes(ga, gb, fine)  # a cropped to b
        my_ba, mx_ba, s_ba = _best_boxes(gb, ga, fine)
        ab = s_ab >= s_ba
        my = np.where(ab[:, None, None], my_ab, my_ba)
        mx = np.where(ab[:, None, None], mx_ab, mx_ba)
        ab = ab[:, None, None, None]
        out[s:s + chunk] = _block_residual(_warp(np.where(ab, a, b), my, mx), np.where(ab, b, a),
                                           cfg.verify_max_gain, BLOCK_PX)
    return out


def verify_pairs(ta: np.ndarray, tb: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ok, residual, info) for pairs of thumbnails (N, 64, 64, 3) uint8: see the module doc.
    ``residual`` is inf where the pair was not measured (too little information, or screened out)."""
    info = np.minimum(information(ta), information(tb))
    screen = coarse_difference(block_means(ta), block_means(tb), cfg) if len(ta) else np.zeros(0, np.float32)
    return _decide(ta, tb, np.arange(len(ta)), np.arange(len(tb)), info, screen, cfg) + (info,)


def verify_candidates(blobs: list[bytes | None], a: np.ndarray, b: np.ndarray, cfg,
                      chunk_pairs: int = 20000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ok, residual, limit) of candidate pairs (row positions ``a``, ``b`` into ``blobs``, the
    rows' thumbnail bytes); ``limit`` is the residual the pair had to stay under (the evidence a
    drop records, and how near a rejected pair came). Every thumbnail is decoded once for the
    screen (block means, information); only pairs that pass it are decoded again, ``chunk_pairs``
    at a time, and aligned. A row whose thumbnail is missing or broken matches nothing."""
    n = len(blobs)
    means = np.zeros((n, 192), np.float32)
    info = np.zeros(n, np.float32)
    valid = np.zeros(n, bool)
    for s in range(0, n, 4096):
        t, ok = decode_thumbs(blobs[s:s + 4096])
        means[s:s + len(t)], info[s:s + len(t)], valid[s:s + len(t)] = block_means(t), information(t), ok
    pair_info = np.minimum(info[a], info[b])
    pair_info[~(valid[a] & valid[b])] = 0.0  # no thumbnail: no evidence
    screen = np.concatenate([coarse_difference(means[a[s:s + 100_000]], means[b[s:s + 100_000]], cfg)
                             for s in range(0, len(a), 100_000)]) if len(a) else np.zeros(0, np.float32)
    ok = np.zeros(len(a), bool)
    residual = np.full(len(a), np.inf, np.float32)
    todo = np.flatnonzero((pair_info >= cfg.verify_min_info) & (screen <= cfg.verify_screen))
    if cfg.verify_layout_screen > 0 and len(todo):
        lim = residual_limit(pair_info[todo], cfg) * cfg.verify_layout_screen
        lay = np.concatenate([layout_difference(means[a[todo[s:s + 100_000]]], means[b[todo[s:s + 100_000]]], cfg)
                              for s in range(0, len(todo), 100_000)])
        todo = todo[lay <= lim]
    for s in range(0, len(todo), chunk_pairs):
        sel = todo[s:s + chunk_pairs]
        rows = np.unique(np.r_[a[sel], b[sel]])
        thumbs, _ = decode_thumbs([blobs[i] for i in rows])
        pa, pb = np.searchsorted(rows, a[sel]), np.searchsorted(rows, b[sel])
        ok[sel], residual[sel] = _decide(thumbs, thumbs, pa, pb, pair_info[sel], screen[sel], cfg)
    return ok, residual, residual_limit(pair_info, cfg)


def residual_limit(info: np.ndarray, cfg) -> np.ndarray:
    """The largest residual a pair of this information may have and still be a duplicate."""
    return np.minimum(cfg.verify_max_residual, cfg.verify_residual_per_info * np.asarray(info, np.float32))


def _decide(ta: np.ndarray, tb: np.ndarray, ia: np.ndarray, ib: np.ndarray, info: np.ndarray,
            screen: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (ta[ia], tb[ib]) with their information and screen value → (ok, residual)."""
    limit = residual_limit(info, cfg)
    residual = np.full(len(ia), np.inf, np.float32)
    # too little to go on (kept), or too different even before alignment (kept): no residual
    enough = np.flatnonzero((info >= cfg.verify_min_info) & (screen <= cfg.verify_screen))
    if cfg.verify_layout_screen > 0 and len(enough):
        lay = layout_difference(block_means(ta[ia[enough]]), block_means(tb[ib[enough]]), cfg)
        enough = enough[lay <= limit[enough] * cfg.verify_layout_screen]
    if len(enough):
        with threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext():
            residual[enough] = pair_residuals(ta[ia[enough]], tb[ib[enough]], cfg)
    return residual <= limit, residual


__all__ = ["THUMB_PX", "phash_of_grey32", "crop_boxes", "compute_descriptors", "decode_thumbs", "information",
           "block_means", "coarse_difference", "layout_signature", "layout_of_thumbs", "layout_difference", "verify_candidates", "residual_limit",
           "pair_residuals", "verify_pairs"]
