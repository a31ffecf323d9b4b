"""Fine-tuning strategies on top of the one training loop (mm.train.fit); WiSE-FT and the
zero-shot retention measurement that follow them live in mm/wise_ft.py.

    summary = finetune("runs/pre", "corpora/digits", "classify", "runs/ft", FinetuneConfig())

Tasks. ``classify``: image (or video) classification from a labelled corpus (``label`` column;
class names from ``finetune.classes_path``, ``DATA/classes.json`` or the sorted labels).
``retrieval``: contrastive image-text / video-text fine-tuning on a curated corpus.
``caption``: a caption decoder trained on the corpus's captions (mm/caption.py; a run without a
decoder gets a fresh one of ``model.decoder`` when its ``layers`` > 0, else mm.caption's default),
evaluated by generating the val split's captions (``caption`` section: mm.caption.CaptionEvalConfig)
into ``RUN/captions.jsonl`` and eval.json's Bleu/ROUGE_L/CIDEr beside the most-frequent-caption
baseline.

Strategies (``finetune.strategy``), one entry each in ``STRATEGIES`` (which weights train, a
probe first or not, the tasks it applies to); tasks, one entry each in ``TASKS`` (its input
checks, its training, its evaluation):

* ``full``: every weight of the adapted tower(s) (classify: the vision tower and its projection).
* ``last_n``: only the last ``last_n_blocks`` blocks (+ final norm, projection) of the tower(s).
* ``head_only``: a linear probe on frozen features, computed once through Ray Data and cached in
  ``RUN/features/``, fit with L-BFGS (CLIP's linear-probe protocol); no Ray Train run.
* ``lora``: LoRA (Hu et al. 2021) through ``peft`` on the attention projections (timm ``attn.qkv``,
  ``attn.proj``; BERT ``query``, ``key``, ``value``, ``attention.output.dense``), merged into the
  weights after training so ``RUN/model`` is a plain model.
* ``lp_ft``: linear probe, then full fine-tuning from the probe's head (Kumar et al. 2022).
* ``flyp``: contrastive fine-tuning of both towers against class-name prompts; the classifier is
  the fine-tuned text tower's prompt embeddings (Goyal et al. 2023, "Finetune like you pretrain").

For ``caption``, full / last_n / lora apply to the decoder (LoRA: its self- and cross-attention,
and only on a run that has a trained decoder); ``finetune.towers`` ``none`` (its default there)
keeps the towers frozen, ``vision``/``both`` also adapt the vision tower.

Classification heads act on the L2-normalised embedding and start from the zero-shot head (class
prompt embeddings x logit scale), as in WiSE-FT (Wortsman et al. 2022). WiSE-FT then evaluates
``theta(alpha) = (1 - alpha) theta_0 + alpha theta_1`` (backbone and head) for each alpha in
``finetune.wise_ft_alphas``; alpha = 0 is the pretrained model with its zero-shot head, so the
curve's ends give zero-shot accuracy before/after fine-tuning ("retention").

Labels reach the training workers through the prompts: classification fine-tunes train on a
*view* of the corpus whose captions are class prompts (mm/prompt_view.py).

Outputs: ``RUN/model`` (plain VLModel), ``RUN/classifier`` (``head.safetensors`` + ``classes.json``),
``RUN/metrics.jsonl``, ``RUN/eval.json``, ``RUN/report.html``; caption: ``RUN/captions.jsonl`` and
the report's caption samples in ``RUN/eval_samples.json`` (``captions``). Every input check runs
before any work (``check_finetune``: one-line ValueErrors). Tested in tests/test_finetune.py.

The strategies (``StrategyConfig``, ``STRATEGIES``, ``PrepareModel``, the LoRA merge) live in
mm/finetune_strategies.py, the tasks (``FinetuneConfig``, ``FinetuneJob``, ``TASKS``: checks,
training, evaluation glue) in mm/finetune_tasks.py; what each task runs lives apart
(mm/wise_ft.py, mm/prompt_view.py, mm/probe.py, mm/caption.py). This module checks a fine-tune
and runs it (``finetune``: a local run dir, or one staged for an ``--out`` URI), and re-exports
the names of both tables' modules.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from core.storage import exists, is_uri, join, local_dir, read_bytes, upload_dir, write_bytes
from mm.finetune_strategies import (
    STRATEGIES,
    PrepareModel,
    Strategy,
    StrategyConfig,
    StrategySpec,
    merge_lora_run,
    merge_lora_state,
)
from mm.finetune_tasks import (
    TASKS,
    FinetuneConfig,
    FinetuneJob,
    TaskSpec,
    cached_embeddings,
    caption_strategy,
    evaluate_caption,
    finetune_caption,
    finetune_classify,
    finetune_retrieval,
    fit_probe,
)
from mm.probe import save_classifier
from mm.prompt_view import Classify, ClassifyFactory, prompt_lookup, write_prompt_view
from mm.wise_ft import evaluate_finetune, interpolate_states, retention

log = logging.getLogger(__name__)


def _applies(strategy: str, task: str) -> bool:
    tasks = STRATEGIES[strategy].tasks
    return tasks is None or task in tasks


def check_finetune(model_dir: str | Path, data: str, task: str, cfg: FinetuneConfig) -> None:
    """The checks of a fine-tune before any work: a known task and strategy, the strategy applies
    to the task, then the task's own checks (``TASKS[task].check``). One-line ValueErrors."""
    s = cfg.finetune
    if task not in TASKS or s.strategy not in STRATEGIES:
        raise ValueError(f"--task {task} with finetune.strategy={s.strategy}: tasks are {', '.join(TASKS)}, "
                         f"strategies {', '.join(STRATEGIES)}")
    if not _applies(s.strategy, task):
        takes = ", ".join(name for name in STRATEGIES if _applies(name, task))
        raise ValueError(f"finetune.strategy={s.strategy} applies to --task {', '.join(STRATEGIES[s.strategy].tasks)}; "
                         f"{task} takes {takes}")
    TASKS[task].check(Path(model_dir), data, cfg)


