"""Live progress of a long pass that runs in Ray tasks: rows, rows/s, elapsed and an ETA.

    with Progress("process", total_bytes=sum(f.size for f in files)) as p:
        ds.map_batches(fn, fn_kwargs={"progress": p.handle}).write_parquet(...)
    # in fn, once per batch:  report(progress, rows=batch.num_rows, nbytes=input_bytes)

Why our own: Ray Data's bars are per dataset and per operator; a curate run is a dozen datasets,
most of them tiny, and in a non-terminal log (``ray job submit``) Ray Data prints a block of
"0/?" lines per dataset. A user wants one line per long pass. Workers tell a zero-CPU counter
actor what they finished (fire and forget, one call per batch); a driver thread reads it every
``interval`` seconds and rewrites one line on a terminal, or logs a line in a job log. The ETA
comes from input bytes consumed vs the pass's input bytes, when those are known (tar shards);
otherwise it is left out rather than guessed.

Enabled by ``core.runtime.progress_enabled()`` (``--progress/--no-progress``; default: on in a
terminal and in ``ray job submit`` logs, off in tests). Disabled, ``handle`` is None and
``report`` does nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger("mm.progress")


def _counter_class():
    import ray

    @ray.remote(num_cpus=0)
    class _Counter:
        def __init__(self) -> None:
            self.rows = 0
            self.bytes = 0

        def add(self, rows: int, nbytes: int) -> None:
            self.rows += rows
            self.bytes += nbytes

        def read(self) -> tuple[int, int]:
            return self.rows, self.bytes

    return _Counter


def report(handle: Any, rows: int, nbytes: int = 0) -> None:
    """From a task: ``rows`` more done (and ``nbytes`` of input consumed). No-op without a handle."""
    if handle is not None:
        handle.add.remote(int(rows), int(nbytes))


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_line(name: str, rows: int, nbytes: int, elapsed: float, total_bytes: int | None, unit: str,
                final: bool = False) -> str:
    rate = rows / elapsed if elapsed > 0 else 0.0
    line = f"{name}: {rows:,} {unit} · {rate:,.0f}/s · {_duration(elapsed)}"
    if final:
        return line + " · done"
    if total_bytes and nbytes:
        frac = min(1.0, nbytes / total_bytes)
        line += f" · {frac:.0%}"
        if frac < 1.0:
            line += f" · ETA {_duration(elapsed * (1 - frac) / frac)}"
    return line


class Progress:
    """Context manager around one pass; see the module docstring."""

    def __init__(self, name: str, *, total_bytes: int | None = None, unit: str = "rows",
                 enabled: bool | None = None, interval: float | None = None) -> None:
        from core.runtime import progress_enabled

        self.name, self.total_bytes, self.unit = name, total_bytes, unit
        self.enabled = progress_enabled() if enabled is None else enabled
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 15.0)
        self.handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> Progress:
        self._t0 = time.monotonic()
        if self.enabled:
            self.handle = _counter_class().remote()
            self._thread = threading.Thread(target=self._loop, name=f"progress-{self.name}", daemon=True)
            self._thread.start()
        return self

    def _read(self) -> tuple[int, int]:
        import ray

        return ray.get(self.handle.read.remote(), timeout=30)

    def _show(self, final: bool = False) -> None:
        rows, nbytes = self._read()
        line = format_line(self.name, rows, nbytes, time.monotonic() - self._t0, self.total_bytes, self.unit, final)
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log.info(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._show()
            except Exception:  # a slow counter must never break the pass it reports on
                pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        try:
            if exc_type is None:
                self._show(final=True)
            elif self.tty:
                sys.stderr.write("\n")
        finally:
            import ray

            ray.kill(self.handle)
            self.handle = None


__all__ = ["Progress", "report", "format_line"]
