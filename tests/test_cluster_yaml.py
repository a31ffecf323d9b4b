"""cluster.yaml is a launchable Ray autoscaler config: checked offline with Ray's own validator.

``prepare_config`` merges the provider's defaults exactly as ``ray up`` does, then
``validate_config`` checks the result against ``ray/autoscaler/ray-schema.json``. On top of the
schema, the tests pin the properties the project relies on: curation can only land on CPU workers
(custom resource ``curation``), training asks for GPUs that only GPU workers have, both worker
types scale from zero, setup commands install this project, and the file mounts exist locally.
No cloud API is called. Run: ``.venv/bin/pytest tests/test_cluster_yaml.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_validates_with_rays_schema_and_validator(raw):
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    # prepare_config fills per-type bounds; ours are explicit and must survive unchanged.
    assert prepared["available_node_types"]["cpu_curate"]["max_workers"] == raw["available_node_types"]["cpu_curate"]["max_workers"]
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validator_rejects_a_broken_variant(raw):
    # The validator must bite on this file's shape, or the test above proves nothing.
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["cpu_curate"]["resources"]["curation"] = "lots"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["idle_timeout"] = 5  # unknown top-level key (the real one is idle_timeout_minutes)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_node_types_separate_curation_from_training(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not run tasks"
    cpu, gpu = types["cpu_curate"], types["gpu_train"]
    # Curation requests `curation`; only the CPU type has it, one unit per CPU.
    assert cpu["resources"]["curation"] == cpu["resources"]["CPU"] > 0
    assert "GPU" not in cpu["resources"] and "training" not in cpu["resources"]
    assert "curation" not in gpu["resources"] and "curation" not in head["resources"]
    # Training asks for GPUs; only the GPU type has them.
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["training"] == gpu["resources"]["GPU"]
    for name in ("cpu_curate", "gpu_train"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"] <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0


def test_setup_installs_this_project_and_mounts_exist(raw):
    mounts = raw["file_mounts"]
    project_remote = next(r for r, local in mounts.items() if (ROOT / local).resolve() == ROOT)
    assert any("pip install" in c and project_remote in c for c in raw["setup_commands"])
    assert any(Path(local).name == "configs" for local in mounts.values())
    for local in mounts.values():
        if not local.startswith("~"):  # ~/.ray/auth_token is the operator's secret, not in the repo
            assert (ROOT / local).exists(), f"file_mounts source {local} missing"
    # Token auth on every node; a mismatch between head and workers would lock workers out.
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any(remote.endswith(".ray/auth_token") for remote in mounts)
    assert ".venv" in raw["rsync_exclude"], "never ship the virtualenv"
    # The docker images pin the Ray version the project depends on.
    pinned = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"ray[' in line)
    version = pinned.split("==")[1].strip('",')
    images = [raw["docker"]["image"], raw["docker"]["head_image"]]
    images += [t["docker"]["worker_image"] for t in raw["available_node_types"].values() if "docker" in t]
    assert all(f":{version}-" in image for image in images), images
