"""``mm refresh`` state on object storage: the lock, the ``current`` pointer, two refreshes at once.

A real S3 API server (``moto_server`` on 127.0.0.1, tests/s3.py, reached through
``AWS_ENDPOINT_URL`` as MinIO is); it honours ``If-None-Match: *`` and ``If-Match`` with 412, as S3
does. Fast tests: the lock (one creator wins, a live lock is refused with the holder named, a
stale one is taken over by exactly one of racing contenders, a holder whose lock was taken over
learns it), the pointer (a reader polling while it flips sees only whole targets), a missing
bucket and a gs:// lock fail in one line before any work. Slow: two ``mm refresh`` processes
started at once on the same s3:// state: exactly one runs (curates, trains, promotes: the pointer
object names its run), the other exits with code 3 and one line naming the holder.

Run: ``.venv/bin/pytest tests/test_refresh_s3.py`` (fast) and ``-m slow`` for the two refreshes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3 import s3_server  # noqa: E402,F401

from core.locking import LockHeld, LockLost, StorageLock, read_pointer, write_pointer  # noqa: E402
from core.storage import exists, read_json, write_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def test_moto_server_honours_conditional_writes(s3_server):  # noqa: F811
    """The premise of the lock: a second If-None-Match: * PUT of a key gets 412."""
    from botocore.exceptions import ClientError

    bucket = s3_server.bucket("cond")[len("s3://"):]
    c = _client()
    c.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_s3_lock_excludes_a_second_holder_and_is_released(s3_server):  # noqa: F811
    path = f"{s3_server.bucket('lock')}/corpus/_refresh.lock"
    with StorageLock(path, owner="first", stale_after_s=60) as lock:
        assert read_json(path)["token"] == lock.token
        with pytest.raises(LockHeld) as e:
            StorageLock(path, owner="second", stale_after_s=60).acquire()
        assert "first" in str(e.value) and path in str(e.value)
    assert not exists(path)
    with StorageLock(path, owner="third"):
        pass


def test_s3_stale_lock_is_taken_over_by_exactly_one_contender(s3_server):  # noqa: F811
    path = f"{s3_server.bucket('stale')}/_refresh.lock"
    dead = {"owner": "dead", "token": "t", "host": "gone", "pid": 1, "heartbeat_unix": time.time() - 100}
    write_bytes(path, json.dumps(dead).encode())
    with pytest.raises(LockHeld):  # not stale yet by a longer horizon
        StorageLock(path, owner="me", stale_after_s=1000).acquire()
    barrier, results, locks = threading.Barrier(6), [], []

    def contend(i: int) -> None:
        lock = StorageLock(path, owner=f"c{i}", stale_after_s=10)
        barrier.wait()
        try:
            locks.append(lock.acquire())
            results.append("won")
        except LockHeld:
            results.append("held")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(results) == ["held"] * 5 + ["won"], results
        assert locks[0].took_over["owner"] == "dead"
        assert read_json(path)["token"] == locks[0].token
    finally:
        for lock in locks:
            lock.release()


def test_s3_lock_holder_learns_it_was_taken_over(s3_server):  # noqa: F811
    path = f"{s3_server.bucket('lost')}/_refresh.lock"
    lock = StorageLock(path, owner="slow", stale_after_s=0.8).acquire()
    try:
        lock.check()
        other = {"owner": "usurper", "token": "u", "host": "elsewhere", "pid": 7, "heartbeat_unix": time.time()}
        _client().put_object(Bucket=path.split("/")[2], Key="_refresh.lock", Body=json.dumps(other).encode())
        deadline = time.monotonic() + 20
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockLost, match="taken over by usurper"):
            lock.check()
    finally:
        lock.release()
    assert read_json(path)["owner"] == "usurper", "the release never deletes another holder's lock"


def test_s3_pointer_flips_atomically(s3_server):  # noqa: F811
    models = f"{s3_server.bucket('models')}/models"
    a, b = f"{models}/run-a", f"{models}/run-b"
    for run in (a, b):
        write_bytes(f"{run}/manifest.json", b"{}")
    assert read_pointer(f"{models}/current") is None
    write_pointer(f"{models}/current", a)
    assert read_pointer(f"{models}/current") == a
    assert read_json(f"{models}/current.json")["target"] == a  # one small object names the run
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(read_pointer(f"{models}/current"))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(60):
        write_pointer(f"{models}/current", a if i % 2 else b)
    stop.set()
    t.join()
    assert seen <= {a, b}, f"a reader saw {seen}"


def test_ledger_and_discovery_on_s3(s3_server):  # noqa: F811
    """The ledger lives on the store; an empty source prefix (which on S3 does not exist until its
    first object arrives) holds no inputs yet instead of failing the scheduled run."""
    from pipelines.ledger import discover, read_ledger, write_ledger_rows

    bucket = s3_server.bucket("ledger")
    assert discover([f"{bucket}/incoming"], read_ledger(f"{bucket}/corpus")) == {"new": [], "changed": [],
                                                                                 "unchanged": 0}
    rows = [{"uri": f"{bucket}/incoming/a.tar", "kind": "tar", "size": 3, "mtime_ns": 1, "checksum": "c1"}]
    write_ledger_rows(f"{bucket}/corpus", rows, "20260101T0000")
    write_ledger_rows(f"{bucket}/corpus", rows, "20260101T0000")  # idempotent per snapshot
    assert read_ledger(f"{bucket}/corpus").column("uri").to_pylist() == [rows[0]["uri"]]


def _refresh_config(tmp_path: Path, bucket: str, train_steps: int = 2) -> Path:
    from test_refresh import TRAIN

    cfg = {"sources": [f"{bucket}/incoming"], "heldout_sources": [f"{bucket}/heldout/h.tar"],
           "storage": {"corpus_root": f"{bucket}/corpus", "models_root": f"{bucket}/models",
                       "reports_root": f"{bucket}/reports"},
           "curate": {"overrides": ["images.image_px=32"]},
           "train": {"config": str(ROOT / "configs" / "pretrain.yaml"), "overrides": TRAIN, "max_steps": train_steps},
           "gate": {"task": "retrieval", "tolerance": 0.02}}
    path = tmp_path / "refresh.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _refresh_cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.refresh", "--config", str(path)]


def test_missing_bucket_and_gs_lock_fail_in_one_line_before_work(s3_server, tmp_path):  # noqa: F811
    from jobs import refresh as R

    bucket = s3_server.bucket("exists")
    write_bytes(f"{bucket}/heldout/h.tar", b"")  # heldout_sources must list (an empty tar is fine here)
    path = _refresh_config(tmp_path, bucket)
    cfg = json.loads(path.read_text())
    cfg["storage"]["corpus_root"] = "s3://no-such-bucket-mm/corpus"
    path.write_text(json.dumps(cfg))
    done = subprocess.run(_refresh_cmd(path), cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-bucket-mm" in lines[0] and "does not exist" in lines[0], lines
    with pytest.raises(ValueError, match="gs:// locks are not supported yet"):
        StorageLock("gs://b/corpus/_refresh.lock", owner="x")
    assert R.EXIT_LOCKED == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_refreshes_at_once_on_s3_one_runs(s3_server, tmp_path):  # noqa: F811
    from pipelines.demo_corpus import generate_demo_corpus

    bucket = s3_server.bucket("twice")
    fs, root = pafs.FileSystem.from_uri(bucket)
    new = generate_demo_corpus(tmp_path / "new", n_images=32, n_videos=2, seed=5)
    held = generate_demo_corpus(tmp_path / "held", n_images=16, n_videos=2, seed=99)
    pafs.copy_files(new["image_sources"][0], f"{root}/incoming/shard-a.tar", destination_filesystem=fs)
    pafs.copy_files(held["image_sources"][0], f"{root}/heldout/h.tar", destination_filesystem=fs)
    path = _refresh_config(tmp_path, bucket)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    procs = [subprocess.Popen(_refresh_cmd(path), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=800) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], [(p.returncode, o[1][-3000:]) for p, o in zip(procs, outs)]
    winner, loser = (outs[0], outs[1]) if procs[0].returncode == 0 else (outs[1], outs[0])
    refused = [line for line in loser[1].splitlines() if line.startswith("refresh:")]
    assert len(refused) == 1 and "another run holds the lock" in refused[0] and "_refresh.lock" in refused[0], \
        loser[1][-2000:]
    result = json.loads(winner[0].strip().splitlines()[-1])
    assert result["decision"] == "promoted" and result["report"].startswith(bucket)
    report = read_json(result["report"])
    run = report["steps"]["train"]["run_dir"]
    assert run.startswith(f"{bucket}/models/run-")
    assert read_json(f"{bucket}/models/current.json")["target"] == run  # the pointer object names the new run
    assert read_pointer(f"{bucket}/models/current") == run
    assert not exists(f"{bucket}/corpus/_refresh.lock") and not exists(f"{bucket}/corpus/_refresh_state.json")
    snap = report["snapshot"]
    assert exists(f"{snap}/data") and read_json(f"{snap}/stats.json")["invariant_ok"]
    assert exists(f"{bucket}/corpus/_index/bands/{snap.rsplit('/', 1)[1]}.parquet")
    assert list(cwd.iterdir()) == []  # nothing written where the user stood
