"""Fine-tuning strategies on top of the one training loop (mm.train.fit), WiSE-FT, and the
zero-shot retention measurement.

    summary = finetune("runs/pre", "corpora/digits", "classify", "runs/ft", FinetuneConfig())

Tasks. ``classify``: image (or video) classification from a labelled corpus (``label`` column;
class names from ``finetune.classes_path``, ``DATA/classes.json`` or the sorted labels).
``retrieval``: contrastive image-text / video-text fine-tuning on a curated corpus.

Strategies (``finetune.strategy``):

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

Classification heads act on the L2-normalised embedding and start from the zero-shot head (class
prompt embeddings x logit scale), as in WiSE-FT (Wortsman et al. 2022). WiSE-FT then evaluates
``theta(alpha) = (1 - alpha) theta_0 + alpha theta_1`` (backbone and head) for each alpha in
``finetune.wise_ft_alphas``; alpha = 0 is the pretrained model with its zero-shot head, so the
curve's ends give zero-shot accuracy before/after fine-tuning ("retention").

Labels reach the training workers through the prompts: the loop's batches carry pixels and
``input_ids`` only, so classification fine-tunes train on a *view* of the corpus
(``RUN/ft_data``, written with Ray Data) whose captions are class prompts; the classify objective
reads each row's class back from its prompt tokens (one prompt per class, checked to be distinct),
and FLYP trains on the same view with the contrastive loss.

Outputs: ``RUN/model`` (plain VLModel), ``RUN/classifier`` (``head.safetensors`` + ``classes.json``),
``RUN/metrics.jsonl``, ``RUN/eval.json``, ``RUN/report.html``. Tested in tests/test_finetune.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mm.evaluate import EvalConfig
from mm.objectives import ContrastiveConfig, Objective, ObjectivesConfig
from mm.probe import ClassifierHead, fit_linear_head, save_classifier
from mm.train import PretrainConfig

log = logging.getLogger(__name__)

Strategy = Literal["full", "last_n", "head_only", "lora", "lp_ft", "flyp"]
_LORA_TARGETS = {
    "vision": r"vision\.vit\.blocks\.\d+\.attn\.(qkv|proj)",
    "text": r"text\.bert\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
}


@dataclass(frozen=True)
class StrategyConfig:
    strategy: Strategy = "full"
    # Which tower(s) full / last_n / lora adapt for retrieval; classify always adapts vision only
    # (the text tower gets no gradient from a classification loss, so it stays pretrained).
    towers: Literal["vision", "text", "both"] = "both"
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

    def pretrain(self, **changes) -> PretrainConfig:
        base = PretrainConfig(model=self.model, objectives=self.objectives, optim=self.optim, data=self.data,
                              train=self.train)
        return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------- classifier heads


# ----------------------------------------------------------------------------- training pieces


def prompt_lookup(prompt_ids: list[list[int]]) -> dict[tuple[int, ...], int]:
    """Token ids of each class's prompt -> class index; two classes may not share ids."""
    lookup: dict[tuple[int, ...], int] = {}
    for c, ids in enumerate(prompt_ids):
        key = tuple(int(i) for i in ids)
        if key in lookup:
            raise ValueError(f"classes {lookup[key]} and {c} tokenise to the same prompt {key}; "
                             "the corpus tokenizer does not know their names")
        lookup[key] = c
    return lookup


