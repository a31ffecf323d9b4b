"""Demo corpus pixels: the attribute axes, a shape drawn on a photo-like background, and its bytes.

    arr = render_image({"shape": "star", "colour": "red", "size": "large", "position": "left"}, rng, 64)
    frames = render_video({"shape": "circle", "colour": "blue", "size": "small", "direction": "up"}, rng, 64, 24)
    mp4 = encode_mp4(frames, fps=12)          # H.264 yuv420p, byte-reproducible

Images: a shape (``SHAPES``) in a colour (``COLOURS``), small or large, at one of five positions,
on a random smooth luminance/chroma field plus mild noise, with jittered size, position and
rotation, so that distinct samples are not perceptual-hash near duplicates. Videos: a shape
moving left, right, up or down (``DIRECTIONS``) across a calmer static background. Everything
derives from the numpy RNG passed in.

Used by pipelines/demo_corpus.py (and tests/hostile.py, bench/shape_probe.py). Tested in
tests/test_demo_corpus.py.
"""

from __future__ import annotations

import io
from fractions import Fraction

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

_SS = 4  # supersampling factor for anti-aliased shape edges
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
            "centre": (0.5, 0.5)}  # (x, y) as fractions of the frame
_RADIUS = {"small": (0.09, 0.12), "large": (0.17, 0.21)}  # of the frame side
_MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image coords: y down

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

def encode_image(arr: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mp4(frames: list[np.ndarray], fps: int, *, crf: int = 23, bit_rate: int | None = None) -> bytes:
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


def decode_mp4(data: bytes) -> tuple[list[np.ndarray], int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = int(round(float(stream.average_rate)))
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], fps


def resize_image(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.LANCZOS))


__all__ = ["SHAPES", "COLOURS", "SIZES", "POSITIONS", "DIRECTIONS", "render_image", "render_video", "encode_image",
           "encode_mp4", "decode_mp4", "resize_image"]
