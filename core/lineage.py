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

Storage primitives: atomic JSON writes (temp file + rename), an atomic ``current`` pointer (a
symlink swapped by rename, so readers see the old or the new target, never neither), and a lock
file (``StorageLock``: ``O_CREAT|O_EXCL``, owner and heartbeat inside; a lock whose heartbeat is
older than ``stale_after_s``, or whose owner process on this host is gone, is taken over). Paths are
local or on a shared mount (NFS/EFS/Filestore, gcsfuse), the same paths every other stage reads.

Tested in tests/test_lineage.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.storage import expand_braces

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
def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
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
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    m = read_json(Path(out_dir) / "manifest.json")
    return m if isinstance(m, dict) else None


def manifest_ref(out_dir: str | os.PathLike) -> dict:
    """How a downstream manifest names an input: its path and the digest of its manifest.json."""
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


def stage_key(stage: str, inputs: list[dict], config: Any, args: dict | None = None) -> str:
    return sha256_json({"stage": stage, "inputs": inputs, "config_sha256": sha256_json(config), "args": args or {}})


def lineage_record(stage: str, key: str, inputs: list[dict], config: Any, args: dict | None = None) -> dict:
    return {"stage": stage, "key": key, "inputs": inputs, "config_sha256": sha256_json(config),
            "args": args or {}, "code_version": code_version(), "completed_at": now_utc()}


def stamp(out_dir: str | os.PathLike, lineage: dict, extra: dict | None = None) -> Path:
    """Merge ``lineage`` (and ``extra`` top-level keys for stages that write no manifest) into
    OUT/manifest.json, atomically. The stamp is written last: its presence means *done*."""
    p = Path(out_dir)
    manifest = read_manifest(p) or {}
    manifest.update(extra or {})
    manifest["lineage"] = lineage
    out = write_json_atomic(p / "manifest.json", manifest)
    _attempt_path(p).unlink(missing_ok=True)
    return out


