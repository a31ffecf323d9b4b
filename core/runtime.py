"""Ray bootstrap shared by every job: connect to a cluster, or start a local Ray sized to the machine.

Rules (../shared/RAY_NOTES.md): with ``--address`` or ``RAY_ADDRESS`` we join that cluster
unchanged; otherwise a local Ray starts in-process, bound to 127.0.0.1, without usage stats,
without the dashboard unless asked, with an explicit auth mode (token auth on a throwaway local
cluster only gets in the way of the CLI), and with Ray Data's no-progress timeout bounded so a
stuck plan fails with a message instead of hanging for 30 minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

log = logging.getLogger(__name__)

DEFAULT_NO_PROGRESS_TIMEOUT_S = 600

# What the user sees (set once by the CLI, jobs/cli.py, before Ray starts): progress None = auto
# (on when stderr is a terminal or the command runs as a `ray job submit` entrypoint, whose log
# is the user's terminal; off otherwise, e.g. in tests); verbose shows Ray Data's INFO lines.
_OUTPUT = {"progress": None, "verbose": False}


def set_output(*, progress: bool | None = None, verbose: bool = False) -> None:
    """Choose progress display and verbosity for the Ray this process starts or joins."""
    _OUTPUT.update(progress=progress, verbose=verbose)


def progress_enabled() -> bool:
    if _OUTPUT["progress"] is not None:
        return bool(_OUTPUT["progress"])
    return sys.stderr.isatty() or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


class _QuietRayData(logging.Filter):
    """On Ray Data's console handler: warnings and errors pass, except the notice that its
    progress bars are off (ours replace them); its per-dataset INFO lines ("Starting execution of
    Dataset ...", "Execution plan ...", "Data sink Parquet finished") pass only with --verbose.
    Its file log under the Ray session keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _OUTPUT["verbose"]:
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith("Progress bars")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
             no_progress_timeout_s: float = DEFAULT_NO_PROGRESS_TIMEOUT_S) -> dict:
    """Start or join Ray; return the cluster's resources (``{"CPU": 2.0, ...}``)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # ours instead: core/progress.py
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", str(int(no_progress_timeout_s)))
    _use_system_arrow_allocator()
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray turns _node_ip_address="127.0.0.1" into the host's routable address
        # (services.resolve_ip_for_localhost) and then GCS, raylet, workers and agents listen on
        # all interfaces (seen: "::", "0.0.0.0", 192.0.2.x). Its single-machine mode keeps every
        # server on loopback; the env var carries it to the processes Ray starts.
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        _say_if_a_cluster_runs_here()
        _start_local(
            address="local",  # never the `ray start` cluster Ray would otherwise pick up on its own
            runtime_env={"worker_process_setup_hook": "core.runtime.worker_setup"},
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    _configure_data_context(no_progress_timeout_s)
    _size_parquet_footer_readers()
    return ray.cluster_resources()


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` for the local Ray (stdlib only: every worker runs it).

    Ray Data 2.60 lists files (every ``read_parquet``) on a work-stealing thread pool whose
    completion thread can lose a race with the pool's shutdown: it then dies with a bare
    ``InterruptedError`` after the listing is complete and correct, and the worker prints the
    traceback, which Ray forwards to the user's terminal (seen once in a fresh-clone test run of
    tests/test_progress.py: 9 lines of "(ListFiles pid=...) Exception in thread
    pool-0/completion-signaler"). That one exception from that thread is dropped; any other
    goes to Python's default hook."""
    import threading

    default = threading.excepthook

    def hook(args) -> None:
        name = getattr(args.thread, "name", "") or ""
        if args.exc_type is InterruptedError and name.endswith("completion-signaler"):
            return
        default(args)

    threading.excepthook = hook


