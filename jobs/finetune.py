"""`mm finetune`: transfer a pretrained run to a task with a strategy, then its evaluation and report.

    mm finetune --init RUN --data DIR --task classify|retrieval|caption --out RUN2
                [--config configs/finetune.yaml] [--set finetune.strategy=lora --set train.max_steps=100 ...]

Tasks and strategies are tables: ``TASKS`` in mm/finetune_tasks.py, ``STRATEGIES`` (full, last_n,
head_only, lora, lp_ft, flyp) in mm/finetune_strategies.py; they say which strategy fits which task. Writes
RUN2/model, RUN2/classifier (classify), RUN2/metrics.jsonl, RUN2/eval.json (metrics, chance; classify
and retrieval: WiSE-FT curve, zero-shot retention; caption: Bleu/ROUGE_L/CIDEr beside the
most-frequent-caption baseline, with RUN2/captions.jsonl) and RUN2/report.html. Bad paths, config
or inputs (mm.finetune.check_finetune) fail before Ray starts, with one line and exit code 2; so
does a ``model.*`` override (``--set`` or the config file's ``model`` section) that differs from
the --init run's saved model, which the fine-tune would otherwise drop (mm.finetune.check_init_overrides).
RUN, DIR and RUN2 may be URIs (``s3://``, ``gs://``): the init run's model/ is fetched once to
the local cache, the corpus is read from the store, and RUN2 is written there as ``mm pretrain``
writes a run (mm.finetune.finetune). Tested in tests/test_finetune.py and tests/test_s3_finetune.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from core.config import load_config
from jobs.cli import UsageError, add_common, check_out_dir, run

log = logging.getLogger("mm.finetune")


def build_parser() -> argparse.ArgumentParser:
    from mm.finetune import TASKS

    p = argparse.ArgumentParser(prog="mm finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="pretrained run dir (with model/) or model dir; a path or URI")
    p.add_argument("--data", required=True,
                   help="curated corpus dir (labelled for --task classify, captioned for --task caption); a path or URI")
    p.add_argument("--task", required=True, choices=tuple(TASKS))
    p.add_argument("--out", required=True, help="run dir to write; a path or URI (s3://, gs://)")
    add_common(p)
    return p


def model_keys(config: str | None, overrides: Sequence[str]) -> list[str]:
    """The ``model.*`` keys a user set, dotted without ``model.``: the config file's ``model``
    section (its leaves) and the ``--set model.…`` overrides, in that order."""
    keys: list[str] = []

    def leaves(node, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and v:
                leaves(v, f"{prefix}{k}.")
            else:
                keys.append(f"{prefix}{k}")

    if config is not None:
        import yaml

        section = (yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}).get("model")
        if isinstance(section, dict):
            leaves(section, "")
    keys += [k.strip()[len("model."):] for k, _, _ in (o.partition("=") for o in overrides)
             if k.strip().startswith("model.")]
    return keys


def check_inputs(init: str, data: str, task: str, out: str, cfg, keys: Sequence[str] = ()) -> None:
    from core.storage import is_uri, join
    from mm.checkpoint import CheckpointError
    from mm.data import check_corpus, corpus_tokenizer_dir, same_tokenizer
    from mm.finetune import check_finetune, check_init_overrides, local_model_dir

    try:
        model_dir = local_model_dir(init)
    except FileNotFoundError as e:
        raise UsageError(str(e).replace("--model", "--init", 1)) from None
    except OSError as e:  # a URI: credentials, a missing bucket, a timeout
        raise UsageError(f"--init {init}: {str(e).splitlines()[0]}") from None
    try:
        check_init_overrides(model_dir, task, cfg, keys)
    except (ValueError, CheckpointError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    for path, flag in ((data, "--data"), (cfg.finetune.retention_data, "finetune.retention_data")):
        if path is None:
            continue
        try:
            check_corpus(path)
        except ValueError as e:
            raise UsageError(str(e).replace("data dir", flag, 1)) from None
        if not same_tokenizer(model_dir / "tokenizer", corpus_tokenizer_dir(path)):
            raise UsageError(f"{flag} {path}: its tokenizer differs from --init's; curate with the model's tokenizer")
    check_out_dir(out)
    if is_uri(out) or is_uri(init):
        if out.rstrip("/") in (init.rstrip("/"), join(init, "model")):
            raise UsageError(f"--out {out} would overwrite --init {init}")
    elif Path(out).resolve() == model_dir.parent.resolve() or Path(out).resolve() == model_dir.resolve():
        raise UsageError(f"--out {out} would overwrite --init {init}")
    try:
        check_finetune(model_dir, data, task, cfg)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None


def _main(args: argparse.Namespace) -> int:
    from mm.finetune import FinetuneConfig, finetune

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    check_inputs(args.init, args.data, args.task, args.out, cfg, model_keys(args.config, args.overrides))
    from core.runtime import init_ray

    init_ray(args.address)
    result = finetune(args.init, args.data, args.task, args.out, cfg)
    for task, values in result["metrics"].items():
        log.info("%s: %s", task, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    for k, v in result.get("retention", {}).items():
        log.info("retention %s = %.4f", k, v)
    log.info("wrote %s/eval.json and %s/report.html", args.out, args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