class Classify(Objective):
    """Cross-entropy of a linear head on the normalised image/video embedding; the target class is
    read from the row's prompt tokens (see the module docstring)."""

    name = "classify"

    def __init__(self, weight: np.ndarray, bias: np.ndarray, lookup: dict[tuple[int, ...], int],
                 label_smoothing: float) -> None:
        super().__init__(1.0)
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(torch.from_numpy(weight))
            self.classifier.bias.copy_(torch.from_numpy(bias))
        self.lookup = lookup
        self.label_smoothing = label_smoothing

    def targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).tolist()
        return torch.tensor([self.lookup[tuple(row[:n])] for row, n in zip(input_ids.tolist(), lengths)],
                            device=input_ids.device)

    def step(self, model, batch):
        y = self.targets(batch["input_ids"], batch["attention_mask"])
        x = model.encode_video(batch["frames"]) if "frames" in batch else model.encode_image(batch["pixels"])
        logits = self.classifier(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, {"acc": (logits.detach().argmax(1) == y).float().mean()}


@dataclass
class ClassifyFactory:
    """Picklable ``(model, tokens) -> Objective`` for mm.train.fit's workers."""

    weight: np.ndarray
    bias: np.ndarray
    lookup: dict
    label_smoothing: float = 0.0

    def __call__(self, model, tokens) -> Objective:
        return Classify(self.weight, self.bias, self.lookup, self.label_smoothing)


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
        if self.strategy == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            target = "|".join(_LORA_TARGETS[t] for t in self.towers)
            inject_adapter_in_model(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha,
                                               lora_dropout=self.lora_dropout, target_modules=f"^({target})$"), model)
            # inject_adapter_in_model leaves only the adapters trainable
        else:
            for t in self.towers:
                tower = getattr(model, t)
                if self.strategy == "last_n":
                    blocks = list(tower.blocks)[-self.last_n_blocks:]
                    for b in blocks:
                        b.requires_grad_(True)
                    if t == "vision":
                        tower.norm.requires_grad_(True)
                        if tower.temporal is not None:
                            for m in list(tower.temporal)[-self.last_n_blocks:]:
                                m.requires_grad_(True)
                else:  # full, lp_ft, flyp
                    tower.requires_grad_(True)
        for t in self.towers:
            getattr(model, f"{t}_proj").requires_grad_(self.strategy != "lora")
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