def check_init_overrides(model_dir: str | Path, task: str, cfg: FinetuneConfig, keys) -> None:
    """``model.*`` keys the user set (dotted, without ``model.``) against the run's saved config:
    a fine-tune starts from the run's model, architecture and all, so an override that differs
    would be dropped; refuse the first one in one line naming the key and both values. Applied,
    hence allowed: ``model.decoder.*`` for ``--task caption`` on a run without a decoder (the
    fresh decoder is built from it). ``model.lock.*`` is not: the strategy (``finetune.strategy``,
    ``finetune.towers``) chooses which weights train."""
    from mm.checkpoint import changed_model_keys, saved_model_config

    saved = saved_model_config(model_dir)
    fresh_decoder = task == "caption" and not saved.decoder.layers
    for key, wanted, was in changed_model_keys(saved, cfg.model, keys):
        if fresh_decoder and key.startswith("decoder."):
            continue
        hint = ("finetune.strategy and finetune.towers choose what trains" if key.startswith("lock.")
                else "--init keeps the run's architecture and settings; drop the override or pretrain a new run")
        raise ValueError(f"model.{key}={wanted!r} differs from the --init run's {was!r}: {hint}")


def local_model_dir(init: str | Path) -> Path:
    """``--init`` (a run or model dir, a path or a URI) as a local model dir: a URI's model/ is
    fetched once into the local cache (core.storage.local_dir), checkpoints stay on the store."""
    from mm.eval_inputs import resolve_model_dir

    if not is_uri(str(init)):
        return resolve_model_dir(init)
    src = join(init, "model") if exists(join(init, "model", "config.json")) else str(init)
    try:
        return resolve_model_dir(local_dir(src))
    except FileNotFoundError:
        raise FileNotFoundError(f"--model {init} is neither a run dir with model/ nor a model dir "
                                "(config.json + model.safetensors)") from None


# In a staging dir but not uploaded with an --out URI: caches of this process.
_STAGING_ONLY = ("features", "ft_data", "init_model", "wise_ft")


