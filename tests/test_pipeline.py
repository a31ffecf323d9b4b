"""``mm pipeline``: stage plans, config validation before work, lineage, skip, force and resume.

Fast tests check that each stage is fed the previous stage's output by path, that a bad stage
config fails before any stage runs (naming the stage), and that the pipeline lock refuses a second
chain on the same outputs. The slow test runs the real chain (curate → pretrain → finetune →
evaluate, in one driver) on demo shards: every output's manifest names its inputs' manifests,
config hash and code version; a rerun skips every stage; ``--force evaluate`` reruns only that
stage; a failed finetune (an injected bad override) is resumed by the next run at finetune.

Run: ``.venv/bin/pytest tests/test_pipeline.py`` (fast) and ``-m slow`` for the chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import lineage as L
from core.config import load_config
from jobs import pipeline as P

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **overrides) -> P.PipelineConfig:
    sets = [f"out_root={tmp_path / 'out'}", f"curate.sources=[{tmp_path / 'shards'}]"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(P.PipelineConfig, str(ROOT / "configs" / "pipeline.yaml"), sets)


def test_stages_are_chained_by_path(tmp_path):
    stages = {s.name: s for s in P.plan(_cfg(tmp_path))}
    out = (tmp_path / "out").resolve()
    assert list(stages) == ["curate", "pretrain", "finetune", "evaluate"]
    assert stages["curate"].argv[:3] == [str((tmp_path / "shards").resolve()), "--out", str(out / "corpus")]
    assert stages["pretrain"].argv[:4] == ["--data", str(out / "corpus"), "--out", str(out / "pretrain")]
    assert stages["finetune"].argv[:4] == ["--init", str(out / "pretrain"), "--data", str(out / "corpus")]
    assert stages["evaluate"].argv[:2] == ["--model", str(out / "finetune")]
    assert stages["evaluate"].argv[4:6] == ["--out", str(out / "evaluate" / "eval.json")]
    # Stage configs are referenced (relative to the repository, as a shipped job sees them).
    assert stages["pretrain"].argv[4:6] == ["--config", "configs/pretrain.yaml"]
    assert stages["pretrain"].config["train"]["max_steps"] > 0  # resolved through mm.train.PretrainConfig
    assert [s.inputs for s in stages.values()][1:] == [[str(out / "corpus")], [str(out / "pretrain"), str(out / "corpus")],
                                                       [str(out / "finetune"), str(out / "corpus")]]


def test_a_bad_stage_config_fails_before_any_stage(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    cfg = tmp_path / "p.yaml"
    cfg.write_text((ROOT / "configs" / "pipeline.yaml").read_text())
    rc = P.main(["--config", str(cfg), "--set", f"out_root={tmp_path / 'out'}",
                 "--set", f"curate.sources=[{tmp_path / 'shards'}]", "--set", "pretrain.overrides=[optim.lrr=1]"])
    err = capsys.readouterr().err
    assert rc == 2 and "pretrain stage: unknown config key 'optim.lrr'" in err
    assert not (tmp_path / "out").exists()
    assert P.main(["--config", str(cfg), "--set", "mode=ray"]) == 2
    assert "valid choices: driver, jobs" in capsys.readouterr().err


def test_a_second_pipeline_on_the_same_outputs_is_refused(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    out = tmp_path / "out"
    with L.StorageLock(out / "_pipeline.lock", owner="other pipeline"):
        rc = P.main(["--config", str(ROOT / "configs" / "pipeline.yaml"), "--set", f"out_root={out}",
                     "--set", f"curate.sources=[{tmp_path / 'shards'}]"])
    assert rc == 3 and "other pipeline" in capsys.readouterr().err


SMALL = {"pretrain.overrides": "[train.num_workers=1,train.max_steps=4,train.checkpoint_every_steps=2,"
                               "train.log_every_steps=2,data.batch_size=8]",
         "finetune.overrides": "[train.num_workers=1,train.max_steps=2,train.log_every_steps=1,data.batch_size=8]",
         "curate.overrides": "[images.image_px=64]",
         "evaluate.task": "retrieval"}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_chain_lineage_skip_force_and_resume(tmp_path, ray_session, capsys):
    from pipelines.demo_corpus import generate_demo_corpus

    demo = generate_demo_corpus(tmp_path / "demo", n_images=40, n_videos=2, seed=4)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text((ROOT / "configs" / "pipeline.yaml").read_text())
    base = ["--config", str(cfg), "--set", f"out_root={tmp_path / 'out'}",
            "--set", f"curate.sources=[{demo['image_sources'][0]}]"]
    base += [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    out = tmp_path / "out"

    # A finetune that fails at run time (its data directory holds no corpus; a bad config key or a
    # missing path would be refused before any stage): curate and pretrain finish and are stamped,
    # then it stops.
    (tmp_path / "empty_corpus").mkdir()
    assert P.main([*base, "--set", f"finetune.data={tmp_path / 'empty_corpus'}"]) == 1
    assert "resumes at the failed one" in capsys.readouterr().err
    assert L.read_manifest(out / "pretrain")["lineage"]["stage"] == "pretrain"
    pretrained_at = (out / "pretrain" / "manifest.json").stat().st_mtime_ns

    # Fixed: the rerun skips curate and pretrain and resumes at finetune.
    assert P.main(base) == 0
    summary = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [summary[s]["action"] for s in P.STAGES] == ["skip", "skip", "fresh", "fresh"]
    assert (out / "pretrain" / "manifest.json").stat().st_mtime_ns == pretrained_at

    # Lineage: every output names its inputs' manifests, config hash and code version.
    for stage, upstream in (("pretrain", ["corpus"]), ("finetune", ["pretrain", "corpus"]),
                            ("evaluate", ["finetune", "corpus"])):
        lin = L.read_manifest(out / stage)["lineage"]
        assert [Path(i["path"]).name for i in lin["inputs"]] == upstream
        for i in lin["inputs"]:
            assert i["manifest_sha256"] == L.file_sha256(Path(i["path"]) / "manifest.json")
        assert len(lin["config_sha256"]) == 64 and lin["code_version"]["source_sha256"]
    curate_lin = L.read_manifest(out / "corpus")["lineage"]
    assert [Path(i["uri"]).name for i in curate_lin["inputs"]] == [Path(demo["image_sources"][0]).name]
    metrics = json.loads((out / "evaluate" / "eval.json").read_text())["metrics"]["retrieval"]
    assert 0.0 <= metrics["image_retrieval_recall@5"] <= 1.0

    # Everything exists for the same inputs and config: all skipped.
    assert P.main(base) == 0
    summary = json.loads((out / "pipeline.json").read_text())["stages"]
    assert all(summary[s]["action"] == "skip" for s in P.STAGES)

    # --force evaluate: only evaluate reruns (nothing downstream of it).
    assert P.main([*base, "--force", "evaluate"]) == 0
    summary = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [summary[s]["action"] for s in P.STAGES] == ["skip", "skip", "skip", "fresh"]


@pytest.mark.cluster
@pytest.mark.slow  # ~1 min; the fast suite submits a curate job in tests/test_job_submit.py
@pytest.mark.timeout(600)
def test_jobs_mode_runs_each_stage_as_a_ray_job(tmp_path):
    """mode: jobs against a real `ray start` cluster: the curate stage becomes a Ray job, its output
    is stamped, and a rerun skips it without submitting anything."""
    from ray.job_submission import JobStatus
    from test_job_submit import LocalCluster

    from pipelines.demo_corpus import generate_demo_corpus

    demo = generate_demo_corpus(tmp_path / "demo", n_images=20, n_videos=2, seed=6)
    cluster = LocalCluster(num_cpus=2, resources={"curation": 2}).start()  # as cluster.yaml's cpu_curate
    try:
        argv = ["--config", str(ROOT / "configs" / "pipeline.yaml"), "--set", f"out_root={tmp_path / 'out'}",
                "--set", f"curate.sources=[{demo['image_sources'][0]}]", "--set", "stages=[curate]",
                "--set", "mode=jobs", "--set", f"jobs.address={cluster.dashboard_url}",
                "--set", f"jobs.working_dir={ROOT}", "--set", "jobs.poll_interval_s=1"]
        assert P.main(argv) == 0
        summary = json.loads((tmp_path / "out" / "pipeline.json").read_text())["stages"]["curate"]
        client = cluster.client()
        assert client.get_job_status(summary["job_id"]) == JobStatus.SUCCEEDED
        assert client.get_job_info(summary["job_id"]).entrypoint.startswith("python -m jobs.curate ")
        lin = L.read_manifest(tmp_path / "out" / "corpus")["lineage"]
        assert lin["stage"] == "curate" and json.loads((tmp_path / "out" / "corpus" / "stats.json").read_text())["kept"]
        jobs_before = len(client.list_jobs())
        assert P.main(argv) == 0
        assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["stages"]["curate"]["action"] == "skip"
        assert len(client.list_jobs()) == jobs_before
        # The driver asks for its entrypoint resources: a resource no node has keeps it pending
        # (on an autoscaling cluster: wakes the node type that has it) until the stage times out.
        pending = [*argv, "--force", "curate", "--set", "jobs.entrypoint_resources={curate: {gpu_only: 1}}",
                   "--set", "jobs.timeout_s=10"]
        assert P.main(pending) == 1
        last = max(client.list_jobs(), key=lambda j: j.start_time or 0)
        assert last.driver_info is None and last.status in (JobStatus.STOPPED, JobStatus.PENDING), last
    finally:
        cluster.stop()
