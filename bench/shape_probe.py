"""Can a vision tower learn the demo's shape label at the demo's budget? A supervised probe.

    .venv/bin/python bench/shape_probe.py [--steps 200] [--train 1500] [--variants patch-avg,conv-max,...]

Renders demo-corpus images (pipelines/demo_corpus.py, all colours/sizes/positions, 64 px),
trains each variant as a 6-way shape classifier from scratch (AdamW lr 1e-3, 20 warmup steps,
batch 64, one CPU thread, no Ray) and prints JSON with held-out accuracy (300 images) per
variant. Variants: the tiny ViT of configs/pretrain.yaml (width 128, 3 blocks, patch 8) with the
linear patch stem (``patch``) or timm's ConvStem (``conv``, mm.config.VisionConfig.stem), pooled
by ``avg``/``token``/``max``; and ``cnn``, a 3-layer conv net with global max pooling, as the
reference for what the budget allows. Supervision is the easiest signal there is: a variant that
cannot learn shape here will not learn it from captions (the contrastive run has less signal).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn


def render(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from pipelines import demo_render as dr
    from pipelines.demo_corpus import plan_attributes

    axes = {"shape": dr.SHAPES, "colour": tuple(dr.COLOURS), "size": dr.SIZES, "position": dr.POSITIONS}
    xs, ys = [], []
    for a in plan_attributes(rng, n, axes):  # the demo corpus's own balanced attribute draw
        xs.append(dr.render_image(a, rng, 64))
        ys.append(dr.SHAPES.index(a["shape"]))
    x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25, torch.tensor(ys)


def build(variant: str) -> nn.Module:
    if variant == "cnn":
        return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                             nn.Flatten(), nn.Linear(128, 6))
    from mm.config import VisionConfig
    from mm.models.vision import VisionTower

    stem, pool = variant.split("-")
    tower = VisionTower(VisionConfig(image_px=64, patch_px=8, width=128, depth=3, heads=4, max_frames=1,
                                     stem=stem, pool=pool))

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower, self.head = tower, nn.Linear(128, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.tower.pool(self.tower(x[:, None])))

    return Classifier()


def probe(variant: str, data, steps: int, seed: int) -> dict:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = build(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return {"variant": variant, "test_acc": round(acc, 3), "final_train_loss": round(float(loss), 3),
            "train_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--variants", default="patch-avg,patch-token,conv-avg,conv-token,conv-max,cnn")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(a.seed)
    data = (render(a.train, rng), render(300, rng))
    results = [probe(v, data, a.steps, a.seed) for v in a.variants.split(",")]
    print(json.dumps({"steps": a.steps, "train_images": a.train, "test_images": 300, "chance": round(1 / 6, 3),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
