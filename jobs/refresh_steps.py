"""The refresh's config and its run: ``RefreshConfig`` and ``Refresh`` (state, steps, report).

    report = Refresh(cfg, {"file": ..., "overrides": [...], "resolved": ...}, address, lock).run()

``Refresh`` runs the steps of ``mm refresh`` (discover, curate, commit, train, evaluate, decide;
the report) in order, each result saved to ``CORPUS/_refresh_state.json`` before the next, so a
rerun resumes at the step that failed; it calls ``lock.check()`` before every step. What each
step does, the storage layout and the crash-safety rules are in jobs/refresh.py's docstring,
which is the command's documentation; that module holds the CLI (config checks, the lock, exit
codes, the summary line). Tested in tests/test_refresh.py and tests/test_refresh_s3.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from core import lineage as L
from core.config import to_dict
from core.storage import exists, is_local, join, local_dir, move, read_bytes, remove, resolve
from jobs.gate import GateConfig, decide, heldout_metric, metric_name
from jobs.stages import StageConfig, StageFailed, load_stage_config, stage_errors

log = logging.getLogger("mm.refresh")


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class StorageConfig:
    corpus_root: str = "corpus"      # snapshot=*/, heldout/, tokenizer/, _ledger.parquet, _index/
    models_root: str = "models"      # run-<snapshot>/, current -> the promoted run
    reports_root: str = "reports"    # refresh-<id>.json


@dataclass(frozen=True)
class TrainStage(StageConfig):
    """The pretraining stage of a refresh: its config reference plus the refresh's step budget and replay."""

    config: str | None = "configs/pretrain.yaml"
    max_steps: int = 200             # step budget of one refresh's (continued) pretraining
    replay_ratio: float = 0.5        # fraction of batches drawn from older snapshots

    def __post_init__(self) -> None:
        if self.max_steps < 1 or not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError("max_steps must be >= 1 and replay_ratio in [0, 1)")


