"""``mm pretrain``: pretrain a vision-language model on curated corpora with Ray Train.

    mm pretrain --data DIR [--data DIR ...] --out RUN [--config FILE] [--set KEY=VALUE ...] [--address ADDR]
    python -m jobs.pretrain ...   # the same, for `ray job submit`

Corpora mix by ``data.mix_weights`` (in --data order). Rerunning with the same ``--out`` resumes
from the run's last step checkpoint. Bad data dirs and configs fail before Ray starts, with one
line and exit code 2. Tested in tests/test_train.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from core.config import load_config
from jobs.cli import UsageError, add_common, check_out_dir, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="curated corpus dir (data/*.parquet + tokenizer/); repeat to mix corpora")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory (resumed if it holds a run)")
    p.add_argument("--init", default=None, metavar="RUN", help="start from this run's or model dir's weights")
    add_common(p)
    return p


def _main(args: argparse.Namespace) -> int:
    from mm.data import check_corpus
    from mm.train import PretrainConfig

    for d in args.data:
        try:
            check_corpus(d)
        except ValueError as e:
            raise UsageError(str(e)) from None
    check_out_dir(args.out)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.init is not None:
        from jobs.finetune import model_keys
        from mm.checkpoint import (
            CheckpointError,
            changed_model_keys,
            local_model_dir,
            model_dir,
            saved_model_config,
        )

        try:
            saved = saved_model_config(model_dir(local_model_dir(args.init)))  # a URI: fetched
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        # --init continues the run's model (mm.train keeps its config, lock.* aside): an explicit
        # --set model.* that differs would be dropped, so it is refused here.
        for key, wanted, was in changed_model_keys(saved, cfg.model, model_keys(None, args.overrides)):
            if not key.startswith("lock."):
                raise UsageError(f"model.{key}={wanted!r} differs from the --init run's {was!r}: --init keeps "
                                 "the run's architecture; drop the override or pretrain without --init")

    from core.runtime import init_ray
    from mm.train import fit

    init_ray(args.address)
    summary = fit(cfg, args.data, args.out, init=args.init)
    print(json.dumps({k: summary[k] for k in ("run_dir", "steps", "checkpoint")}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
