"""Linear classifier heads on frozen embeddings: the linear probe and fine-tuning's classifier.

    head = fit_linear_head(x, y, n_classes)        # multinomial logistic regression, L-BFGS
    save_classifier(head, "runs/ft/classifier")    # head.safetensors + classes.json
    head = load_classifier("runs/ft/classifier"); logits = head(x)

Used by evaluation (``linear_probe``, the ``classify`` task) and by fine-tuning (``head_only``,
``lp_ft``), which is why it lives apart from both. Tested in tests/test_finetune.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mm.checkpoint import read_json, read_tensors, write_json, write_tensors


@dataclass
class ClassifierHead:
    """Linear classifier on L2-normalised embeddings: logits = x @ weight.T + bias."""

    classes: list[str]
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.weight.T + self.bias

    __call__ = logits


def save_classifier(head: ClassifierHead, out_dir: str | Path) -> Path:
    d = Path(out_dir)
    write_tensors(d / "head.safetensors", {"weight": torch.from_numpy(np.ascontiguousarray(head.weight)),
                                           "bias": torch.from_numpy(np.ascontiguousarray(head.bias))})
    write_json(d / "classes.json", head.classes)
    return d


def load_classifier(path: str | Path) -> ClassifierHead:
    d = Path(path)
    t = read_tensors(d / "head.safetensors")
    return ClassifierHead(list(read_json(d / "classes.json")), t["weight"].float().numpy(), t["bias"].float().numpy())


def fit_linear_head(x: np.ndarray, y: np.ndarray, n_classes: int, *, weight_decay: float = 1e-4,
                    max_iters: int = 200, init: tuple[np.ndarray, np.ndarray] | None = None,
                    log_to: list | None = None) -> ClassifierHead:
    """Multinomial logistic regression, full batch, L-BFGS: CE + weight_decay * ||W||^2."""
    xt = torch.from_numpy(np.asarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    lin = nn.Linear(xt.shape[1], n_classes)
    with torch.no_grad():
        if init is not None:
            lin.weight.copy_(torch.from_numpy(init[0]))
            lin.bias.copy_(torch.from_numpy(init[1]))
        else:
            lin.weight.zero_()
            lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iters, history_size=20,
                            line_search_fn="strong_wolfe")
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), yt) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    opt.step(closure)
    if log_to is not None:
        log_to.extend({"step": i + 1, "loss/probe": v} for i, v in enumerate(calls))
    return ClassifierHead([str(i) for i in range(n_classes)], lin.weight.detach().numpy().copy(),
                          lin.bias.detach().numpy().copy())


__all__ = ["ClassifierHead", "save_classifier", "load_classifier", "fit_linear_head"]
