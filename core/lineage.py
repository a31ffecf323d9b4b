"""Lineage, skip/resume decisions and the storage primitives the chained jobs share.

Every stage output (a corpus dir, a run dir, an eval dir) carries ``manifest.json``. When a chain
(``jobs/pipeline.py``, ``jobs/refresh.py``) finishes a stage it stamps a ``lineage`` section into
that manifest, next to whatever the stage itself wrote:

    "lineage": {"stage": "pretrain", "key": "<sha256>", "config_sha256": "<sha256>",
                "inputs": [{"path": ".../corpus", "manifest_sha256": "<sha256>"}, ...],
                "args": {...}, "code_version": {"package", "git_commit", "git_dirty", "source_sha256"},
                "completed_at": "2026-11-28T14:02:11Z"}

``key`` hashes the stage name, its inputs (the sha256 of each input's manifest.json, or the size and
mtime of raw source files), its resolved config and its arguments; the code version is recorded but
not part of the key (a code change alone does not invalidate outputs; ``--force`` reruns).

Skip and resume (``plan_stage``): an output whose stamp carries the same key is *done* and skipped.
Before a stage runs, an attempt marker (``.NAME.attempt.json`` beside the output) records its key.
An output with an attempt for the same key but no stamp is a failed or interrupted run of the same
work: it is resumed in place (stages resume from their own outputs, e.g. Ray Train checkpoints). An
output from other inputs or config, or any output under ``force``, is wiped first so a stale
checkpoint can never leak into new work. Upstream reruns change the upstream manifest, hence the
downstream keys, hence the downstream stages rerun: a failed chain resumes at the failed stage.

Storage primitives: atomic JSON writes (temp file + rename locally, one PUT on an object store),
and, from core/locking.py, the atomic ``current`` pointer and the lock (``StorageLock``). Output
dirs, manifests and stamps may be local paths or URIs (``s3://``, ``gs://``: core.storage).

Tested in tests/test_lineage.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.locking import LockHeld, LockLost, StorageLock, read_pointer, write_pointer
from core.storage import (
    exists,
    expand_braces,
    is_local,
    join,
    remove,
    resolve,
    write_json,
)
from core.storage import read_json as _read_json_uri

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("core", "jobs", "mm", "pipelines")


# --------------------------------------------------------------------------- hashing
def sha256_json(obj: Any) -> str:
    """A stable digest of plain data (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_CODE_VERSION: dict | None = None


def code_version() -> dict:
    """Package version, git commit (and whether the tree is dirty) when there is a checkout, and a
    digest of the Python sources, which also identifies code shipped by ``--working-dir``."""
    global _CODE_VERSION
    if _CODE_VERSION is not None:
        return dict(_CODE_VERSION)
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("mm-curate-train")
    except PackageNotFoundError:
        package = None
    h = hashlib.sha256()
    for pkg in SOURCE_PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    commit = dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PACKAGES],
                                cwd=ROOT, capture_output=True, text=True, timeout=5)
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    _CODE_VERSION = {"package": package, "git_commit": commit, "git_dirty": dirty, "source_sha256": h.hexdigest()}
    return dict(_CODE_VERSION)


# --------------------------------------------------------------------------- manifests
def write_json_atomic(path: str | os.PathLike, data: Any) -> Path | str:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    if not is_local(path):
        write_json(path, data)
        return str(path)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def read_json(path: str | os.PathLike) -> Any | None:
    if not is_local(path):
        return _read_json_uri(path)
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    m = read_json(join(out_dir, "manifest.json"))
    return m if isinstance(m, dict) else None


def manifest_ref(out_dir: str | os.PathLike) -> dict:
    """How a downstream manifest names an input: its path and the digest of its manifest.json."""
    if not is_local(out_dir):
        from core.storage import read_bytes

        blob = read_bytes(join(out_dir, "manifest.json"))
        if blob is None:
            raise FileNotFoundError(f"{out_dir} has no manifest.json (did its stage finish?)")
        return {"path": str(out_dir).rstrip("/"), "manifest_sha256": hashlib.sha256(blob).hexdigest()}
    p = Path(out_dir).resolve()
    m = p / "manifest.json"
    if not m.is_file():
        raise FileNotFoundError(f"{p} has no manifest.json (did its stage finish?)")
    return {"path": str(p), "manifest_sha256": file_sha256(m)}


