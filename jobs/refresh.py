"""``mm refresh --config configs/refresh.yaml``: the scheduled incremental refresh.

    mm refresh --config configs/refresh.yaml [--set train.max_steps=50 ...] [--address ADDR]
    python -m jobs.refresh ...     # the same, for `ray job submit --submission-id refresh-<date>`

One run, under a lock in storage (``CORPUS/_refresh.lock``; a second run exits at once, code 3):

1. **discover** the inputs (tar shards, manifests, folders) under ``sources`` and compare them with
   the ledger ``CORPUS/_ledger.parquet`` (uri, kind, size, mtime_ns, checksum, snapshot): an input
   whose size and mtime match its ledger row is unchanged without being read; otherwise it is
   checksummed, and it is new or changed when no ledger row has that checksum. Nothing new: the
   run stops here (no curation, no training) and says so.
2. **curate** the new and changed inputs with ``jobs.curate`` (the corpus tokenizer once one
   exists) into a staging dir, then dedup them against the *whole existing corpus* through the
   persistent index ``CORPUS/_index/*.parquet`` (exact content hash + pHash LSH bands, one file
   per snapshot plus the held-out set) with ``pipelines.dedup.find_duplicates``: existing rows get
   priority 0 (never dropped), the held-out set -1, new rows 1. Cross-snapshot duplicates move from
   ``data/`` to ``rejects/`` (reason ``duplicate``/``near_duplicate``, the existing keeper's
   sample_id in detail) and ``stats.json`` is corrected so the invariant still holds.
   The fixed held-out set (``heldout.sources``) is curated once into ``CORPUS/heldout``.
3. **commit**: the snapshot's index rows are written, the staging dir is renamed to
   ``CORPUS/snapshot=YYYYMMDDTHHMM/`` (a partition, readable with
   ``ray.data.read_parquet("CORPUS/snapshot=*/data")``) and the ledger gains its inputs.
4. **train**: continue pretraining from the promoted model (``MODELS/current``; from scratch the
   first time) on the new snapshot mixed with the old snapshots (``train.replay_ratio`` of the
   batches replay old data) for ``train.max_steps`` steps, into ``MODELS/run-<snapshot>``.
5. **evaluate** the candidate (and the promoted model, once per held-out version) on the held-out
   set; **promote** (``MODELS/current`` swapped atomically) only if ``gate.metric`` is no worse
   than the promoted model's by more than ``gate.tolerance``; otherwise keep it and say why.
6. **report**: ``REPORTS/refresh-<id>.json``, and a summary line on stdout.

Crash safety: every step's result goes to ``CORPUS/_refresh_state.json``; a rerun resumes the
unfinished refresh (same snapshot id, same input list) at the step that failed. Curation restarts
from scratch in its staging dir; commit is idempotent; training resumes from the run's checkpoints.

Tested in tests/test_refresh.py (units, and the three-refresh story end to end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import lineage as L
from core.config import load_config, to_dict
from jobs.cli import UsageError, add_common, run

log = logging.getLogger("mm.refresh")
EXIT_LOCKED = 3
LEDGER_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("kind", pa.string()),
                           pa.field("size", pa.int64()), pa.field("mtime_ns", pa.int64()),
                           pa.field("checksum", pa.string()), pa.field("snapshot", pa.string()),
                           pa.field("recorded_at", pa.string())])
INDEX_COLUMNS = ["row_id", "sample_id", "source", "key", "content_hash", "hashes", "area", "caption"]


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class StorageConfig:
    corpus_root: str = "corpus"      # snapshot=*/, heldout/, tokenizer/, _ledger.parquet, _index/
    models_root: str = "models"      # run-<snapshot>/, current -> the promoted run
    reports_root: str = "reports"    # refresh-<id>.json


@dataclass(frozen=True)
class StageConfig:
    config: str | None = None        # the stage's own YAML (configs/curate.yaml, ...); None: defaults
    overrides: tuple[str, ...] = ()  # KEY=VALUE applied on top, as --set


@dataclass(frozen=True)
class TrainConfig:
    config: str | None = "configs/pretrain.yaml"
    overrides: tuple[str, ...] = ()
    max_steps: int = 200             # step budget of one refresh's (continued) pretraining
    replay_ratio: float = 0.5        # fraction of batches drawn from older snapshots

    def __post_init__(self) -> None:
        if self.max_steps < 1 or not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError("max_steps must be >= 1 and replay_ratio in [0, 1)")


@dataclass(frozen=True)
class GateConfig:
    task: Literal["retrieval", "zeroshot"] = "retrieval"
    metric: str = "image_retrieval_recall@5"   # a key of eval.json's metrics[task]; higher is better
    tolerance: float = 0.02                    # absolute: promote if new >= current - tolerance


@dataclass(frozen=True)
class RefreshConfig:
    sources: tuple[str, ...] = ()    # URIs/paths/globs the inputs arrive under
    modality: Literal["image", "video"] = "image"
    heldout_sources: tuple[str, ...] = ()  # the fixed held-out inputs (never trained on)
    storage: StorageConfig = field(default_factory=StorageConfig)
    curate: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: StageConfig = field(default_factory=StageConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    lock_stale_after_s: float = 900.0  # a lock without heartbeat for this long belongs to a dead run


class StageFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------- ledger + discovery
def ledger_path(corpus: Path) -> Path:
    return corpus / "_ledger.parquet"


def read_ledger(corpus: Path) -> pa.Table:
    p = ledger_path(corpus)
    return pq.read_table(p).cast(LEDGER_SCHEMA) if p.is_file() else LEDGER_SCHEMA.empty_table()


def write_ledger_rows(corpus: Path, rows: list[dict], snapshot: str) -> None:
    """Append ``rows`` for ``snapshot`` (replacing any rows of that snapshot: idempotent), atomically."""
    old = read_ledger(corpus)
    old = old.filter(pc.not_equal(old.column("snapshot"), snapshot))
    now = L.now_utc()
    new = pa.Table.from_pylist([{**{k: r[k] for k in ("uri", "kind", "size", "mtime_ns", "checksum")},
                                 "snapshot": snapshot, "recorded_at": now} for r in rows], schema=LEDGER_SCHEMA)
    p = ledger_path(corpus)
    tmp = p.with_name(f".{p.name}.tmp")
    pq.write_table(pa.concat_tables([old, new]), tmp)
    tmp.replace(p)


def discover(sources: Sequence[str], ledger: pa.Table, ensure_ray=lambda: None) -> dict:
    """Inputs under ``sources`` → {"new": [...], "changed": [...], "unchanged": n}; each input a
    ledger-shaped dict. Files whose size and mtime match the ledger are not read."""
    import pyarrow.fs as pafs

    from pipelines.curate import checksum_inputs
    from pipelines.listing import expand_sources

    files = []
    for src in sources:
        try:
            files += expand_sources([src])
        except ValueError as e:
            if "holds no inputs" not in str(e):
                raise
            log.info("source %s holds no inputs yet", src)
    known = {(r["uri"], r["size"], r["mtime_ns"]): r["checksum"] for r in ledger.to_pylist()}
    sums_by_uri: dict[str, set] = {}
    for r in ledger.to_pylist():
        sums_by_uri.setdefault(r["uri"], set()).add(r["checksum"])
    records, to_hash = [], []
    for f in files:
        info = f.fs.get_file_info(f.path)
        mtime = int(info.mtime_ns or 0)
        if f.kind == "folder":  # a folder's mtime says little: its checksum is a cheap listing digest
            mtime = max((i.mtime_ns or 0 for i in f.fs.get_file_info(pafs.FileSelector(f.path, recursive=True))),
                        default=0)
        rec = {"uri": f.uri, "kind": f.kind, "size": int(f.size), "mtime_ns": mtime,
               "checksum": known.get((f.uri, int(f.size), mtime))}
        records.append(rec)
        if rec["checksum"] is None:
            to_hash.append(f)
    if to_hash:
        ensure_ray()  # checksums are computed in parallel Ray tasks
        sums = {r["uri"]: r["checksum"] for r in checksum_inputs(to_hash)}
        for rec in records:
            rec["checksum"] = rec["checksum"] or sums[rec["uri"]]
    out: dict = {"new": [], "changed": [], "unchanged": 0}
    for rec in records:
        seen = sums_by_uri.get(rec["uri"])
        if seen is None:
            out["new"].append(rec)
        elif rec["checksum"] not in seen:
            out["changed"].append(rec)
        else:
            out["unchanged"] += 1
    return out


# --------------------------------------------------------------------------- cross-snapshot dedup
def _work_rows(curated: Path) -> pa.Table:
    return pq.read_table(curated / "_work" / "processed")


def _join_keys(t: pa.Table, modality: str) -> list[tuple]:
    cols = ["source", "key"] + (["start_s"] if modality == "video" else [])
    values = [t.column(c).to_pylist() for c in cols]
    return [tuple(round(v, 3) if isinstance(v, float) else v for v in row) for row in zip(*values)]


def kept_index_rows(curated: Path, modality: str, namespace: str) -> pa.Table:
    """Index rows (INDEX_COLUMNS) of the rows ``curated/data`` kept, from its ``_work`` rows; the
    row_id is namespaced so the same (source, key) in two snapshots never collides."""
    from pipelines.schema import make_sample_id

    data = pq.read_table(curated / "data", columns=["source", "key"] + (["start_s"] if modality == "video" else []))
    kept = set(_join_keys(data, modality))
    work = _work_rows(curated)
    work = work.filter(pc.is_null(work.column("reason")))
    mask = pa.array([k in kept for k in _join_keys(work, modality)], pa.bool_())
    rows = work.filter(mask).select(INDEX_COLUMNS)
    rid = pa.array([make_sample_id(namespace, r) for r in rows.column("row_id").to_pylist()], pa.string())
    return rows.set_column(0, "row_id", rid)


def dedup_against_index(curated: Path, index_files: list[Path], modality: str, dedup_cfg, namespace: str) -> dict:
    """Reject rows of ``curated`` that duplicate a row of the index (existing corpus, held-out set).
    Returns {"duplicate": n, "near_duplicate": n, "heldout": n}; rewrites data/, rejects/, stats.json."""
    import ray

    from pipelines.dedup import find_duplicates
    from pipelines.schema import REJECT_SCHEMA

    new = kept_index_rows(curated, modality, namespace)
    counts = {"duplicate": 0, "near_duplicate": 0, "heldout": 0}
    if new.num_rows == 0 or not index_files:
        return counts
    parts = [new.append_column("priority", pa.array([1] * new.num_rows, pa.int64()))]
    heldout_ids: set[str] = set()
    for f in index_files:
        t = pq.read_table(f).select(INDEX_COLUMNS)
        prio = -1 if f.stem == "heldout" else 0
        if prio < 0:
            heldout_ids.update(t.column("sample_id").to_pylist())
        parts.append(t.append_column("priority", pa.array([prio] * t.num_rows, pa.int64())))
    rows = ray.data.from_arrow(pa.concat_tables(parts))
    drops = find_duplicates(rows, dedup_cfg)
    new_ids = set(new.column("row_id").to_pylist())
    drops = drops.filter(pa.array([r in new_ids for r in drops.column("row_id").to_pylist()], pa.bool_()))
    if drops.num_rows == 0:
        return counts
    by_rid = {r: i for i, r in enumerate(new.column("row_id").to_pylist())}
    idx = pa.array([by_rid[r] for r in drops.column("row_id").to_pylist()], pa.int64())
    dropped = new.take(idx)
    rejects = pa.table({"source": dropped.column("source"), "key": dropped.column("key"),
                        "stage": pa.array(["dedup"] * drops.num_rows), "reason": drops.column("reason"),
                        "detail": drops.column("keeper")}).cast(REJECT_SCHEMA)
    pq.write_table(rejects, curated / "rejects" / "cross_snapshot.parquet")
    gone = set(_join_keys(dropped, modality))
    removed = _rewrite_data(curated, gone, modality)
    for reason, keeper in zip(drops.column("reason").to_pylist(), drops.column("keeper").to_pylist()):
        counts[reason] += 1
        counts["heldout"] += keeper in heldout_ids
    _correct_stats(curated, removed, drops.column("reason").to_pylist(), modality)
    return counts


def _rewrite_data(curated: Path, gone: set, modality: str) -> pa.Table:
    """Drop rows keyed in ``gone`` from every data/ file (each rewritten atomically); return the
    removed rows' (split, caption, input_ids) for the stats correction."""
    removed = []
    for f in sorted((curated / "data").glob("*.parquet")):
        t = pq.read_table(f)
        mask = pa.array([k in gone for k in _join_keys(t, modality)], pa.bool_())
        if not pc.any(mask).as_py():
            continue
        removed.append(t.filter(mask).select(["sample_id", "split", "caption", "input_ids"]))
        tmp = f.with_name(f".{f.name}.tmp")
        pq.write_table(t.filter(pc.invert(mask)), tmp)
        tmp.replace(f)
    return pa.concat_tables(removed)


