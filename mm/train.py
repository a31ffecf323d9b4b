"""The one training loop, for pretraining and fine-tuning, on Ray Train.

    cfg = load_config(PretrainConfig, "configs/pretrain.yaml", ["train.max_steps=100"])
    summary = fit(cfg, ["corpus_a", "corpus_b"], "runs/r1")

``fit`` starts a ``TorchTrainer`` (DDP over gloo on CPU, NCCL on GPU; FSDP2 with
``train.parallel=fsdp``, meant for GPUs and tested on CPU) whose workers read their shard of each corpus from Ray Data
(JPEG decode and augmentation run in Ray Data map stages; batches prefetched), run the configured
objectives (mm/objectives.py) and write

    run_dir/metrics.jsonl   one line per logged step (rank 0)
    run_dir/model/          the final model (mm.checkpoint.save_model)
    run_dir/manifest.json   inputs, resolved config, code version
    run_dir/ray/            Ray Train's storage: step checkpoints (safetensors + JSON)

A second ``fit`` on the same ``run_dir`` (the same command after a killed driver) resumes from
the latest *complete* step checkpoint found in storage (``mm.checkpoint.latest_complete_checkpoint``:
train_state.json written last, tensor file sizes checked), not from Ray Train's own snapshot,
which the controller writes a moment after a checkpoint lands and a kill can leave behind or
torn. Ray Train itself resumes within one ``fit`` after a worker dies (``FailureConfig``).
Each ``fit`` is an *attempt* with its own id in ``run_dir/ray/attempt.json``, written before
anything else: workers of an earlier attempt that outlive their driver (their raylet gone, or on
other nodes until the GCS timeout) see it before every write and stop, so they never append
metrics or checkpoints behind the rerun's back; a worker also exits at once when its raylet (its
parent process) dies. Resume is exact: the checkpoint holds model, optimizer and scheduler
state, the step, and each corpus stream's position (epoch, batches consumed); random draws are
reseeded per step from (seed, rank, step), and Ray Data runs with ``preserve_order`` (also for
the driver-side ``materialize`` of a cached corpus, whose block order otherwise follows task
completion) so every fresh run and every shard sees the same rows in the same order.

Pretraining and fine-tuning differ by objectives and config only: callers pass extra objective
factories and a ``prepare_model`` hook (freeze, LoRA, ...). Beside the loop: ``train.frozen_features``'
precomputation (mm/frozen.py) and what a run reports, metrics.jsonl and one progress line per
logged step on the driver (mm/train_log.py). The driver side (``fit``) and the worker side
(``train_loop`` and its pieces) stay together, one concern, about 620 lines.
Tested in tests/test_train.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.storage import (
    is_uri,
    join,
    local_dir,
    read_json,
    remove,
    resolve,
    upload_dir,
    write_bytes,
    write_json,
)
from mm.checkpoint import (
    latest_complete_checkpoint,
    load_model,
    load_train_state,
    local_model_dir,
    model_dir,
    save_model,
    save_train_state,
    step_checkpoints,
)
from mm.config import ModelConfig
from mm.data import (
    DataConfig,
    PreprocessConfig,
    build_dataset,
    check_corpus,
    corpus_info,
    load_token_info,
    same_tokenizer,
    trim_padding,
)
from mm.frozen import TowerFeatures, check_frozen_features, frozen_feature_dataset
from mm.models import VLModel, build_model, lock_towers
from mm.objectives import ObjectiveFactory, ObjectivesConfig, ObjectiveSet, build_objectives
from mm.optim import OptimConfig, build_optimizer, build_scheduler
from mm.train_log import MetricsLog, read_metrics, say

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2
    cpus_per_worker: float | None = None  # default: core.runtime.worker_cpus (fractional on small machines)
    use_gpu: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 (fully_shard) per block; saves memory on GPUs
    max_steps: int = 200
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    seed: int = 0
    max_failures: int = 1
    collective_timeout_s: int = 600  # a rank stuck in all-reduce/barrier fails the run instead of hanging (Ray: 1800)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_checkpointing: bool = False
    compile: bool = False
    accumulate_steps: int = 1
    grad_clip_norm: float = 1.0  # 0: no clipping (the norm is still computed for non-finite checks)
    # DDP: needed when some trainable parameter gets no gradient in a step (an extra objective
    # that uses one tower only, say); costs a graph traversal per step.
    find_unused_parameters: bool = False
    tensorboard: bool = False
    mlflow_tracking_uri: str | None = None
    # LiT with both towers wholly locked, no augmentation and the contrastive objective alone:
    # the towers' pooled features are a fixed function of each row, so they are computed once
    # per corpus (Ray Data actors, into RUN/features/) and the steps train the projections on
    # them; a step then costs the heads alone. The model saved is the same whole model.
    frozen_features: bool = False

    def __post_init__(self) -> None:
        for name in ("num_workers", "max_steps", "checkpoint_every_steps", "log_every_steps", "accumulate_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# -- driver side -------------------------------------------------------------------------------
def fit(cfg: PretrainConfig, corpora: Sequence[str], run_dir: str, init: str | None = None,
        objectives: Sequence[ObjectiveFactory] | None = None,
        prepare_model: Callable[[VLModel], VLModel] | None = None) -> dict:
    """Train on ``corpora`` (curated dirs) into ``run_dir``; resumes a run already there.

    init: a run or model dir whose weights (and architecture) start the model.
    objectives: extra objective factories ``(model, tokens) -> Objective`` added to the config's.
    prepare_model: called on every worker with the built model before wrapping (freeze, LoRA).
    Returns {"run_dir", "steps", "last": last metrics line, "checkpoint": path}.
    """
    import ray
    import ray.train

    from core.lineage import code_version
    from core.runtime import init_ray, worker_cpus

    if not corpora:
        raise ValueError("no corpus given")
    if cfg.train.frozen_features:
        check_frozen_features(cfg, objectives, prepare_model)
    for c in corpora:
        check_corpus(c)
    infos = [corpus_info(c) for c in corpora]
    tokenizer_dir = join(corpora[0], "tokenizer")  # a URI stays one: each node fetches it (local_dir)
    for c in corpora[1:]:
        if not same_tokenizer(tokenizer_dir, join(c, "tokenizer")):
            raise ValueError(f"corpus {c} uses another tokenizer than {corpora[0]}; curate them with one tokenizer")
    tokens = load_token_info(tokenizer_dir)
    weights = _mix_weights(cfg.data, infos)
    # What the workers get: a URI stays one and each worker's node fetches it (``local_model_dir``,
    # core.storage's cache); the driver's cached copy would not exist on another node.
    init_src = (str(init) if is_uri(str(init)) else str(model_dir(init).resolve())) if init is not None else None
    if init is not None:
        init = local_model_dir(init)  # a URI: the driver's own fetched copy, for this check only
        _, init_cfg = load_model(init)  # validates the init checkpoint before any work
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(init_cfg, lock=cfg.model.lock))
    # A local run dir, or a URI (s3://, gs://): then Ray Train's checkpoints, metrics.jsonl, the
    # manifest and the final model go straight to the store, and a rerun anywhere resumes from it.
    run = run_dir.rstrip("/") if is_uri(run_dir) else str(Path(run_dir).resolve())
    if not is_uri(run):
        Path(run).mkdir(parents=True, exist_ok=True)
    write_bytes(join(run, "manifest.json"), json.dumps({
        "inputs": {"corpora": [{"path": i.path, "modality": i.modality, "rows": i.rows, "manifest": i.manifest}
                               for i in infos],
                   "init": init_src},
        "mix_weights": weights, "config": dataclasses.asdict(cfg), "code_version": code_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2, default=str).encode())

    attempt, resume = _start_attempt(run)

    if not ray.is_initialized():
        init_ray()
    pre = PreprocessConfig.build(cfg.model, cfg.data, tokens.pad_id, train=True, seed=cfg.train.seed)
    t = cfg.train
    with _preserve_order():
        if t.frozen_features:
            datasets = {f"corpus{i}": frozen_feature_dataset(cfg, info, join(run, "features", f"corpus{i}"), pre,
                                                             tokens.vocab_size, init_src)
                        for i, info in enumerate(infos)}
        else:
            datasets = {f"corpus{i}": build_dataset(info, "train", pre, cfg.data) for i, info in enumerate(infos)}
    # Leave a whole CPU to the Ray Data read/decode tasks (RAY_NOTES.md: starved reads hang).
    cpus = t.cpus_per_worker or worker_cpus(t.num_workers, reserve_cpus=1.0)
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # a shard replays the same rows: exact resume
    trainer = _torch_trainer()(
        train_loop,
        train_loop_config={"cfg": cfg, "tokens": tokens, "weights": weights, "run_dir": run,
                           "tokenizer_dir": tokenizer_dir, "init": init_src,
                           "extra_objectives": list(objectives or ()), "prepare_model": prepare_model,
                           "streams": list(datasets), "attempt": attempt, "resume": resume},
        torch_config=ray.train.torch.TorchConfig(timeout_s=t.collective_timeout_s),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=run,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    lines = read_metrics(join(run, "metrics.jsonl"))
    return {"run_dir": run, "steps": lines[-1]["step"] if lines else 0,
            "last": lines[-1] if lines else {},
            # a rerun of a finished run trains nothing and reports no checkpoint: the one it resumed from
            "checkpoint": result.checkpoint.path if result.checkpoint else resume}


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's record of the checkpoints it reported


def _start_attempt(run: str) -> tuple[str, str | None]:
    """Start a new attempt on ``run``: fence off earlier ones, pick the checkpoint to resume from.

    1. ``run/ray/attempt.json`` gets a fresh id first: from then on, workers of an earlier attempt
       still running (a killed driver's) stop at their next write (``_check_attempt``).
    2. The newest complete step checkpoint is the resume point. Ray Train's snapshot is not used:
       the controller writes it after the checkpoint lands, so a driver killed in between leaves a
       snapshot one checkpoint behind (or none: the rerun started again from step 0), and one torn
       mid-write, or naming a deleted checkpoint, makes Ray refuse the run dir.
    3. Ray's snapshot and every other step dir go (incomplete ones, and older ones Ray would no
       longer prune since it forgets them): this attempt's Ray Train starts its bookkeeping from
       nothing and keeps ``keep_checkpoints`` of its own, beside the one it resumed from.
    Returns (attempt id, resume checkpoint path/URI or None)."""
    ray_dir = join(run, "ray")
    attempt = uuid.uuid4().hex
    write_json(join(ray_dir, "attempt.json"), {"attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(),
                                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    found = latest_complete_checkpoint(ray_dir)
    fs, _, _ = resolve(ray_dir)
    for _, d in step_checkpoints(ray_dir):
        if found is None or d != found[1]:
            remove(fs, resolve(d)[1])
    remove(fs, resolve(join(ray_dir, RAY_SNAPSHOT))[1])
    if found is None:
        return attempt, None
    say(f"resuming from the latest complete checkpoint, step {found[0]} ({found[1]})")
    return attempt, found[1]


class AttemptSuperseded(RuntimeError):
    """A newer ``fit`` on the same run dir started: this attempt's workers must not write."""


