"""Source formats: a tar stream, a manifest file or a folder's key groups to input records.

    for block in TarRecords(cfg).read(stream, uri): ...        # pa.Table blocks of INPUT_SCHEMA rows
    for block in ManifestRecords(cfg, fs).read(f, uri, path): ...
    records = assemble_group(source, key, {"0001.jpg": b"...", "0001.txt": b"a cat"}, cfg)

An *input* (DESIGN.md) is one record here: a tar key group, a media file with its sidecars, a
manifest row. Records carry the raw media bytes and caption; nothing is decoded here, so the image
and the video pipelines share these readers. Columns (INPUT_SCHEMA):

    source        URI of the tar shard, folder or manifest the record came from
    key           tar key (``dir/0001``), folder-relative path without extension, or manifest row
    media         bytes (null when missing, or for a manifest URL not yet downloaded)
    media_name    member/file name, for the extension (never used as a filesystem path)
    media_uri     a folder's video file, left unread: the video stage opens it and reads only
                  what its clips need (pipelines/video.py); media is then null
    caption_raw   caption text (decoded with captions.decode_caption), null when missing
    meta          JSON of sidecar extras: label, other JSON fields, subtitles (``.srt``/``.vtt``
                  text under "subtitles" with "subtitles_format"), manifest columns
    url           manifest URL to fetch (pipelines/download.py fills ``media``)
    error         reader-level reject reason (missing_caption, missing_media, file_too_large,
                  unsupported_member, corrupt_shard, bad_manifest_row, read_error), else null
    error_detail

Formats: WebDataset tars (``.tar``, ``.tar.gz``, ``.tgz``; members streamed, never extracted:
a member name like ``../../etc/x.jpg`` is only a string); folders with sidecar captions (``x.jpg``
+ ``x.txt`` or ``x.json`` with a ``caption`` field); manifests (``.parquet``, ``.jsonl``, ``.csv``)
with a caption column and a path, bytes (img2dataset / HF ``{"bytes", "path"}`` structs) or URL
column. Damage (a truncated tar, a split key group, a bad manifest line) becomes reject records,
never an exception: one corrupt input never stops a run. ``SourceConfig`` is the ``sources``
section of the curate config (readers and pipelines/download.py).

Which files to read: pipelines/listing.py; the Ray Data plan over these readers:
pipelines/datasources.py. Tested in tests/test_sources.py.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs

from core.storage import is_uri
from pipelines.captions import decode_caption
from pipelines.inputs import (
    INPUT_SCHEMA,
    MEDIA_EXTS,
    SIDECAR_EXTS,
    SUBTITLE_EXTS,
    VIDEO_EXTS,
    SourceFile,
    input_record,
)


@dataclass(frozen=True)
class SourceConfig:
    """How inputs are found and read; manifest column names are tried in order."""

    caption_columns: tuple[str, ...] = ("caption", "text", "txt", "TEXT", "alt", "title", "name")
    path_columns: tuple[str, ...] = ("path", "file", "filepath", "file_name", "image_path", "video_path")
    bytes_columns: tuple[str, ...] = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes")
    url_columns: tuple[str, ...] = ("url", "URL", "image_url", "contentUrl", "video_url")
    label_field: str = "label"
    caption_field: str = "caption"               # of a sidecar JSON
    max_media_bytes: int = 64 * 1024 * 1024      # larger members/files are rejected unread
    rows_per_block: int = 256                    # records per block emitted by a read task
    files_per_read_task: int = 256               # folder groups per read task
    # URL download (pipelines/download.py)
    download_timeout_s: float = 10.0             # connect and per-read timeout
    download_total_timeout_s: float = 60.0       # whole response, including retries
    download_retries: int = 2                    # after the first try, for 429/5xx/timeouts/resets
    download_backoff_s: float = 0.5              # doubled after each retry
    videos_dir: str = ""                         # videos of annotation files; "" = beside the file
    caption_rule: Literal["all", "first", "longest", "random"] = "all"   # videos with several captions
    download_threads: int = 32                   # concurrent requests per worker process (its process task's download threads)
    download_per_host: int = 8                   # concurrent connections per host per process
    download_max_redirects: int = 5
    opt_out_tags: tuple[str, ...] = ("noai", "noimageai")   # X-Robots-Tag values that reject
    user_agent: str = "mm-curate/0.1 (+https://github.com/; honours X-Robots-Tag noai)"

    def __post_init__(self) -> None:
        if self.max_media_bytes <= 0 or self.rows_per_block <= 0 or self.files_per_read_task <= 0:
            raise ValueError("max_media_bytes, rows_per_block and files_per_read_task must be > 0")
        if self.download_threads <= 0 or self.download_per_host <= 0 or self.download_retries < 0:
            raise ValueError("download_threads and download_per_host must be > 0, download_retries >= 0")


# --------------------------------------------------------------------------- record assembly
def _ext(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def assemble_group(source: str, key: str, files: dict[str, bytes], cfg: SourceConfig,
                   errors: dict[str, tuple[str, str]] | None = None,
                   uris: dict[str, str] | None = None) -> list[dict]:
    """Members sharing a key (``{name: bytes}``) → input records. The first media file by
    extension preference is the input; further media files become inputs ``key.ext`` sharing
    the sidecars. ``errors`` maps member names to reader errors (e.g. too large)."""
    errors = errors or {}
    uris = uris or {}  # media names -> URI, read later (videos)
    media = sorted((n for n in list(files) + list(errors) + list(uris) if _ext(n) not in SIDECAR_EXTS),
                   key=lambda n: (MEDIA_EXTS.index(_ext(n)) if _ext(n) in MEDIA_EXTS else 99, n))
    caption: str | None = None
    meta: dict[str, Any] = {}
    caption_error: tuple[str, str] | None = None
    by_ext = {_ext(n): n for n in files}
    if "json" in by_ext:
        try:
            extra = json.loads(decode_caption(files[by_ext["json"]]) or "null")
        except ValueError as e:
            extra, caption_error = None, ("bad_sidecar", f"json: {str(e)[:120]}")
        if isinstance(extra, dict):
            value = extra.pop(cfg.caption_field, None)
            if isinstance(value, str):
                caption = value
            meta.update({k: v for k, v in extra.items() if _is_scalar(v)})
            if cfg.label_field in extra and cfg.label_field != "label":
                meta["label"] = extra[cfg.label_field]
    if "txt" in by_ext:
        caption = decode_caption(files[by_ext["txt"]])
    if "cls" in by_ext and "label" not in meta:
        meta["label"] = (decode_caption(files[by_ext["cls"]]) or "").strip()
    for sub in SUBTITLE_EXTS:
        if sub in by_ext:
            meta["subtitles"], meta["subtitles_format"] = decode_caption(files[by_ext[sub]]), sub
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None
    if not media:
        return [input_record(source, key, caption_raw=caption, meta=meta_json, error="missing_media",
                        error_detail=", ".join(sorted(files)))]
    out = []
    for i, name in enumerate(media):
        k = key if i == 0 else f"{key}.{_ext(name)}"
        has_text = caption is not None or "subtitles" in meta  # subtitles caption a video's clips
        err = errors.get(name) or caption_error or (None if has_text else ("missing_caption", None))
        out.append(input_record(source, k, media=None if err else files.get(name), media_name=posixpath.basename(name),
                           media_uri=None if err else uris.get(name),
                           caption_raw=caption, meta=meta_json, error=err[0] if err else None,
                           error_detail=err[1] if err else None))
    return out


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _to_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=INPUT_SCHEMA)


def webdataset_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = directory + basename up to its first dot."""
    d, base = posixpath.split(name)
    stem = base.split(".", 1)[0]
    return (f"{d}/{stem}" if d else stem), base

