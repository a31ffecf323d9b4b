"""Generators of broken and hostile media, shared by the reliability tests.

Base media are real: demo-corpus pictures (``pipelines.demo_render.render_image``) encoded by
Pillow as JPEG/PNG/WebP and demo videos encoded by PyAV as H.264 MP4. Everything else here
damages them the way the web does (byte flips, truncations, lying headers) or builds inputs
meant to hurt the pipeline (decompression bombs, path-traversing tar members, symlinks out of
the source folder, 1 MB captions, invalid UTF-8, NUL bytes, right-to-left overrides).

Used by tests/test_hostile_inputs.py, tests/test_faults.py, tests/test_security.py and
bench/curate_load.py. Nothing here mocks a library: every file is a real file.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.demo_render import COLOURS, POSITIONS, SHAPES, SIZES, encode_mp4, render_image, render_video


# -- real base media --------------------------------------------------------------------------
def picture(seed: int, px: int = 64) -> np.ndarray:
    """A demo-corpus picture: one coloured shape on a photo-like background, (px, px, 3) uint8."""
    rng = np.random.default_rng([seed, 7])
    attrs = {"shape": SHAPES[seed % len(SHAPES)], "colour": list(COLOURS)[seed % len(COLOURS)],
             "size": SIZES[seed % 2], "position": POSITIONS[seed % len(POSITIONS)]}
    return render_image(attrs, rng, px)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **kw)
    return buf.getvalue()


def base_images(seed: int = 0, px: int = 64) -> dict[str, bytes]:
    arr = picture(seed, px)
    return {"jpg": encode(arr, "jpg", quality=90), "png": encode(arr, "png"), "webp": encode(arr, "webp", quality=80)}


def base_mp4(seed: int = 0, px: int = 64, n_frames: int = 24, fps: int = 12) -> bytes:
    rng = np.random.default_rng([seed, 11])
    attrs = {"shape": SHAPES[seed % len(SHAPES)], "colour": list(COLOURS)[seed % len(COLOURS)],
             "size": "large", "direction": ("left", "right", "up", "down")[seed % 4]}
    return encode_mp4(render_video(attrs, rng, px, n_frames), fps)


# -- damage ------------------------------------------------------------------------------------
def audio_only_mp4(n_frames: int = 30) -> bytes:
    """An MP4 with one AAC audio stream and no video stream (a reject: no_video_stream)."""
    import av

    buf = io.BytesIO()
    c = av.open(buf, "w", format="mp4")
    a = c.add_stream("aac", rate=16000)
    a.layout = "mono"
    for j in range(n_frames):
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        fr.sample_rate, fr.pts = 16000, j * 1024
        for p in a.encode(fr):
            c.mux(p)
    c.close()
    return buf.getvalue()


def flip_bytes(data: bytes, rng: np.random.Generator, n: int) -> bytes:
    """``n`` random bytes replaced by random values (the first bytes too: magic numbers break)."""
    b = bytearray(data)
    for pos in rng.integers(0, len(b), n):
        b[int(pos)] = int(rng.integers(0, 256))
    return bytes(b)


def truncate(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_with_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming ``width`` x ``height`` (CRC fixed, so it parses):
    the header lies about the pixels the IDAT holds."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + _png_chunk(b"IHDR", body) + png[33:]


def jpeg_with_size(jpg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF marker claiming ``width`` x ``height`` (0 allowed)."""
    b = bytearray(jpg)
    i = 2
    while i < len(b) - 9:
        if b[i] != 0xFF:
            raise ValueError("not a JPEG marker stream")
        marker, seg_len = b[i + 1], struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(b)
        i += 2 + seg_len
    raise ValueError("no SOF marker")


def png_bomb(side: int = 12_000) -> bytes:
    """A real decompression bomb: a ``side`` x ``side`` 1-bit PNG of zeros, a few kB on disk,
    ``side**2`` pixels (12,000² = 144 M > the 64 M-pixel default limit) once decoded."""
    z = zlib.compressobj(9)
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + one row of zero bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# -- hostile captions ----------------------------------------------------------------------------
HOSTILE_CAPTIONS: dict[str, bytes] = {
    "huge": ("a red circle " * 80_000).encode()[: 1 << 20],              # 1 MiB of text
    "invalid_utf8": b"a blue \xff\xfe square \xc3\x28 on grey \xed\xa0\x80",
    "nul": b"a green\x00 triangle\x00\x00 on a field",
    "rtl": "a yellow \u202estar\u202c on \u2067black\u2069 \u200fground".encode(),
    "only_controls": b"\x00\x01\x02\x1b\x07\x08\x7f",
    "ansi": b"\x1b[31ma red\x1b[0m circle\r\x1b[2K",
    "html_script": b"<script>alert(1)</script><img src=x onerror=alert(2)> a purple diamond",
    "deep_html": b"<b>" * 50_000 + b"a purple cross",
}


# -- containers -----------------------------------------------------------------------------------
def tar_add(t: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
            linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mtime = 0
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    else:
        t.addfile(info)


def write_tar(path: Path, members: list[tuple]) -> Path:
    """members: (name, bytes) or (name, bytes, tar type, linkname)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for m in members:
            tar_add(t, *m)
    return path


def write_folder_sample(folder: Path, stem: str, media: bytes, ext: str, caption: bytes) -> None:
    (folder / f"{stem}.{ext}").write_bytes(media)
    (folder / f"{stem}.txt").write_bytes(caption)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int, str]]:
    """path -> (size, mtime_ns, kind) of everything under ``root`` (symlinks not followed)."""
    skip_s = {str(s) for s in skip}
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip_s]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p in skip_s:
                continue
            st = os.lstat(p)
            kind = "link" if os.path.islink(p) else ("dir" if os.path.isdir(p) else "file")
            out[p] = (0 if kind == "dir" else st.st_size, 0 if kind == "dir" else st.st_mtime_ns, kind)
    return out


def read_keys(out: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """((source, key) of every data row, (source, key, reason) of every reject row) from Parquet."""
    import pyarrow.parquet as pq

    data, rejects = [], []
    for f in sorted((out / "data").glob("*.parquet")):
        t = pq.read_table(f, columns=["source", "key"])
        data += list(zip(t.column("source").to_pylist(), t.column("key").to_pylist()))
    for f in sorted((out / "rejects").glob("*.parquet")):
        t = pq.read_table(f, columns=["source", "key", "reason"])
        rejects += list(zip(t.column("source").to_pylist(), t.column("key").to_pylist(),
                            t.column("reason").to_pylist()))
    return data, rejects


def check_accounting(out: Path) -> dict:
    """The accounting invariant from the Parquet outputs: every (source, key) once, in data/ or
    rejects/ (with a reason), never both; stats.json agrees. Returns stats.json."""
    stats = json.loads((out / "stats.json").read_text())
    data, rejects = read_keys(out)
    kept = set(data)
    rejected = {(s, k) for s, k, _ in rejects}
    assert len(kept) == len(data), "duplicate keys in data/"
    assert len(rejected) == len(rejects), "duplicate keys in rejects/"
    assert not kept & rejected, f"in both data/ and rejects/: {sorted(kept & rejected)[:5]}"
    assert all(r for _, _, r in rejects), "reject without a reason"
    assert stats["kept"] == len(data) and stats["rejected_total"] == len(rejects)
    assert stats["inputs"] == len(data) + len(rejects) and stats["invariant_ok"] is True
    return stats
