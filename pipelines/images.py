"""Image validation and transformation: bytes in, a curated JPEG + perceptual hash out (pure functions).

    out = process_image(data, "x.jpg", ImageConfig())   # dict, or raises ImageReject(reason, detail)
    table = process_image_batch(inputs, cfg.images, cfg.captions)   # the curate stage (pyarrow in/out)

Order of checks (cheap first, nothing decoded before it is known to be safe):
  empty file → format sniff (only ``ImageConfig.formats``; never EPS/PSD/etc.) → pixel limit from
  the header (decompression bombs) → animation → min side / aspect ratio → a downscaled JPEG decodes in libjpeg-turbo (simplejpeg)
  at the smallest DCT scale n/8 still >= the output size, far less CPU than a full decode and
  resize; CMYK and damaged JPEGs take Pillow's path (draft 1/2..1/8), as do other formats → decode
  (truncation detected) → EXIF orientation → colour: CMYK (through its ICC profile when present),
  16-bit, palette, alpha composited on white → resize shorter side to ``image_px`` → JPEG encode.

The exact-duplicate key ``pixel_hash`` hashes the decoded pixels at the curated resolution plus the
original size, so a re-encoded or re-tagged copy of the same picture hashes the same; ``phash`` is
the 64-bit DCT perceptual hash (Zauner 2010; the ``imagehash.phash`` recipe: 32x32 grey, 2-D
DCT-II, top-left 8x8, bits above the median) that nominates near-duplicate candidates, with
``crop_hashes`` (the pHashes of four corner crops) and ``thumb`` (a 64x64 thumbnail) that verify
them (pipelines/dedup_verify.py), all computed here from the decoded pixels.

Reject reasons: empty_file, unsupported_format, decode_error, truncated, decompression_bomb,
animated, too_small, bad_aspect_ratio. Tested in tests/test_images.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.captions import CaptionConfig, normalize_for_dedup, process_caption
from pipelines.dedup_verify import compute_descriptors, phash_of_grey32
from pipelines.schema import make_sample_id

# We check the pixel limit ourselves before decoding; Pillow's own check stays as a backstop.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Magic numbers of formats that exist but that we do not decode (reported as unsupported_format).
_KNOWN_MAGIC = ((b"<svg", "svg"), (b"<?xml", "svg/xml"), (b"%!PS", "eps"), (b"8BPS", "psd"),
                (b"\x00\x00\x01\x00", "ico"), (b"%PDF", "pdf"))


@dataclass(frozen=True)
class ImageConfig:
    """Image validation and output; every threshold carries its unit."""

    image_px: int = 256                        # shorter side of the stored image
    upscale: bool = False                      # enlarge images whose shorter side is below image_px
    jpeg_quality: int = 90
    min_side_px: int = 32
    max_aspect_ratio: float = 4.0              # long side / short side
    max_image_pixels: int = 64_000_000         # checked from the header, before decoding
    animated: Literal["first_frame", "reject"] = "first_frame"
    draft: bool = True                         # JPEG DCT-domain downscale while decoding (n/8 scales, simplejpeg)
    # Downscaling filter. "area": each output pixel averages the source pixels it covers (Pillow's
    # BOX filter; OpenCV's INTER_AREA), the usual filter for shrinking; "bicubic": Pillow's bicubic
    # with reducing_gap=2. Area is 0.8 ms against 1.85 ms for bicubic on a 372x360 -> 265x256 step
    # (the resize after a 6/8 DCT-scaled decode), the largest single cost of a sample (measured).
    resample: Literal["area", "bicubic"] = "area"
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow names; JPEG covers MPO

    def __post_init__(self) -> None:
        if self.image_px < 8:
            raise ValueError("image_px must be >= 8")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in [1, 100]")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, not {self.resample!r}")
        if self.max_aspect_ratio < 1.0:
            raise ValueError("max_aspect_ratio must be >= 1")


_RESAMPLE = ("area", "bicubic")


class ImageReject(Exception):
    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def process_image(data: bytes | None, name: str | None, cfg: ImageConfig) -> dict:
    """Validate, decode, normalise, resize, encode and hash one image; raise ImageReject."""
    if not data:
        raise ImageReject("empty_file", "0 bytes")
    try:
        im = Image.open(io.BytesIO(data), formats=_open_formats(cfg.formats))
    except Image.DecompressionBombError as e:
        raise ImageReject("decompression_bomb", str(e)[:200]) from None
    except UnidentifiedImageError:
        if _looks_truncated(data):
            raise ImageReject("truncated", f"{len(data)} bytes, no end marker") from None
        raise ImageReject(*_sniff_unsupported(data, name)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if _looks_truncated(data) else "decode_error"
        raise ImageReject(reason, f"{type(e).__name__}: {str(e)[:160]}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageReject("decode_error", f"bad size {w}x{h}")
    if w * h > cfg.max_image_pixels:
        raise ImageReject("decompression_bomb", f"{w}x{h} > {cfg.max_image_pixels} pixels")
    if getattr(im, "n_frames", 1) > 1 and cfg.animated == "reject":
        raise ImageReject("animated", f"{im.n_frames} frames")
    if min(w, h) < cfg.min_side_px:
        raise ImageReject("too_small", f"{w}x{h} < {cfg.min_side_px} px")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise ImageReject("bad_aspect_ratio", f"{w}x{h}")
    scale = cfg.image_px / min(w, h)
    fast = _fast_jpeg(data, im, w, h, cfg) if cfg.draft and im.format in ("JPEG", "MPO") and scale < 1 else None
    if fast is not None:
        out, w, h = fast
        return _finish(out, w, h, cfg)
    if cfg.draft and im.format in ("JPEG", "MPO") and scale < 0.5:
        # Request the output size; Pillow picks the largest DCT scale (1/2, 1/4, 1/8) still >= it.
        im.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageReject("decompression_bomb", str(e)[:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        truncated = "truncated" in msg or isinstance(e, EOFError) or _looks_truncated(data)
        reason = "truncated" if truncated else "decode_error"
        raise ImageReject(reason, f"{type(e).__name__}: {msg[:160]}") from None
    decoded_size = im.size
    im = _apply_orientation(im)
    if im.size != decoded_size:  # EXIF rotation by 90/270 degrees: report the upright size
        w, h = h, w
    rgb = to_rgb(im)
    return _finish(resize_shorter_side(rgb, cfg.image_px, cfg.upscale, cfg.resample), w, h, cfg)


def _finish(out: Image.Image, w: int, h: int, cfg: ImageConfig) -> dict:
    """The curated RGB image (upright, at its output size) → JPEG, hashes and descriptors."""
    ow, oh = out.size
    pixel_hash = hashlib.blake2b(out.tobytes(), digest_size=16, key=f"{w}x{h}".encode()).digest()
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=cfg.jpeg_quality)
    return {"image": buf.getvalue(), "width": ow, "height": oh, **compute_descriptors(out),
            "pixel_hash": pixel_hash, "orig_width": w, "orig_height": h}


def _fast_jpeg(data: bytes, im: Image.Image, w: int, h: int, cfg: ImageConfig) -> tuple | None:
    """A JPEG that is downscaled: libjpeg-turbo (simplejpeg) decodes it straight at the smallest
    DCT scale n/8 that is still at least the output size (Pillow's draft offers only 1/2, 1/4,
    1/8: a 480 px side going to 256 decodes at 6/8 here instead of 8/8), the resize runs on those
    fewer pixels, and the EXIF rotation is applied to the small image. About 40% less CPU for
    decode + resize on 640x480 photos (bench/curate_images.py). Returns (image, upright w, h),
    or None to take Pillow's path: CMYK/YCCK, or anything libjpeg-turbo reports as damaged
    (truncated, bad markers): Pillow's path then gives the reject its precise reason."""
    if im.mode not in ("RGB", "L"):
        return None
    s = cfg.image_px / min(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    try:
        a = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0], min_height=size[1])
    except (ValueError, RuntimeError):
        return None
    if a.shape[1] < size[0] or a.shape[0] < size[1]:
        return None
    small = Image.fromarray(a, "RGB")
    if small.size != size:
        small = resize_shorter_side(small, cfg.image_px, resample=cfg.resample)
    if "exif" in im.info:  # the rotation is the same _apply_orientation as Pillow's path, on fewer pixels
        small.info["exif"] = im.info["exif"]
        decoded = small.size
        small = _apply_orientation(small)
        if small.size != decoded:  # rotated by 90/270 degrees: report the upright size
            w, h = h, w
    return small, w, h