def _check_attempt(run_dir: str, attempt: str) -> None:
    """Before a worker writes into the run dir: stop if another attempt took the run over."""
    current = read_json(join(run_dir, "ray", "attempt.json"))
    if isinstance(current, dict) and current.get("attempt") not in (None, attempt):
        raise AttemptSuperseded(f"{run_dir}: a newer run of this command (attempt {current.get('attempt')}, "
                                f"pid {current.get('pid')} on {current.get('host')}) took it over; this one stops")


@contextlib.contextmanager
def _preserve_order():
    """Ray Data in deterministic order while the datasets are built: ``build_dataset`` may
    ``materialize`` a small corpus on the driver, and without ``preserve_order`` its blocks are
    stored in the order their read tasks finish, so two runs (a killed one and its rerun) fed the
    ranks different rows. Restored after, for the rest of the process."""
    from ray.data import DataContext

    opts = DataContext.get_current().execution_options
    old = opts.preserve_order
    opts.preserve_order = True
    try:
        yield
    finally:
        opts.preserve_order = old


def _torch_trainer():
    """``TorchTrainer``, less Train v2's ``PlacementGroupCleanerCallback`` when no dashboard runs.

    That callback's detached actor asks the State API (served by the dashboard) every second
    whether the controller still lives; on a Ray started without the dashboard (``init_ray``'s
    local default) each query fails and it warns "Failed to query Ray Train Controller actor
    state" every few seconds of the run. What it guards against, a controller dying without
    removing its placement group, ends with a local Ray anyway; with a dashboard it stays."""
    import ray
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # a Ray without it
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if ray._private.worker.get_dashboard_url():
                return callbacks
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def _mix_weights(data: DataConfig, infos) -> list[float]:
    if data.mix_weights:
        if len(data.mix_weights) != len(infos):
            raise ValueError(f"data.mix_weights has {len(data.mix_weights)} entries for {len(infos)} corpora")
        w = list(data.mix_weights)
    else:
        w = [float(i.rows.get("train", 0)) for i in infos]
    for i, info in enumerate(infos):
        if w[i] > 0 and info.rows.get("train", 0) == 0:
            raise ValueError(f"corpus {info.path} has no train rows")
    if sum(w) <= 0:
        raise ValueError("no training rows in the given corpora")
    return [x / sum(w) for x in w]


