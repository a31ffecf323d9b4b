"""Local means local: without ``--address``/``RAY_ADDRESS`` a command starts its own Ray even when a
``ray start`` cluster runs on the machine, and says how to join that one instead.

Before the fix, ``ray.init(num_cpus=...)`` found the cluster's address file and failed with "When
connecting to an existing cluster, num_cpus and num_gpus must not be provided". The cluster here
is the tests' throwaway ``LocalCluster`` (tests/test_job_submit.py, ``ray start --temp-dir T``, which
writes ``T/ray_current_cluster``); the probe runs with ``RAY_TMPDIR=D`` and ``D/ray/ray_current_cluster``
linked to that file, which is exactly where a plain ``ray.init`` looks for a ``ray start`` cluster
(``$RAY_TMPDIR/ray``, /tmp/ray by default), so nothing else on the machine sees it. Runs with the ``cluster`` marker (in the default suite, like the job-submit test).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from test_job_submit import ROOT, LocalCluster

pytestmark = pytest.mark.cluster

PROBE = ("from core.runtime import init_ray; import ray; r = init_ray(num_cpus=1); "
         "print('CPU', r.get('CPU'), 'GCS', ray.get_runtime_context().gcs_address)")


def test_a_command_starts_its_own_ray_beside_a_ray_start_cluster():
    cluster = LocalCluster(num_cpus=1).start()
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
        cluster.stop()
        shutil.rmtree(probe_tmp, ignore_errors=True)
