"""What a user sees from `mm curate`: a short default log, and live progress when asked.

Runs the real command in a subprocess (its own local Ray, stderr not a terminal, as in a job
log), on the demo corpus generator's smallest tar shards: the default log is a handful of lines
(the summary with per-stage seconds and the JSON result, no Ray Data internals); with
``--progress`` the process pass reports its inputs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.progress import format_line

REPO = Path(__file__).resolve().parent.parent


def test_format_line_rate_eta_and_final():
    line = format_line("process", 1500, 25, 10.0, 100, "inputs")
    assert line == "process: 1,500 inputs · 150/s · 10s · 25% · ETA 30s"
    assert format_line("process", 10, 0, 2.0, None, "inputs") == "process: 10 inputs · 5/s · 2s"
    assert format_line("process", 10, 50, 2.0, 100, "inputs", final=True).endswith("· done")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipelines.demo_corpus import generate_demo_corpus

    out = tmp_path_factory.mktemp("progress") / "raw"
    return generate_demo_corpus(out, n_images=40, n_videos=2, image_px=32)["image_sources"][:2]


def _start(shards, out, *flags) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.curate", *shards, "--out", str(out), *flags]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(proc: subprocess.Popen) -> list[str]:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return (stdout + stderr).strip().splitlines()


def test_default_log_is_short_and_progress_appears_when_asked(shards, tmp_path):
    # Both commands at once, each with its own local Ray: most of each one's wall time is its
    # interpreter's imports and Ray's start-up and shutdown, which overlap (it took two in a row).
    plain, progress = _start(shards, tmp_path / "a"), _start(shards, tmp_path / "b", "--progress")
    try:
        lines, progress_lines = _lines(plain), _lines(progress)
    finally:
        for proc in (plain, progress):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(lines) <= 4, "\n".join(lines)
    assert not any("streaming_executor" in ln or "Dataset dataset_" in ln or "Progress bars" in ln
                   for ln in lines), "\n".join(lines)
    summary = [ln for ln in lines if "curated" in ln]
    assert summary and "process" in summary[0] and "dedup" in summary[0], "\n".join(lines)
    assert any(ln.startswith("{") and '"invariant_ok": true' in ln for ln in lines), "\n".join(lines)
    assert not any("mm.progress" in ln for ln in lines)

    lines = progress_lines
    progress = [ln for ln in lines if "mm.progress" in ln and "process:" in ln]
    assert progress and progress[-1].endswith("· done"), "\n".join(lines)
