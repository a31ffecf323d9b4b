"""The atomic ``current`` pointer and the lock, on local disks and object stores.

    write_pointer("s3://b/models/current", "s3://b/models/run-1")   # one PUT of current.json
    with StorageLock("s3://b/corpus/_refresh.lock", owner="mm refresh"): ...

The ``current`` pointer: locally a symlink swapped by rename (readers see the old or the new
target, never neither); on an object store, which has no symlinks, the object ``current.json``
(``{"target": URI}``) written with one PUT, atomic per object.

The lock (``StorageLock``): locally a file created with ``O_CREAT|O_EXCL`` (atomic on local disks
and NFS); on S3 (and S3-compatible stores: MinIO, reached through ``AWS_ENDPOINT_URL``) an object
created with a conditional PUT (``If-None-Match: *``: exactly one creator wins, the others get
412), its heartbeat and a takeover written with ``If-Match`` on the ETag seen, its release a
conditional DELETE. pyarrow.fs has no conditional writes, so this part uses boto3. ``gs://``
locks are refused with one line (not supported yet). Owner and heartbeat are inside; a lock whose
heartbeat is older than ``stale_after_s``, or whose owner process on this host is gone, is taken
over. Tested in tests/test_lineage.py (local) and tests/test_refresh_s3.py (S3, moto_server).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from core.storage import exists, is_local, read_json, resolve, s3_client, write_bytes, write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the current pointer
def _s3_client():
    """core.storage's boto3 S3 client (one per endpoint); boto3 clients are thread-safe."""
    try:
        return s3_client()
    except ImportError:
        raise OSError("s3:// locks and pointers need boto3 (pip install boto3)") from None


def _pointer_object(link: str | os.PathLike) -> str:
    return f"{str(link).rstrip('/')}.json"