def interpolate_states(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * theta0 + alpha * theta1 for every floating tensor (others from theta1)."""
    if theta0.keys() != theta1.keys():
        raise ValueError("WiSE-FT needs two models of one architecture")
    return {k: ((1 - alpha) * theta0[k].float() + alpha * v.float()).to(v.dtype) if v.is_floating_point() else v
            for k, v in theta1.items()}


# ----------------------------------------------------------------------------- orchestration


def _json_list(path: Path) -> list:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def resolve_task_classes(data: str, s: StrategyConfig) -> list[str]:
    from mm.evaluate import EvalConfig, resolve_classes, split_labels

    labels = split_labels(data, "train")
    classes = resolve_classes(data, EvalConfig(classes_path=s.classes_path), labels)
    if not classes or not any(lab in set(classes) for lab in labels):
        raise ValueError(f"--data {data}: the train split has no rows labelled with a known class")
    return classes


def _templates(data: str, s: StrategyConfig):
    from mm.evaluate import DEFAULT_TEMPLATES, corpus_file, load_templates

    return load_templates(corpus_file(data, s.templates_path, "templates.json", DEFAULT_TEMPLATES))


def _tokenize(tok, texts: list[str], max_tokens: int) -> list[list[int]]:
    from mm.data import pad_ids

    ids, mask = pad_ids(tok(texts)["input_ids"], tok.pad_token_id, max_tokens, True)
    return [row[:n].tolist() for row, n in zip(ids, mask.sum(1))]


def prompt_view_batch(table, prompts: dict[str, list[str]], prompt_ids: dict[str, list[list[int]]]):
    """Ray Data batch function (pyarrow): keep rows of known classes; caption := one of its class prompts."""
    import hashlib

    import pyarrow as pa

    table = table.filter(pa.array([lab in prompt_ids for lab in table["label"].to_pylist()]))
    captions, ids = [], []
    for sid, lab in zip(table["sample_id"].to_pylist(), table["label"].to_pylist()):
        # one prompt per row, drawn from a hash of the sample id (stable across reruns)
        j = int.from_bytes(hashlib.blake2b(sid.encode(), digest_size=4).digest(), "little") % len(prompts[lab])
        captions.append(prompts[lab][j])
        ids.append(prompt_ids[lab][j])
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string()))
    return table.set_column(table.schema.get_field_index("input_ids"), "input_ids", pa.array(ids, pa.list_(pa.int32())))


def write_prompt_view(data: str, out: Path, classes: list[str], prompts: list[list[str]], tok,
                      max_tokens: int) -> Path:
    """RUN/ft_data: the labelled rows of ``data`` with class prompts as captions (Ray Data)."""
    import ray.data
    from ray.data.expressions import col

    from mm.checkpoint import write_json

    if (out / "manifest.json").is_file():
        return out  # written by an earlier attempt of this run
    shutil.rmtree(out, ignore_errors=True)
    by_class = dict(zip(classes, prompts))
    ids = {c: _tokenize(tok, ps, max_tokens) for c, ps in by_class.items()}
    files = sorted(str(f) for f in (Path(data) / "data").glob("*.parquet"))
    (ray.data.read_parquet(files).filter(expr=col("label").is_in(classes))
     .map_batches(prompt_view_batch, fn_kwargs={"prompts": by_class, "prompt_ids": ids},
                  batch_format="pyarrow", batch_size=256, num_cpus=0.5)
     .write_parquet(str(out / "data")))
    shutil.copytree(Path(data) / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    (out / "classes.json").write_text(json.dumps(classes), encoding="utf-8")
    write_json(out / "manifest.json", {"view_of": str(Path(data).resolve()), "classes": classes, "prompts": by_class})
    return out


def cached_embeddings(run: Path, model_dir: Path, data: str, split: str, cfg: EvalConfig):
    """Frozen embeddings of one split, computed once through Ray Data and cached in RUN/features/."""
    from mm.evaluate import Embeddings, embed_split

    path = run / "features" / f"{split}.npz"
    if path.is_file():
        z = np.load(path)
        return Embeddings(z["sample_id"], z["media_key"], z["label"], z["media_emb"], z["text_emb"])
    emb = embed_split(model_dir, data, split, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, sample_id=emb.sample_id, media_key=emb.media_key, label=emb.label, media_emb=emb.media_emb,
             text_emb=emb.text_emb)
    return emb


def _checkpoint_head(summary: dict) -> tuple[np.ndarray, np.ndarray]:
    """The trained classify head from the run's final Ray Train checkpoint (it is not part of RUN/model)."""
    from mm.checkpoint import load_train_state

    state, _, _ = load_train_state(summary["checkpoint"])
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


def finetune(init: str, data: str, task: Literal["classify", "retrieval"], out: str, cfg: FinetuneConfig) -> dict:
    """Fine-tune ``init`` (run or model dir) on ``data`` with ``cfg.finetune.strategy``; then WiSE-FT,
    eval.json and report.html in ``out``. Ray must be initialised. Returns the eval dict."""
    from mm.evaluate import load_model_and_tokenizer, resolve_model_dir, zeroshot_weights
    from mm.train import fit

    t0 = time.time()
    s = cfg.finetune
    run = Path(out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    init_dir = resolve_model_dir(init)
    init_model, tok = load_model_and_tokenizer(init_dir)
    max_tokens = init_model.cfg.text.max_tokens
    adapts_vision = task == "classify" or s.towers in ("vision", "both")
    if s.strategy == "lora" and adapts_vision and init_model.cfg.vision.torchvision_name:
        raise ValueError("finetune.strategy=lora targets attention projections; a CNN vision tower has none "
                         "(use last_n, full, or --set finetune.towers=text for retrieval)")
    heads: dict[str, ClassifierHead] = {}
    if task == "retrieval":
        if s.strategy not in ("full", "last_n", "lora"):
            raise ValueError(f"finetune.strategy={s.strategy} applies to --task classify; retrieval takes "
                             "full, last_n or lora")
        towers = ("vision", "text") if s.towers == "both" else (s.towers,)
        objectives = cfg.objectives
        if objectives.contrastive.weight <= 0:
            objectives = dataclasses.replace(objectives, contrastive=ContrastiveConfig(weight=1.0))
        fit(cfg.pretrain(objectives=objectives), [data], str(run), init=str(init_dir),
            prepare_model=PrepareModel(s.strategy, towers, s.last_n_blocks, s.lora_rank, s.lora_alpha,
                                       s.lora_dropout, train_scale=len(towers) == 2))
    else:
        classes = resolve_task_classes(data, s)
        prompts = _class_prompt_lists(classes, _templates(data, s))
        scale = float(init_model.scale()[0].detach())
        zs = zeroshot_weights(init_model, tok, classes, _templates(data, s))
        heads["zeroshot"] = ClassifierHead(classes, zs * scale, np.zeros(len(classes), np.float32))
        head0 = heads["zeroshot"] if s.head_init == "zeroshot" else \
            ClassifierHead(classes, np.zeros_like(zs), np.zeros(len(classes), np.float32))
        if s.strategy in ("head_only", "lp_ft"):
            emb = cached_embeddings(run, init_dir, data, "train", cfg.eval)
            from mm.evaluate import label_targets

            keep, y = label_targets(emb.label, classes)
            probe_log: list[dict] = []
            head0 = fit_linear_head(emb.media_emb[keep], y, len(classes), weight_decay=s.probe_weight_decay,
                                    max_iters=s.probe_max_iters, log_to=probe_log)
            head0.classes = classes
            (run / "probe_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probe_log))
        if s.strategy == "head_only":
            shutil.rmtree(run / "model", ignore_errors=True)
            shutil.copytree(init_dir, run / "model")
            heads["finetuned"] = head0
        elif s.strategy == "flyp":
            view = write_prompt_view(data, run / "ft_data", classes, prompts, tok, max_tokens)
            fit(cfg.pretrain(objectives=ObjectivesConfig()), [str(view)], str(run), init=str(init_dir),
                prepare_model=PrepareModel("full", ("vision", "text"), train_scale=True))
        else:  # full, last_n, lora, lp_ft: cross-entropy on the view's one prompt per class
            view = write_prompt_view(data, run / "ft_data", classes, [p[:1] for p in prompts], tok, max_tokens)
            lookup = prompt_lookup([_tokenize(tok, p[:1], max_tokens)[0] for p in prompts])
            strategy = "full" if s.strategy == "lp_ft" else s.strategy
            summary = fit(cfg.pretrain(), [str(view)], str(run), init=str(init_dir),
                          objectives=[ClassifyFactory(head0.weight.astype(np.float32), head0.bias.astype(np.float32),
                                                      lookup, s.label_smoothing)],
                          prepare_model=PrepareModel(strategy, ("vision",), s.last_n_blocks, s.lora_rank,
                                                     s.lora_alpha, s.lora_dropout))
            w, b = _checkpoint_head(summary)
            heads["finetuned"] = ClassifierHead(classes, w, b)
    if s.strategy == "lora":
        _merge_lora_run(run, s)
    if task == "classify" and s.strategy == "flyp":
        import mm

        tuned = mm.load(str(run))
        heads["finetuned"] = ClassifierHead(classes, zeroshot_weights(tuned, tok, classes, _templates(data, s))
                                            * float(tuned.scale()[0].detach()), np.zeros(len(classes), np.float32))
    if "finetuned" in heads:
        save_classifier(heads["finetuned"], run / "classifier")
    result = evaluate_finetune(run, init_dir, data, task, cfg, heads)
    result["finetune"] = {"init": str(init_dir), "task": task, "strategy": s.strategy,
                          "time_s": round(time.time() - t0, 1)}
    from mm.evaluate import write_eval
    from mm.report import write_report

    write_eval(result, run / "eval.json")
    write_report(run)
    return result


def _class_prompt_lists(classes: list[str], templates) -> list[list[str]]:
    from mm.evaluate import class_prompts

    return class_prompts(classes, templates)


def evaluate_finetune(run: Path, init_dir: Path, data: str, task: str, cfg: FinetuneConfig,
                      heads: dict[str, ClassifierHead]) -> dict:
    """WiSE-FT curve over ``finetune.wise_ft_alphas`` (always with 0 and 1), final metrics, retention.

    Every interpolated model is written under RUN/wise_ft/ and all are embedded in one Ray Data
    pass (mm.evaluate.evaluate_models); the directories are removed afterwards.
    """
    import mm
    from mm.checkpoint import read_tensors, save_model
    from mm.evaluate import evaluate_models, load_model_and_tokenizer, zeroshot_weights

    s = cfg.finetune
    # retrieval on the fine-tune data's own captions gives the report its sample retrievals
    tasks = ("classify", "zeroshot", "retrieval") if task == "classify" else ("retrieval", "zeroshot")
    theta0 = read_tensors(init_dir / "model.safetensors")
    theta1 = read_tensors(run / "model" / "model.safetensors")
    alphas = sorted(set(s.wise_ft_alphas) | {0.0, 1.0})
    model = mm.load(str(run))
    dirs: list[Path] = []
    for alpha in alphas:
        if alpha == 1.0:
            dirs.append(run)
            continue
        d = run / "wise_ft" / f"alpha_{alpha:.2f}"
        shutil.rmtree(d, ignore_errors=True)
        model.load_state_dict(interpolate_states(theta0, theta1, alpha))
        save_model(model, model.cfg, d / "model", init_dir / "tokenizer")
        if "finetuned" in heads:
            z, f = heads["zeroshot"], heads["finetuned"]
            if s.strategy == "flyp":  # FLYP's classifier is the (interpolated) text tower's prompts
                m_a, tok = load_model_and_tokenizer(d / "model")
                w = zeroshot_weights(m_a, tok, z.classes, _templates(data, s)) * float(m_a.scale()[0].detach())
                head = ClassifierHead(z.classes, w, z.bias)
            else:
                head = ClassifierHead(f.classes, (1 - alpha) * z.weight + alpha * f.weight,
                                      (1 - alpha) * z.bias + alpha * f.bias)
            save_classifier(head, d / "classifier")
        dirs.append(d)
    results = evaluate_models(dirs, data, cfg.eval, tasks=tasks)
    if s.retention_data:
        for res, ret in zip(results, evaluate_models(dirs, s.retention_data, cfg.eval, tasks=("zeroshot", "retrieval"))):
            res["metrics"].update({f"retention_{k}": v for k, v in ret["metrics"].items()})
            res["chance"].update({f"retention_{k}": v for k, v in ret["chance"].items()})
    shutil.rmtree(run / "wise_ft", ignore_errors=True)
    curve = [{"alpha": a, "metrics": r["metrics"]} for a, r in zip(alphas, results)]
    final = results[-1]
    final["wise_ft"] = curve
    final["retention"] = retention(curve, task)
    return final


def retention(curve: list[dict], task: str) -> dict:
    """Zero-shot (and fine-tuned) numbers of the pretrained (alpha 0) and fine-tuned (alpha 1) models."""
    by = {p["alpha"]: p["metrics"] for p in curve}
    before, after = by[0.0], by[1.0]
    out: dict[str, float | None] = {}
    for task_name in sorted(set(before) & set(after)):
        for name in ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1", "video_retrieval_recall@1"):
            if name in before[task_name] and name in after[task_name]:
                b, a = before[task_name][name], after[task_name][name]
                out[f"{task_name}/{name}/pretrained"] = b
                out[f"{task_name}/{name}/finetuned"] = a
                if task_name.startswith(("zeroshot", "retention_")):
                    out[f"{task_name}/{name}/retention"] = a / b if b > 0 else None
    return out


__all__ = ["StrategyConfig", "FinetuneConfig", "Classify", "ClassifyFactory", "PrepareModel", "merge_lora_state",
           "interpolate_states", "prompt_lookup", "finetune", "evaluate_finetune", "retention", "write_prompt_view",
           "cached_embeddings"]
