"""Fine-tuning tasks: their config, input checks, training and evaluation (``TASKS``).

    TASKS["classify"].check(model_dir, data, cfg); heads = TASKS["classify"].train(job)

``FinetuneConfig`` is PretrainConfig's sections plus ``finetune`` (mm/finetune_strategies.py's
``StrategyConfig``), ``eval`` and ``caption``. ``TASKS`` holds one entry per task (``TaskSpec``:
its checks, its training, its evaluation), each run on a ``FinetuneJob`` (the config, the data,
the run dir, the model it starts from):

* ``classify``: image (or video) classification from a labelled corpus (``label`` column; class
  names from ``finetune.classes_path``, ``DATA/classes.json`` or the sorted labels). Heads act on
  the L2-normalised embedding and start from the zero-shot head (class prompt embeddings x logit
  scale), as in WiSE-FT (Wortsman et al. 2022); then the strategy's head: a linear probe on
  frozen features computed once through Ray Data and cached in ``RUN/features/``, fit with L-BFGS
  (CLIP's linear-probe protocol); the ``classify`` objective on a *view* of the corpus whose
  captions are class prompts (mm/prompt_view.py: that is how labels reach the workers); or FLYP's
  fine-tuned text-tower prompt embeddings.
* ``retrieval``: contrastive image-text / video-text fine-tuning on a curated corpus.
* ``caption``: a caption decoder trained on the corpus's captions (mm/caption.py; a run without a
  decoder gets a fresh one of ``model.decoder`` when its ``layers`` > 0, else mm.caption's
  default), evaluated by generating the val split's captions (``caption`` section:
  mm.caption.CaptionEvalConfig) into ``RUN/captions.jsonl`` and eval.json's Bleu/ROUGE_L/CIDEr
  beside the most-frequent-caption baseline. full / last_n / lora apply to the decoder (LoRA:
  its self- and cross-attention, and only on a run that has a trained decoder);
  ``finetune.towers`` ``none`` (its default there) keeps the towers frozen, ``vision``/``both``
  also adapt the vision tower.

Classify and retrieval are evaluated by WiSE-FT (mm/wise_ft.py). The entry point that runs a
task is mm/finetune.py. Tested in tests/test_finetune.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from torch import nn

from core.storage import is_uri, join, local_dir
from mm.caption import CaptionEvalConfig
from mm.eval_inputs import EvalConfig
from mm.finetune_strategies import STRATEGIES, PrepareModel, StrategyConfig
from mm.objectives import ContrastiveConfig, ObjectivesConfig
from mm.probe import ClassifierHead, fit_linear_head
from mm.prompt_view import Classify, ClassifyFactory, prompt_lookup, tokenize_prompts, write_prompt_view
from mm.train import PretrainConfig
from mm.wise_ft import evaluate_finetune


def _no_contrastive() -> ObjectivesConfig:
    return ObjectivesConfig(contrastive=ContrastiveConfig(weight=0.0))


@dataclass(frozen=True)
class FinetuneConfig(PretrainConfig):
    """PretrainConfig's sections (model, objectives, optim, data, train) plus the strategy and eval."""

    objectives: ObjectivesConfig = field(default_factory=_no_contrastive)
    finetune: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    caption: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)  # --task caption's evaluation

    def pretrain(self, **changes) -> PretrainConfig:
        base = PretrainConfig(model=self.model, objectives=self.objectives, optim=self.optim, data=self.data,
                              train=self.train)
        return dataclasses.replace(base, **changes)



def resolve_task_classes(data: str, s: StrategyConfig) -> list[str]:
    from mm.eval_inputs import resolve_classes, split_labels

    labels = split_labels(data, "train")
    classes = resolve_classes(data, EvalConfig(classes_path=s.classes_path), labels)
    if not classes or not any(lab in set(classes) for lab in labels):
        raise ValueError(f"--data {data}: the train split has no rows labelled with a known class")
    return classes


def cached_embeddings(run: Path, model_dir: Path, data: str, split: str, cfg: EvalConfig):
    """Frozen embeddings of one split, computed once through Ray Data and cached in RUN/features/."""
    from mm.embed import Embeddings, embed_split

    path = run / "features" / f"{split}.npz"
    if path.is_file():
        z = np.load(path)
        return Embeddings(z["sample_id"], z["media_key"], z["label"], z["media_emb"], z["text_emb"])
    emb = embed_split(model_dir, data, split, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, sample_id=emb.sample_id, media_key=emb.media_key, label=emb.label, media_emb=emb.media_emb,
             text_emb=emb.text_emb)
    return emb


