"""The input record every reader emits, the file kinds and media extensions they know, a resolved source.

    rec = input_record("s3://b/x.tar", "0001", media=b"...", media_name="0001.jpg", caption_raw="a cat")

Shared by the readers (pipelines/sources.py, pipelines/annotations.py) and the stages that
consume their records (images, video, download), so none of them imports another reader.
Columns of INPUT_SCHEMA are described in pipelines/sources.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "mpg", "mpeg", "m4v")
MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS
SUBTITLE_EXTS = ("srt", "vtt")
SIDECAR_EXTS = ("txt", "json", "cls") + SUBTITLE_EXTS
MANIFEST_EXTS = ("parquet", "jsonl", "csv")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

INPUT_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False), pa.field("key", pa.string(), nullable=False),
    pa.field("media", pa.binary()), pa.field("media_name", pa.string()), pa.field("media_uri", pa.string()),
    pa.field("caption_raw", pa.string()), pa.field("meta", pa.string()), pa.field("url", pa.string()),
    pa.field("error", pa.string()), pa.field("error_detail", pa.string()),
])



@dataclass(frozen=True)
class SourceFile:
    """One resolved input: a tar shard, a manifest file or a folder (listed at read time)."""

    uri: str          # as it appears in the ``source`` column
    path: str         # path inside ``fs``
    kind: str         # "tar" | "manifest" | "folder"
    size: int
    fs: Any           # pyarrow.fs.FileSystem (picklable)


def input_record(source: str, key: str, **kw: Any) -> dict:
    """One INPUT_SCHEMA record: every field null but the ones given."""
    rec = {f.name: None for f in INPUT_SCHEMA}
    rec.update(source=source, key=key, **kw)
    return rec



__all__ = ["INPUT_SCHEMA", "IMAGE_EXTS", "VIDEO_EXTS", "MEDIA_EXTS", "SUBTITLE_EXTS", "SIDECAR_EXTS",
           "MANIFEST_EXTS", "TAR_SUFFIXES", "SourceFile", "input_record"]