def source_refs(paths: Iterable[str]) -> list[dict]:
    """Raw inputs named by what a rerun can check cheaply: every file's path, size and mtime.

    Directories are walked (hidden files skipped); globs and brace patterns are expanded as the
    curate readers expand them. Used for the skip key only; the refresh ledger uses checksums.
    """
    out: list[dict] = []
    for src in paths:
        for pattern in expand_braces(src):
            if not is_local(pattern):  # an object-store file or prefix (no globs there)
                out += _uri_refs(pattern)
                continue
            p = Path(pattern).expanduser()
            files = (sorted(Path("/").glob(str(p.resolve()).lstrip("/"))) if any(c in pattern for c in "*?[")
                     else [p])
            for f in files:
                if f.is_dir():
                    members = sorted(x for x in f.rglob("*") if x.is_file()
                                     and not any(part.startswith(".") for part in x.relative_to(f).parts))
                else:
                    members = [f]
                for x in members:
                    st = x.stat()
                    out.append({"uri": str(x.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _uri_refs(uri: str) -> list[dict]:
    import pyarrow.fs as pafs

    fs, path, prefix = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = sorted((i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                        if i.type == pafs.FileType.File and not any(p.startswith(".") for p in i.path[len(path):].split("/"))),
                       key=lambda i: i.path)
    elif info.type == pafs.FileType.File:
        infos = [info]
    else:
        raise FileNotFoundError(f"{uri} does not exist")
    return [{"uri": prefix + i.path, "size": i.size, "mtime_ns": i.mtime_ns} for i in infos]


def stage_key(stage: str, inputs: list[dict], config: Any, args: dict | None = None) -> str:
    return sha256_json({"stage": stage, "inputs": inputs, "config_sha256": sha256_json(config), "args": args or {}})


def lineage_record(stage: str, key: str, inputs: list[dict], config: Any, args: dict | None = None) -> dict:
    return {"stage": stage, "key": key, "inputs": inputs, "config_sha256": sha256_json(config),
            "args": args or {}, "code_version": code_version(), "completed_at": now_utc()}


def stamp(out_dir: str | os.PathLike, lineage: dict, extra: dict | None = None) -> Path:
    """Merge ``lineage`` (and ``extra`` top-level keys for stages that write no manifest) into
    OUT/manifest.json, atomically. The stamp is written last: its presence means *done*."""
    manifest = read_manifest(out_dir) or {}
    manifest.update(extra or {})
    manifest["lineage"] = lineage
    out = write_json_atomic(join(out_dir, "manifest.json"), manifest)
    fs, attempt, _ = resolve(_attempt_path(out_dir))
    remove(fs, attempt)
    return Path(out) if is_local(out_dir) else out


def _attempt_path(out_dir: str | os.PathLike) -> str:
    parent, name = str(out_dir).rstrip("/").rsplit("/", 1) if "/" in str(out_dir).rstrip("/") else (".", str(out_dir))
    return f"{parent}/.{name}.attempt.json"


@dataclass(frozen=True)
class Plan:
    action: Literal["skip", "resume", "fresh"]
    reason: str


def plan_stage(out_dir: str | os.PathLike, key: str, force: bool = False) -> Plan:
    """Decide what to do with a stage output given the key of the work asked for (no side effects)."""
    if not exists(out_dir):
        return Plan("fresh", "no output yet")
    done = ((read_manifest(out_dir) or {}).get("lineage") or {}).get("key")
    if force:
        return Plan("fresh", "--force")
    if done == key:
        return Plan("skip", "output exists for the same inputs and config")
    attempt = (read_json(_attempt_path(out_dir)) or {}).get("key")
    if done is None and attempt == key:
        return Plan("resume", "an earlier attempt with the same inputs and config did not finish")
    if done is not None:
        return Plan("fresh", "inputs or config changed since the output was made")
    return Plan("fresh", "output from an unknown or different attempt")


def begin_stage(out_dir: str | os.PathLike, key: str, plan: Plan) -> None:
    """Act on ``plan``: wipe the output for a fresh start, then record the attempt's key."""
    if plan.action == "skip":
        return
    if plan.action == "fresh" and exists(out_dir):
        log.info("removing %s (%s)", out_dir, plan.reason)
        fs, path, _ = resolve(str(out_dir))
        remove(fs, path)
    write_json_atomic(_attempt_path(out_dir), {"key": key, "started_at": now_utc(), "host": socket.gethostname(),
                                         "pid": os.getpid()})


__all__ = ["sha256_json", "file_sha256", "code_version", "write_json_atomic", "read_json", "read_manifest",
           "manifest_ref", "source_refs", "stage_key", "lineage_record", "stamp", "Plan", "plan_stage",
           "begin_stage", "write_pointer", "read_pointer", "StorageLock", "LockHeld", "LockLost"]
