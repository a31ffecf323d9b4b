"""Video annotation files as input records: MSR-VTT style JSON and WebVid style CSV.

An input is one annotated video (one JSON video id, one CSV row). Records carry the video's
location (``media_uri``; the bytes are read later, only the parts a clip needs), the caption(s)
and, when the annotation has them, timed spans. ``pipelines/video_clips.py`` cuts the clips.

JSON shapes read (``read_msrvtt``):
* MSR-VTT's own ``{"videos": [{"video_id": ...}], "sentences": [{"video_id", "caption"}]}``;
  its ``start time``/``end time`` refer to the YouTube source, not to the clip files, and are
  ignored: each caption describes the whole file;
* ``{video_id: [caption, ...]}`` and ``[{"video_id"|"video": ..., "caption": str | [str]}]``
  (the CLIP4Clip / retrieval-benchmark form);
* ActivityNet-Captions style ``{video_id: {"timestamps": [[s, e], ...], "sentences": [...]}}``:
  each timed sentence becomes a clip.
``caption_rule`` picks what a video with several captions yields: ``all`` (every caption a
training pair for the same clip), ``first``, ``longest``, or ``random`` (seeded by the video id,
so reruns agree).

WebVid CSV (``read_webvid`` / ``webvid_records``): columns ``videoid``, ``name`` (the caption),
``contentUrl``, optionally ``page_dir``, ``duration``. The video is looked up under
``videos_dir`` as ``{page_dir}/{videoid}.*`` or ``{videoid}.*`` (video2dataset's layout), or
``contentUrl`` when it is a local path or a ``pyarrow.fs`` URI; http(s) URLs are not
downloaded here (that is video2dataset's job) and an unfound video is a ``missing_media``
reject. Captions are read as bytes and decoded like all captions, so a broken encoding in one
row never fails the file.

Tested in tests/test_annotations.py.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from core.storage import resolve
from pipelines.captions import decode_caption
from pipelines.inputs import INPUT_SCHEMA, VIDEO_EXTS

CAPTION_RULES = ("all", "first", "longest", "random")


def resolve_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI (``s3://``, ``gs://``, ``file://``)."""
    fs, p, _ = resolve(path)
    return fs, p


def _uri(fs: pafs.FileSystem, path: str) -> str:
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def index_videos(videos_dir: str, exts: tuple[str, ...] | None = None) -> dict[str, str]:
    """Map ``stem`` and ``relative/stem`` to the URI of every video file under ``videos_dir``."""
    exts = exts or VIDEO_EXTS
    fs, root = resolve_fs(videos_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, NotADirectoryError):
        return {}
    index: dict[str, str] = {}
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or info.extension.lower() not in exts:
            continue
        rel = posixpath.relpath(info.path, root)
        stem_rel = rel.rsplit(".", 1)[0]
        for k in (stem_rel, posixpath.basename(stem_rel), rel, posixpath.basename(rel)):
            index.setdefault(k, _uri(fs, info.path))
    return index


def choose_captions(video_id: str, captions: list[str], rule: str) -> list[str]:
    """Apply ``caption_rule`` to one video's captions (empty ones dropped first)."""
    if rule not in CAPTION_RULES:
        raise ValueError(f"unknown caption_rule {rule!r}; valid choices: {', '.join(CAPTION_RULES)}")
    caps = [c for c in captions if c and c.strip()]
    if not caps or rule == "all":
        return caps
    if rule == "first":
        return caps[:1]
    if rule == "longest":
        return [max(caps, key=len)]
    h = int.from_bytes(hashlib.blake2b(video_id.encode(), digest_size=8).digest(), "big")
    return [caps[h % len(caps)]]


def _record(source: str, key: str, uri: str | None, captions: list[str], extra: dict,
            spans: list | None = None, error: str | None = None, detail: str | None = None) -> dict:
    meta = dict(extra)
    if len(captions) > 1:
        meta["captions"] = captions
    if spans:
        meta["spans"] = spans
    return {"source": source, "key": key, "media": None, "media_uri": uri,
            "media_name": posixpath.basename(uri) if uri else None,
            "caption_raw": captions[0] if captions else None,
            "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None,
            "url": None, "error": error, "error_detail": detail}


