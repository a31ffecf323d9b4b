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
tests/test_s3_chain.py (the chain with a refresh, every path s3://). The config and the steps
(``RefreshConfig``, ``Refresh``) are in jobs/refresh_steps.py; this module is the command: its
config checks, the lock, the exit codes and the summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from core import lineage as L
from core.config import load_config, to_dict
from core.storage import is_local, join
from jobs.cli import UsageError, add_common, check_out_dir, run
from jobs.gate import GateConfig
from jobs.refresh_steps import Refresh, RefreshConfig, StorageConfig, TrainStage, storage_root
from jobs.stages import StageFailed

EXIT_LOCKED = 3


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
    corpus = storage_root(cfg.storage.corpus_root)
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
    print(json.dumps({"report": join(storage_root(cfg.storage.reports_root), f"refresh-{report['refresh']}.json"),
                      "decision": report["decision"]["action"]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["RefreshConfig", "StorageConfig", "TrainStage", "GateConfig", "Refresh", "summarize", "main"]