# --------------------------------------------------------------------------- readers
class TarRecords:
    """Streams one tar shard into key-group records; damage becomes reject records, never raises."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg

    def read(self, stream: Any, uri: str) -> Iterator[pa.Table]:
        buf: list[dict] = []
        emitted: dict[str, int] = {}
        group_key, files, errors = None, {}, {}
        last_key = ""

        def flush():
            nonlocal group_key, files, errors
            if group_key is not None:
                key = group_key
                if key in emitted:  # WebDataset needs contiguous groups; name the split part apart
                    emitted[key] += 1
                    key = f"{key}#{emitted[group_key]}"
                else:
                    emitted[key] = 1
                buf.extend(assemble_group(uri, key, files, self.cfg, errors))
            group_key, files, errors = None, {}, {}

        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    key, base = webdataset_key(member.name)
                    if key != group_key:
                        flush()
                        group_key = key
                        last_key = key
                    if not member.isreg():
                        errors[member.name] = ("unsupported_member", f"{member.name}: not a regular file")
                    elif member.size > self.cfg.max_media_bytes:
                        errors[member.name] = ("file_too_large", f"{member.size} bytes")
                    else:
                        f = tar.extractfile(member)
                        data = f.read() if f is not None else b""
                        if len(data) != member.size:
                            errors[member.name] = ("truncated", f"{len(data)} of {member.size} bytes")
                        else:
                            files[member.name] = data
                    if len(buf) >= self.cfg.rows_per_block:
                        yield _to_table(buf)
                        buf = []
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            # The rest of the shard cannot be read: the partial group keeps its members read so far
            # (a half-read member is "truncated"), and the unreadable tail is one reject input.
            if group_key is not None and not files and not errors:
                group_key = None
            flush()
            buf.append(input_record(uri, f"{last_key}#tail" if last_key else "#tail", error="corrupt_shard",
                               error_detail=f"{type(e).__name__}: {str(e)[:160]}"))
        else:
            flush()
        if buf:
            yield _to_table(buf)


class ManifestRecords:
    """One manifest file (parquet, jsonl, csv) → records keyed by zero-padded row number."""

    def __init__(self, cfg: SourceConfig, fs: Any):
        self.cfg, self.fs = cfg, fs

    def read(self, f: Any, uri: str, path: str) -> Iterator[pa.Table]:
        ext = path.lower().rsplit(".", 1)[-1]
        base_dir = posixpath.dirname(path)
        prefix = uri[: len(uri) - len(path)] if uri.endswith(path) else ""
        buf: list[dict] = []
        for i, row in enumerate(self._rows(f, ext)):
            key = f"{i:09d}"
            if isinstance(row, Exception):
                buf.append(input_record(uri, key, error="bad_manifest_row", error_detail=str(row)[:200]))
            else:
                buf.append(self._rowinput_record(uri, key, row, base_dir, prefix))
            if len(buf) >= self.cfg.rows_per_block:
                yield _to_table(buf)
                buf = []
        if buf:
            yield _to_table(buf)

    def _rows(self, f: Any, ext: str) -> Iterator[dict | Exception]:
        if ext == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=self.cfg.rows_per_block):
                yield from batch.to_pylist()
            return
        text = io.TextIOWrapper(io.BufferedReader(_RawAdapter(f)), encoding="utf-8", errors="replace",
                                newline="" if ext == "csv" else None)
        if ext == "csv":
            reader = csv.DictReader(text)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield e
                    continue
                yield {k: v for k, v in row.items() if k is not None}
        else:
            for line in text:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    yield row if isinstance(row, dict) else ValueError(f"not an object: {line[:80]!r}")
                except ValueError as e:
                    yield e

    def _rowinput_record(self, uri: str, key: str, row: dict, base_dir: str, prefix: str) -> dict:
        cfg = self.cfg
        caption = _first(row, cfg.caption_columns)
        media = name = url = None
        error = None
        blob_col = next((c for c in cfg.bytes_columns if isinstance(row.get(c), (bytes, dict))), None)
        path_col = next((c for c in cfg.path_columns if isinstance(row.get(c), str) and row[c]), None)
        url_col = next((c for c in cfg.url_columns if isinstance(row.get(c), str) and row[c]), None)
        if blob_col is not None:
            value = row[blob_col]
            if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
                name = value.get("path") or blob_col
                value = value.get("bytes")
            media, name = value, name or f"{key}.{blob_col}"
            if not media:
                error = ("missing_media", f"empty {blob_col}")
        elif path_col is not None:
            name = row[path_col]
            media, error = self._read_path(name, base_dir)
        elif url_col is not None:
            url = row[url_col]
            name = posixpath.basename(url.split("?", 1)[0]) or "download"
        else:
            error = ("missing_media", "no media column (" + ", ".join(
                cfg.bytes_columns[:2] + cfg.path_columns[:2] + cfg.url_columns[:1]) + " ...)")
        if caption is None and error is None:
            error = ("missing_caption", None)
        skip = {blob_col, cfg.caption_field}
        meta = {k: v for k, v in row.items() if k not in skip and _is_scalar(v) and v is not None
                and not (isinstance(v, str) and len(v) > 4096)}
        if cfg.label_field in row and row[cfg.label_field] is not None:
            meta["label"] = row[cfg.label_field]
        return input_record(uri, key, media=media, media_name=name, url=url,
                       caption_raw=caption if isinstance(caption, str) else decode_caption(caption),
                       meta=json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None,
                       error=error[0] if error else None, error_detail=error[1] if error else None)

    def _read_path(self, name: str, base_dir: str) -> tuple[bytes | None, tuple[str, str] | None]:
        try:
            if is_uri(name):
                fs, path = pafs.FileSystem.from_uri(name)
            else:
                fs, path = self.fs, name if name.startswith("/") else posixpath.normpath(posixpath.join(base_dir, name))
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                return None, ("missing_media", f"{name}: not found")
            if (info.size or 0) > self.cfg.max_media_bytes:
                return None, ("file_too_large", f"{info.size} bytes")
            with fs.open_input_stream(path) as fh:
                return fh.read(), None
        except OSError as e:
            return None, ("read_error", f"{name}: {str(e)[:160]}")


def _first(row: dict, names: tuple[str, ...]) -> Any:
    for n in names:
        v = row.get(n)
        if v is not None:
            return v if isinstance(v, (str, bytes)) else str(v)
    return None


class _RawAdapter(io.RawIOBase):
    """A pyarrow NativeFile as a Python raw stream (for TextIOWrapper)."""

    def __init__(self, f: Any):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


def read_folder_chunk(folder: SourceFile, chunk: list, cfg: SourceConfig) -> Iterator[pa.Table]:
    """Key groups of a folder (``listing.list_folder_groups``) → blocks of records; videos are left unread."""
    buf: list[dict] = []
    for key, members in chunk:
        files: dict[str, bytes] = {}
        errors: dict[str, tuple[str, str]] = {}
        uris: dict[str, str] = {}
        for path, size in members:
            name = posixpath.basename(path)
            if size < 0:
                errors[name] = ("unsupported_member", f"{name}: not a regular file (symlink, FIFO or device)")
                continue
            if _ext(name) in VIDEO_EXTS:  # not read here: the video stage seeks to its clips
                uris[name] = folder.uri[: len(folder.uri) - len(folder.path)] + path
                continue
            if size > cfg.max_media_bytes:
                errors[name] = ("file_too_large", f"{size} bytes")
                continue
            try:
                with folder.fs.open_input_stream(path) as fh:
                    files[name] = fh.read()
            except OSError as e:
                errors[name] = ("read_error", str(e)[:160])
        buf.extend(assemble_group(folder.uri, key, files, cfg, errors, uris))
        if len(buf) >= cfg.rows_per_block:
            yield _to_table(buf)
            buf = []
    if buf:
        yield _to_table(buf)


__all__ = ["SourceConfig", "assemble_group", "webdataset_key", "TarRecords", "ManifestRecords", "read_folder_chunk"]