def _checkpoint_head(summary: dict, store: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The trained classify head from the run's final Ray Train checkpoint (it is not part of
    RUN/model); a run on a URI (``store``) has it there, fetched to the local cache."""
    from mm.checkpoint import load_train_state

    ckpt = summary["checkpoint"]
    if is_uri(store):  # Ray names it inside its filesystem (no scheme): RUN/ray/<checkpoint dir>
        ckpt = local_dir(join(store, "ray", PurePosixPath(str(ckpt)).name))
    state, _, _ = load_train_state(ckpt)
    keys = [f"objectives.{Classify.name}.classifier.{leaf}" for leaf in ("weight", "bias")]  # keyed by name
    if any(k not in state for k in keys):
        raise ValueError(f"no classify head in checkpoint {summary['checkpoint']}")
    return tuple(state[k].float().numpy() for k in keys)



@dataclass
class FinetuneJob:
    """What a task's function gets: the config, the data, the run dir it writes, and the model
    (with its tokenizer) it starts from. ``run`` is local; for an ``--out`` URI it is a staging
    dir and ``store`` the URI: Ray Train writes checkpoints, metrics.jsonl and RUN/model there
    (``fit_dir``), ``fetch_model`` brings RUN/model back for evaluation, and ``finetune`` uploads
    the rest at the end."""

    cfg: FinetuneConfig
    data: str
    run: Path
    init_dir: Path
    init_model: nn.Module
    tok: Any  # the run's Hugging Face tokenizer
    task: str = "classify"
    store: str = ""  # the --out URI; "" when the run is local

    @property
    def fit_dir(self) -> str:
        """Where ``mm.train.fit`` writes the run: the store, or the local run dir."""
        return self.store or str(self.run)

    def fetch_model(self) -> None:
        """After a fit on the store: its RUN/model copied into the local run dir (a copy, so
        a LoRA merge never edits the fetch cache)."""
        if self.store:
            shutil.rmtree(self.run / "model", ignore_errors=True)
            shutil.copytree(local_dir(join(self.store, "model")), self.run / "model")

    def prepare(self, towers: tuple[str, ...], train_scale: bool = False) -> PrepareModel:
        s = self.cfg.finetune
        return PrepareModel(s.strategy, towers, s.last_n_blocks, s.lora_rank, s.lora_alpha, s.lora_dropout,
                            train_scale=train_scale)


def finetune_retrieval(job: FinetuneJob) -> dict[str, ClassifierHead]:
    """Contrastive fine-tuning on the corpus's own captions (the config's objectives, contrastive on)."""
    from mm.train import fit

    s = job.cfg.finetune
    towers = ("vision", "text") if s.towers in (None, "both") else (s.towers,)
    objectives = job.cfg.objectives
    if objectives.contrastive.weight <= 0:
        objectives = dataclasses.replace(objectives, contrastive=ContrastiveConfig(weight=1.0))
    fit(job.cfg.pretrain(objectives=objectives), [job.data], job.fit_dir, init=str(job.init_dir),
        prepare_model=job.prepare(towers, train_scale=len(towers) == 2))
    job.fetch_model()
    return {}


def finetune_classify(job: FinetuneJob) -> dict[str, ClassifierHead]:
    """Classification: the zero-shot head, then the strategy's fine-tuned one (a probe, the
    ``classify`` objective on the prompt view, or FLYP's text-tower prompts)."""
    import mm
    from mm.eval_inputs import class_prompts, corpus_templates
    from mm.eval_tasks import zeroshot_weights
    from mm.train import fit

    s, spec = job.cfg.finetune, STRATEGIES[job.cfg.finetune.strategy]
    data, run, tok = job.data, job.run, job.tok
    max_tokens = job.init_model.cfg.text.max_tokens
    classes = resolve_task_classes(data, s)
    templates = corpus_templates(data, s.templates_path)
    prompts = class_prompts(classes, templates)
    scale = float(job.init_model.scale()[0].detach())
    zs = zeroshot_weights(job.init_model, tok, classes, templates)
    zeroshot = ClassifierHead(classes, zs * scale, np.zeros(len(classes), np.float32))
    head0 = zeroshot if s.head_init == "zeroshot" else \
        ClassifierHead(classes, np.zeros_like(zs), np.zeros(len(classes), np.float32))
    if spec.probe_first:
        head0 = fit_probe(job, classes)
    if spec.trainable is None:  # head_only: the pretrained model with the probe
        shutil.rmtree(run / "model", ignore_errors=True)
        shutil.copytree(job.init_dir, run / "model")
        return {"zeroshot": zeroshot, "finetuned": head0}
    if spec.prompts_contrastive:  # flyp: both towers, contrastive, against every class prompt
        view = write_prompt_view(data, run / "ft_data", classes, prompts, tok, max_tokens)
        fit(job.cfg.pretrain(objectives=ObjectivesConfig()), [str(view)], job.fit_dir, init=str(job.init_dir),
            prepare_model=job.prepare(("vision", "text"), train_scale=True))
        job.fetch_model()
        tuned = mm.load(str(run))
        w = zeroshot_weights(tuned, tok, classes, templates) * float(tuned.scale()[0].detach())
        return {"zeroshot": zeroshot, "finetuned": ClassifierHead(classes, w, np.zeros(len(classes), np.float32))}
    # cross-entropy on the view's one prompt per class
    view = write_prompt_view(data, run / "ft_data", classes, [p[:1] for p in prompts], tok, max_tokens)
    lookup = prompt_lookup([tokenize_prompts(tok, p[:1], max_tokens)[0] for p in prompts])
    summary = fit(job.cfg.pretrain(), [str(view)], job.fit_dir, init=str(job.init_dir),
                  objectives=[ClassifyFactory(head0.weight.astype(np.float32), head0.bias.astype(np.float32),
                                              lookup, s.label_smoothing)],
                  prepare_model=job.prepare(("vision",)))
    job.fetch_model()
    w, b = _checkpoint_head(summary, job.store)
    return {"zeroshot": zeroshot, "finetuned": ClassifierHead(classes, w, b)}