def _correct_stats(curated: Path, removed: pa.Table, reasons: list[str], modality: str) -> None:
    from pipelines import stats as stats_mod

    st = json.loads((curated / "stats.json").read_text())
    n = removed.num_rows
    st["kept"] -= n
    for r in reasons:
        st["rejected"][r] = st["rejected"].get(r, 0) + 1
    st["rejected_total"] = sum(st["rejected"].values())
    st["rejected_by_stage"]["dedup"] = st["rejected_by_stage"].get("dedup", 0) + len(reasons)
    for s in removed.column("split").to_pylist():
        st["splits"][s] -= 1
    # Subtract the removed rows' caption histograms (bins are fixed, counts add up exactly).
    work = _work_rows(curated).select(["sample_id", "orig_width", "orig_height"])
    dims = {s: (w, h) for s, w, h in zip(*(work.column(c).to_pylist() for c in work.column_names))}
    ids = removed.column("sample_id").to_pylist()
    part = stats_mod.histogram_partials(pa.table({
        "orig_width": pa.array([dims[s][0] for s in ids], pa.int32()),
        "orig_height": pa.array([dims[s][1] for s in ids], pa.int32()),
        "caption": removed.column("caption"), "input_ids": removed.column("input_ids"),
        "split": removed.column("split")})).to_pylist()[0]
    for name, h in st["histograms"].items():
        h["counts"] = [a - b for a, b in zip(h["counts"], part[name])]
    st["cross_snapshot_duplicates"] = len(reasons)
    st["duplicates_dropped"] = st.get("duplicates_dropped", 0) + len(reasons)
    if modality == "image":
        st["invariant_ok"] = st["inputs"] == st["kept"] + st["rejected_total"]
    L.write_json_atomic(curated / "stats.json", st)


