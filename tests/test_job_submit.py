"""A stage runs unchanged as a Ray job: ``ray job submit ... -- python -m jobs.curate`` on a real cluster.

The test starts its own cluster with ``ray start --head`` on 127.0.0.1 (free ports, its own
``--temp-dir``, ``RAY_AUTH_MODE=disabled`` set explicitly: ../shared/RAY_NOTES.md), submits the
curate job with the ``ray`` CLI exactly as deploy/README.md shows, waits for ``SUCCEEDED`` and checks
the corpus the job wrote. It stops only the cluster it started: the processes whose command line
names its temp dir, and their children (never ``ray stop``, which would stop every Ray on the
machine). ``LocalCluster`` is shared with tests/test_autoscaling.py. The same cluster then shows
that a command without an address starts its own Ray beside it (local means local).

Run: ``.venv/bin/pytest -m cluster tests/test_job_submit.py`` (CI runs the ``cluster`` marker).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A throwaway ``ray start --head`` cluster on 127.0.0.1 that only stops what it started."""

    def __init__(self, *, num_cpus: int = 2, autoscaling_config: dict | None = None,
                 object_store_bytes: int = 200 * 2**20, env: dict | None = None, resources: dict | None = None):
        # Short temp dir: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="mmray-", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.num_cpus, self.autoscaling_config = num_cpus, autoscaling_config
        self.object_store_bytes = object_store_bytes
        self.resources = resources
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # The job's `python` must be this venv's; auth off for a throwaway cluster (set explicitly).
        self.env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
                         "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                         "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120", **(env or {})})

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> LocalCluster:
        cmd = [RAY, "start", "--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--num-cpus", str(self.num_cpus), "--object-store-memory", str(self.object_store_bytes),
               "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        if self.autoscaling_config is not None:
            path = Path(self.temp_dir) / "autoscaling.json"
            path.write_text(json.dumps(self.autoscaling_config, indent=1))
            cmd += ["--autoscaling-config", str(path)]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return self

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def wait_job(self, submission_id: str, timeout_s: float) -> str:
        from ray.job_submission import JobStatus

        client, t0 = self.client(), time.time()
        while time.time() - t0 < timeout_s:
            status = client.get_job_status(submission_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status.value
            time.sleep(1.0)
        client.stop_job(submission_id)
        return "TIMEOUT"

    def logs(self, submission_id: str) -> str:
        return self.client().get_job_logs(submission_id)

    def processes(self) -> list:
        import psutil

        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in arg for arg in (p.info["cmdline"] or [])):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def stop(self, grace_s: float = 4.0) -> None:
        """Terminate this cluster's processes (and their worker children), kill what is left after
        ``grace_s``, then remove its temp dir. A throwaway cluster needs no graceful exit: its GCS
        and log monitor outlive SIGTERM for 20 s and more (seen), which cost every test 15 s here."""
        import psutil

        procs = set(self.processes())
        for p in list(procs):
            try:
                procs.update(p.children(recursive=True))
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def submit(cluster: LocalCluster, submission_id: str, entrypoint: list[str],
           options: list[str] = (), working_dir: str = ".") -> subprocess.CompletedProcess:
    """``ray job submit`` with the CLI, from the repository root, as a user would type it."""
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", working_dir,
           "--submission-id", submission_id, "--no-wait", *options, "--", *entrypoint]
    return subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster():
    """One cluster for this module's tests (each ``ray start`` costs 5-40 s on the shared 2 cores)."""
    c = LocalCluster(num_cpus=2).start()
    try:
        yield c
    finally:
        c.stop()
        assert not c.processes(), "the test's cluster left processes behind"


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_curate_runs_unchanged_as_a_ray_job(cluster, tmp_path):
    from pipelines.demo_corpus import generate_demo_corpus

    demo = generate_demo_corpus(tmp_path / "demo", n_images=30, n_videos=2, seed=3)
    shard = demo["image_sources"][0]
    out = tmp_path / "corpus"
    t0 = time.time()
    sub = submit(cluster, "test-curate-1", ["python", "-m", "jobs.curate", shard, "--out", str(out)])
    assert sub.returncode == 0, sub.stdout + sub.stderr
    status = cluster.wait_job("test-curate-1", timeout_s=240)
    logs = cluster.logs("test-curate-1")
    assert status == "SUCCEEDED", logs[-3000:]
    seconds = time.time() - t0

    stats = json.loads((out / "stats.json").read_text())
    data = pq.read_table(out / "data")
    rejects = pq.read_table(out / "rejects")
    assert stats["inputs"] == demo["counts"]["image_tar_samples"]
    assert stats["invariant_ok"] and stats["kept"] == data.num_rows > 0
    assert stats["inputs"] == data.num_rows + rejects.num_rows
    assert {"duplicate", "near_duplicate"} <= set(rejects.column("reason").to_pylist())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["uri"] for i in manifest["inputs"]] == [shard]
    assert (out / "tokenizer").is_dir()
    # The job ran on the cluster, as a Ray job: the driver's summary line is in the job logs.
    summary = json.loads(next(line for line in logs.splitlines() if line.startswith('{"inputs"')))
    assert summary["kept"] == stats["kept"]
    # A reused submission id is refused: what makes `--submission-id refresh-<date>` idempotent.
    again = submit(cluster, "test-curate-1", ["python", "-m", "jobs.curate", shard, "--out", str(out)])
    assert again.returncode != 0
    print(json.dumps({"submit_to_succeeded_s": round(seconds, 1)}))


# -- local means local (was tests/test_local_ray.py; it shares this module's cluster) -------------
PROBE = ("from core.runtime import init_ray; import ray; r = init_ray(num_cpus=1); "
         "print('CPU', r.get('CPU'), 'GCS', ray.get_runtime_context().gcs_address)")


@pytest.mark.cluster
def test_a_command_starts_its_own_ray_beside_a_ray_start_cluster(cluster):
    """Local means local: without ``--address``/``RAY_ADDRESS`` a command starts its own Ray even when a
    ``ray start`` cluster runs on the machine, and says how to join that one instead.

    Before the fix, ``ray.init(num_cpus=...)`` found the cluster's address file and failed with "When
    connecting to an existing cluster, num_cpus and num_gpus must not be provided". The cluster is
    this module's ``LocalCluster`` (``ray start --temp-dir T``, which writes ``T/ray_current_cluster``,
    2 CPUs: the probe asks for 1); the probe runs with ``RAY_TMPDIR=D`` and ``D/ray/ray_current_cluster``
    linked to that file, which is exactly where a plain ``ray.init`` looks for a ``ray start`` cluster
    (``$RAY_TMPDIR/ray``, /tmp/ray by default), so nothing else on the machine sees it.
    """
    probe_tmp = tempfile.mkdtemp(prefix="mmprobe-", dir="/tmp")
    try:
        os.makedirs(os.path.join(probe_tmp, "ray"))
        os.symlink(os.path.join(cluster.temp_dir, "ray_current_cluster"),
                   os.path.join(probe_tmp, "ray", "ray_current_cluster"))
        env = {**cluster.env, "RAY_TMPDIR": probe_tmp}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "CPU 1.0" in out.stdout
        gcs = out.stdout.rsplit("GCS", 1)[1].strip()
        assert gcs != cluster.gcs_address  # its own Ray, not the cluster
        port = cluster.gcs_address.rsplit(":", 1)[1]  # the address file names the node IP, not 127.0.0.1
        assert "pass --address auto" in out.stderr and f":{port})" in out.stderr
    finally:
        shutil.rmtree(probe_tmp, ignore_errors=True)