@lru_cache(maxsize=8)
def _open_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in (x.upper() for x in formats) if f in Image.OPEN)


def _looks_truncated(data: bytes) -> bool:
    """A known container whose end marker is missing: JPEG without EOI, PNG without IEND, GIF
    without its trailer (trailing padding after the marker is tolerated)."""
    tail = data[-64:].rstrip(b"\x00")
    if data[:3] == b"\xff\xd8\xff":
        return b"\xff\xd9" not in tail
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in tail
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return not tail.endswith(b";")
    return False


def _sniff_unsupported(data: bytes, name: str | None) -> tuple[str, str]:
    head = data[:64].lstrip()
    for magic, fmt in _KNOWN_MAGIC:
        if head.startswith(magic):
            return "unsupported_format", fmt
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1", b"ftypmsf1"):
        return "unsupported_format", data[8:12].decode()
    if data[4:8] == b"ftyp" or data[:4] == b"\x1aE\xdf\xa3" or data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "unsupported_format", "video"
    try:  # a format Pillow knows but that is not in cfg.formats
        fmt = Image.open(io.BytesIO(data)).format
        return "unsupported_format", str(fmt)
    except Exception:  # noqa: BLE001 - anything else is simply undecodable
        return "decode_error", f"not an image ({(name or '?').rsplit('.', 1)[-1]})"


