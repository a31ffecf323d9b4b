"""Autoscaling on one machine: cluster.yaml's node types under Ray's ``fake_multinode`` provider.

``fake_config()`` derives the config from cluster.yaml itself (the same head, ``cpu_curate`` and
``gpu_train`` types with their custom resources and labels, scaled to 1 CPU per node, no cloud
fields, a short idle timeout) and the test starts it with
``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``. The head advertises no CPU, as in
cluster.yaml, so the curation job asks for more CPUs than the head has. It is submitted as a
curation job is meant to be on that cluster,
``ray job submit --entrypoint-resources '{"curation": 1}' -- python -m jobs.curate ...``: its
driver needs a ``curation`` slot, which only ``cpu_curate`` nodes have, and its Ray Data tasks
need CPUs, which only workers have. So a ``cpu_curate`` worker must appear (and no ``gpu_train``
node), the job must succeed with its tasks on that worker, and once idle the worker must go away.
Both are asserted through ``ray.nodes()``. Stops only its own cluster (tests/test_job_submit.py).

Why the driver's resource and not Ray Data's demand: Ray Data 2.60 submits no task while the
cluster has no free CPU (it warns "Cluster resources are not enough to run any task ... unless the
cluster scales up") and its rate-based autoscaler only scales from observed throughput, so a plan
alone never wakes an idle autoscaling cluster from zero workers (seen here).

Run: ``.venv/bin/pytest -m cluster tests/test_autoscaling.py`` (CI runs the ``cluster`` marker).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from test_job_submit import LocalCluster, submit

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MIN = 0.1  # 6 s: scale-down within the test's time budget
WORKER_OBJECT_STORE_BYTES = 100 * 2**20


def fake_config(gcs_address: str, cluster_yaml: Path = ROOT / "cluster.yaml", max_cpu_workers: int = 2) -> dict:
    """cluster.yaml with the ``fake_multinode`` provider: every node a local raylet. Fake workers
    join ``gcs_address`` (without it they would try port 6379, where another Ray may listen)."""
    real = yaml.safe_load(cluster_yaml.read_text())
    cfg = copy.deepcopy(real)
    cfg["provider"] = {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                       "disable_node_updaters": True, "disable_launch_config_check": True}
    cfg["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    cfg["docker"], cfg["auth"], cfg["file_mounts"] = {}, {}, {}
    for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
              "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter"):
        cfg[k] = []
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "ray.head.default", "fake_multinode names its head ray.head.default"
    for name, t in types.items():
        t["node_config"] = {}
        t.pop("docker", None)
        if name == cfg["head_node_type"]:
            continue
        # Same resource *kinds* as the real type (custom resources included), 1 unit of each.
        t["resources"] = {k: 1 for k in t["resources"]} | {"object_store_memory": WORKER_OBJECT_STORE_BYTES}
    types["cpu_curate"]["max_workers"] = max_cpu_workers
    types["gpu_train"]["max_workers"] = 1
    cfg["max_workers"] = max_cpu_workers + 1
    return cfg


def test_fake_config_keeps_the_node_types_and_validates():
    from ray.autoscaler._private.util import validate_config

    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = fake_config("127.0.0.1:6399")
    # prepare_config would merge fake_multinode's defaults file, which the wheel lacks: the config
    # is complete on its own, so it goes to the validator as it is.
    validate_config(copy.deepcopy(cfg))
    assert set(cfg["available_node_types"]) == set(real["available_node_types"])
    for name, t in cfg["available_node_types"].items():
        assert set(t["resources"]) - {"object_store_memory"} == set(real["available_node_types"][name]["resources"])
        assert t.get("labels") == real["available_node_types"][name].get("labels")


def _nodes(address: str) -> list[dict]:
    """Alive nodes as (type, resources), read through ray.nodes() from a short-lived driver."""
    import subprocess
    import sys

    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False);"
            "print('NODES=' + json.dumps([{'id': n['NodeID'], 'res': n['Resources'], 'labels': n.get('Labels', {})}"
            " for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    # Ray may print autoscaler events to the driver's stdout too: take the marked line.
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("NODES="))[6:])


def _kind(node: dict) -> str:
    res = node["res"]
    if "node:__internal_head__" in res:
        return "head"
    return "gpu_train" if "GPU" in res else "cpu_curate" if "curation" in res else "?"


# The job's working_dir is `local://` (the repository, in place), not an uploaded package. Every
# fake_multinode node shares this machine's session dir, so each node's runtime-env agent unpacks
# the uploaded package into the *same* runtime_resources/working_dir_files/_ray_pkg_* directory,
# and it unpacks with overwrite: it deletes that directory and extracts it again (the job's
# runtime_env_setup log: "Removing .../_ray_pkg_..." once per node that joins). The driver's cwd
# is that directory, so from then on getcwd() fails with ENOENT, and the first `import torch`
# (transformers, when the tokenizer is built) aborts: oneMKL's loader in libtorch_cpu.so calls
# getcwd() and reports its failure as "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"
# (`cd $(mktemp -d) && rmdir $PWD && python -c 'import torch'` prints the same). On a real
# cluster every node has its own disk and unpacks once; cluster.yaml puts the repository on
# every node (file_mounts), which is what `local://` says. tests/test_job_submit.py covers the
# uploaded `--working-dir .`.
@pytest.mark.cluster
@pytest.mark.slow  # ~1.5 min: `pytest -m slow tests/test_autoscaling.py`
@pytest.mark.timeout(600)  # generous for loaded CI runners
def test_curation_job_scales_cpu_workers_up_then_down(tmp_path):
    from pipelines.demo_corpus import generate_demo_corpus

    demo = generate_demo_corpus(tmp_path / "demo", n_images=24, n_videos=2, seed=5)
    head_cpus = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["ray.head.default"][
        "resources"]["CPU"]
    cluster = LocalCluster(num_cpus=head_cpus, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    # Two CPU workers at most. Ray Data's Parquet reader used to ask for 32 CPUs of footer-reader
    # actors per read_parquet, which outgrew them and brought up gpu_train for its CPUs (seen);
    # core/runtime.py now sizes that pool to the cluster's CPUs. Curation tasks ask only for CPUs,
    # so a curation demand larger than every cpu_curate node can still spill onto gpu_train.
    cluster.autoscaling_config = fake_config(cluster.gcs_address, max_cpu_workers=2)
    cluster.start()
    try:
        assert [_kind(n) for n in _nodes(cluster.gcs_address)] == ["head"]
        t0 = time.time()
        out = tmp_path / "corpus"
        # local://: see the comment above the test (an uploaded package is deleted under the driver).
        # node_labels: every Ray Data task and actor of the job carries {mm.io/role: curation}, the
        # label only cpu_curate nodes have, so none can land on (or bring up) a gpu_train node.
        sub = submit(cluster, "autoscale-curate", ["python", "-m", "jobs.curate", demo["image_sources"][0],
                                                   "--out", str(out),
                                                   "--set", "execution.node_labels={mm.io/role: curation}"],
                     ["--entrypoint-resources", json.dumps({"curation": 1})], working_dir=f"local://{ROOT}")
        assert sub.returncode == 0, sub.stdout + sub.stderr
        seen: set[str] = set()
        peak = 0
        from ray.job_submission import JobStatus

        client = cluster.client()
        while time.time() - t0 < 420:
            kinds = [_kind(n) for n in _nodes(cluster.gcs_address)]
            if set(kinds) - seen:
                print(f"{time.time() - t0:6.1f} s: nodes {kinds}", flush=True)
            seen.update(kinds)
            peak = max(peak, kinds.count("cpu_curate"))
            if client.get_job_status("autoscale-curate") in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                              JobStatus.STOPPED):
                break
            time.sleep(2)
        scaled_up_s = time.time() - t0
        status = cluster.wait_job("autoscale-curate", timeout_s=30)
        assert status == "SUCCEEDED", cluster.logs("autoscale-curate")[-3000:]
        assert json.loads((out / "stats.json").read_text())["kept"] > 0
        assert peak >= 1, f"no cpu_curate worker appeared (saw {seen})"
        assert "gpu_train" not in seen, "curation must never bring up a GPU node"

        t1 = time.time()
        while time.time() - t1 < 120:
            kinds = [_kind(n) for n in _nodes(cluster.gcs_address)]
            if kinds == ["head"]:
                break
            time.sleep(2)
        assert kinds == ["head"], f"idle workers were not removed: {kinds}"
        print(json.dumps({"peak_cpu_workers": peak, "job_s": round(scaled_up_s, 1),
                          "scale_down_s": round(time.time() - t1, 1)}))
    finally:
        cluster.stop()
    assert not cluster.processes()


def _wait_for_head_only(address: str, timeout_s: float = 120) -> tuple[list[str], float]:
    t0 = time.time()
    while True:
        kinds = [_kind(n) for n in _nodes(address)]
        if kinds == ["head"] or time.time() - t0 > timeout_s:
            return kinds, time.time() - t0
        time.sleep(2)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_stage_wakes_a_cpu_curate_node_and_lets_it_go(tmp_path):
    """``mm pipeline`` with ``mode: jobs`` against the fake_multinode cluster, cluster.yaml's node
    types with ``cpu_curate`` at 0 workers: the curate stage is submitted with the pipeline's
    entrypoint resources (``jobs.entrypoint_resources``' default ``{curate: {curation: 1}}``, no
    test-side submit), which only a ``cpu_curate`` node has, so the autoscaler launches one; the
    stage finishes there, the pipeline stamps its output, and the idle node is removed after
    ``idle_timeout_minutes`` (6 s here)."""
    import subprocess
    import sys

    from ray.job_submission import JobStatus

    from pipelines.demo_corpus import generate_demo_corpus

    demo = generate_demo_corpus(tmp_path / "demo", n_images=24, n_videos=2, seed=5)
    head_cpus = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["ray.head.default"][
        "resources"]["CPU"]
    cluster = LocalCluster(num_cpus=head_cpus, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    # One cpu_curate worker at most: on 2 cores a second raylet only adds load.
    cluster.autoscaling_config = fake_config(cluster.gcs_address, max_cpu_workers=1)
    pipeline_yaml = tmp_path / "pipeline.yaml"
    pipeline_yaml.write_text(yaml.safe_dump({
        "out_root": str(tmp_path / "pipe"), "mode": "jobs", "stages": ["curate"],
        # local://: the repository in place, as on cluster.yaml's nodes; an uploaded package is
        # unpacked again under the running driver by every fake node (see above the first test).
        "jobs": {"address": cluster.dashboard_url, "working_dir": f"local://{ROOT}", "poll_interval_s": 1.0,
                 "timeout_s": 420},
        "curate": {"sources": [demo["image_sources"][0]], "modality": "image",
                   # every Ray Data task on a node labelled for curation: never a gpu_train node
                   "overrides": ["execution.node_labels={mm.io/role: curation}"]}}))
    cluster.start()
    try:
        assert [_kind(n) for n in _nodes(cluster.gcs_address)] == ["head"]
        t0 = time.time()
        log_file = tmp_path / "pipeline.log"  # a file, not a pipe nobody reads while polling
        with log_file.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(pipeline_yaml)],
                                    cwd=ROOT, env={**cluster.env, "PYTHONPATH": str(ROOT)}, stdout=log,
                                    stderr=subprocess.STDOUT)
        seen: set[str] = set()
        curate_nodes: set[str] = set()
        peak = 0
        while proc.poll() is None and time.time() - t0 < 480:
            nodes = _nodes(cluster.gcs_address)
            kinds = [_kind(n) for n in nodes]
            if set(kinds) - seen:
                print(f"{time.time() - t0:6.1f} s: nodes {kinds}", flush=True)
            seen.update(kinds)
            curate_nodes.update(n["id"] for n in nodes if _kind(n) == "cpu_curate")
            peak = max(peak, kinds.count("cpu_curate"))
            time.sleep(2)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        stage_s = time.time() - t0
        assert proc.returncode == 0, log_file.read_text()[-4000:]
        summary = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())["stages"]["curate"]
        assert summary["action"] == "fresh" and summary["job_id"], summary  # it ran, as a Ray job
        info = cluster.client().get_job_info(summary["job_id"])
        assert info.status == JobStatus.SUCCEEDED and info.entrypoint.startswith("python -m jobs.curate ")
        # the driver asked for the pipeline's {"curation": 1} (not the test's), so it ran on the new node
        assert info.driver_node_id in curate_nodes, (info.driver_node_id, curate_nodes)
        assert info.metadata == {**info.metadata, "stage": "curate"}
        assert json.loads((tmp_path / "pipe" / "corpus" / "stats.json").read_text())["kept"] > 0
        assert peak == 1, f"no cpu_curate worker appeared (saw {seen})"
        assert "gpu_train" not in seen, "a curate stage must never bring up a GPU node"

        kinds, down_s = _wait_for_head_only(cluster.gcs_address)
        assert kinds == ["head"], f"the idle cpu_curate worker was not removed: {kinds}"
        print(json.dumps({"peak_cpu_workers": peak, "stage_s": round(stage_s, 1), "scale_down_s": round(down_s, 1)}))
    finally:
        cluster.stop()
    assert not cluster.processes()
