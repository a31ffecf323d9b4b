"""Image validation, conversion, resize and hashing on real encoded files made here (no Ray)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.captions import CaptionConfig
from pipelines.images import (
    IMAGE_WORK_SCHEMA,
    ImageConfig,
    ImageReject,
    compute_phash,
    hamming,
    process_image,
    process_image_batch,
    to_rgb,
)
from pipelines.inputs import INPUT_SCHEMA

CFG = ImageConfig(image_px=64, min_side_px=16)


def photo(w=320, h=240, seed=0) -> np.ndarray:
    """Photo-like content: smooth random field plus texture."""
    rng = np.random.default_rng(seed)
    small = rng.random((h // 16 + 2, w // 16 + 2, 3))
    base = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def encode(arr_or_im, fmt="JPEG", **kw) -> bytes:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def reject_reason(data, cfg=CFG, name="x.jpg"):
    with pytest.raises(ImageReject) as e:
        process_image(data, name, cfg)
    return e.value.reason


def test_jpeg_png_webp_decode_resize_encode():
    for fmt in ("JPEG", "PNG", "WEBP"):
        out = process_image(encode(photo(), fmt), "x", CFG)
        assert (out["width"], out["height"]) == (85, 64)
        assert (out["orig_width"], out["orig_height"]) == (320, 240)
        assert Image.open(io.BytesIO(out["image"])).format == "JPEG"
        assert isinstance(out["phash"], int) and -(1 << 63) <= out["phash"] < (1 << 63)


def test_no_upscale_by_default_and_upscale_option():
    small = encode(photo(40, 30))
    assert process_image(small, "x", CFG)["height"] == 30
    assert process_image(small, "x", ImageConfig(image_px=64, min_side_px=16, upscale=True))["height"] == 64


def test_draft_mode_matches_full_decode():
    data = encode(photo(1600, 1200), quality=95)
    a = process_image(data, "x", CFG)
    b = process_image(data, "x", ImageConfig(image_px=64, min_side_px=16, draft=False))
    assert (a["width"], a["height"]) == (b["width"], b["height"]) == (85, 64)
    assert hamming(a["phash"], b["phash"]) <= 4


def test_area_and_bicubic_resample_agree_in_kind():
    """Both shrink filters give the configured size, JPEG out, and nearly the same picture."""
    for fmt in ("JPEG", "PNG"):
        data = encode(photo(640, 480), fmt)
        a = process_image(data, "x", CFG)  # area, the default
        b = process_image(data, "x", ImageConfig(image_px=64, min_side_px=16, resample="bicubic"))
        assert (a["width"], a["height"]) == (b["width"], b["height"]) == (85, 64)
        pa_, pb = (np.asarray(Image.open(io.BytesIO(x["image"])), np.float32) for x in (a, b))
        assert np.abs(pa_ - pb).mean() < 12 and hamming(a["phash"], b["phash"]) <= 6
    with pytest.raises(ValueError, match="resample"):
        ImageConfig(resample="lanczos")


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"this is not an image at all", "decode_error"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "unsupported_format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "unsupported_format"),
])
def test_bad_bytes(data, reason):
    assert reject_reason(data) == reason


def test_truncated_jpeg_and_png():
    jpg = encode(photo())
    assert reject_reason(jpg[: len(jpg) // 2]) in ("truncated", "decode_error")
    png = encode(photo(), "PNG")
    assert reject_reason(png[: len(png) // 2], name="x.png") in ("truncated", "decode_error")


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_checked_before_decoding():
    # a 100k x 100k PNG header: rejected from the header alone, nothing is allocated
    assert reject_reason(_png_header_only(100_000, 100_000), name="x.png") == "decompression_bomb"
    assert reject_reason(encode(photo(), "PNG"), ImageConfig(max_image_pixels=10_000)) == "decompression_bomb"


def test_animated_gif_first_frame_or_reject():
    frames = [Image.fromarray(photo(seed=i)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = process_image(buf.getvalue(), "x.gif", CFG)
    assert out["height"] == 64
    assert reject_reason(buf.getvalue(), ImageConfig(image_px=64, min_side_px=16, animated="reject")) == "animated"


def test_min_side_and_aspect_ratio():
    assert reject_reason(encode(photo(64, 10))) == "too_small"
    assert reject_reason(encode(photo(400, 50)), ImageConfig(image_px=32, min_side_px=16)) == "bad_aspect_ratio"


def test_alpha_composited_on_white_and_palette_transparency():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = to_rgb(Image.fromarray(rgba, "RGBA"))
    a = np.asarray(out)
    assert tuple(a[5, 5]) == (255, 0, 0) and tuple(a[35, 5]) == (255, 255, 255)
    p = Image.fromarray(rgba, "RGBA").convert("P")
    p.info["transparency"] = p.getpixel((5, 35))
    assert tuple(np.asarray(to_rgb(p))[35, 5]) == (255, 255, 255)
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    assert tuple(np.asarray(to_rgb(la))[35, 5]) == (255, 255, 255)


def test_cmyk_and_16bit_and_grey():
    arr = photo(64, 48)
    cmyk = Image.fromarray(arr).convert("CMYK")
    out = process_image(encode(cmyk, "JPEG", quality=95), "x.jpg", CFG)
    back = np.asarray(Image.open(io.BytesIO(out["image"])).convert("RGB"), np.float32)
    ref = np.asarray(Image.fromarray(arr).resize((out["width"], out["height"])), np.float32)
    assert np.abs(back - ref).mean() < 25  # colours survive the CMYK round trip
    grey16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    im16 = Image.fromarray(grey16)
    rgb = np.asarray(to_rgb(im16))
    assert rgb.dtype == np.uint8 and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 100 < rgb[24, 32, 0] < 160  # scaled, not clipped at 255
    assert to_rgb(Image.fromarray(arr[..., 0], "L")).mode == "RGB"


def test_exif_orientation_applied():
    arr = photo(80, 40)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = process_image(encode(im, "JPEG", exif=exif.tobytes()), "x.jpg", ImageConfig(image_px=40, min_side_px=16))
    assert (out["orig_width"], out["orig_height"]) == (40, 80)
    assert (out["width"], out["height"]) == (40, 80)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_scaled_jpeg_decode_matches_pillow_path_in_every_orientation(orientation):
    """The libjpeg-turbo n/8 path (draft=True) against Pillow's full decode (draft=False): same
    upright size, same original size, pixels within JPEG noise, for every EXIF orientation."""
    im = Image.fromarray(photo(300, 200, seed=orientation))
    exif = im.getexif()
    exif[0x0112] = orientation
    data = encode(im, "JPEG", quality=95, exif=exif.tobytes())
    cfg = ImageConfig(image_px=150, min_side_px=16)
    fast = process_image(data, "x.jpg", cfg)
    slow = process_image(data, "x.jpg", ImageConfig(image_px=150, min_side_px=16, draft=False))
    upright = (200, 300) if orientation >= 5 else (300, 200)
    assert (fast["orig_width"], fast["orig_height"]) == (slow["orig_width"], slow["orig_height"]) == upright
    assert (fast["width"], fast["height"]) == (slow["width"], slow["height"])
    a, b = (np.asarray(Image.open(io.BytesIO(r["image"])), np.float32) for r in (fast, slow))
    assert np.abs(a - b).mean() < 3
    assert hamming(fast["phash"], slow["phash"]) <= 4


def test_scaled_jpeg_decode_grey_and_damaged_fall_back_cleanly():
    grey = encode(Image.fromarray(photo(320, 240)[..., 0], "L"), "JPEG")
    out = process_image(grey, "g.jpg", CFG)
    assert Image.open(io.BytesIO(out["image"])).mode == "RGB" and out["height"] == 64
    jpg = encode(photo(640, 480))
    assert reject_reason(jpg[: len(jpg) * 2 // 3]) == "truncated"


def test_phash_robust_to_reencode_resize_and_distinct_for_others():
    base = photo(400, 300, seed=1)
    ref = process_image(encode(base, quality=95), "x", CFG)["phash"]
    lowq = process_image(encode(base, quality=30), "x", CFG)["phash"]
    bigger = process_image(encode(np.asarray(Image.fromarray(base).resize((480, 360)))), "x", CFG)["phash"]
    assert hamming(ref, lowq) <= 6 and hamming(ref, bigger) <= 6
    others = [process_image(encode(photo(400, 300, seed=s)), "x", CFG)["phash"] for s in range(2, 8)]
    assert min(hamming(ref, o) for o in others) > 12


def test_pixel_hash_equal_for_lossless_reencode():
    arr = photo(100, 80)
    a = process_image(encode(arr, "PNG"), "a.png", CFG)
    b = process_image(encode(arr, "PNG", compress_level=1, optimize=False), "b.png", CFG)
    c = process_image(encode(arr, "WEBP", lossless=True), "c.webp", CFG)
    assert a["pixel_hash"] == b["pixel_hash"] == c["pixel_hash"]
    d = process_image(encode(photo(100, 80, seed=9), "PNG"), "d.png", CFG)
    assert d["pixel_hash"] != a["pixel_hash"]


def test_compute_phash_known_bits():
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    assert compute_phash(flat) in (0, -(1 << 63))  # only DC can exceed the median of a flat image


def test_process_image_batch_rows_and_reasons():
    good = encode(photo())
    rows = [
        dict(source="s", key="ok", media=good, media_name="ok.jpg", caption_raw="a nice photo"),
        dict(source="s", key="badcap", media=good, media_name="b.jpg", caption_raw="IMG_0001.JPG"),
        dict(source="s", key="badimg", media=b"xx", media_name="c.jpg", caption_raw="a broken file"),
        dict(source="s", key="read", error="missing_caption"),
        dict(source="s", key="label", media=good, media_name="d.jpg", caption_raw="a nice photo",
             meta='{"label": "cat"}'),
    ]
    full = [{f.name: r.get(f.name) for f in INPUT_SCHEMA} for r in rows]
    out = process_image_batch(pa.Table.from_pylist(full, schema=INPUT_SCHEMA), CFG, CaptionConfig())
    assert out.schema == IMAGE_WORK_SCHEMA
    got = {r["key"]: r for r in out.to_pylist()}
    assert got["ok"]["reason"] is None and got["ok"]["hashes"] == [got["ok"]["phash"]]
    assert got["badcap"]["reason"] == "boilerplate_caption" and got["badcap"]["stage"] == "caption"
    assert got["badimg"]["reason"] == "decode_error" and got["badimg"]["stage"] == "image"
    assert got["read"]["reason"] == "missing_caption" and got["read"]["stage"] == "read"
    assert got["label"]["label"] == "cat"
    # same pixels and same caption: same sample_id, different row ids
    assert got["ok"]["sample_id"] == got["label"]["sample_id"] and got["ok"]["row_id"] != got["label"]["row_id"]