# --------------------------------------------------------------------------- the run
class Refresh:
    """One refresh: its paths, its persisted state and its steps (each resumable)."""

    STEPS = ("discover", "curate", "commit", "train", "evaluate", "decide")

    def __init__(self, cfg: RefreshConfig, argv_config: dict, address: str | None = None):
        self.cfg = cfg
        self.address = address
        self.corpus = Path(cfg.storage.corpus_root).resolve()
        self.models = Path(cfg.storage.models_root).resolve()
        self.reports = Path(cfg.storage.reports_root).resolve()
        self.state_path = self.corpus / "_refresh_state.json"
        self.argv_config = argv_config
        self.state: dict = {}

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
            if not (self.corpus / f"snapshot={sid}").exists() and not (self.reports / f"refresh-{sid}.json").exists():
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
    def snapshot_dir(self) -> Path:
        return self.corpus / f"snapshot={self.sid}"

    @property
    def staging(self) -> Path:
        return self.corpus / "_staging" / f"snapshot={self.sid}"

    @property
    def run_dir(self) -> Path:
        return self.models / f"run-{self.sid}"

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> dict:
        self.load_or_start()
        steps = self.state["steps"]
        for name in self.STEPS:
            if name in steps:
                continue
            t0 = time.time()
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
        found = discover(self.cfg.sources, read_ledger(self.corpus), self.ensure_ray)
        todo = found["new"] + found["changed"]
        log.info("discovered %d new, %d changed, %d unchanged inputs", len(found["new"]), len(found["changed"]),
                 found["unchanged"])
        return {**found, "stop": not todo,
                "why": "no new or changed inputs: nothing to curate or train" if not todo else None}

    def _curate(self, uris: list[str], out: Path, extra: list[str]) -> None:
        import jobs.curate

        argv = [*uris, "--out", str(out), "--modality", self.cfg.modality]
        if self.cfg.curate.config:
            argv += ["--config", self.cfg.curate.config]
        for o in (*self.cfg.curate.overrides, "output.keep_work=true", *extra):
            argv += ["--set", o]
        rc = jobs.curate.main(argv)
        if rc:
            raise StageFailed(f"curate of {out} exited with code {rc}")

    def _dedup_cfg(self):
        from pipelines.curate import CurateConfig

        cfg = load_config(CurateConfig, self.cfg.curate.config, list(self.cfg.curate.overrides))
        return cfg.dedup

    def step_curate(self) -> dict:
        d = self.state["steps"]["discover"]
        uris = [r["uri"] for r in d["new"] + d["changed"]]
        tok = self.corpus / "tokenizer"
        shutil.rmtree(self.staging, ignore_errors=True)
        self._curate(uris, self.staging, [f"tokenizer.path={tok}"] if tok.is_dir() else [])
        if not tok.is_dir():  # the first snapshot's tokenizer becomes the corpus tokenizer
            shutil.copytree(self.staging / "tokenizer", tok.with_name(".tokenizer.tmp"), dirs_exist_ok=True)
            tok.with_name(".tokenizer.tmp").rename(tok)
        heldout = self.ensure_heldout()
        index = sorted((self.corpus / "_index").glob("snapshot=*.parquet"))
        index = [f for f in index if f.stem != f"snapshot={self.sid}"]
        if heldout:
            index.append(self.corpus / "_index" / "heldout.parquet")
        dups = dedup_against_index(self.staging, index, self.cfg.modality, self._dedup_cfg(), self.sid)
        st = json.loads((self.staging / "stats.json").read_text())
        log.info("curated %d inputs into snapshot=%s: %d kept; cross-snapshot %s", st["inputs"], self.sid,
                 st["kept"], dups)
        return {"inputs": st["inputs"], "kept": st["kept"], "rejected": st["rejected"],
                "train_rows": st["splits"]["train"], "cross_snapshot": dups, "invariant_ok": st.get("invariant_ok")}

    def ensure_heldout(self) -> Path | None:
        """Curate the fixed held-out set once, with the corpus tokenizer, all rows in one split."""
        if not self.cfg.heldout_sources:
            return None
        out = self.corpus / "heldout"
        key = L.stage_key("heldout", L.source_refs(self.cfg.heldout_sources),
                          {"curate": [self.cfg.curate.config, list(self.cfg.curate.overrides)]})
        plan = L.plan_stage(out, key)
        if plan.action != "skip":
            L.begin_stage(out, key, L.Plan("fresh", plan.reason))
            self._curate(list(self.cfg.heldout_sources), out,
                         [f"tokenizer.path={self.corpus / 'tokenizer'}", "output.val_fraction=0.0"])
            rows = kept_index_rows(out, self.cfg.modality, "heldout")
            _write_parquet_atomic(rows, self.corpus / "_index" / "heldout.parquet")
            shutil.rmtree(out / "_work", ignore_errors=True)
            L.stamp(out, L.lineage_record("heldout", key, L.source_refs(self.cfg.heldout_sources), {}))
        return out

    def step_commit(self) -> dict:
        if self.staging.exists():
            rows = kept_index_rows(self.staging, self.cfg.modality, self.sid)
            _write_parquet_atomic(rows, self.corpus / "_index" / f"snapshot={self.sid}.parquet")
            shutil.rmtree(self.staging / "_work", ignore_errors=True)
            d = self.state["steps"]["discover"]
            inputs = [{"uri": r["uri"], "size": r["size"], "checksum": r["checksum"]} for r in d["new"] + d["changed"]]
            L.stamp(self.staging, L.lineage_record("curate", L.sha256_json(inputs), inputs,
                                                   {"curate": [self.cfg.curate.config, list(self.cfg.curate.overrides)]},
                                                   {"snapshot": self.sid}))
            self.staging.rename(self.snapshot_dir)
            with contextlib.suppress(OSError):
                self.staging.parent.rmdir()  # _staging/ when no other staging dir is left
        elif not self.snapshot_dir.is_dir():
            raise StageFailed(f"neither {self.staging} nor {self.snapshot_dir} exists; rerun after removing "
                              f"{self.state_path} to start over")
        d = self.state["steps"]["discover"]
        write_ledger_rows(self.corpus, d["new"] + d["changed"], self.sid)
        kept = self.state["steps"]["curate"]["train_rows"]
        return {"snapshot_dir": str(self.snapshot_dir), "stop": kept == 0,
                "why": "every new input was rejected or a duplicate: nothing new to train on" if kept == 0 else None}

    def old_snapshots(self) -> list[tuple[Path, int]]:
        out = []
        for d in sorted(self.corpus.glob("snapshot=*")):
            st = L.read_json(d / "stats.json") or {}
            rows = (st.get("splits") or {}).get("train", 0)
            if d != self.snapshot_dir and rows > 0 and (L.read_manifest(d) or {}).get("lineage"):
                out.append((d, rows))
        return out

    def step_train(self) -> dict:
        import jobs.pretrain

        init = L.read_pointer(self.models / "current")
        old = self.old_snapshots()
        corpora = [self.snapshot_dir] + [d for d, _ in old]
        replay = self.cfg.train.replay_ratio if old else 0.0
        total_old = sum(n for _, n in old) or 1
        weights = [1.0 - replay] + [replay * n / total_old for _, n in old]
        overrides = [*self.cfg.train.overrides, f"train.max_steps={self.cfg.train.max_steps}",
                     "data.mix_weights=[" + ",".join(f"{w:.6f}" for w in weights) + "]"]
        inputs = [L.manifest_ref(c) for c in corpora] + ([L.manifest_ref(init)] if init else [])
        config = {"config": self.cfg.train.config, "overrides": overrides}
        key = L.stage_key("pretrain", inputs, config)
        plan = L.plan_stage(self.run_dir, key)
        if plan.action != "skip":
            L.begin_stage(self.run_dir, key, plan)
            argv = [a for c in corpora for a in ("--data", str(c))] + ["--out", str(self.run_dir)]
            argv += ["--init", str(init)] if init else []
            argv += ["--config", self.cfg.train.config] if self.cfg.train.config else []
            argv += [a for o in overrides for a in ("--set", o)]
            rc = jobs.pretrain.main(argv)
            if rc:
                raise StageFailed(f"pretrain exited with code {rc}")
            L.stamp(self.run_dir, L.lineage_record("pretrain", key, inputs, config))
        lines = [json.loads(x) for x in (self.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {"run_dir": str(self.run_dir), "init": str(init) if init else None, "plan": plan.action,
                "corpora": [str(c) for c in corpora], "mix_weights": weights,
                "steps": lines[-1]["step"] if lines else 0}

    def evaluate(self, run: Path) -> dict:
        """The gate task's metrics of ``run`` on the held-out set, cached per held-out version."""
        import jobs.evaluate

        heldout = self.corpus / "heldout"
        out = run / "heldout" / "eval.json"
        ref = L.manifest_ref(heldout)
        cached = L.read_json(out)
        if isinstance(cached, dict) and cached.get("heldout_manifest_sha256") == ref["manifest_sha256"]:
            return cached
        argv = ["--model", str(run), "--data", str(heldout), "--out", str(out), "--task", self.cfg.gate.task,
                "--set", "split=train"]
        argv += ["--config", self.cfg.evaluate.config] if self.cfg.evaluate.config else []
        argv += [a for o in self.cfg.evaluate.overrides for a in ("--set", o)]
        rc = jobs.evaluate.main(argv)
        if rc:
            raise StageFailed(f"evaluate of {run} exited with code {rc}")
        result = json.loads(out.read_text())
        result["heldout_manifest_sha256"] = ref["manifest_sha256"]
        L.write_json_atomic(out, result)
        return result

    def metric(self, result: dict) -> float:
        g = self.cfg.gate
        try:
            return float(result["metrics"][g.task][g.metric])
        except KeyError:
            have = sorted((result.get("metrics") or {}).get(g.task, {}))
            raise StageFailed(f"gate metric {g.task}.{g.metric} not in the evaluation; have: {', '.join(have)}; "
                              f"skipped: {result.get('skipped')}") from None

    def step_evaluate(self) -> dict:
        if not self.cfg.heldout_sources:
            raise StageFailed("heldout_sources is empty: a refresh needs a fixed held-out set to gate on")
        cand = self.metric(self.evaluate(self.run_dir))
        cur_run = self.state["steps"]["train"]["init"]
        cur = self.metric(self.evaluate(Path(cur_run))) if cur_run else None
        return {"candidate": cand, "current": cur, "current_run": cur_run}

    def step_decide(self) -> dict:
        e, g = self.state["steps"]["evaluate"], self.cfg.gate
        name = f"{g.task}.{g.metric}"
        if e["current"] is None:
            action, why = "promoted", f"first model: {name} {e['candidate']:.4f}, nothing to compare against"
        elif e["candidate"] >= e["current"] - g.tolerance:
            action = "promoted"
            why = f"{name} {e['candidate']:.4f} >= {e['current']:.4f} - tolerance {g.tolerance} (current)"
        else:
            action = "held"
            why = (f"{name} {e['candidate']:.4f} < {e['current']:.4f} - tolerance {g.tolerance}: "
                   f"kept {e['current_run']}")
        if action == "promoted":
            L.write_pointer(self.models / "current", self.run_dir)
        return {"action": action, "why": why, "current": str(L.read_pointer(self.models / "current"))}

    def finish(self) -> dict:
        s = self.state["steps"]
        stop = next((s[n] for n in self.STEPS if n in s and s[n].get("stop")), None)
        decision = s.get("decide") or {"action": "skipped", "why": stop["why"] if stop else "?"}
        rid = self.sid
        report = {"refresh": rid, "snapshot": str(self.snapshot_dir) if "commit" in s else None,
                  "started_at": self.state["started_at"], "finished_at": L.now_utc(),
                  "resumed": self.state.get("resumed", 0), "decision": decision, "steps": s,
                  "config": self.state["config"], "code_version": L.code_version()}
        L.write_json_atomic(self.reports / f"refresh-{rid}.json", report)
        self.state_path.unlink(missing_ok=True)
        return report


def _write_parquet_atomic(t: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(t, tmp)
    tmp.replace(path)


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
    for root in (cfg.storage.corpus_root, cfg.storage.models_root, cfg.storage.reports_root):
        if Path(root).exists() and not Path(root).is_dir():
            raise UsageError(f"{root} is a file, expected a directory")


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(RefreshConfig, args.config, args.overrides)
    check_config(cfg)
    corpus = Path(cfg.storage.corpus_root)
    corpus.mkdir(parents=True, exist_ok=True)
    try:
        lock = L.StorageLock(corpus / "_refresh.lock", owner="mm refresh", stale_after_s=cfg.lock_stale_after_s)
        lock.acquire()
    except L.LockHeld as e:
        print(f"refresh: {e}; this run exits without changing anything", file=sys.stderr)
        return EXIT_LOCKED
    try:
        report = Refresh(cfg, {"file": args.config, "overrides": list(args.overrides), "resolved": to_dict(cfg)},
                         address=args.address).run()
    except StageFailed as e:
        print(f"refresh: {e}\nrefresh: the state is kept in {corpus / '_refresh_state.json'}; fix the cause and "
              f"rerun: the refresh resumes at the failed step", file=sys.stderr)
        return 1
    finally:
        lock.release()
    print(summarize(report))
    print(json.dumps({"report": str(Path(cfg.storage.reports_root).resolve() / f"refresh-{report['refresh']}.json"),
                      "decision": report["decision"]["action"]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["RefreshConfig", "Refresh", "discover", "read_ledger", "write_ledger_rows", "dedup_against_index",
           "kept_index_rows", "summarize", "main"]