def _group_msrvtt(data) -> dict[str, dict]:
    """Any of the supported JSON shapes -> ``{video_id: {"captions": [...], "spans": [...]}}``."""
    videos: dict[str, dict] = {}

    def add(vid, caption=None, span=None, extra=None):
        entry = videos.setdefault(str(vid), {"captions": [], "spans": [], "extra": {}})
        if extra:
            entry["extra"].update(extra)
        if caption is None:
            return
        if span is not None:
            entry["spans"].append([span[0], span[1], str(caption)])
        elif isinstance(caption, list):
            entry["captions"].extend(str(c) for c in caption)
        else:
            entry["captions"].append(str(caption))

    if isinstance(data, dict) and "sentences" in data and isinstance(data["sentences"], list):
        for v in data.get("videos") or []:
            if isinstance(v, dict) and "video_id" in v:
                add(v["video_id"], extra={k: v[k] for k in ("category", "split") if k in v})
        for s in data["sentences"]:
            if isinstance(s, dict) and "video_id" in s:
                add(s["video_id"], s.get("caption"))
    elif isinstance(data, dict):
        for vid, val in data.items():
            if isinstance(val, dict) and "sentences" in val:
                stamps = val.get("timestamps") or []
                for j, sent in enumerate(val["sentences"]):
                    span = stamps[j] if j < len(stamps) and isinstance(stamps[j], (list, tuple)) \
                        and len(stamps[j]) == 2 else None
                    add(vid, sent, span=span)
                    if span is None:
                        videos[str(vid)]["bad_spans"] = videos[str(vid)].get("bad_spans", 0) + 1
            elif isinstance(val, (list, str)):
                add(vid, val)
            else:
                add(vid)
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                vid = item.get("video_id", item.get("video"))
                if vid is not None:
                    add(str(vid).rsplit(".", 1)[0] if "." in str(vid) else vid, item.get("caption"))
    else:
        raise ValueError("MSR-VTT JSON must be an object or a list")
    return videos


def msrvtt_records(data, source: str, videos_dir: str, caption_rule: str = "all") -> list[dict]:
    """Parsed MSR-VTT style JSON -> one input record per video id (see the module docstring)."""
    index = index_videos(videos_dir)
    out = []
    for vid, entry in _group_msrvtt(data).items():
        uri = index.get(vid)
        extra = dict(entry["extra"])
        if entry.get("bad_spans"):
            extra["bad_spans"] = entry["bad_spans"]
        if uri is None:
            out.append(_record(source, vid, None, [], extra, error="missing_media",
                               detail=f"no video file for id {vid!r} under {videos_dir}"))
            continue
        if entry["spans"]:
            out.append(_record(source, vid, uri, [], extra, spans=entry["spans"]))
            continue
        caps = choose_captions(vid, entry["captions"], caption_rule)
        if not caps:
            out.append(_record(source, vid, uri, [], extra, error="missing_caption",
                               detail="the annotation lists no caption for this video"))
            continue
        out.append(_record(source, vid, uri, caps, extra))
    return out


def read_msrvtt(path: str, videos_dir: str | None = None, caption_rule: str = "all") -> pa.Table:
    """Read an MSR-VTT style JSON file; videos are looked up under ``videos_dir`` (default: beside it).

    A file that is not JSON (or not one of the shapes) becomes one ``corrupt_annotations`` reject
    record, like a corrupt tar shard: accounted for, never a crash.
    """
    fs, p = resolve_fs(path)
    with fs.open_input_stream(p) as f:
        raw = f.read()
    try:
        data = json.loads(decode_caption(raw))
        recs = msrvtt_records(data, path, videos_dir or posixpath.dirname(p) or ".", caption_rule)
    except ValueError as e:
        recs = [_record(path, "#file", None, [], {}, error="corrupt_annotations", detail=str(e)[:200])]
    return pa.Table.from_pylist(recs, schema=INPUT_SCHEMA)