def fit_probe(job: FinetuneJob, classes: list[str]) -> ClassifierHead:
    """A linear probe on the train split's cached frozen embeddings (RUN/probe_metrics.jsonl)."""
    from mm.eval_tasks import label_targets

    s = job.cfg.finetune
    emb = cached_embeddings(job.run, job.init_dir, job.data, "train", job.cfg.eval)
    keep, y = label_targets(emb.label, classes)
    probe_log: list[dict] = []
    head = fit_linear_head(emb.media_emb[keep], y, len(classes), weight_decay=s.probe_weight_decay,
                           max_iters=s.probe_max_iters, log_to=probe_log)
    head.classes = classes
    (job.run / "probe_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probe_log))
    return head


def caption_strategy(cfg: FinetuneConfig):
    """``finetune``'s fields -> mm.caption.CaptionStrategy; the decoder a run without one gets is
    ``model.decoder`` when it has layers, else CaptionStrategy's."""
    from mm.caption import strategy_from_finetune

    s = cfg.finetune
    return strategy_from_finetune(s.strategy, s.towers or "none", s.last_n_blocks, s.lora_rank, s.lora_alpha,
                                  s.lora_dropout, cfg.model.decoder if cfg.model.decoder.layers else None)


def finetune_caption(job: FinetuneJob) -> dict[str, ClassifierHead]:
    """Caption fine-tuning (mm.caption.train_caption): no classifier heads."""
    from mm.caption import train_caption

    train_caption(job.init_dir, job.data, job.run, job.cfg.pretrain(), caption_strategy(job.cfg))
    return {}


def evaluate_caption(job: FinetuneJob, heads: dict[str, ClassifierHead]) -> dict:
    """The fine-tuned decoder captions the ``caption.split`` rows (RUN/captions.jsonl); eval.json
    gets the scores beside the baseline's, eval_samples.json the report's samples."""
    from mm.caption import evaluate_captions

    result = evaluate_captions(job.run, job.data, job.cfg.caption, captions_out=job.run / "captions.jsonl")
    result["samples"] = {"captions": result.pop("caption_samples")}
    return result


def evaluate_wise_ft(job: FinetuneJob, heads: dict[str, ClassifierHead]) -> dict:
    """Classify and retrieval: the WiSE-FT curve, final metrics and retention (mm/wise_ft.py)."""
    return evaluate_finetune(job.run, job.init_dir, job.data, job.task, job.cfg, heads)


def _model_meta(model_dir: Path) -> dict:
    from mm.checkpoint import read_json

    return (read_json(Path(model_dir) / "config.json") or {}).get("model") or {}


def _check_lora_vision(model_dir: Path, cfg: FinetuneConfig, adapts_vision: bool) -> None:
    if cfg.finetune.strategy == "lora" and adapts_vision and \
            (_model_meta(model_dir).get("vision") or {}).get("torchvision_name"):
        raise ValueError("finetune.strategy=lora targets attention projections; a CNN vision tower has none "
                         "(use last_n, full, or --set finetune.towers=text for retrieval)")


def check_classify(model_dir: Path, data: str, cfg: FinetuneConfig) -> None:
    from mm.eval_inputs import split_labels

    _check_lora_vision(model_dir, cfg, adapts_vision=True)
    if is_uri(data) and STRATEGIES[cfg.finetune.strategy].trainable is not None:
        raise ValueError(f"--data {data}: --task classify with finetune.strategy={cfg.finetune.strategy} writes a "
                         "prompt view of a local corpus (mm/prompt_view.py); give a local --data, or use head_only")
    if not any(split_labels(data, "train")):
        raise ValueError(f"--data {data} has no labelled train rows (needed for --task classify)")


def check_retrieval(model_dir: Path, data: str, cfg: FinetuneConfig) -> None:
    if cfg.finetune.towers == "none":
        raise ValueError("finetune.towers=none trains nothing for --task retrieval: vision, text or both")
    _check_lora_vision(model_dir, cfg, adapts_vision=cfg.finetune.towers in (None, "vision", "both"))


def check_caption(model_dir: Path, data: str, cfg: FinetuneConfig) -> None:
    """Everything mm.caption would refuse, before any work: a run without a vision tower, a
    strategy that cannot apply, a corpus without captions, empty references, references longer
    than the context, no train or eval rows, a decoder too short for the captions or the eval."""
    from mm.caption import check_caption_corpus, check_caption_model, check_caption_strategy

    if cfg.finetune.retention_data:
        raise ValueError("finetune.retention_data measures zero-shot retention of classify and retrieval "
                         "fine-tunes; --task caption has none")
    meta = check_caption_model(model_dir, need_decoder=False)
    has_decoder = bool((meta.get("decoder") or {}).get("layers"))
    s = caption_strategy(cfg)
    check_caption_strategy(s, has_decoder, bool(meta["vision"].get("torchvision_name")))
    text_tokens = int(meta["text"]["max_tokens"])
    check_caption_corpus(data, text_tokens, splits=("train", cfg.caption.split))
    decoder = dict(meta["decoder"]) if has_decoder else dataclasses.asdict(s.decoder)
    if not has_decoder and text_tokens - 1 > decoder["max_tokens"]:
        raise ValueError(f"model.decoder.max_tokens {decoder['max_tokens']} < the run's captions "
                         f"(text.max_tokens {text_tokens}); give the new decoder more positions")
    prompt = 0
    if decoder.get("prompt"):
        from transformers import AutoTokenizer

        from mm.generate import prompt_token_ids

        prompt = len(prompt_token_ids(AutoTokenizer.from_pretrained(str(Path(model_dir) / "tokenizer")),
                                      decoder["prompt"]))
    limit = int(decoder["max_tokens"]) - 1 - prompt
    if cfg.caption.max_tokens > limit:
        raise ValueError(f"caption.max_tokens {cfg.caption.max_tokens} > {limit}, what the decoder's positions "
                         "leave after [CLS] and the prompt")


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task. ``check(model_dir, data, cfg)``: its input checks, before any work
    (one-line ValueErrors); ``train(job)``: the fine-tune, returning the classifier heads it
    leaves (``zeroshot``, ``finetuned``); ``evaluate(job, heads)``: eval.json's dict (a
    ``samples`` entry goes to eval_samples.json for the report)."""

    check: Callable[[Path, str, FinetuneConfig], None]
    train: Callable[[FinetuneJob], dict[str, ClassifierHead]]
    evaluate: Callable[[FinetuneJob, dict[str, ClassifierHead]], dict]


TASKS: dict[str, TaskSpec] = {
    "classify": TaskSpec(check_classify, finetune_classify, evaluate_wise_ft),
    "retrieval": TaskSpec(check_retrieval, finetune_retrieval, evaluate_wise_ft),
    "caption": TaskSpec(check_caption, finetune_caption, evaluate_caption),
}



__all__ = ["FinetuneConfig", "FinetuneJob", "TaskSpec", "TASKS", "resolve_task_classes", "cached_embeddings",
           "finetune_classify", "finetune_retrieval", "finetune_caption", "fit_probe", "caption_strategy",
           "evaluate_caption", "evaluate_wise_ft", "check_classify", "check_retrieval", "check_caption"]
