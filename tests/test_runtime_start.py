"""core.runtime starts a local Ray again when Ray's fixed 30 s startup wait runs out (a loaded
machine), and kills what the failed attempt started. No Ray needed: ``ray.init`` is replaced
by a stand-in that starts a real child process (as Ray starts its GCS and raylet) and fails.

    .venv/bin/pytest tests/test_runtime_start.py -q
"""

from __future__ import annotations

import subprocess
import time

import pytest
import ray

from core import runtime

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


def _gone(pid: int) -> bool:
    """Killed: no such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _fake_init(fail_times: int, error: Exception = TIMEOUT):
    calls, started = [], []

    def init(**kw):
        calls.append(kw)
        if len(calls) <= fail_times:
            started.append(subprocess.Popen(["sleep", "60"]))  # a "raylet" of the failed attempt
            raise error

    return init, calls, started


def test_a_local_start_that_times_out_is_tried_again_and_leaves_no_process(monkeypatch):
    init, calls, started = _fake_init(fail_times=2)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    runtime._start_local(address="local", num_cpus=1)
    assert len(calls) == 3 and all(c == {"address": "local", "num_cpus": 1} for c in calls)
    for p in started:  # killed (and reaped) by pid before the next try, long before sleep 60 ends
        p.wait(timeout=10)
        assert _gone(p.pid)


def test_other_errors_and_the_last_timeout_are_raised(monkeypatch):
    init, calls, started = _fake_init(fail_times=5, error=ValueError("bad num_cpus"))
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ValueError, match="bad num_cpus"):
        runtime._start_local(address="local")
    assert len(calls) == 1  # not a startup timeout: no second try
    started[0].kill()
    started[0].wait()
    init, calls, started = _fake_init(fail_times=5)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(Exception, match="timed out during startup"):
        runtime._start_local(address="local")
    assert len(calls) == runtime.LOCAL_START_TRIES
    for p in started[:-1]:
        p.wait(timeout=10)
        assert _gone(p.pid)
    started[-1].kill()
    started[-1].wait()


def test_child_pids_finds_grandchildren():
    p = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while not runtime._child_pids(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchildren = runtime._child_pids(p.pid)
        assert len(grandchildren) == 1 and grandchildren < runtime._child_pids() and p.pid in runtime._child_pids()
    finally:
        runtime._kill_pids(runtime._child_pids(p.pid) | {p.pid})
    p.wait(timeout=10)
    assert all(_gone(pid) for pid in grandchildren | {p.pid})


def test_arrow_uses_the_system_allocator_unless_told_otherwise(monkeypatch):
    """init_ray's allocator choice: the C library's malloc for Arrow (mimalloc kept a finalize
    worker's freed buffers, docs/BENCHMARKS.md); an explicit ARROW_DEFAULT_MEMORY_POOL is kept."""
    import pyarrow as pa

    before = pa.default_memory_pool()
    try:
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
        runtime._use_system_arrow_allocator()
        assert pa.default_memory_pool().backend_name == "system"
        assert runtime.os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system"  # what a local Ray's workers inherit
        pa.set_memory_pool(pa.mimalloc_memory_pool())
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
        runtime._use_system_arrow_allocator()
        assert pa.default_memory_pool().backend_name == "mimalloc"
        assert runtime.os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "mimalloc"
    finally:
        pa.set_memory_pool(before)


def test_worker_setup_drops_only_ray_listing_race():
    """The local Ray's worker hook silences Ray Data's file-listing completion thread dying with
    InterruptedError (a shutdown race, the listing already complete); every other thread error
    still reaches the hook that was there before."""
    import threading

    before, seen = threading.excepthook, []
    try:
        threading.excepthook = lambda args: seen.append((args.thread.name, args.exc_type))
        runtime.worker_setup()

        def run(name: str, exc: type[BaseException]) -> None:
            def boom():
                raise exc()
            t = threading.Thread(target=boom, name=name)
            t.start()
            t.join()

        run("pool-0/completion-signaler", InterruptedError)
        run("pool-0/completion-signaler", ValueError)
        run("other", InterruptedError)
        assert seen == [("pool-0/completion-signaler", ValueError), ("other", InterruptedError)]
    finally:
        threading.excepthook = before
