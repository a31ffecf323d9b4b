"""One session-scoped local Ray for the whole suite (settings from ../shared/RAY_NOTES.md).

Tests that need Ray take the ``ray_session`` fixture; everything else runs without it. A hang
fails fast: Ray Data's no-progress timeout is 120 s here, not the default 1800 s.
"""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # what core.runtime.init_ray gives a local Ray
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from core.runtime import init_ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING")
        init_ray(no_progress_timeout_s=120)  # applies the DataContext settings to this session
    yield ray
    ray.shutdown()


# A line Ray forwards from a worker process of the session ("(Name pid=N) ...", maybe coloured).
_RAY_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:.* pid=\d+|raylet|autoscaler)")


@pytest.fixture
def cli_errors(capsys):
    """Reads the stderr lines a command wrote, without the log lines Ray forwards from the shared
    session's workers: those land in whichever test is running when they arrive (an actor of an
    earlier test logging as it is cleaned up)."""

    def read() -> list[str]:
        return [line for line in capsys.readouterr().err.strip().splitlines() if not _RAY_FORWARDED.match(line)]

    return read
