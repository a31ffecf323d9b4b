"""`mm evaluate`: metrics of a saved model on a curated corpus split, eval.json and report.html.

    mm evaluate --model RUN --data DIR --out RUN/eval.json [--task zeroshot|retrieval|classify|linear_probe|masked]
                [--config configs/evaluate.yaml] [--set split=val --set batch_rows=128 ...]
                [--set rerank_k=16]   # ITM re-ranking of retrieval (a run trained with ITM)

``--model`` is a run dir (with ``model/``, and ``classifier/`` after a classification fine-tune)
or a model dir. Without ``--task`` the config's ``tasks`` run (zero-shot and retrieval; zero-shot
is skipped, and said so in eval.json, when the split has no labels). Writes FILE.json,
FILE_samples.json and report.html beside FILE.json (with RUN/metrics.jsonl's loss curves when
FILE.json sits in a run). Bad paths, and ``rerank_k > 0`` for a model without an ITM head, fail
before Ray starts, with one line and exit code 2.
Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from core.config import load_config
from core.storage import exists, is_uri, join, local_dir, read_bytes, write_bytes
from jobs.cli import UsageError, add_common, check_out_dir, run

log = logging.getLogger("mm.evaluate")
TASKS = ("zeroshot", "retrieval", "classify", "linear_probe", "masked", "caption")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run dir (with model/) or model dir")
    p.add_argument("--data", required=True, help="curated corpus dir (data/*.parquet + tokenizer/)")
    p.add_argument("--out", required=True, help="eval JSON file to write (e.g. RUN/eval.json)")
    p.add_argument("--task", choices=TASKS, default=None, help="one task (default: the config's tasks)")
    add_common(p)
    return p


def check_inputs(model: str, data: str, out: str) -> Path:
    """Fail before any work on a bad --model, --data or --out; return the model dir."""
    from mm.data import check_corpus, corpus_tokenizer_dir, same_tokenizer
    from mm.evaluate import resolve_model_dir

    try:
        model_dir = resolve_model_dir(model)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    try:
        check_corpus(data)
    except ValueError as e:
        raise UsageError(str(e).replace("data dir", "--data", 1)) from None
    if not (model_dir / "tokenizer").is_dir():
        raise UsageError(f"--model {model} has no tokenizer/ beside its weights")
    if not same_tokenizer(model_dir / "tokenizer", corpus_tokenizer_dir(data)):
        raise UsageError(f"--data {data}: its tokenizer differs from --model's; curate with the model's tokenizer")
    if is_uri(out):
        check_out_dir(out.rsplit("/", 1)[0])
    elif Path(out).is_dir():
        raise UsageError(f"--out {out} is a directory, expected a .json file path")
    return model_dir


def local_run_view(model: str, scratch: Path) -> str:
    """``--model`` as a local path: itself, or for a URI a view in ``scratch`` of what evaluation
    reads — the run's model/ (and classifier/) fetched once into the local cache
    (core.storage.local_dir), and its metrics.jsonl for the report. Checkpoints stay on the store."""
    if not is_uri(model):
        return model
    try:
        subs = [sub for sub in ("model", "classifier") if exists(join(model, sub, "config.json"))
                or exists(join(model, sub, "classes.json"))]
        if not subs:  # a bare model dir at the URI
            return local_dir(model) if exists(join(model, "config.json")) else model
        view = scratch / "run"
        view.mkdir(parents=True, exist_ok=True)
        for sub in subs:
            (view / sub).symlink_to(local_dir(join(model, sub)))
        metrics = read_bytes(join(model, "metrics.jsonl"))
        if metrics:
            (view / "metrics.jsonl").write_bytes(metrics)
        return str(view)
    except OSError as e:  # credentials, a missing bucket, a timeout: one line naming the URI
        raise UsageError(f"--model {model}: {str(e).splitlines()[0]}") from None


def _main(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mm-evaluate-") as scratch:
        return _evaluate(args, Path(scratch))


def _evaluate(args: argparse.Namespace, scratch: Path) -> int:
    from mm.evaluate import EvalConfig, evaluate_run, write_eval

    cfg = load_config(EvalConfig, args.config, args.overrides)
    model = local_run_view(args.model, scratch)
    model_dir = check_inputs(model, args.data, args.out)
    if args.task == "caption":
        _check_caption(model_dir, args.data)
    if cfg.rerank_k > 0 and "retrieval" in ((args.task,) if args.task else cfg.tasks):
        from mm.evaluate import itm_checkpoint

        try:
            itm_checkpoint(model_dir, cfg.rerank_k)
        except ValueError as e:
            raise UsageError(str(e)) from None
    from core.runtime import init_ray
    from mm.report import write_report

    init_ray(args.address)
    tasks = (args.task,) if args.task else None
    local_out = (Path(model) if model != args.model else scratch) / Path(args.out).name if is_uri(args.out) \
        else Path(args.out)
    if args.task == "caption":
        result = _evaluate_captions(model_dir, args.data, cfg, local_out)
    else:
        result = evaluate_run(model, args.data, cfg, tasks=tasks)
    # A URI --out: written beside the run view (so the report finds its metrics.jsonl), then put
    # on the store: eval.json, its samples and report.html, next to each other as locally.
    out = write_eval(result, local_out)
    report = write_report(out.parent, eval_path=out)
    if is_uri(args.out):
        target = args.out.rsplit("/", 1)[0]
        for f in (out, out.with_name(out.stem + "_samples.json"), out.with_name("captions.jsonl"), report):
            if f.is_file():
                write_bytes(join(target, f.name), f.read_bytes())
        out, report = args.out, join(target, report.name)
    for task, values in result["metrics"].items():
        log.info("%s: %s", task, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    for task, why in result["skipped"].items():
        log.warning("skipped %s: %s", task, why)
    log.info("wrote %s and %s", out, report)
    return 0


def _evaluate_captions(model_dir: Path, data: str, cfg, out: Path) -> dict:
    """``--task caption``: generate on the split (cfg.split, cfg.max_rows), score Bleu_1..4,
    ROUGE_L and CIDEr beside the most-frequent-training-caption baseline, and write
    captions.jsonl beside FILE.json (mm/caption.py)."""
    from mm.caption import CaptionEvalConfig, evaluate_captions

    out.parent.mkdir(parents=True, exist_ok=True)
    r = evaluate_captions(model_dir, data, CaptionEvalConfig(split=cfg.split, max_rows=cfg.max_rows),
                          captions_out=out.with_name("captions.jsonl"))
    return {"model": str(model_dir), "data": data, "split": cfg.split, "metrics": r["metrics"],
            "chance": r["chance"], "baseline": r["baseline"], "counts": r["counts"], "skipped": {},
            "samples": {"captions": r["caption_samples"]}}


def _check_caption(model_dir: Path, data: str) -> None:
    from mm.caption import check_caption_corpus, check_caption_model

    try:
        model_cfg = check_caption_model(model_dir, need_decoder=True)
        check_caption_corpus(data, int(model_cfg["text"]["max_tokens"]), splits=("train", "val"))
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
