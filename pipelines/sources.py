"""Source readers: every supported input format to one stream of generic input records (Ray Data).

    files = expand_sources(["shards/{00000..00009}.tar", "folder/", "urls.parquet"], cfg)  # driver
    ds = read_inputs(files, cfg)            # one Ray Data dataset of INPUT_SCHEMA rows, any mix

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

Formats: WebDataset tars (brace patterns and globs; ``.tar``, ``.tar.gz``, ``.tgz``); folders
with sidecar captions (``x.jpg`` + ``x.txt`` or ``x.json`` with a ``caption`` field); manifests
(``.parquet``, ``.jsonl``, ``.csv``) with a caption column and a path, bytes (img2dataset / HF
``{"bytes", "path"}`` structs) or URL column. Every ``SRC`` is a local path or a ``pyarrow.fs`` URI.

Why custom datasources instead of ``ray.data.read_webdataset``/``read_csv``: those raise on a
truncated tar, a split key group or a bad manifest line (one corrupt input would stop the run) and
give no row numbers to name manifest inputs by. Ours are ``FileBasedDatasource`` subclasses (same
file listing, retries and filesystem handling) that turn such damage into reject records. Tar
members are streamed and never extracted: a member name like ``../../etc/x.jpg`` is only a string.

Tested in tests/test_sources.py.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from core.storage import expand_braces, is_uri, resolve
from pipelines.captions import decode_caption
from pipelines.inputs import (
    INPUT_SCHEMA,
    MANIFEST_EXTS,
    MEDIA_EXTS,
    SIDECAR_EXTS,
    SUBTITLE_EXTS,
    TAR_SUFFIXES,
    VIDEO_EXTS,
    SourceFile,
    input_record,
)

log = logging.getLogger(__name__)

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
    download_threads: int = 32                   # concurrent requests per download task
    download_per_host: int = 8                   # concurrent connections per host per process
    download_max_redirects: int = 5
    opt_out_tags: tuple[str, ...] = ("noai", "noimageai")   # X-Robots-Tag values that reject
    user_agent: str = "mm-curate/0.1 (+https://github.com/; honours X-Robots-Tag noai)"

    def __post_init__(self) -> None:
        if self.max_media_bytes <= 0 or self.rows_per_block <= 0 or self.files_per_read_task <= 0:
            raise ValueError("max_media_bytes, rows_per_block and files_per_read_task must be > 0")
        if self.download_threads <= 0 or self.download_per_host <= 0 or self.download_retries < 0:
            raise ValueError("download_threads and download_per_host must be > 0, download_retries >= 0")


# --------------------------------------------------------------------------- source expansion
def _kind_of(path: str) -> str | None:
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.rsplit(".", 1)[-1] in MANIFEST_EXTS:
        return "manifest"
    return None


def expand_sources(srcs: list[str]) -> list[SourceFile]:
    """Resolve SRC arguments (paths, URIs, brace patterns, globs) to input files; raise ValueError
    with one clear line for a missing or empty SRC or an unknown file type."""
    out: list[SourceFile] = []
    for src in srcs:
        found: list[SourceFile] = []
        for pattern in expand_braces(src):
            fs, path, prefix = resolve(pattern)
            if any(c in path for c in "*?["):
                found += _glob(fs, path, prefix)
                continue
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise ValueError(f"source {pattern} does not exist")
            if info.type == pafs.FileType.Directory:
                found += _expand_dir(fs, path, prefix)
            else:
                kind = _kind_of(path)
                if kind in (None, "manifest"):
                    from pipelines.annotations import is_annotation_file

                    kind = "annotations" if is_annotation_file(fs, path) else kind
                if kind is None:
                    raise ValueError(f"source {pattern}: unknown file type; expected a folder, a .tar "
                                     f"shard, a manifest (.parquet, .jsonl, .csv) or video annotations "
                                     f"(MSR-VTT .json, WebVid .csv)")
                found.append(SourceFile(prefix + path, path, kind, info.size or 0, fs))
        if not found:
            raise ValueError(f"source {src} holds no inputs (no tar shards, manifests or media files)")
        out += found
    seen: set[str] = set()
    return [s for s in out if not (s.uri in seen or seen.add(s.uri))]


def glob_regex(pattern: str) -> re.Pattern:
    """Shell glob → regex: ``*`` and ``?`` stay inside one path segment, ``**`` crosses them."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j].replace("\\", "\\\\")
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _glob(fs: Any, pattern: str, prefix: str) -> list[SourceFile]:
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    base = "/".join(parts[:fixed]) or "/"
    recursive = "**" in pattern or len(parts) - fixed > 1
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    except (FileNotFoundError, OSError):
        return []
    regex = glob_regex(pattern)
    files = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and regex.match(info.path):
            kind = _kind_of(info.path)
            if kind is not None:
                files.append(SourceFile(prefix + info.path, info.path, kind, info.size or 0, fs))
        elif info.type == pafs.FileType.Directory and regex.match(info.path):
            files += _expand_dir(fs, info.path, prefix)
    return files


def _expand_dir(fs: Any, path: str, prefix: str) -> list[SourceFile]:
    """A folder of tar shards (img2dataset output: its .parquet/.json metadata is ignored), a folder
    of manifests, or a folder of media files with sidecars."""
    infos = [pafs.FileInfo(p, pafs.FileType.File, size=size) for p, size, _, is_file in list_tree(fs, path)
             if is_file and not posixpath.basename(p).startswith(".")]
    infos.sort(key=lambda i: i.path)
    tars = [i for i in infos if _kind_of(i.path) == "tar"]
    if tars:
        return [SourceFile(prefix + i.path, i.path, "tar", i.size or 0, fs) for i in tars]
    exts = {posixpath.basename(i.path).rsplit(".", 1)[-1].lower() for i in infos if "." in i.path}
    if exts & set(MEDIA_EXTS) or exts & {"txt"}:
        return [SourceFile(prefix + path, path, "folder", sum(i.size or 0 for i in infos), fs)]
    return [SourceFile(prefix + i.path, i.path, "manifest", i.size or 0, fs)
            for i in infos if _kind_of(i.path) == "manifest"]


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