def _apply_orientation(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a good image
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited on white,
    CMYK through its embedded ICC profile when it has one."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255) else 255.0
        if a.max(initial=0) > 65535:
            top = float(a.max())
        a = np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "CMYK":
        icc = im.info.get("icc_profile")
        if icc:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception:  # noqa: BLE001 - a broken profile falls back to the naive transform
                pass
        return im.convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im
    elif mode in ("LA", "PA", "La", "RGBa", "RGBA"):
        im = im.convert("RGBA")
    else:
        return im.convert("RGB")
    background = Image.new("RGB", im.size, (255, 255, 255))
    background.paste(im, mask=im.getchannel("A"))
    return background


def resize_shorter_side(im: Image.Image, image_px: int, upscale: bool = False,
                        resample: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is ``image_px`` (sizes rounded); enlarging (only with ``upscale``)
    is always bicubic, shrinking uses ``resample`` (``ImageConfig.resample``)."""
    w, h = im.size
    short = min(w, h)
    if short == image_px or (short < image_px and not upscale):
        return im
    s = image_px / short
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if w < size[0]:
        return im.resize(size, Image.Resampling.BICUBIC)
    if resample == "area":
        return im.resize(size, Image.Resampling.BOX)
    # reducing_gap: box-reduce first, then bicubic: near-Lanczos quality at a fraction of the cost.
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def compute_phash(im: Image.Image) -> int:
    """64-bit DCT perceptual hash as a signed int64 (bit 63 = top-left coefficient)."""
    return phash_of_grey32(np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BOX)))


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


# --------------------------------------------------------------------------- the curate stage
#: Work rows written by the process stage (``curate.WORK_COLUMNS`` plus the image columns).
IMAGE_WORK_SCHEMA = pa.schema([
    pa.field("row_id", pa.string()), pa.field("sample_id", pa.string()),
    pa.field("source", pa.string()), pa.field("key", pa.string()), pa.field("caption", pa.string()),
    pa.field("image", pa.binary()), pa.field("width", pa.int32()), pa.field("height", pa.int32()),
    pa.field("phash", pa.int64()), pa.field("label", pa.string()),
    pa.field("content_hash", pa.string()), pa.field("hashes", pa.list_(pa.int64())),
    pa.field("crop_hashes", pa.list_(pa.int64())), pa.field("thumb", pa.binary()),
    pa.field("area", pa.int64()), pa.field("orig_width", pa.int32()), pa.field("orig_height", pa.int32()),
    pa.field("stage", pa.string()), pa.field("reason", pa.string()), pa.field("detail", pa.string()),
])


def process_image_batch(batch: pa.Table, cfg: ImageConfig, captions: CaptionConfig) -> pa.Table:
    """Input records (inputs.INPUT_SCHEMA) → work rows: one per input, kept candidate or reject."""
    cols = {name: batch.column(name).to_pylist() for name in
            ("source", "key", "media", "media_name", "caption_raw", "meta", "error", "error_detail")}
    rows: dict[str, list] = {f.name: [] for f in IMAGE_WORK_SCHEMA}
    for i in range(batch.num_rows):
        source, key = cols["source"][i], cols["key"][i]
        out = {f.name: None for f in IMAGE_WORK_SCHEMA}
        out.update(source=source, key=key, row_id=make_sample_id(source, key), label=_label(cols["meta"][i]))
        if cols["error"][i]:
            out.update(stage="read", reason=cols["error"][i], detail=cols["error_detail"][i])
        else:
            caption, bad = process_caption(cols["caption_raw"][i], captions)
            out["caption"] = caption
            if bad:
                out.update(stage="caption", reason=bad[0], detail=bad[1])
            else:
                try:
                    r = process_image(cols["media"][i], cols["media_name"][i], cfg)
                except ImageReject as e:
                    out.update(stage="image", reason=e.reason, detail=e.detail)
                except Exception as e:  # noqa: BLE001 - a corrupt sample never stops a run
                    out.update(stage="image", reason="decode_error", detail=f"{type(e).__name__}: {e}"[:200])
                else:
                    ph = r.pop("pixel_hash")
                    out.update(r, content_hash=ph.hex(), hashes=[r["phash"]],
                               area=r["orig_width"] * r["orig_height"],
                               sample_id=make_sample_id(ph, normalize_for_dedup(caption)))
        for k, v in out.items():
            rows[k].append(v)
    return pa.Table.from_pydict(rows, schema=IMAGE_WORK_SCHEMA)


def _label(meta: str | None) -> str | None:
    if not meta:
        return None
    try:
        value = json.loads(meta).get("label")
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


__all__ = ["ImageConfig", "ImageReject", "process_image", "process_image_batch", "to_rgb",
           "resize_shorter_side", "compute_phash", "hamming", "IMAGE_WORK_SCHEMA"]