def webvid_records(batch: pa.Table, source: str, videos_dir: str,
                   index: dict[str, str] | None = None) -> pa.Table:
    """A batch of WebVid CSV rows (``name`` read as binary) -> input records."""
    index = index_videos(videos_dir) if index is None else index
    cols = batch.column_names
    n = batch.num_rows
    ids = [str(v) if v is not None else None for v in batch.column("videoid").to_pylist()]
    names = batch.column("name").to_pylist() if "name" in cols else [None] * n
    urls = batch.column("contentUrl").to_pylist() if "contentUrl" in cols else [None] * n
    dirs = batch.column("page_dir").to_pylist() if "page_dir" in cols else [None] * n
    durs = batch.column("duration").to_pylist() if "duration" in cols else [None] * n
    out = []
    for i in range(n):
        vid = ids[i]
        if not vid:
            out.append(_record(source, f"row{i}", None, [], {}, error="missing_key", detail="empty videoid"))
            continue
        uri = None
        if dirs[i]:
            uri = index.get(f"{dirs[i]}/{vid}")
        uri = uri or index.get(vid)
        url = urls[i].decode("utf-8", "replace") if isinstance(urls[i], bytes) else urls[i]
        if uri is None and url and not url.startswith(("http://", "https://")):
            fs, p = resolve_fs(url)
            if fs.get_file_info(p).type == pafs.FileType.File:
                uri = _uri(fs, p)
        extra = {"duration_s": str(durs[i])} if durs[i] is not None else {}
        caption = decode_caption(names[i])
        if uri is None:
            out.append(_record(source, vid, None, [caption] if caption else [], extra, error="missing_media",
                               detail=f"video {vid} not under {videos_dir} (contentUrl {url!r} is not fetched)"))
            continue
        out.append(_record(source, vid, uri, [caption] if caption else [], extra))
    return pa.Table.from_pylist(out, schema=INPUT_SCHEMA)


WEBVID_CONVERT = pacsv.ConvertOptions(column_types={"videoid": pa.string(), "name": pa.binary(),
                                                    "contentUrl": pa.binary(), "page_dir": pa.string()})


def read_webvid(path: str, videos_dir: str | None = None) -> pa.Table:
    """Read a WebVid style CSV into input records (for a whole corpus, ``ray.data.read_csv`` with
    ``convert_options=WEBVID_CONVERT`` and ``webvid_records`` as a map stage do the same).
    A CSV that cannot be parsed is one ``corrupt_annotations`` reject record."""
    fs, p = resolve_fs(path)
    try:
        with fs.open_input_stream(p) as f:
            table = pacsv.read_csv(f, convert_options=WEBVID_CONVERT)
    except (pa.ArrowInvalid, OSError) as e:
        return pa.Table.from_pylist([_record(path, "#file", None, [], {}, error="corrupt_annotations",
                                             detail=str(e)[:200])], schema=INPUT_SCHEMA)
    if "videoid" not in table.column_names:
        raise ValueError(f"{path}: a WebVid CSV needs a 'videoid' column; found {', '.join(table.column_names)}")
    return webvid_records(table, path, videos_dir or posixpath.dirname(p) or ".")


def is_annotation_file(fs: pafs.FileSystem, path: str) -> bool:
    """A ``.json`` file, or a ``.csv`` whose header is WebVid's (``videoid`` plus ``name`` or
    ``contentUrl``): read by this module instead of as an image manifest."""
    low = path.lower()
    if low.endswith(".json"):
        return True
    if not low.endswith(".csv"):
        return False
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(65536).decode("utf-8", "replace")
    except OSError:
        return False
    header = [h.strip().strip('"') for h in head.splitlines()[0].split(",")] if head else []
    return "videoid" in header and ("name" in header or "contentUrl" in header)


def read_annotations(uri: str, videos_dir: str | None = None, caption_rule: str = "all") -> pa.Table:
    """An annotation file (by extension) -> input records."""
    if uri.lower().endswith(".csv"):
        return read_webvid(uri, videos_dir)
    return read_msrvtt(uri, videos_dir, caption_rule)


__all__ = ["CAPTION_RULES", "resolve_fs", "index_videos", "choose_captions", "msrvtt_records", "read_msrvtt",
           "webvid_records", "read_webvid", "WEBVID_CONVERT", "is_annotation_file", "read_annotations"]