@dataclass(frozen=True)
class RefreshConfig:
    sources: tuple[str, ...] = ()    # URIs/paths/globs the inputs arrive under
    modality: Literal["image", "video"] = "image"
    heldout_sources: tuple[str, ...] = ()  # the fixed held-out inputs (never trained on)
    storage: StorageConfig = field(default_factory=StorageConfig)
    curate: StageConfig = field(default_factory=StageConfig)
    train: TrainStage = field(default_factory=TrainStage)
    evaluate: StageConfig = field(default_factory=StageConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    lock_stale_after_s: float = 900.0  # a lock without heartbeat for this long belongs to a dead run


# --------------------------------------------------------------------------- the run
class Refresh:
    """One refresh: its paths, its persisted state and its steps (each resumable)."""

    STEPS = ("discover", "curate", "commit", "train", "evaluate", "decide")

    def __init__(self, cfg: RefreshConfig, argv_config: dict, address: str | None = None,
                 lock: L.StorageLock | None = None):
        self.cfg = cfg
        self.address = address
        self.lock = lock  # checked before every step
        self.corpus = storage_root(cfg.storage.corpus_root)
        self.models = storage_root(cfg.storage.models_root)
        self.reports = storage_root(cfg.storage.reports_root)
        self.state_path = join(self.corpus, "_refresh_state.json")
        self.argv_config = argv_config
        self.state: dict = {}

    # -- stage configs: loaded once, when a step first needs one -----------------------------
    @functools.cached_property
    def curate_config(self):
        from pipelines.curate import CurateConfig

        with stage_errors():
            return replace(load_stage_config("curate", CurateConfig, self.cfg.curate), modality=self.cfg.modality)

    @functools.cached_property
    def pretrain_config(self):
        from mm.train import PretrainConfig

        with stage_errors():
            return load_stage_config("train", PretrainConfig, self.cfg.train)

    @functools.cached_property
    def evaluate_config(self):
        from mm.evaluate import EvalConfig

        with stage_errors():  # the held-out set is curated into one split, train (output.val_fraction=0)
            return replace(load_stage_config("evaluate", EvalConfig, self.cfg.evaluate), split="train")

    # -- state -------------------------------------------------------------------------------
    def load_or_start(self) -> None:
        prev = L.read_json(self.state_path)
        if isinstance(prev, dict) and prev.get("snapshot"):
            self.state = prev
            self.state["resumed"] = self.state.get("resumed", 0) + 1
            log.warning("resuming refresh snapshot=%s at step %s (previous attempt: %s)", prev["snapshot"],
                        self._next_step(), prev.get("error") or "interrupted")
        else:
            self.state = {"snapshot": self._new_snapshot_id(), "started_at": L.now_utc(), "steps": {},
                          "config": self.argv_config, "resumed": 0}
        self._save()

    def _new_snapshot_id(self) -> str:
        t = time.time()
        while True:
            sid = time.strftime("%Y%m%dT%H%M", time.gmtime(t))
            if not exists(join(self.corpus, f"snapshot={sid}")) and not exists(join(self.reports, f"refresh-{sid}.json")):
                return sid
            t += 60

    def _next_step(self) -> str:
        return next((s for s in self.STEPS if s not in self.state.get("steps", {})), "report")

    def _save(self) -> None:
        L.write_json_atomic(self.state_path, self.state)

    @property
    def sid(self) -> str:
        return self.state["snapshot"]

    @property
    def snapshot_dir(self) -> str:
        return join(self.corpus, f"snapshot={self.sid}")

    @property
    def staging(self) -> str:
        return join(self.corpus, "_staging", f"snapshot={self.sid}")

    @property
    def run_dir(self) -> str:
        return join(self.models, f"run-{self.sid}")

    @property
    def index_dir(self) -> str:
        return join(self.corpus, "_index")

    @property
    def tokenizer_dir(self) -> str:
        return join(self.corpus, "tokenizer")

    def has_tokenizer(self) -> bool:
        """The corpus tokenizer is complete (its copy is made under a temp name, then moved)."""
        return exists(self.tokenizer_dir) and not exists(join(self.corpus, ".tokenizer.tmp"))

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> dict:
        self.load_or_start()
        steps = self.state["steps"]
        for name in self.STEPS:
            if name in steps:
                continue
            t0 = time.time()
            if self.lock is not None:
                self.lock.check()  # never change shared state under a lock this run may have lost
            try:
                if name != "discover":
                    self.ensure_ray()
                result = getattr(self, f"step_{name}")()
            except BaseException as e:
                self.state["error"] = f"step {name} failed: {type(e).__name__}: {e}"[:500]
                self._save()
                raise
            result["seconds"] = round(time.time() - t0, 2)
            steps[name] = result
            self.state.pop("error", None)
            self._save()
            if result.get("stop"):
                break
        return self.finish()

    def ensure_ray(self) -> None:
        """Ray starts (or is joined) only when a step needs it: a refresh with nothing new whose
        inputs all match the ledger by size and mtime never starts Ray."""
        from core.runtime import init_ray

        init_ray(self.address)

    def step_discover(self) -> dict:
        from pipelines.ledger import discover, read_ledger

        found = discover(self.cfg.sources, read_ledger(self.corpus), self.ensure_ray)
        todo = found["new"] + found["changed"]
        log.info("discovered %d new, %d changed, %d unchanged inputs", len(found["new"]), len(found["changed"]),
                 found["unchanged"])
        return {**found, "stop": not todo,
                "why": "no new or changed inputs: nothing to curate or train" if not todo else None}

    def _with_tokenizer(self, cfg, **output):
        """The curate config with the corpus tokenizer (and ``output`` fields) put in."""
        cfg = replace(cfg, tokenizer=replace(cfg.tokenizer, path=local_dir(self.tokenizer_dir)))
        return replace(cfg, output=replace(cfg.output, **output)) if output else cfg

    def step_curate(self) -> dict:
        from pipelines.incremental import curate_snapshot, dedup_against_index

        d = self.state["steps"]["discover"]
        uris = [r["uri"] for r in d["new"] + d["changed"]]
        has_tok = self.has_tokenizer()
        cfg = self._with_tokenizer(self.curate_config) if has_tok else self.curate_config
        _remove(self.staging)
        with stage_errors(f"curate of {self.staging}"):
            curate_snapshot(uris, self.staging, cfg)
        if not has_tok:  # the first snapshot's tokenizer becomes the corpus tokenizer
            import pyarrow.fs as pafs

            fs, tok, _ = resolve(self.tokenizer_dir)
            tmp = resolve(join(self.corpus, ".tokenizer.tmp"))[1]
            remove(fs, tok)
            remove(fs, tmp)
            if is_local(self.corpus):  # pyarrow's copy_files does not create a local destination folder
                fs.create_dir(tmp, recursive=True)
            pafs.copy_files(resolve(join(self.staging, "tokenizer"))[1], tmp, source_filesystem=fs,
                            destination_filesystem=fs)
            move(fs, tmp, tok)
        self.ensure_heldout()
        dups = dedup_against_index(self.staging, self.index_dir, self.sid, self.cfg.modality, cfg.dedup)
        st = L.read_json(join(self.staging, "stats.json"))
        log.info("curated %d inputs into snapshot=%s: %d kept; cross-snapshot %s", st["inputs"], self.sid,
                 st["kept"], dups)
        return {"inputs": st["inputs"], "kept": st["kept"], "rejected": st["rejected"],
                "train_rows": st["splits"]["train"], "cross_snapshot": dups, "invariant_ok": st.get("invariant_ok")}

    def ensure_heldout(self) -> None:
        """Curate the fixed held-out set once, with the corpus tokenizer, all rows in one split."""
        if not self.cfg.heldout_sources:
            return
        from pipelines.incremental import HELDOUT, curate_snapshot, index_snapshot

        out = join(self.corpus, "heldout")
        key = L.stage_key("heldout", L.source_refs(self.cfg.heldout_sources), {"curate": to_dict(self.curate_config)})
        plan = L.plan_stage(out, key)
        if plan.action != "skip":
            L.begin_stage(out, key, L.Plan("fresh", plan.reason))
            with stage_errors(f"curate of {out}"):
                curate_snapshot(list(self.cfg.heldout_sources), out,
                                self._with_tokenizer(self.curate_config, val_fraction=0.0))
            index_snapshot(out, self.index_dir, HELDOUT, self.cfg.modality, self.curate_config.dedup)
            L.stamp(out, L.lineage_record("heldout", key, L.source_refs(self.cfg.heldout_sources), {}))

    def step_commit(self) -> dict:
        from pipelines.curate import WORK_ROWS_DIR
        from pipelines.incremental import index_snapshot
        from pipelines.ledger import write_ledger_rows

        if exists(self.staging):
            if exists(join(self.staging, WORK_ROWS_DIR)):  # else indexed by an attempt that stopped later
                index_snapshot(self.staging, self.index_dir, self.sid, self.cfg.modality, self.curate_config.dedup)
            d = self.state["steps"]["discover"]
            inputs = [{"uri": r["uri"], "size": r["size"], "checksum": r["checksum"]} for r in d["new"] + d["changed"]]
            L.stamp(self.staging, L.lineage_record("curate", L.sha256_json(inputs), inputs,
                                                   {"curate": to_dict(self.curate_config)}, {"snapshot": self.sid}))
            fs, staging, _ = resolve(self.staging)
            snapshot = resolve(self.snapshot_dir)[1]
            remove(fs, snapshot)  # a move an earlier attempt left half done (object stores copy, then delete)
            move(fs, staging, snapshot)
            if is_local(self.corpus):
                with contextlib.suppress(OSError):
                    Path(staging).parent.rmdir()  # _staging/ when no other staging dir is left
        elif not exists(self.snapshot_dir):
            raise StageFailed(f"neither {self.staging} nor {self.snapshot_dir} exists; rerun after removing "
                              f"{self.state_path} to start over")
        d = self.state["steps"]["discover"]
        write_ledger_rows(self.corpus, d["new"] + d["changed"], self.sid)
        kept = self.state["steps"]["curate"]["train_rows"]
        return {"snapshot_dir": str(self.snapshot_dir), "stop": kept == 0,
                "why": "every new input was rejected or a duplicate: nothing new to train on" if kept == 0 else None}

    def step_train(self) -> dict:
        from mm.train import fit
        from pipelines.incremental import replay_mix

        init = L.read_pointer(join(self.models, "current"))
        corpora, weights = replay_mix(self.corpus, self.snapshot_dir, self.cfg.train.replay_ratio)
        base = self.pretrain_config
        cfg = replace(base, train=replace(base.train, max_steps=self.cfg.train.max_steps),
                      data=replace(base.data, mix_weights=tuple(weights)))
        inputs = [L.manifest_ref(c) for c in corpora] + ([L.manifest_ref(init)] if init else [])
        config = to_dict(cfg)
        key = L.stage_key("pretrain", inputs, config)
        plan = L.plan_stage(self.run_dir, key)
        if plan.action != "skip":
            L.begin_stage(self.run_dir, key, plan)
            with stage_errors("pretrain"):
                fit(cfg, corpora, self.run_dir, init=str(init) if init else None)
            L.stamp(self.run_dir, L.lineage_record("pretrain", key, inputs, config))
        metrics = (read_bytes(join(self.run_dir, "metrics.jsonl")) or b"").decode()
        lines = [json.loads(x) for x in metrics.splitlines() if x.strip()]
        return {"run_dir": str(self.run_dir), "init": str(init) if init else None, "plan": plan.action,
                "corpora": corpora, "mix_weights": weights,
                "steps": lines[-1]["step"] if lines else 0}

    def step_evaluate(self) -> dict:
        if not self.cfg.heldout_sources:
            raise StageFailed("heldout_sources is empty: a refresh needs a fixed held-out set to gate on")
        heldout, cur_run = join(self.corpus, "heldout"), self.state["steps"]["train"]["init"]
        cand = heldout_metric(self.run_dir, heldout, self.evaluate_config, self.cfg.gate)
        cur = heldout_metric(cur_run, heldout, self.evaluate_config, self.cfg.gate) if cur_run else None
        return {"candidate": cand, "current": cur, "current_run": cur_run}

    def step_decide(self) -> dict:
        e = self.state["steps"]["evaluate"]
        modality = (L.read_json(join(self.corpus, "heldout", "stats.json")) or {}).get("modality", "image")
        gate = replace(self.cfg.gate, metric=metric_name(self.cfg.gate, modality))
        action, why = decide(e["candidate"], e["current"], e["current_run"], gate)
        if action == "promoted":
            L.write_pointer(join(self.models, "current"), self.run_dir)
        return {"action": action, "why": why, "current": str(L.read_pointer(join(self.models, "current")))}

    def finish(self) -> dict:
        s = self.state["steps"]
        stop = next((s[n] for n in self.STEPS if n in s and s[n].get("stop")), None)
        decision = s.get("decide") or {"action": "skipped", "why": stop["why"] if stop else "?"}
        rid = self.sid
        report = {"refresh": rid, "snapshot": str(self.snapshot_dir) if "commit" in s else None,
                  "started_at": self.state["started_at"], "finished_at": L.now_utc(),
                  "resumed": self.state.get("resumed", 0), "decision": decision, "steps": s,
                  "config": self.state["config"], "code_version": L.code_version()}
        L.write_json_atomic(join(self.reports, f"refresh-{rid}.json"), report)
        _remove(self.state_path)
        return report


def storage_root(path: str) -> str:
    """A storage root as the refresh names it: an absolute local path, or the URI as given."""
    return resolve(path)[1] if is_local(path) else str(path).rstrip("/")


def _remove(path: str) -> None:
    fs, p, _ = resolve(path)
    remove(fs, p)


__all__ = ["StorageConfig", "TrainStage", "RefreshConfig", "Refresh", "storage_root"]
