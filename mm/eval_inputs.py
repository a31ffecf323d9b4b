"""What an evaluation reads: its config, the model dir, the split's labels and classes, the prompts.

    cfg = EvalConfig(tasks=("zeroshot", "retrieval"), split="val")
    model_dir = resolve_model_dir("runs/pre")            # RUN/model or a model dir
    classes = resolve_classes(data, cfg, split_labels(data, cfg.split))
    prompts = class_prompts(classes, load_templates(DEFAULT_TEMPLATES))

Zero-shot prompts: a JSON list of templates with ``{c}``, or a mapping class -> list of prompts.
Shared by evaluation (mm/evaluate.py and the modules it calls) and fine-tuning (mm/finetune.py).
Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config import packaged_config
from core.storage import exists, is_uri, join, local_file, resolve

Task = Literal["zeroshot", "retrieval", "classify", "linear_probe", "masked"]
DEFAULT_TEMPLATES = packaged_config("templates.json")  # the shipped prompts (package data)


@dataclass(frozen=True)
class LinearProbeConfig:
    """Logistic regression on frozen pooled features (CLIP's linear-probe protocol), fit with L-BFGS."""

    weight_decay: float = 1e-4
    max_iters: int = 200
    max_train_rows: int = 50_000  # rows of the train split embedded for the probe


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[Task, ...] = ("zeroshot", "retrieval")
    split: str = "val"
    templates_path: str | None = None  # default: DATA/templates.json, else configs/templates.json
    classes_path: str | None = None  # default: DATA/classes.json, else the sorted labels of the split
    batch_rows: int = 64  # rows per embedding batch
    num_actors: int = 1
    actor_cpus: float = 1.0
    max_rows: int = 0  # 0: the whole split
    ks: tuple[int, ...] = (1, 5, 10)
    block_rows: int = 1024  # queries per similarity block
    block_cols: int = 65536  # gallery items per similarity block
    sample_queries: int = 4  # sample retrievals kept for the report
    sample_hits: int = 5
    thumb_px: int = 96
    # ITM re-ranking of retrieval (ALBEF/BLIP as LAVIS runs it): each query's top rerank_k ITC
    # candidates are re-scored with the fusion encoder + ITM head (score = ITM match logit + ITC
    # cosine) and reported as *_itm beside the ITC recalls. 0: off. Needs a run that trained ITM.
    rerank_k: int = 0
    rerank_batch: int = 128  # fused (text, media) pairs per fusion-encoder forward
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)

    def __post_init__(self) -> None:
        if self.batch_rows < 1 or self.num_actors < 1:
            raise ValueError("batch_rows and num_actors must be >= 1")
        if not self.ks or min(self.ks) < 1:
            raise ValueError("ks must be positive")
        if self.rerank_k < 0 or self.rerank_batch < 1:
            raise ValueError("rerank_k must be >= 0 and rerank_batch >= 1")


def resolve_model_dir(path: str | Path) -> Path:
    """A run dir (with ``model/``) or a model dir (with ``config.json`` + ``model.safetensors``)."""
    p = Path(path)
    for cand in (p / "model", p):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FileNotFoundError(f"--model {path} is neither a run dir with model/ nor a model dir "
                            "(config.json + model.safetensors)")


def load_templates(path: str | Path) -> list[str] | dict[str, list[str]]:
    """A list of templates with ``{c}``, or a mapping class name -> list of prompts."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, list) and data and all(isinstance(t, str) and "{c}" in t for t in data):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) and v for v in data.values()):
        return {str(k): [str(x) for x in v] for k, v in data.items()}
    raise ValueError(f"templates {path}: expected a list of strings with {{c}} or a mapping class -> prompts")


def class_prompts(classes: list[str], templates: list[str] | dict[str, list[str]]) -> list[list[str]]:
    if isinstance(templates, dict):
        missing = [c for c in classes if c not in templates]
        if missing:
            raise ValueError(f"templates have no prompts for classes {missing[:5]}")
        return [templates[c] for c in classes]
    return [[t.format(c=c) for t in templates] for c in classes]


def corpus_file(data_dir: str | Path, override: str | None, name: str, fallback: Path | None = None) -> Path | None:
    """``override``, else the corpus's ``name`` (fetched once when the corpus is at a URI), else ``fallback``."""
    if override:
        return Path(override)
    if is_uri(str(data_dir)):
        uri = join(str(data_dir), name)
        return Path(local_file(uri)) if exists(uri) else fallback
    p = Path(data_dir) / name
    return p if p.is_file() else fallback


def corpus_templates(data_dir: str | Path, override: str | None = None) -> list[str] | dict[str, list[str]]:
    """The zero-shot prompts: ``override``, else DATA/templates.json, else the shipped templates."""
    return load_templates(corpus_file(data_dir, override, "templates.json", DEFAULT_TEMPLATES))


def split_labels(data_dir: str | Path, split: str) -> list[str | None]:
    """The ``label`` column of one split, read on the driver (one small column)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, root, _ = resolve(str(data_dir))
    ds = pads.dataset(f"{root.rstrip('/')}/data", format="parquet", filesystem=fs)
    if "label" not in ds.schema.names:
        return []
    return ds.to_table(columns=["label"], filter=pc.field("split") == split)["label"].to_pylist()


def resolve_classes(data_dir: str | Path, cfg: EvalConfig, labels: list[str | None]) -> list[str]:
    path = corpus_file(data_dir, cfg.classes_path, "classes.json")
    if path is not None:
        classes = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"classes file {path} must hold a JSON list of class names")
        return classes
    return sorted({x for x in labels if x is not None})


def load_model_and_tokenizer(model_dir: Path):
    """The saved model (eval mode) and its run's Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    import mm

    model = mm.load(str(model_dir))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))


def schema_names(data_dir) -> list[str]:
    """Column names of a curated corpus's Parquet files (none when it has no file)."""
    import pyarrow.parquet as pq

    from mm.data import _data_files

    fs, files = _data_files(str(data_dir))
    return pq.read_schema(files[0], filesystem=fs).names if files else []


def run_dir_of(model_dir: Path) -> Path:
    """RUN for RUN/model; a bare model dir stands for itself."""
    return model_dir.parent if model_dir.name == "model" else model_dir


__all__ = ["Task", "DEFAULT_TEMPLATES", "LinearProbeConfig", "EvalConfig", "resolve_model_dir", "load_templates",
           "class_prompts", "corpus_file", "corpus_templates", "split_labels", "resolve_classes", "load_model_and_tokenizer",
           "schema_names", "run_dir_of"]
