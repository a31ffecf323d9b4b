"""Classification through prompts: how labels reach Ray Train workers whose batches carry only
pixels and ``input_ids``.

    view = write_prompt_view(data, run / "ft_data", classes, prompts, tok, max_tokens)
    lookup = prompt_lookup([tokenize_prompts(tok, p[:1], max_tokens)[0] for p in prompts])
    fit(cfg, [str(view)], run, objectives=[ClassifyFactory(weight, bias, lookup)])

Classification fine-tunes train on a *view* of the corpus (``RUN/ft_data``, written with Ray
Data) whose captions are class prompts; the ``classify`` objective reads each row's class back
from its prompt tokens (one prompt per class, checked to be distinct), and FLYP trains on the
same view with the contrastive loss. Used by mm/finetune.py; tested in tests/test_finetune.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mm.objectives import Objective


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


def tokenize_prompts(tok, texts: list[str], max_tokens: int) -> list[list[int]]:
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
    ids = {c: tokenize_prompts(tok, ps, max_tokens) for c, ps in by_class.items()}
    files = sorted(str(f) for f in (Path(data) / "data").glob("*.parquet"))
    (ray.data.read_parquet(files).filter(expr=col("label").is_in(classes))
     .map_batches(prompt_view_batch, fn_kwargs={"prompts": by_class, "prompt_ids": ids},
                  batch_format="pyarrow", batch_size=256, num_cpus=0.5)
     .write_parquet(str(out / "data")))
    shutil.copytree(Path(data) / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    (out / "classes.json").write_text(json.dumps(classes), encoding="utf-8")
    write_json(out / "manifest.json", {"view_of": str(Path(data).resolve()), "classes": classes, "prompts": by_class})
    return out


__all__ = ["prompt_lookup", "Classify", "ClassifyFactory", "tokenize_prompts", "prompt_view_batch",
           "write_prompt_view"]
