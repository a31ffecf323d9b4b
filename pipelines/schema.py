"""The Parquet contracts between curation and training (DESIGN.md "Curate output").

``pipelines/`` and ``mm/`` meet only through these schemas, the files on disk and the
tokenizer. Change a column here deliberately: users' scripts read these files.

Image-text row: sample_id, source, key, caption, image (JPEG bytes), width, height, phash,
input_ids, split, plus an optional ``label`` (class name from a sidecar or manifest column,
used by classification fine-tuning). Video-text rows carry frames/frame_times_s/start_s/end_s
instead of image. Rejects: one row per rejected input.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

_COMMON = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
]
_TAIL = [
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("phash", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=True),
]

IMAGE_SCHEMA = pa.schema([*_COMMON, pa.field("image", pa.binary(), nullable=False), *_TAIL])

VIDEO_SCHEMA = pa.schema(
    [
        *_COMMON,
        pa.field("frames", pa.list_(pa.binary()), nullable=False),
        pa.field("frame_times_s", pa.list_(pa.float32()), nullable=False),
        pa.field("start_s", pa.float32(), nullable=False),
        pa.field("end_s", pa.float32(), nullable=False),
        *_TAIL,
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=True),
    ]
)

SPLITS = ("train", "val")


class Reject(Exception):
    """An input (or clip) that cannot be used: ``reason`` and ``detail`` become its REJECT_SCHEMA row."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def schema_for(modality: str) -> pa.Schema:
    if modality == "image":
        return IMAGE_SCHEMA
    if modality == "video":
        return VIDEO_SCHEMA
    raise ValueError(f"unknown modality {modality!r}; valid choices: image, video")


def assign_split(sample_id: str, val_fraction: float) -> str:
    """Deterministic train/val split from a hash of the sample id (stable across reruns)."""
    h = int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big")
    return "val" if (h % 10_000) < int(round(val_fraction * 10_000)) else "train"


def make_sample_id(*parts: bytes | str) -> str:
    """Content-derived, stable id: a 128-bit BLAKE2b of the parts, hex."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
