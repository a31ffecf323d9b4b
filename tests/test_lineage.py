"""core/lineage.py: skip/resume decisions, manifest stamps, the atomic pointer and the storage lock.

Real files and real processes (a lock holder is a child process killed with SIGKILL; racing
contenders are separate processes). No Ray. Run: ``.venv/bin/pytest tests/test_lineage.py``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core import lineage as L


def _make_output(d: Path, payload: str = "x") -> None:
    (d / "data").mkdir(parents=True)
    (d / "data" / "part.txt").write_text(payload)
    L.write_json_atomic(d / "manifest.json", {"inputs": [], "written_by": "stage"})


def test_plan_fresh_skip_resume_and_stale(tmp_path):
    out = tmp_path / "corpus"
    key = L.stage_key("curate", [{"uri": "a.tar", "size": 1, "mtime_ns": 1}], {"x": 1})
    assert L.plan_stage(out, key).action == "fresh"

    plan = L.plan_stage(out, key)
    L.begin_stage(out, key, plan)
    _make_output(out)
    # Crashed before the stamp: the same work resumes in place, its files kept.
    plan = L.plan_stage(out, key)
    assert plan.action == "resume"
    L.begin_stage(out, key, plan)
    assert (out / "data" / "part.txt").exists()

    L.stamp(out, L.lineage_record("curate", key, [], {"x": 1}))
    assert L.plan_stage(out, key).action == "skip"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["written_by"] == "stage", "the stage's own manifest content is kept"
    assert manifest["lineage"]["key"] == key and manifest["lineage"]["code_version"]["source_sha256"]
    assert not (tmp_path / ".corpus.attempt.json").exists()

    # Forced, or other config: the stale output is wiped before the new attempt.
    assert L.plan_stage(out, key, force=True).action == "fresh"
    other = L.stage_key("curate", [], {"x": 2})
    plan = L.plan_stage(out, other)
    assert plan.action == "fresh" and "changed" in plan.reason
    L.begin_stage(out, other, plan)
    assert not (out / "data").exists()


def test_unknown_output_is_not_resumed(tmp_path):
    out = tmp_path / "run"
    _make_output(out)  # made by hand or by another chain: never resumed blindly
    assert L.plan_stage(out, "k").action == "fresh"


def test_keys_follow_upstream_manifests(tmp_path):
    up = tmp_path / "up"
    _make_output(up)
    k1 = L.stage_key("pretrain", [L.manifest_ref(up)], {})
    L.stamp(up, L.lineage_record("curate", "k", [], {}))  # upstream reran: its manifest changed
    k2 = L.stage_key("pretrain", [L.manifest_ref(up)], {})
    assert k1 != k2
    with pytest.raises(FileNotFoundError):
        L.manifest_ref(tmp_path / "missing")


def test_source_refs_see_new_and_changed_files(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    (src / "a.tar").write_bytes(b"1")
    (src / ".hidden").write_bytes(b"ignored")
    r1 = L.source_refs([str(src)])
    assert [Path(r["uri"]).name for r in r1] == ["a.tar"]
    (src / "b.tar").write_bytes(b"22")
    r2 = L.source_refs([str(src / "*.tar")])
    assert [Path(r["uri"]).name for r in r2] == ["a.tar", "b.tar"]
    assert L.source_refs([str(tmp_path / "shards" / "{a,b}.tar")]) == r2


def test_pointer_swaps_atomically(tmp_path):
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    a.mkdir()
    b.mkdir()
    link = tmp_path / "models" / "current"
    assert L.read_pointer(link) is None
    L.write_pointer(link, a)
    assert L.read_pointer(link) == a.resolve()
    assert not os.path.isabs(os.readlink(link)), "relative target: the tree can be moved"
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(L.read_pointer(link))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        L.write_pointer(link, a if i % 2 else b)
    stop.set()
    t.join()
    assert seen <= {a.resolve(), b.resolve()}, f"a reader saw {seen}"


def test_lock_excludes_a_second_holder(tmp_path):
    path = tmp_path / "_refresh.lock"
    with L.StorageLock(path, owner="first", stale_after_s=60):
        with pytest.raises(L.LockHeld) as e:
            L.StorageLock(path, owner="second", stale_after_s=60).acquire()
        assert "first" in str(e.value)
    assert not path.exists()
    with L.StorageLock(path, owner="third"):
        pass


def test_lock_whose_heartbeat_cannot_be_written_is_lost(tmp_path):
    """A storage error must not be swallowed: the holder learns it can no longer vouch for the
    lock (before the fix the heartbeat ignored OSError and the holder ran on while another run
    could take the lock over)."""
    d = tmp_path / "corpus"
    d.mkdir()
    lock = L.StorageLock(d / "_refresh.lock", owner="refresh", stale_after_s=1.0).acquire()
    try:
        lock.check()  # fine while the heartbeat is written
        d.rename(tmp_path / "gone")  # the lock's directory is replaced by a file: every heartbeat write fails
        d.write_text("not a directory")
        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(L.LockLost, match="heartbeat"):
            lock.check()
    finally:
        lock.release()


def test_lock_heartbeat_keeps_it_fresh(tmp_path):
    path = tmp_path / "l.lock"
    lock = L.StorageLock(path, owner="beat", stale_after_s=2).acquire()
    try:
        first = lock.holder()["heartbeat_unix"]
        time.sleep(1.5)
        assert lock.holder()["heartbeat_unix"] > first
        with pytest.raises(L.LockHeld):
            L.StorageLock(path, owner="other", stale_after_s=2).acquire()
    finally:
        lock.release()


_HOLD = """
import sys, time
from core.lineage import StorageLock
StorageLock(sys.argv[1], owner="crasher", stale_after_s=3600).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    path = tmp_path / "l.lock"
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(L.LockHeld):
            L.StorageLock(path, owner="me").acquire()
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    lock = L.StorageLock(path, owner="me").acquire()  # same host, pid gone: stale at once
    assert lock.took_over["owner"] == "crasher"
    lock.release()


def test_lock_with_an_old_heartbeat_is_stale(tmp_path):
    path = tmp_path / "l.lock"
    L.write_json_atomic(path, {"owner": "elsewhere", "token": "t", "host": "another-host", "pid": 1,
                               "heartbeat_unix": time.time() - 100})
    with pytest.raises(L.LockHeld):
        L.StorageLock(path, owner="me", stale_after_s=1000).acquire()
    with L.StorageLock(path, owner="me", stale_after_s=10) as lock:
        assert lock.took_over["owner"] == "elsewhere"


def _contend(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        lock = L.StorageLock(path, owner=f"p{os.getpid()}", stale_after_s=5).acquire()
        results.put("won")
        time.sleep(1.0)
        lock.release()
    except L.LockHeld:
        results.put("held")


def test_racing_contenders_for_a_stale_lock_one_wins(tmp_path):
    path = tmp_path / "l.lock"
    L.write_json_atomic(path, {"owner": "dead", "token": "t", "host": "gone", "pid": 1, "heartbeat_unix": 0})
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes.count("won") == 1, outcomes