def _use_system_arrow_allocator() -> None:
    """Arrow buffers from the C library's malloc, in this process and the local Ray it starts.

    pyarrow's default pool (mimalloc) keeps freed memory cached in the process: a curate worker
    that streamed the 20k-input work rows back in (finalize) stayed at ~900 MB PSS for 127 MB of
    Arrow data, and that worker was the part of peak memory that grew with the corpus. With
    ``ARROW_DEFAULT_MEMORY_POOL=system`` the same read held ~585 MB and the run's peak PSS fell
    from 2,950 to 2,560-2,620 MB (bench/curate_images.py, docs/BENCHMARKS.md). Workers inherit the
    variable from the local raylet; a cluster's nodes get it from their ``ray start`` line
    (cluster.yaml). An explicit value is kept."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system":
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())  # pyarrow may be imported (and its pool chosen) already


LOCAL_START_TRIES = 3


def _start_local(**kw) -> None:
    """``ray.init`` of a local Ray, tried again when it "timed out during startup".

    Ray waits a fixed 30 s for its raylet to register with the GCS (``raylet_start_wait_time_s``
    in ray/_private/node.py, not configurable); on a loaded machine that start takes longer and
    the command failed before any work (seen: the pretrain driver-kill test at load ~30). The
    processes the failed attempt started (GCS, raylet, agents: this process's new children) are
    killed by pid before the next try, so no half-started Ray stays behind."""
    import ray

    for attempt in range(1, LOCAL_START_TRIES + 1):
        before = _child_pids()
        try:
            ray.init(**kw)
            return
        except Exception as e:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(e) or attempt == LOCAL_START_TRIES:
                raise
            log.warning("local Ray did not start within Ray's 30 s (a loaded machine?); starting it again (%d/%d)",
                        attempt + 1, LOCAL_START_TRIES)
            with contextlib.suppress(Exception):
                ray.shutdown()
            _kill_pids(_child_pids() - before)


def _child_pids(root: int | None = None) -> set[int]:
    """Every descendant of ``root`` (default: this process), from /proc (empty elsewhere)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root or os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _kill_pids(pids: set[int]) -> None:
    import signal
    import time

    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:  # reap our direct children; others are reaped by theirs or init
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
    time.sleep(0.1)


def _say_if_a_cluster_runs_here() -> None:
    """One line when a ``ray start`` cluster runs on this machine: this command starts its own
    Ray anyway (local means local), and says how to use that one instead."""
    try:
        from ray._private.utils import read_ray_address

        existing = read_ray_address()
    except Exception:  # no such file, unreadable: nothing to say
        existing = None
    if existing:
        log.warning("a Ray cluster was started on this machine (%s); this command starts its own local Ray. "
                    "To run on that cluster instead, pass --address auto (or set RAY_ADDRESS)", existing)


def _size_parquet_footer_readers() -> None:
    """At most one Parquet footer-reader actor per CPU the cluster has now.

    Ray Data 2.60 reads Parquet through Datasource V2: every ``read_parquet`` starts
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` (default 32) ``FooterReader`` actors, each scheduled
    with 1 CPU, even for a single file. On an autoscaling cluster that is a demand for 32 CPUs
    just to read footers: the autoscaler adds nodes for it and, once ``cpu_curate`` is at its
    ``max_workers``, adds ``gpu_train`` nodes for their CPUs (seen in tests/test_autoscaling.py:
    "{'CPU': 1.0}: 31+ pending tasks/actors" while reading 1 file). The variable is read when the
    plan is built, in the driver; an explicit value is kept.
    """
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(min(32, max(1, cpus))))


def _configure_data_context(no_progress_timeout_s: float) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # one line per long pass instead (core/progress.py)
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data's own config, set when it is imported
        console = isinstance(handler, logging.StreamHandler)  # not its SessionFileHandler
        if console and not any(isinstance(f, _QuietRayData) for f in handler.filters):
            handler.addFilter(_QuietRayData())
    if hasattr(ctx, "execution_no_progress_timeout_s"):
        ctx.execution_no_progress_timeout_s = no_progress_timeout_s


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def worker_cpus(num_workers: int, reserve_cpus: float = 0.5) -> float:
    """CPUs per training worker so ``num_workers`` fit beside Ray Data's read tasks.

    On a 2-CPU machine, 2 workers x 1 CPU plus a map stage hangs (RAY_NOTES.md): give the
    workers what is left after ``reserve_cpus`` for the data stages, never more than 1 each.
    """
    total = cluster_cpus()
    per = max(0.1, (total - reserve_cpus) / max(1, num_workers))
    return round(min(1.0, per), 2)
