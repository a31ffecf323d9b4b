"""``mm pipeline --config configs/pipeline.yaml``: curate → pretrain → finetune → evaluate, chained.

    mm pipeline --config configs/pipeline.yaml [--set mode=jobs ...] [--force [STAGE ...]] [--address ADDR]
    python -m jobs.pipeline ...    # the same, for `ray job submit`

Each stage is the unchanged stage job (``jobs.curate``, ``jobs.pretrain``, ``jobs.finetune``,
``jobs.evaluate``), fed by the previous stage's output path under ``out_root``:

    OUT/corpus/        curate      (sources → curated corpus)
    OUT/pretrain/      pretrain    (--data OUT/corpus)
    OUT/finetune/      finetune    (--init OUT/pretrain --data finetune.data or OUT/corpus)
    OUT/evaluate/      evaluate    (--model OUT/finetune --data evaluate.data or the finetune data;
                                    eval.json, report.html, manifest.json)

``mode: driver`` runs the stages one after the other in this process (one Ray); ``mode: jobs``
submits each as its own Ray job (``JobSubmissionClient``, ``jobs.address``, the repository as
``working_dir``) and waits for it, so a long chain survives as separate, separately logged jobs.

The pipeline config references each stage's own YAML plus overrides (never copies their fields);
the resolved stage configs are validated before any work. Lineage (core/lineage.py): after each
stage the output's manifest.json gets a ``lineage`` stamp naming its inputs' manifests, the
config hash and the code version. A stage whose output is stamped for the same inputs and config
is skipped; ``--force`` reruns every stage, ``--force STAGE`` that one (and, through the changed
manifests, the ones after it). A failed chain rerun resumes at the stage that failed. A lock
(``OUT/_pipeline.lock``) keeps two pipelines from writing the same outputs.

Tested in tests/test_pipeline.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core import lineage as L
from core.config import load_config, to_dict
from jobs.cli import UsageError, add_common, run
from jobs.stages import StageConfig, StageFailed, load_stage_config

log = logging.getLogger("mm.pipeline")
STAGES = ("curate", "pretrain", "finetune", "evaluate")
CONFIG_CLASSES = {"curate": ("pipelines.curate", "CurateConfig"), "pretrain": ("mm.train", "PretrainConfig"),
                  "finetune": ("mm.finetune", "FinetuneConfig"), "evaluate": ("mm.evaluate", "EvalConfig")}
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CurateStage(StageConfig):
    sources: tuple[str, ...] = ()      # SRC arguments of `mm curate`
    modality: Literal["image", "video"] = "image"


@dataclass(frozen=True)
class FinetuneStage(StageConfig):
    task: Literal["classify", "retrieval", "caption"] = "classify"  # mm.finetune.TASKS
    data: str | None = None            # labelled (classify) corpus; None: the curated corpus


@dataclass(frozen=True)
class EvaluateStage(StageConfig):
    task: Literal["zeroshot", "retrieval", "classify", "linear_probe"] | None = None  # None: the config's tasks
    data: str | None = None            # None: the fine-tuning data


@dataclass(frozen=True)
class JobsConfig:
    address: str = "http://127.0.0.1:8265"   # Jobs API of the cluster (mode: jobs)
    # Shipped with every job (.gitignore'd paths excluded); or a URI used as it is, e.g.
    # local:///home/ray/mm where every node already has the repository (cluster.yaml's file_mounts).
    working_dir: str = "."
    poll_interval_s: float = 2.0
    timeout_s: float = 0.0                   # per stage job; 0: no limit
    # Resources each stage's job driver asks for (`ray job submit --entrypoint-resources`). On
    # cluster.yaml's cluster the head advertises no CPU, so a curate driver that asks for nothing
    # would sit on the head and only its tasks would wake the autoscaler; asking for `curation`
    # places the driver on (and, from zero, wakes) a cpu_curate node. Training stages need none:
    # their Ray Train workers ask for GPUs and `training`, which only gpu_train nodes have.
    entrypoint_resources: dict[str, dict[str, float]] = field(
        default_factory=lambda: {"curate": {"curation": 1.0}, "evaluate": {"curation": 1.0}})


@dataclass(frozen=True)
class PipelineConfig:
    out_root: str = "runs/pipeline"
    mode: Literal["driver", "jobs"] = "driver"
    stages: tuple[Literal["curate", "pretrain", "finetune", "evaluate"], ...] = STAGES
    jobs: JobsConfig = field(default_factory=JobsConfig)
    curate: CurateStage = field(default_factory=CurateStage)
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(config="configs/pretrain.yaml"))
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)


# --------------------------------------------------------------------------- stage plans
@dataclass
class Stage:
    name: str
    out: Path                 # the output dir the lineage stamp goes into
    argv: list[str]           # arguments of `python -m jobs.<name>`
    inputs: list[str]         # upstream output dirs (their manifests are the lineage inputs)
    sources: list[str]        # raw sources (curate)
    config: dict              # the resolved stage config (for the hash)


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _job_path(path: str) -> str:
    """A config path as the job sees it: relative to the working dir when inside the repository
    (the job's cwd is the shipped working dir), absolute otherwise."""
    p = Path(os.path.abspath(path))  # not resolve(): configs/ is a link the job's working dir also has
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def resolve_stage_config(name: str, stage: StageConfig, extra: Sequence[str] = ()) -> dict:
    """Load the stage's own config class with its YAML and overrides: a bad key fails here, before
    any stage runs, with the stage named."""
    module, cls = CONFIG_CLASSES[name]
    return to_dict(load_stage_config(name, getattr(importlib.import_module(module), cls), stage, extra))


def plan(cfg: PipelineConfig) -> list[Stage]:
    out = Path(cfg.out_root).resolve()
    corpus, pre, ft, ev = out / "corpus", out / "pretrain", out / "finetune", out / "evaluate"
    ft_data = _abs(cfg.finetune.data) if cfg.finetune.data else str(corpus)
    ev_data = _abs(cfg.evaluate.data) if cfg.evaluate.data else ft_data

    def common(s: StageConfig) -> list[str]:
        args = ["--config", _job_path(s.config)] if s.config else []
        return args + [a for o in s.overrides for a in ("--set", o)]

    c = cfg.curate
    stages = [
        Stage("curate", corpus, [*(_abs(s) if "://" not in s else s for s in c.sources), "--out", str(corpus),
                                 "--modality", c.modality, *common(c)],
              [], list(c.sources), resolve_stage_config("curate", c, [f"modality={c.modality}"])),
        Stage("pretrain", pre, ["--data", str(corpus), "--out", str(pre), *common(cfg.pretrain)],
              [str(corpus)], [], resolve_stage_config("pretrain", cfg.pretrain)),
        Stage("finetune", ft, ["--init", str(pre), "--data", ft_data, "--task", cfg.finetune.task, "--out", str(ft),
                               *common(cfg.finetune)],
              [str(pre), ft_data], [], resolve_stage_config("finetune", cfg.finetune)),
        Stage("evaluate", ev, ["--model", str(ft), "--data", ev_data, "--out", str(ev / "eval.json"),
                               *(["--task", cfg.evaluate.task] if cfg.evaluate.task else []), *common(cfg.evaluate)],
              [str(ft), ev_data], [], resolve_stage_config("evaluate", cfg.evaluate)),
    ]
    return [s for s in stages if s.name in cfg.stages]


def stage_inputs(stage: Stage) -> list[dict]:
    refs = L.source_refs(stage.sources) if stage.sources else []
    return refs + [L.manifest_ref(d) for d in stage.inputs]


# --------------------------------------------------------------------------- runners
def run_in_driver(stage: Stage, address: str | None) -> None:
    module = importlib.import_module(f"jobs.{stage.name}")
    argv = stage.argv + (["--address", address] if address else [])
    rc = module.main(argv)
    if rc:
        raise StageFailed(f"stage {stage.name} exited with code {rc}")


def run_as_job(stage: Stage, jobs: JobsConfig, chain_id: str) -> str:
    """Submit ``python -m jobs.<stage> ...`` as a Ray job and wait; return the submission id."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(jobs.address)
    entrypoint = "python -m jobs." + stage.name + " " + shlex.join(stage.argv)
    sid = f"{chain_id}-{stage.name}-{int(time.time())}"
    client.submit_job(entrypoint=entrypoint, submission_id=sid,
                      entrypoint_resources=dict(jobs.entrypoint_resources.get(stage.name, {})) or None,
                      runtime_env={"working_dir": jobs.working_dir if "://" in jobs.working_dir
                                   else str(Path(jobs.working_dir).resolve())},
                      metadata={"pipeline": chain_id, "stage": stage.name})
    log.info("submitted %s as Ray job %s", stage.name, sid)
    t0 = time.time()
    while True:
        status = client.get_job_status(sid)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if jobs.timeout_s and time.time() - t0 > jobs.timeout_s:
            client.stop_job(sid)
            raise StageFailed(f"stage {stage.name} (job {sid}) ran past {jobs.timeout_s:.0f} s and was stopped")
        time.sleep(jobs.poll_interval_s)
    if status != JobStatus.SUCCEEDED:
        tail = "\n".join(client.get_job_logs(sid).splitlines()[-20:])
        raise StageFailed(f"stage {stage.name} (job {sid}) ended {status.value}:\n{tail}")
    return sid


def run_pipeline(cfg: PipelineConfig, *, force: Sequence[str] | None = None, address: str | None = None) -> dict:
    """Run the chain; ``force`` None: nothing forced, empty: every stage, else the named stages."""
    stages = plan(cfg)
    out = Path(cfg.out_root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chain_id = "pipeline-" + L.sha256_json([to_dict(cfg), str(out)])[:10]
    summary: dict = {"out_root": str(out), "mode": cfg.mode, "stages": {}}
    with L.StorageLock(out / "_pipeline.lock", owner="mm pipeline", stale_after_s=600):
        for stage in stages:
            try:
                inputs = stage_inputs(stage)
            except FileNotFoundError as e:  # an input that is not a finished stage's output
                raise StageFailed(f"stage {stage.name}: {e}") from None
            key = L.stage_key(stage.name, inputs, stage.config, {"argv": stage.argv})
            forced = force is not None and (not force or stage.name in force)
            decision = L.plan_stage(stage.out, key, force=forced)
            log.info("stage %s: %s (%s)", stage.name, decision.action, decision.reason)
            entry = {"action": decision.action, "reason": decision.reason, "out": str(stage.out)}
            summary["stages"][stage.name] = entry
            if decision.action == "skip":
                continue
            L.begin_stage(stage.out, key, decision)
            t0 = time.time()
            if cfg.mode == "jobs":
                entry["job_id"] = run_as_job(stage, cfg.jobs, chain_id)
            else:
                run_in_driver(stage, address)
            entry["seconds"] = round(time.time() - t0, 1)
            extra = None if L.read_manifest(stage.out) else {"command": stage.name, "argv": stage.argv,
                                                              "config": stage.config}
            L.stamp(stage.out, L.lineage_record(stage.name, key, inputs, stage.config, {"argv": stage.argv}), extra)
    L.write_json_atomic(out / "pipeline.json", {**summary, "finished_at": L.now_utc()})
    return summary


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--force", nargs="*", choices=STAGES, default=None, metavar="STAGE",
                   help="rerun stages even if their outputs exist: all, or the named ones")
    add_common(p)
    return p


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    if "curate" in cfg.stages and not cfg.curate.sources:
        raise UsageError("curate.sources is empty: name the sources to curate")
    for name, data in (("finetune.data", cfg.finetune.data), ("evaluate.data", cfg.evaluate.data)):
        if data and not Path(data).is_dir():
            raise UsageError(f"{name} {data} does not exist")
    if cfg.mode == "jobs" and args.address:
        raise UsageError("--address is for mode: driver; in mode: jobs set jobs.address (the Jobs API URL)")
    try:
        summary = run_pipeline(cfg, force=args.force, address=args.address)
    except L.LockHeld as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 3
    except StageFailed as e:
        print(f"pipeline: {e}\npipeline: fix the cause and rerun: finished stages are skipped, the chain resumes "
              f"at the failed one", file=sys.stderr)
        return 1
    for name, s in summary["stages"].items():
        print(f"{name:9s} {s['action']:7s} {s['out']}" + (f"  ({s['seconds']} s)" if "seconds" in s else ""))
    result = {"out_root": summary["out_root"]}
    if "evaluate" in summary["stages"]:
        result["eval"] = os.path.join(summary["out_root"], "evaluate", "eval.json")
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
