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

Longer than ~450 lines on purpose: the two tables and the strategies and tasks they name (their
checks, training and evaluation glue) read in one place; what each task runs lives apart
(mm/wise_ft.py, mm/prompt_view.py, mm/probe.py, mm/caption.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from core.storage import exists, is_uri, join, local_dir, read_bytes, upload_dir, write_bytes
from mm.caption import CaptionEvalConfig
from mm.eval_inputs import EvalConfig
from mm.objectives import ContrastiveConfig, ObjectivesConfig
from mm.probe import ClassifierHead, fit_linear_head, save_classifier
from mm.prompt_view import Classify, ClassifyFactory, prompt_lookup, tokenize_prompts, write_prompt_view
from mm.train import PretrainConfig
from mm.wise_ft import evaluate_finetune, interpolate_states, retention

log = logging.getLogger(__name__)

Strategy = Literal["full", "last_n", "head_only", "lora", "lp_ft", "flyp"]
_LORA_TARGETS = {
    "vision": r"vision\.vit\.blocks\.\d+\.attn\.(qkv|proj)",
    "text": r"text\.bert\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
}


@dataclass(frozen=True)
class StrategyConfig:
    strategy: Strategy = "full"
    # Which tower(s) full / last_n / lora adapt; None: the task's default (retrieval: both; caption:
    # none, a frozen-tower decoder). Classify always adapts vision only (the text tower gets no
    # gradient from a classification loss, so it stays pretrained), caption at most vision.
    towers: Literal["vision", "text", "both", "none"] | None = None
    last_n_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    head_init: Literal["zeroshot", "zeros"] = "zeroshot"
    label_smoothing: float = 0.0
    probe_weight_decay: float = 1e-4
    probe_max_iters: int = 200
    classes_path: str | None = None  # default: DATA/classes.json, else the sorted labels
    templates_path: str | None = None  # default: DATA/templates.json, else configs/templates.json
    wise_ft_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    retention_data: str | None = None  # a second corpus whose zero-shot/retrieval is measured before/after

    def __post_init__(self) -> None:
        if self.last_n_blocks < 1:
            raise ValueError("last_n_blocks must be >= 1")
        if self.lora_rank < 1:
            raise ValueError("lora_rank must be >= 1")
        if any(not 0.0 <= a <= 1.0 for a in self.wise_ft_alphas):
            raise ValueError("wise_ft_alphas must lie in [0, 1]")


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


# ----------------------------------------------------------------------------- strategies


def _train_towers(model, p: PrepareModel) -> None:
    """``full``: every weight of the adapted towers and their projections."""
    for t in p.towers:
        getattr(model, t).requires_grad_(True)
        getattr(model, f"{t}_proj").requires_grad_(True)


def _train_last_blocks(model, p: PrepareModel) -> None:
    """``last_n``: the towers' last ``last_n_blocks`` blocks (vision: + final norm and temporal
    blocks) and their projections."""
    for t in p.towers:
        tower = getattr(model, t)
        for b in list(tower.blocks)[-p.last_n_blocks:]:
            b.requires_grad_(True)
        if t == "vision":
            tower.norm.requires_grad_(True)
            if tower.temporal is not None:
                for m in list(tower.temporal)[-p.last_n_blocks:]:
                    m.requires_grad_(True)
        getattr(model, f"{t}_proj").requires_grad_(True)


def _train_lora(model, p: PrepareModel) -> None:
    """``lora``: peft adapters on the towers' attention projections, nothing else trains."""
    from peft import LoraConfig, inject_adapter_in_model

    target = "|".join(_LORA_TARGETS[t] for t in p.towers)
    inject_adapter_in_model(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                                       target_modules=f"^({target})$"), model)  # leaves only the adapters trainable


@dataclass(frozen=True)
class StrategySpec:
    """One fine-tuning strategy. ``trainable`` sets which weights train (``PrepareModel`` runs it on
    every worker; None: no Ray Train run); ``probe_first``: a linear probe on cached frozen
    features starts the head; ``prompts_contrastive``: classification trains both towers
    contrastively against class prompts and reads its classifier off the text tower (FLYP);
    ``tasks``: the tasks it applies to (None: every task in ``TASKS``)."""

    trainable: Callable | None
    probe_first: bool = False
    prompts_contrastive: bool = False
    tasks: tuple[str, ...] | None = None


STRATEGIES: dict[str, StrategySpec] = {
    "full": StrategySpec(_train_towers),
    "last_n": StrategySpec(_train_last_blocks),
    "lora": StrategySpec(_train_lora),
    "head_only": StrategySpec(None, probe_first=True, tasks=("classify",)),
    "lp_ft": StrategySpec(_train_towers, probe_first=True, tasks=("classify",)),
    "flyp": StrategySpec(_train_towers, prompts_contrastive=True, tasks=("classify",)),
}


@dataclass
class PrepareModel:
    """The ``prepare_model`` hook: which weights train, per strategy (runs on every worker)."""

    strategy: str
    towers: tuple[str, ...]  # subset of ("vision", "text")
    last_n_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    train_scale: bool = False  # the logit scale: only with a contrastive objective

    def __call__(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        STRATEGIES[self.strategy].trainable(model, self)
        # Only what the objectives use may require grad: DDP fails on parameters without gradients.
        model.logit_scale.requires_grad_(self.train_scale)
        return model


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft LoRA keys -> plain keys: W + (B @ A) * scaling under the base layer's name."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if ".base_layer." in k:
            prefix, leaf = k.split(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.default.weight"].float()  # (r, in)
                b = state[f"{prefix}.lora_B.default.weight"].float()  # (out, r)
                v = (v.float() + (b @ a) * scaling).to(v.dtype)
            out[f"{prefix}.{leaf}"] = v
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- orchestration


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


def _merge_lora_run(run: Path, s: StrategyConfig) -> None:
    """Rewrite RUN/model without adapters (W + BA * alpha/r): a plain model for mm.load."""
    from mm.checkpoint import read_tensors, write_tensors

    path = run / "model" / "model.safetensors"
    state = read_tensors(path)
    if any(".lora_A." in k for k in state):
        write_tensors(path, merge_lora_state(state, s.lora_alpha / s.lora_rank), metadata={"format": "mm-vlmodel/1"})


# ----------------------------------------------------------------------------- tasks


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
        _merge_lora_run(run, s)
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


__all__ = ["StrategyConfig", "FinetuneConfig", "StrategySpec", "STRATEGIES", "TaskSpec", "TASKS", "FinetuneJob",
           "check_finetune", "check_init_overrides", "local_model_dir", "finetune_caption", "evaluate_caption", "caption_strategy", "Classify",
           "ClassifyFactory", "PrepareModel", "merge_lora_state", "interpolate_states", "prompt_lookup", "finetune",
           "finetune_classify", "finetune_retrieval", "fit_probe", "evaluate_finetune", "retention",
           "write_prompt_view", "cached_embeddings"]
