"""Storage helpers: local paths and ``pyarrow.fs`` URIs, brace patterns, whole-file reads and
writes, the local cache of a URI (the pointer and the lock: core/locking.py).

    fs, path, prefix = resolve("s3://bucket/corpus")   # S3FileSystem, "bucket/corpus", "s3://"
    expand_braces("shard-{000..002}.tar")               # shard-000.tar shard-001.tar shard-002.tar

``prefix`` rebuilds a URI from a path inside ``fs`` (``prefix + path``); it is empty for local
paths and ``file://`` URIs. Tested in tests/test_sources.py, tests/test_lineage.py and the S3 tests.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


def is_uri(path: str) -> bool:
    """``scheme://...`` (``s3://``, ``gs://``, ``file://``), as opposed to a local path."""
    return bool(_URI.match(str(path)))


def resolve(src: str) -> tuple[Any, str, str]:
    """(filesystem, path inside it, URI prefix to rebuild URIs) for a local path or a URI."""
    if is_uri(src):
        fs, path = pafs.FileSystem.from_uri(src)
        scheme = src.split("://", 1)[0]
        return fs, path, ("" if scheme == "file" else f"{scheme}://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(src)), ""


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` → a1b a2b a3b (zero padding kept), ``{x,y}`` → x y; nested and repeated."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or hi.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a brace expression; keep literally
        return [head + items[0] + t for t in expand_braces(tail)]
    return [e for item in items for e in expand_braces(head + item + tail)]


def move(fs: Any, src: str, dst: str) -> None:
    """Move a file or a directory tree inside ``fs``. A rename where the filesystem has one
    (local); on object stores (S3, GCS), which have no rename and whose ``move`` refuses
    directories, every object is copied server-side and the source deleted after all copies
    succeeded. Not atomic there: callers commit with a marker written last (curate's stats.json)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    info = fs.get_file_info(src)
    if info.type == pafs.FileType.File:
        fs.copy_file(src, dst)
        fs.delete_file(src)
        return
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{src}: nothing to move")
    fs.create_dir(dst, recursive=True)
    for item in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if item.type == pafs.FileType.File:
            fs.copy_file(item.path, dst + item.path[len(src):])
    fs.delete_dir(src)


def remove(fs: Any, path: str) -> None:
    """Delete a file or a directory tree if it exists (object-store "directories" included)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def _mirror_root() -> str:
    """Where ``local_dir``/``local_file`` keep fetched copies: ``$MM_CACHE_DIR/mirror`` (default ~/.cache/mm)."""
    return os.path.join(os.environ.get("MM_CACHE_DIR") or os.path.expanduser("~/.cache/mm"), "mirror")


def local_dir(src: str | os.PathLike) -> str:
    """A local directory holding what ``src`` holds: ``src`` itself when it is local; for a URI
    (a corpus's tokenizer/, a run's model/ on S3), a copy under ``$MM_CACHE_DIR`` (default
    ~/.cache/mm) named by the URI and its listing (paths, sizes, mtimes), so a changed directory
    is fetched again and an unchanged one never twice. Safe when several processes on a node
    ask at once: each copies into its own temp dir and renames it into place (first one wins).
    For small directories (tokenizers, model files); data is read from the store directly."""
    import hashlib
    import tempfile

    src = str(src)
    if not is_uri(src) or src.startswith("file://"):
        return resolve(src)[1]
    fs, path, _ = resolve(src)
    path = path.rstrip("/")
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not infos:
        raise FileNotFoundError(f"{src} does not exist or is empty")
    listing = "\n".join(f"{i.path}\0{i.size}\0{i.mtime_ns}" for i in sorted(infos, key=lambda i: i.path))
    key = hashlib.sha256(src.encode()).hexdigest()[:16] + "-" + hashlib.sha256(listing.encode()).hexdigest()[:16]
    root = _mirror_root()
    target = os.path.join(root, key, os.path.basename(path))
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=root)
    os.makedirs(os.path.join(tmp, os.path.basename(path)))
    pafs.copy_files(path, os.path.join(tmp, os.path.basename(path)), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    try:
        os.rename(tmp, os.path.join(root, key))
    except OSError:  # another process got there first: its copy is the same listing
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_file(src: str | os.PathLike) -> str:
    """A local path holding the file ``src`` (a path, or a URI fetched once into the same cache
    as ``local_dir``, keyed by the URI, size and mtime)."""
    import hashlib
    import tempfile

    src = str(src)
    if not is_uri(src) or src.startswith("file://"):
        return resolve(src)[1]
    fs, path, _ = resolve(src)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{src} does not exist")
    key = hashlib.sha256(f"{src}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:32]
    root = os.path.join(_mirror_root(), key)
    target = os.path.join(root, os.path.basename(path))
    if not os.path.isfile(target):
        os.makedirs(root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=root)
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as f:
            while chunk := f.read(8 << 20):
                out.write(chunk)
        os.replace(tmp, target)
    return target


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (never ``os.path.join``'s scheme mangling)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(src: str | os.PathLike) -> bytes | None:
    """The bytes of a file at a path or URI; None if there is no such file.

    One version of the file, whole, even while a writer replaces it: local files are replaced
    by rename (``write_bytes``), and an ``s3://`` object is read with a single GET. pyarrow's
    S3 stream asks for the size first (HEAD) and then reads ranges: an object replaced in
    between came back cut to the old size or mixed (tests/test_storage_s3.py, 28 of 198 reads
    torn while metrics.jsonl-sized objects were rewritten)."""
    src = str(src)
    if src.startswith("s3://") and "?" not in src:  # a query (endpoint_override=...) is pyarrow's to parse
        return _s3_get(src)
    fs, path, _ = resolve(src)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


_S3: dict[str | None, Any] = {}  # boto3 clients (thread-safe) by endpoint: one per process and endpoint


def s3_client():
    """A boto3 S3 client for ``AWS_ENDPOINT_URL`` (MinIO, moto; unset: AWS), one per process and
    endpoint, so a process that switches endpoints never keeps the first one's. ImportError
    without boto3."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint not in _S3:
        _S3[endpoint] = boto3.client("s3", endpoint_url=endpoint)
    return _S3[endpoint]


def _s3_get(uri: str) -> bytes | None:
    """An S3 object's bytes in one GetObject (boto3, ``AWS_ENDPOINT_URL`` honoured as pyarrow
    does); None when the key or the bucket does not exist, as pyarrow's listing said before."""
    try:
        client = s3_client()
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # boto3 is a dependency; without it, pyarrow's (HEAD + range) read
        fs, path, _ = resolve(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not key or key.endswith("/"):
        return None
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            return None
        raise OSError(f"{uri}: {code or 'error'}: {e.response.get('Error', {}).get('Message', e)}") from None
    except BotoCoreError as e:
        raise OSError(f"{uri}: {e}") from None


def write_bytes(dst: str | os.PathLike, data: bytes) -> None:
    """Write a whole file at a path or URI. Local: a temp file renamed over the target (readers
    never see a torn file); object stores: a single PUT, which is atomic per object."""
    fs, path, _ = resolve(str(dst))
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        import tempfile

        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_dir(local: str | os.PathLike, dst: str) -> None:
    """Copy a local directory to a path or URI (replacing what is there)."""
    fs, path, _ = resolve(dst)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(str(local)) == path:
        return
    remove(fs, path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def exists(src: str | os.PathLike) -> bool:
    fs, path, _ = resolve(str(src))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_local(src: str | os.PathLike) -> bool:
    """A local path or a ``file://`` URI (as opposed to an object store)."""
    return not is_uri(str(src)) or str(src).startswith("file://")


def read_json(src: str | os.PathLike) -> Any | None:
    """The JSON at a path or URI; None if there is no such file or it does not parse."""
    data = read_bytes(src)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_json(dst: str | os.PathLike, data: Any) -> None:
    """Write JSON at a path or URI so readers see the old or the new file (``write_bytes``)."""
    write_bytes(dst, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


__all__ = ["is_uri", "s3_client", "is_local", "resolve", "expand_braces", "move", "remove", "local_dir", "local_file", "join",
           "read_bytes", "write_bytes", "upload_dir", "exists", "read_json", "write_json"]
