"""``mm refresh --config configs/refresh.yaml``: the scheduled incremental refresh.

    mm refresh --config configs/refresh.yaml [--set train.max_steps=50 ...] [--address ADDR]
    python -m jobs.refresh ...     # the same, for `ray job submit --submission-id refresh-<date>`

Every root (``storage.corpus_root``, ``models_root``, ``reports_root``) and every source may be a
local path or a URI (``s3://``, ``gs://``: pyarrow.fs through core.storage); on an object store
the refresh needs no shared POSIX filesystem.

One run, under a lock in storage (``CORPUS/_refresh.lock``: an ``O_EXCL`` file locally, an object
created with ``If-None-Match: *`` on S3, core.locking.StorageLock; a second run exits at once,
code 3, with one line naming the holder):

1. **discover** the inputs (tar shards, manifests, folders) under ``sources`` that the ledger
   ``CORPUS/_ledger.parquet`` does not hold yet, or holds with another checksum
   (pipelines/ledger.py). Nothing new: the run stops here (no curation, no training) and says so.
2. **curate** the new and changed inputs (the corpus tokenizer once one exists) into a staging
   dir, then dedup them against the *whole existing corpus* through the banded index
   ``CORPUS/_index/`` (pipelines/incremental.py: only the new rows are banded, joined on the
   stored band keys, and verified against the stored rows they meet, so the cost follows the new
   data, bench/refresh_cost.py): cross-snapshot duplicates move from ``data/`` to ``rejects/cross_snapshot.parquet`` and ``stats.json`` is corrected so the
   invariant still holds. The fixed held-out set (``heldout_sources``) is curated once into
   ``CORPUS/heldout``.
3. **commit**: the snapshot's index rows and bands are written, the staging dir is moved to
   ``CORPUS/snapshot=YYYYMMDDTHHMM/`` (a rename locally; on an object store a copy then a delete,
   redone from the staging dir if interrupted; a partition, readable with
   ``ray.data.read_parquet("CORPUS/snapshot=*/data")``) and the ledger gains its inputs.
4. **train**: continue pretraining from the promoted model (``MODELS/current``; from scratch the
   first time) on the new snapshot mixed with the old snapshots (``train.replay_ratio`` of the
   batches replay old data) for ``train.max_steps`` steps, into ``MODELS/run-<snapshot>``.
5. **evaluate** the candidate (and the promoted model, once per held-out version) on the held-out
   set; **promote** (``MODELS/current`` swapped atomically) only if ``gate.metric`` is no worse
   than the promoted model's by more than ``gate.tolerance``; otherwise keep it and say why
   (jobs/gate.py). ``MODELS/current`` is a symlink locally and the object ``MODELS/current.json``
   (``{"target": RUN}``, one PUT) on an object store (core.locking.write_pointer).
6. **report**: ``REPORTS/refresh-<id>.json``, and a summary line on stdout.

Each stage runs the library function its own command runs (``run_curate``, ``fit``,
``evaluate_run``) with its config object: the stage's YAML and overrides (``curate``, ``train``,
``evaluate``: jobs/stages.py), loaded once when a step first needs it, with the refresh's own
changes made by ``dataclasses.replace`` (modality, tokenizer, step budget, mix weights, split).
A bad stage config fails that step. Lineage keys hash the resolved config objects.

Crash safety: every step's result goes to ``CORPUS/_refresh_state.json``; a rerun resumes the
unfinished refresh (same snapshot id, same input list) at the step that failed. Curation restarts
from scratch in its staging dir; commit is idempotent; training resumes from the run's checkpoints.

Tested in tests/test_refresh.py (units, and the three-refresh story end to end), on S3
(moto_server) in tests/test_refresh_s3.py (lock, pointer, two refreshes at once) and
tests/test_s3_chain.py (the chain with a refresh, every path s3://).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from core import lineage as L
from core.config import load_config, to_dict
from core.storage import exists, is_local, join, local_dir, move, read_bytes, remove, resolve
from jobs.cli import UsageError, add_common, check_out_dir, run
from jobs.gate import GateConfig, decide, heldout_metric, metric_name
from jobs.stages import StageConfig, StageFailed, load_stage_config, stage_errors

log = logging.getLogger("mm.refresh")
EXIT_LOCKED = 3


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
        self.corpus = _root(cfg.storage.corpus_root)
        self.models = _root(cfg.storage.models_root)
        self.reports = _root(cfg.storage.reports_root)
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


def _root(path: str) -> str:
    """A storage root as the refresh names it: an absolute local path, or the URI as given."""
    return resolve(path)[1] if is_local(path) else str(path).rstrip("/")


def _remove(path: str) -> None:
    fs, p, _ = resolve(path)
    remove(fs, p)


def summarize(report: dict) -> str:
    s, d = report["steps"], report["decision"]
    parts = [f"refresh {report['refresh']}"]
    if "discover" in s:
        x = s["discover"]
        parts.append(f"{len(x['new'])} new, {len(x['changed'])} changed, {x['unchanged']} unchanged inputs")
    if "curate" in s:
        c = s["curate"]
        parts.append(f"curated {c['inputs']}: {c['kept']} kept, cross-snapshot duplicates "
                     f"{c['cross_snapshot']['duplicate']} exact + {c['cross_snapshot']['near_duplicate']} near")
    if "train" in s:
        parts.append(f"trained {s['train']['steps']} steps from {s['train']['init'] or 'scratch'}")
    parts.append(f"{d['action']}: {d['why']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm refresh", description=__doc__.split("\n\n")[0])
    add_common(p)
    return p


def check_config(cfg: RefreshConfig) -> None:
    if not cfg.sources:
        raise UsageError("sources is empty: say where new inputs arrive (sources: [dir, glob, ...])")
    for what, path in (("curate.config", cfg.curate.config), ("train.config", cfg.train.config),
                       ("evaluate.config", cfg.evaluate.config)):
        if path and not Path(path).is_file():
            raise UsageError(f"{what} {path} does not exist")
    if not cfg.heldout_sources:
        raise UsageError("heldout_sources is empty: the promotion gate needs a fixed held-out set")
    from pipelines.listing import expand_sources

    try:
        expand_sources(list(cfg.heldout_sources))
    except ValueError as e:
        raise UsageError(f"heldout_sources: {e}") from None
    for name in ("corpus_root", "models_root", "reports_root"):
        try:
            check_out_dir(getattr(cfg.storage, name))
        except UsageError as e:  # its message names --out
            raise UsageError(str(e).replace("--out ", f"storage.{name} ", 1)) from None


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(RefreshConfig, args.config, args.overrides)
    check_config(cfg)
    corpus = _root(cfg.storage.corpus_root)
    if is_local(corpus):
        Path(corpus).mkdir(parents=True, exist_ok=True)
    try:
        lock = L.StorageLock(join(corpus, "_refresh.lock"), owner="mm refresh", stale_after_s=cfg.lock_stale_after_s)
        lock.acquire()
    except ValueError as e:  # a store whose lock is not supported (gs://)
        raise UsageError(f"storage.corpus_root: {e}") from None
    except L.LockHeld as e:
        print(f"refresh: {e}; this run exits without changing anything", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as e:  # credentials, a missing bucket, an unreachable endpoint: nothing was changed
        raise UsageError(f"storage.corpus_root {corpus}: {str(e).splitlines()[0]}") from None
    try:
        report = Refresh(cfg, {"file": args.config, "overrides": list(args.overrides), "resolved": to_dict(cfg)},
                         address=args.address, lock=lock).run()
    except L.LockLost as e:
        print(f"refresh: {e}; stopped before the next step. Rerun when storage is reachable: it resumes",
              file=sys.stderr)
        return 1
    except StageFailed as e:
        print(f"refresh: {e}\nrefresh: the state is kept in {join(corpus, '_refresh_state.json')}; fix the cause and "
              f"rerun: the refresh resumes at the failed step", file=sys.stderr)
        return 1
    finally:
        lock.release()
    print(summarize(report))
    print(json.dumps({"report": join(_root(cfg.storage.reports_root), f"refresh-{report['refresh']}.json"),
                      "decision": report["decision"]["action"]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["RefreshConfig", "TrainStage", "GateConfig", "Refresh", "summarize", "main"]