def _attempt_path(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.attempt.json"


@dataclass(frozen=True)
class Plan:
    action: Literal["skip", "resume", "fresh"]
    reason: str


def plan_stage(out_dir: str | os.PathLike, key: str, force: bool = False) -> Plan:
    """Decide what to do with a stage output given the key of the work asked for (no side effects)."""
    p = Path(out_dir)
    if not p.exists():
        return Plan("fresh", "no output yet")
    done = ((read_manifest(p) or {}).get("lineage") or {}).get("key")
    if force:
        return Plan("fresh", "--force")
    if done == key:
        return Plan("skip", "output exists for the same inputs and config")
    attempt = (read_json(_attempt_path(p)) or {}).get("key")
    if done is None and attempt == key:
        return Plan("resume", "an earlier attempt with the same inputs and config did not finish")
    if done is not None:
        return Plan("fresh", "inputs or config changed since the output was made")
    return Plan("fresh", "output from an unknown or different attempt")


def begin_stage(out_dir: str | os.PathLike, key: str, plan: Plan) -> None:
    """Act on ``plan``: wipe the output for a fresh start, then record the attempt's key."""
    p = Path(out_dir)
    if plan.action == "skip":
        return
    if plan.action == "fresh" and p.exists():
        log.info("removing %s (%s)", p, plan.reason)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    write_json_atomic(_attempt_path(p), {"key": key, "started_at": now_utc(), "host": socket.gethostname(),
                                         "pid": os.getpid()})


# --------------------------------------------------------------------------- atomic pointer
def write_pointer(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Point ``link`` (a symlink) at ``target`` atomically: a new link is renamed over the old one.
    The target is stored relative to the link's folder so the tree can be moved or mounted."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(target).resolve(), link.parent.resolve())
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(rel, tmp)
    try:
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()


def read_pointer(link: str | os.PathLike) -> Path | None:
    """The resolved target of ``link``, or None when there is no pointer (or it dangles)."""
    link = Path(link)
    if not link.is_symlink():
        return link.resolve() if link.is_dir() else None
    target = link.resolve()
    return target if target.exists() else None


# --------------------------------------------------------------------------- lock
class LockHeld(RuntimeError):
    """Another live process holds the lock."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        age = time.time() - float(holder.get("heartbeat_unix", 0))
        super().__init__(f"another run holds the lock {path}: {holder.get('owner', '?')} on "
                         f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, since {holder.get('acquired_at', '?')} "
                         f"(heartbeat {age:.0f} s ago)")


class LockLost(RuntimeError):
    """This process held the lock but can no longer vouch for it (heartbeat writes failing, or
    another run took it over): stop before changing anything else."""


class StorageLock:
    """An exclusive lock file in storage, with a heartbeat so a crashed holder's lock goes stale.

        with StorageLock("corpus/_refresh.lock", owner="refresh", stale_after_s=900):
            ...

    Acquire: ``open(O_CREAT|O_EXCL)`` (atomic on local disks and NFS). If the file exists and is
    live, raise ``LockHeld``. If it is stale (heartbeat older than ``stale_after_s``, or the holder
    ran on this host and its pid is gone), replace it under a takeover mutex (itself an
    ``O_EXCL`` file), re-checking that it is still the same stale holder. A daemon thread rewrites
    the heartbeat every ``stale_after_s / 4``. A heartbeat that cannot be written is retried; when
    none has been written for ``stale_after_s / 2`` (another run may soon see the lock as stale), or
    another run took the lock over, the lock is *lost*: ``check()`` raises ``LockLost``, and the
    holder calls it before every step that changes shared state.
    """

    def __init__(self, path: str | os.PathLike, *, owner: str, stale_after_s: float = 900.0):
        self.path = Path(path)
        self.owner = owner
        self.stale_after_s = float(stale_after_s)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None
        self.lost: str | None = None  # why this process can no longer vouch for the lock

    def _record(self) -> dict:
        return {"owner": self.owner, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired_at": getattr(self, "_acquired_at", now_utc()), "heartbeat_unix": time.time()}

    def holder(self) -> dict | None:
        h = read_json(self.path)
        return h if isinstance(h, dict) else None

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: a torn write by a crashed holder, or being written right now
            with contextlib.suppress(FileNotFoundError):
                return time.time() - self.path.stat().st_mtime > self.stale_after_s
            return False
        if time.time() - float(holder.get("heartbeat_unix", 0)) > self.stale_after_s:
            return True
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)))
        return False

    def acquire(self) -> StorageLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acquired_at = now_utc()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if not self._is_stale(holder):
                    raise LockHeld(self.path, holder or {}) from None
                if not self._take_over(holder):
                    continue  # the lock changed under us: look again
                break
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            break
        else:
            raise LockHeld(self.path, self.holder() or {})
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, seen: dict | None) -> bool:
        """Replace a stale lock, under a short-lived mutex so that two contenders cannot both
        replace it (the second would otherwise overwrite the first's fresh lock)."""
        mutex = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - mutex.stat().st_mtime > 60:  # a contender crashed mid-takeover
                    mutex.unlink()
            time.sleep(0.2)
            return False
        os.close(fd)
        try:
            now = self.holder()
            if (now or {}).get("token") != (seen or {}).get("token") or not self._is_stale(now):
                return False
            write_json_atomic(self.path, self._record())
            log.warning("took over a stale lock %s (holder %s)", self.path, seen)
            self.took_over = seen or {}
            return True
        finally:
            mutex.unlink(missing_ok=True)

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(max(0.1, self.stale_after_s / 4)):
            try:
                holder = self.holder()
                if holder is not None and holder.get("token") != self.token:
                    self.lost = f"lock {self.path} was taken over by {holder.get('owner')} pid {holder.get('pid')}"
                    log.error("%s; stopping", self.lost)
                    return
                write_json_atomic(self.path, self._record())
                last_ok = time.monotonic()
            except OSError as e:
                if time.monotonic() - last_ok > self.stale_after_s / 2:
                    self.lost = f"cannot write the heartbeat of lock {self.path}: {e}"
                    log.error("%s; stopping before another run takes it over", self.lost)
                    return
                log.warning("lock %s: heartbeat failed (%s); retrying", self.path, e)

    def check(self) -> None:
        """Raise ``LockLost`` if this process can no longer vouch for the lock."""
        if self.lost:
            raise LockLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StorageLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["sha256_json", "file_sha256", "code_version", "write_json_atomic", "read_json", "read_manifest",
           "manifest_ref", "source_refs", "stage_key", "lineage_record", "stamp", "Plan", "plan_stage",
           "begin_stage", "write_pointer", "read_pointer", "StorageLock", "LockHeld", "LockLost"]