def write_pointer(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` atomically. Local: a symlink (target relative to the link's
    folder, so the tree can be moved or mounted) renamed over the old one. Object store:
    ``link.json`` holding ``{"target": URI}``, one PUT (on S3 through boto3)."""
    if not is_local(link):
        body = json.dumps({"target": str(target).rstrip("/"), "written_at": time.time()}).encode()
        if str(link).startswith("s3://"):
            bucket, _, key = _pointer_object(link)[len("s3://"):].partition("/")
            _s3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
        else:
            write_bytes(_pointer_object(link), body)
        return
    link = Path(resolve(str(link))[1])
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(resolve(str(target))[1]).resolve(), link.parent.resolve())
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(rel, tmp)
    try:
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()


def read_pointer(link: str | os.PathLike) -> Path | str | None:
    """The target of ``link`` (a resolved Path locally, a URI on an object store), or None when
    there is no pointer or its target is gone."""
    if not is_local(link):
        if str(link).startswith("s3://"):  # one GET: pyarrow reads a HEAD then ranges, torn by a concurrent PUT
            bucket, _, key = _pointer_object(link)[len("s3://"):].partition("/")
            try:
                ptr = json.loads(_s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
            except _s3_client().exceptions.NoSuchKey:
                ptr = None
        else:
            ptr = read_json(_pointer_object(link))
        target = ptr.get("target") if isinstance(ptr, dict) else None
        return target if target and exists(target) else None
    link = Path(resolve(str(link))[1])
    if not link.is_symlink():
        return link.resolve() if link.is_dir() else None
    target = link.resolve()
    return target if target.exists() else None


# --------------------------------------------------------------------------- the lock
class LockHeld(RuntimeError):
    """Another live process holds the lock."""

    def __init__(self, path: str | os.PathLike, holder: dict):
        self.path, self.holder = path, holder
        age = time.time() - float(holder.get("heartbeat_unix", 0))
        super().__init__(f"another run holds the lock {path}: {holder.get('owner', '?')} on "
                         f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, since {holder.get('acquired_at', '?')} "
                         f"(heartbeat {age:.0f} s ago)")


class LockLost(RuntimeError):
    """This process held the lock but can no longer vouch for it (heartbeat writes failing, or
    another run took it over): stop before changing anything else."""


class _TakenOver(Exception):
    def __init__(self, holder: dict | None):
        self.holder = holder or {}


class _Seen(NamedTuple):
    """A lock found in place: its holder (None if unreadable), the version a takeover swaps on
    (S3: the ETag; locally None: the holder's token), and its age by the store's clock (S3; locally
    None: the file's mtime, read when needed)."""

    holder: dict | None
    version: str | None = None
    age_s: float | None = None


class StorageLock:
    """An exclusive lock in storage, with a heartbeat so a crashed holder's lock goes stale.

        with StorageLock("corpus/_refresh.lock", owner="refresh", stale_after_s=900):   # or s3://...
            ...

    Acquire: an atomic create (``O_CREAT|O_EXCL`` locally; ``If-None-Match: *`` on S3, see the
    module doc). If the lock exists and is live, raise ``LockHeld``. If it is stale (heartbeat
    older than ``stale_after_s``, or the holder ran on this host and its pid is gone), replace it
    by a compare-and-swap on what was seen (locally under a takeover mutex, itself an ``O_EXCL``
    file; on S3 a PUT with ``If-Match`` on the stale lock's ETag), so two contenders cannot both
    take it over. A daemon thread rewrites the heartbeat every ``stale_after_s / 4``. A heartbeat
    that cannot be written is retried; when none has been written for ``stale_after_s / 2``
    (another run may soon see the lock as stale), or another run took the lock over, the lock is
    *lost*: ``check()`` raises ``LockLost``, and the holder calls it before every step that
    changes shared state. Storage errors while acquiring are ``OSError`` naming the lock.
    """

    def __new__(cls, path: str | os.PathLike, **_kw):
        if cls is StorageLock and not is_local(path):
            scheme = str(path).split("://", 1)[0]
            if scheme != "s3":
                raise ValueError(f"lock {path}: {scheme}:// locks are not supported yet (they need conditional "
                                 f"writes); keep this state on s3:// or a local/shared path")
            return super().__new__(_S3Lock)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, *, owner: str, stale_after_s: float = 900.0):
        self.path: Any = Path(resolve(str(path))[1])
        self.owner = owner
        self.stale_after_s = float(stale_after_s)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None
        self.lost: str | None = None  # why this process can no longer vouch for the lock

    def _record(self) -> dict:
        return {"owner": self.owner, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired_at": getattr(self, "_acquired_at", None) or _now_utc(), "heartbeat_unix": time.time()}

    def holder(self) -> dict | None:
        try:
            h = read_json(self.path)
        except OSError:  # the lock's folder is gone or not a folder: no holder to read
            h = None
        return h if isinstance(h, dict) else None

    def _age_of_unreadable(self) -> float:
        with contextlib.suppress(FileNotFoundError):
            return time.time() - self.path.stat().st_mtime
        return 0.0

    def _is_stale(self, holder: dict | None, age_s: float | None = None) -> bool:
        if holder is None:  # unreadable: a torn write by a crashed holder, or being written right now
            return (self._age_of_unreadable() if age_s is None else age_s) > self.stale_after_s
        if time.time() - float(holder.get("heartbeat_unix", 0)) > self.stale_after_s:
            return True
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)))
        return False

    def acquire(self) -> StorageLock:
        """The one acquire loop of both backends, through three hooks: ``_create`` (the atomic
        create), ``_observe`` (the lock found in place, or None if it went away in between) and
        ``_take_over`` (the compare-and-swap on what was seen)."""
        self._acquired_at = _now_utc()
        for _ in range(5):
            if self._create():
                break
            seen = self._observe()
            if seen is None:
                continue  # released in between: try to create it again
            if not self._is_stale(seen.holder, seen.age_s):
                raise LockHeld(self.path, seen.holder or {})
            if self._take_over(seen):
                log.warning("took over a stale lock %s (holder %s)", self.path, seen.holder)
                self.took_over = seen.holder or {}
                break  # else the lock changed under us: look again
        else:
            raise LockHeld(self.path, self.holder() or {})
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _observe(self) -> _Seen | None:
        """Locally the lock is never reported gone: an unreadable or vanished file is judged by
        its age (a vanished one: 0, so live)."""
        return _Seen(self.holder())

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def _take_over(self, seen: _Seen) -> bool:
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
            if (now or {}).get("token") != (seen.holder or {}).get("token") or not self._is_stale(now):
                return False
            write_json(self.path, self._record())
            return True
        finally:
            mutex.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        """Write a fresh heartbeat; ``_TakenOver`` if another run holds the lock now."""
        holder = self.holder()
        if holder is not None and holder.get("token") != self.token:
            raise _TakenOver(holder)
        write_json(self.path, self._record())

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(max(0.1, self.stale_after_s / 4)):
            try:
                self._heartbeat()
                last_ok = time.monotonic()
            except _TakenOver as e:
                self.lost = f"lock {self.path} was taken over by {e.holder.get('owner')} pid {e.holder.get('pid')}"
                log.error("%s; stopping", self.lost)
                return
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

    def _stop_beating(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def release(self) -> None:
        self._stop_beating()
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StorageLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _S3Lock(StorageLock):
    """``StorageLock`` on S3: conditional PUT/DELETE through boto3 (``AWS_ENDPOINT_URL`` honoured)."""

    def __init__(self, path: str | os.PathLike, *, owner: str, stale_after_s: float = 900.0):
        super().__init__("/", owner=owner, stale_after_s=stale_after_s)
        self.path = str(path)
        self.bucket, _, self.key = self.path.split("://", 1)[1].partition("/")
        self._etag: str | None = None  # of the lock object as this holder last wrote it

    def _s3(self):
        return _s3_client()

    def _call(self, op: str, **kw) -> dict | None:
        """One S3 call; None when a condition failed (412, or 409 for a concurrent conditional
        write), ``FileNotFoundError`` for a missing key, ``OSError`` naming the lock otherwise."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._s3(), op)(Bucket=self.bucket, Key=self.key, **kw)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(self.path) from None
            raise OSError(f"lock {self.path}: {code}: {e.response.get('Error', {}).get('Message', e)}") from None
        except BotoCoreError as e:
            raise OSError(f"lock {self.path}: {e}") from None

    def _put(self, **cond) -> bool:
        r = self._call("put_object", Body=json.dumps(self._record()).encode(), ContentType="application/json", **cond)
        if r is None:
            return False
        self._etag = r["ETag"]
        return True

    def _get(self) -> tuple[dict | None, str | None, float]:
        """(holder or None if unreadable, ETag, age in seconds by the store's clock) or (None, None, 0)."""
        try:
            r = self._call("get_object")
        except FileNotFoundError:
            return None, None, 0.0
        body = r["Body"].read()
        age = max(0.0, time.time() - r["LastModified"].timestamp())
        try:
            holder = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = None
        return (holder if isinstance(holder, dict) else None), r["ETag"], age

    def holder(self) -> dict | None:
        return self._get()[0]

    def _create(self) -> bool:
        return self._put(IfNoneMatch="*")

    def _observe(self) -> _Seen | None:
        holder, etag, age = self._get()
        return None if etag is None else _Seen(holder, etag, age)

    def _take_over(self, seen: _Seen) -> bool:
        return self._put(IfMatch=seen.version)  # compare-and-swap on the stale lock we saw

    def _heartbeat(self) -> None:
        if not self._put(IfMatch=self._etag):
            raise _TakenOver(self.holder())

    def release(self) -> None:
        self._stop_beating()
        if self._etag is not None and not self.lost:
            with contextlib.suppress(OSError):  # a lock left behind goes stale; never delete another's
                self._call("delete_object", IfMatch=self._etag)


def _now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


__all__ = ["write_pointer", "read_pointer", "StorageLock", "LockHeld", "LockLost"]
