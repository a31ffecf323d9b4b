"""Source listing: ``SRC`` arguments to the input files a curate run reads (on the driver).

    files = expand_sources(["shards/{00000..00009}.tar", "folder/", "urls.parquet", "s3://b/x/*.tar"])

Every ``SRC`` is a local path or a ``pyarrow.fs`` URI, a brace pattern (``shard-{000..099}.tar``)
or a glob (``*`` and ``?`` stay in one path segment, ``**`` crosses them). A folder is a folder of
tar shards (img2dataset output: its .parquet/.json metadata is ignored), a folder of manifests,
or a folder of media files with sidecars (one ``folder`` input file, grouped by key when read:
``list_folder_groups``). A missing or empty SRC, or a file of unknown type, is a ValueError with
one clear line. A local tree is walked without following symlinks (``list_tree``).

The files are read by pipelines/datasources.py. Tested in tests/test_sources.py.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from typing import Any

import pyarrow.fs as pafs

from core.storage import expand_braces, resolve
from pipelines.inputs import MANIFEST_EXTS, MEDIA_EXTS, SIDECAR_EXTS, TAR_SUFFIXES, SourceFile


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


__all__ = ["expand_sources", "glob_regex", "list_folder_groups", "list_tree"]