def finetune(init: str, data: str, task: str, out: str, cfg: FinetuneConfig) -> dict:
    """Fine-tune ``init`` (run or model dir) on ``data`` for ``task`` (a key of ``TASKS``) with
    ``cfg.finetune.strategy``; then the task's evaluation (classify, retrieval: WiSE-FT), eval.json
    and report.html in ``out``. Ray must be initialised. Returns the eval dict.

    Any of ``init``, ``data``, ``out`` may be a URI (``s3://``, ``gs://``). With an ``out`` URI the
    run is staged in a local temp dir: Ray Train's checkpoints, metrics.jsonl, the manifest and
    RUN/model go straight to the store (classify, retrieval; as ``mm pretrain``), and RUN/model
    (after a LoRA merge), classifier/, eval.json, its samples and report.html are uploaded at
    the end, eval.json and report.html last. ``--task caption`` trains in the staging dir and
    uploads the whole run (mm/caption.py writes its decoder's init model locally)."""
    import tempfile

    init_dir = local_model_dir(init)
    check_finetune(init_dir, data, task, cfg)
    if not is_uri(out):
        run = Path(out).resolve()
        run.mkdir(parents=True, exist_ok=True)
        return _finetune(str(init), init_dir, data, task, run, "", cfg)
    store = out.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="mm-finetune-") as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        result = _finetune(str(init), init_dir, data, task, run, "" if task == "caption" else store, cfg)
        _upload_run(run, store)
    return result


def _finetune(init: str, init_dir: Path, data: str, task: str, run: Path, store: str, cfg: FinetuneConfig) -> dict:
    from mm.eval_inputs import load_model_and_tokenizer
    from mm.evaluate import write_eval
    from mm.report import write_report

    t0 = time.time()
    s = cfg.finetune
    init_model, tok = load_model_and_tokenizer(init_dir)
    job = FinetuneJob(cfg, data, run, init_dir, init_model, tok, task, store)
    heads = TASKS[task].train(job)
    _record_init_uri(init, job.fit_dir if task != "caption" else str(run))
    if s.strategy == "lora":
        merge_lora_run(run, s)
    if "finetuned" in heads:
        save_classifier(heads["finetuned"], run / "classifier")
    result = TASKS[task].evaluate(job, heads)
    result["finetune"] = {"init": init if is_uri(init) else str(init_dir), "task": task, "strategy": s.strategy,
                          "time_s": round(time.time() - t0, 1)}
    write_eval(result, run / "eval.json")
    if store and not (run / "metrics.jsonl").is_file():  # the report's loss curves, written by fit on the store
        metrics = read_bytes(join(store, "metrics.jsonl"))
        if metrics:
            (run / "metrics.jsonl").write_bytes(metrics)
    write_report(run)
    return result


def _record_init_uri(init: str, run: str) -> None:
    """fit's manifest names the local cache it read an ``--init`` URI from: name the URI."""
    from core.storage import read_json, write_json

    manifest = read_json(join(run, "manifest.json")) if is_uri(init) else None
    if isinstance(manifest, dict) and isinstance(manifest.get("inputs"), dict):
        manifest["inputs"]["init"] = init
        write_json(join(run, "manifest.json"), manifest)


def _upload_run(run: Path, store: str) -> None:
    """The staged run to its URI: folders first, then files, eval.json and report.html last (a
    run on the store with an eval.json is complete)."""
    last = ("eval.json", "report.html")
    entries = sorted((p for p in run.iterdir() if p.name not in _STAGING_ONLY), key=lambda p: (
        p.is_file(), p.name in last, last.index(p.name) if p.name in last else 0, p.name))
    for p in entries:
        if p.is_dir():
            upload_dir(p, join(store, p.name))
        else:
            write_bytes(join(store, p.name), p.read_bytes())


__all__ = ["Strategy", "StrategyConfig", "FinetuneConfig", "StrategySpec", "STRATEGIES", "TaskSpec", "TASKS",
           "FinetuneJob", "check_finetune", "check_init_overrides", "local_model_dir", "finetune_caption",
           "evaluate_caption", "caption_strategy", "Classify", "ClassifyFactory", "PrepareModel", "merge_lora_state",
           "interpolate_states", "prompt_lookup", "finetune", "finetune_classify", "finetune_retrieval", "fit_probe",
           "evaluate_finetune", "retention", "write_prompt_view", "cached_embeddings"]