# -- worker side -------------------------------------------------------------------------------
class Stream:
    """One corpus shard as an endless batch stream that knows its position (epoch, batches)."""

    def __init__(self, shard, data: DataConfig, seed: int, epoch: int = 0, batches: int = 0) -> None:
        self.shard, self.data, self.seed = shard, data, seed
        self.epoch, self.batches = epoch, 0
        self._start()
        for _ in range(batches):  # replay to the checkpointed position
            self.next()

    def _start(self) -> None:
        self.it = iter(self.shard.iter_torch_batches(
            batch_size=self.data.batch_size, drop_last=True, prefetch_batches=self.data.prefetch_batches,
            local_shuffle_buffer_size=self.data.shuffle_buffer_rows or None,
            local_shuffle_seed=self.seed * 100_003 + self.epoch if self.data.shuffle_buffer_rows else None))

    def next(self) -> dict:
        for _ in range(2):
            try:
                batch = next(self.it)
                self.batches += 1
                return batch
            except StopIteration:
                self.epoch, self.batches = self.epoch + 1, 0
                self._start()
        raise ValueError(f"a corpus has fewer train rows per worker than batch_size {self.data.batch_size}")

    def position(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}


def _seed_step(seed: int, rank: int, step: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def _wrap(module: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The one place that makes the model distributed: DDP, or FSDP2 per transformer block."""
    import ray.train.torch

    if t.parallel == "fsdp":
        # FSDP2 also runs on CPU over gloo (tests/test_train.py trains and checkpoints with it); it
        # saves memory only on GPUs, where bf16 params with fp32 reduction apply.
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        module.to(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if _amp_dtype(t, device) == torch.bfloat16 else MixedPrecisionPolicy()
        model = module.model
        for blk in [*model.vision.blocks, *model.text.blocks, *(model.fusion.layers if model.fusion else []),
                    *(model.decoder.blocks if model.decoder is not None else [])]:
            fully_shard(blk, mp_policy=mp)
        return fully_shard(module, mp_policy=mp)
    return ray.train.torch.prepare_model(module, parallel_strategy="ddp", parallel_strategy_kwargs={
        "find_unused_parameters": t.find_unused_parameters})


def _amp_dtype(t: TrainConfig, device: torch.device) -> torch.dtype | None:
    if t.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]


def _no_sync(module: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: a flag, set for every micro-step
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    return contextlib.nullcontext()


def _mean_over_workers(values: dict[str, torch.Tensor]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(values)
    v = torch.stack([values[k].float().cpu() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        # gloo has no AVG: sum then divide. CPU tensor works with gloo; NCCL needs it on GPU.
        v = v.to("cuda") if dist.get_backend() == "nccl" else v
        dist.all_reduce(v)
        v = v.cpu() / dist.get_world_size()
    return {k: float(x) for k, x in zip(keys, v)}


def train_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: Sequence[dict], t: TrainConfig, amp: torch.dtype | None,
               params: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """One optimizer step over ``batches`` (accumulation micro-batches): forward/backward under
    autocast, unscale, clip, and a step unless the gradient norm is not finite.
    Returns (metrics averaged over micro-batches, grad norm, whether the step was taken)."""
    n = len(batches)
    device_type = params[0].device.type if params else "cpu"
    window: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        with _no_sync(module, i == n - 1), \
                torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, metrics = module(batch)
            scaler.scale(loss / n).backward()
        for k, v in {"loss": loss.detach(), **metrics}.items():
            window[k] = window.get(k, 0) + v / n
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm if t.grad_clip_norm > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # Gradients are all-reduced, so every rank sees the same norm and takes the same branch: a
    # NaN/inf anywhere (fp16 overflow, a bad batch) skips the update everywhere, and is counted.
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return window, grad_norm, finite


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. Banner sections: build, resume, loop, checkpoint, finish."""
    import ray.train
    import ray.train.torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from mm.checkpoint import restore_state

    cfg: PretrainConfig = config["cfg"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    # ---- build --------------------------------------------------------------------------------
    # A worker whose raylet (its parent) died belongs to a killed driver: it exits instead of
    # training on, unseen, until Ray notices (checked every step, below).
    parent = os.getppid()
    # Ray Train's checkpoint is this attempt's own (a worker restart); else where fit resumes.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume"):
        checkpoint = ray.train.Checkpoint(config["resume"])
    saved = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_train_state(d)  # (model_state, optim_state, state), restored below
    model = _build_model(cfg.model, config["tokens"].vocab_size, config["init"], saved[2] if saved else None)
    if config["prepare_model"] is not None:
        model = config["prepare_model"](model)
    objs = build_objectives(cfg.objectives, model, config["tokens"], config["extra_objectives"])
    module = ObjectiveSet(model, objs)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if t.compile:
        for blk in [*model.vision.blocks, *model.text.blocks]:
            blk.compile()
    module = _wrap(module, t, device)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    amp = _amp_dtype(t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    # ---- resume -------------------------------------------------------------------------------
    step, nonfinite, positions = 0, 0, {}
    if saved is not None:
        model_state, optim_state, state = saved
        restore_state(module, optimizer, model_state, optim_state)
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, nonfinite, positions = state["step"], state["nonfinite_steps"], state["streams"]
        if rank == 0:
            say(f"resumed from step {step} ({checkpoint.path})")
    streams = [Stream(ray.train.get_dataset_shard(name), cfg.data, t.seed, **positions.get(name, {}))
               for name in config["streams"]]
    mlog = MetricsLog(config["run_dir"], t, step) if rank == 0 else None
    params = [p for p in module.parameters() if p.requires_grad]
    samples_per_step = cfg.data.batch_size * t.accumulate_steps * world_size

    # ---- loop ---------------------------------------------------------------------------------
    module.train()
    window: dict[str, torch.Tensor] = {}
    window_steps, window_time, window_wait = 0, 0.0, 0.0
    while step < t.max_steps:
        if os.getppid() != parent:
            say(f"rank {rank}: Ray's raylet died (the driver was killed?); exiting")
            os._exit(1)
        t_start = time.perf_counter()
        _seed_step(t.seed, rank, step)
        batches, wait = [], 0.0
        for micro in range(t.accumulate_steps):
            # Same corpus on every rank this micro-step: the contrastive gather mixes one modality.
            pick = np.random.default_rng([t.seed, step, micro]).choice(len(streams), p=config["weights"])
            t_wait = time.perf_counter()
            b = streams[pick].next()
            batches.append(b if t.frozen_features else trim_padding(b))
            wait += time.perf_counter() - t_wait
        metrics, grad_norm, finite = train_step(module, optimizer, scaler, batches, t, amp, params)
        nonfinite += 0 if finite else 1
        for k, v in metrics.items():
            window[k] = window.get(k, 0) + v
        scheduler.step()
        step += 1
        window_steps += 1
        window_time += time.perf_counter() - t_start
        window_wait += wait

        if step % t.log_every_steps == 0 or step == t.max_steps:
            means = _mean_over_workers({k: v / window_steps for k, v in window.items()})
            line = {"step": step, **means, "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": samples_per_step * window_steps / window_time,
                    "data_wait_frac": window_wait / window_time, "grad_norm": float(grad_norm),
                    "nonfinite_steps": nonfinite, "epoch": {f"corpus{i}": s.epoch for i, s in enumerate(streams)}}
            if "contrastive/logit_scale" in line:
                line["logit_scale"] = line["contrastive/logit_scale"]
            if mlog is not None:
                _check_attempt(config["run_dir"], config["attempt"])
                mlog.write(line)
            window, window_steps, window_time, window_wait = {}, 0, 0.0, 0.0

        # ---- checkpoint -----------------------------------------------------------------------
        if step % t.checkpoint_every_steps == 0 or step == t.max_steps:
            model_state, optim_state = get_state_dict(module, optimizer, options=full)  # collective
            state = {"step": step, "nonfinite_steps": nonfinite, "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "streams": {name: s.position() for name, s in zip(config["streams"], streams)},
                     "rng": {"scheme": "torch.manual_seed(SeedSequence([seed, rank, micro_step]))",
                             "seed": t.seed},
                     # a pretrained text tower's architecture: a resume rebuilds it without its files
                     "text_hf_config": (module_model(module).text.bert.config.to_dict()
                                        if cfg.model.text.pretrained_path else None)}
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    _check_attempt(config["run_dir"], config["attempt"])
                    save_train_state(tmp, model_state, optim_state, state)
                    if step == t.max_steps:
                        model_only = {k[len("model."):]: v for k, v in model_state.items() if k.startswith("model.")}
                        _save_final_model(module_model(module), cfg.model, config["run_dir"],
                                          config["tokenizer_dir"], model_only)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"step": step}, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}")
    if mlog is not None:
        mlog.close()


def _build_model(model_cfg: ModelConfig, vocab_size: int, init: str | None, saved_state: dict | None) -> VLModel:
    """The model a worker trains. A run is self-contained: started from another run (``init``) it
    is that run's saved model; continuing from its own step checkpoint it is rebuilt from the
    saved architecture (the pretrained text tower's config is in the checkpoint). Only a fresh run
    reads the pretrained weight files (``pretrained_path``). Weights come from the checkpoint
    either way; locking is applied as configured."""
    if init:
        model, _ = load_model(local_model_dir(init))
    elif saved_state is not None and (saved_state.get("text_hf_config") or not model_cfg.text.pretrained_path):
        bare = dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, pretrained_path=None),
                                   text=dataclasses.replace(model_cfg.text, pretrained_path=None))
        model = VLModel(bare, vocab_size, saved_state.get("text_hf_config"))
    else:
        return build_model(model_cfg, vocab_size)
    lock_towers(model, model_cfg.lock)
    return model


def _save_final_model(model: VLModel, model_cfg, run_dir: str, tokenizer_dir: str, state: dict) -> None:
    """RUN/model: written in place for a local run; for a URI, written to a temp dir on this
    node and uploaded (the driver may be on another node)."""
    if not is_uri(run_dir):
        save_model(model, model_cfg, Path(run_dir) / "model", local_dir(tokenizer_dir), state=state)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, model_cfg, Path(tmp) / "model", local_dir(tokenizer_dir), state=state)
        upload_dir(Path(tmp) / "model", join(run_dir, "model"))


def module_model(module: torch.nn.Module) -> VLModel:
    from mm.checkpoint import unwrap

    return unwrap(module).model


__all__ = ["TrainConfig", "PretrainConfig", "fit", "train_loop", "train_step", "read_metrics", "Stream",
           # moved to mm.frozen / mm.train_log, importable from here as before
           "TowerFeatures", "check_frozen_features", "frozen_feature_dataset", "MetricsLog"]