# --------------------------------------------------------------------------- datasources
class _TarRecords:
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


class _ManifestRecords:
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


class InputFilesDatasource(FileBasedDatasource):
    """Tar shards or manifests of one kind on one filesystem (Ray handles listing, retries, splits)."""

    _FILE_EXTENSIONS = None

    def __init__(self, kind: str, files: list[SourceFile], cfg: SourceConfig):
        super().__init__([f.path for f in files], filesystem=files[0].fs)
        self._kind, self._cfg, self._fs = kind, cfg, files[0].fs
        self._uris = {f.path: f.uri for f in files}

    def _open_input_source(self, filesystem, path, **open_args):
        if self._kind == "manifest" and path.lower().endswith(".parquet"):
            return filesystem.open_input_file(path)  # parquet needs random access
        if self._kind == "tar":
            open_args["compression"] = None  # tarfile's "r|*" detects gzip itself
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path):
        uri = self._uris.get(path, path)
        if self._kind == "tar":
            yield from _TarRecords(self._cfg).read(f, uri)
        else:
            yield from _ManifestRecords(self._cfg, self._fs).read(f, uri, path)


class FolderDatasource(Datasource):
    """Media files + sidecars in a folder tree: listed on the driver, read in parallel tasks."""

    def __init__(self, folder: SourceFile, cfg: SourceConfig):
        self._folder, self._cfg = folder, cfg
        self._groups = list_folder_groups(folder)

    def estimate_inmemory_data_size(self):
        return self._folder.size

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        groups, cfg = self._groups, self._cfg
        n = max(1, min(len(groups), max(parallelism, -(-len(groups) // cfg.files_per_read_task))))
        tasks = []
        for i in range(n):
            chunk = groups[i * len(groups) // n:(i + 1) * len(groups) // n]
            if chunk:
                meta = BlockMetadata(num_rows=None, size_bytes=sum(s for _, m in chunk for _, s in m),
                                     exec_stats=None, input_files=None)
                tasks.append(ReadTask(partial(_read_folder_chunk, self._folder, chunk, cfg), meta,
                                      per_task_row_limit=per_task_row_limit))
        return tasks


def list_folder_groups(folder: SourceFile) -> list[tuple[str, list[tuple[str, int]]]]:
    """[(key, [(path, size), ...])]: files grouped by folder-relative path minus the extension."""
    groups: dict[str, list[tuple[str, int]]] = {}
    root = folder.path.rstrip("/") + "/"
    for path, size, regular, _ in list_tree(folder.fs, folder.path):
        rel = path[len(root):] if path.startswith(root) else posixpath.basename(path)
        base = posixpath.basename(rel)
        if base.startswith(".") or "." not in base:
            continue
        ext = base.rsplit(".", 1)[-1].lower()
        if ext in MANIFEST_EXTS or (ext not in MEDIA_EXTS and ext not in SIDECAR_EXTS):
            continue  # READMEs, manifests, stray files are not inputs of a folder source
        # size -1: a symlink, FIFO or device: a reject, never opened (a FIFO blocks, a link leaves the folder)
        groups.setdefault(rel.rsplit(".", 1)[0], []).append((path, size if regular else -1))
    return sorted(groups.items())


def list_tree(fs: Any, path: str) -> list[tuple[str, int, bool, bool]]:
    """Files under ``path``: (path, size, regular and not a symlink, a file or a link to one).

    A local tree is walked without following symlinks: pyarrow's recursive listing follows
    them, so a link out of a source folder read files outside it, and a link loop listed the
    same files 40 times over (two loops: exponentially many). Other filesystems have no links.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        return [(i.path, i.size or 0, True, True) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File]
    out = []
    for d, _, names in os.walk(path, followlinks=False):
        for name in names:
            p = os.path.join(d, name)
            try:
                st, lst = os.stat(p), os.lstat(p)
            except OSError:  # a dangling link
                out.append((p, 0, False, False))
                continue
            out.append((p, st.st_size, stat.S_ISREG(lst.st_mode), stat.S_ISREG(st.st_mode)))
    return out


def _read_folder_chunk(folder: SourceFile, chunk: list, cfg: SourceConfig) -> Iterator[pa.Table]:
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


def read_inputs(files: list[SourceFile], cfg: SourceConfig):
    """One Ray Data dataset of INPUT_SCHEMA records over every source, whatever the mix."""
    import ray

    parts = []
    by_kind: dict[tuple[str, str], list[SourceFile]] = {}
    for f in files:
        if f.kind == "folder":
            parts.append(ray.data.read_datasource(FolderDatasource(f, cfg)))
        elif f.kind == "annotations":
            from pipelines.annotations import read_annotations

            parts.append(ray.data.from_arrow(read_annotations(f.uri, cfg.videos_dir or None, cfg.caption_rule)))
        else:
            by_kind.setdefault((f.kind, type(f.fs).__name__), []).append(f)
    for (kind, _), group in sorted(by_kind.items()):
        parts.append(ray.data.read_datasource(InputFilesDatasource(kind, group, cfg)))
    ds = parts[0]
    return ds.union(*parts[1:]) if len(parts) > 1 else ds


def has_urls(files: list[SourceFile]) -> bool:
    return any(f.kind == "manifest" for f in files)


__all__ = ["SourceConfig", "expand_sources", "read_inputs", "assemble_group", "webdataset_key",
           "list_folder_groups", "has_urls"]
