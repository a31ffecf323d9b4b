"""Objectives on one device: each returns a finite loss with gradients to the right parts, the
set runs them on one batch, hard negatives avoid the positive and duplicate captions, and a few
optimizer steps lower every loss on a fixed batch.

    .venv/bin/pytest tests/test_objectives.py -x -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from mm.data import TokenInfo
from mm.models import build_model
from mm.objectives import (
    ITMConfig,
    MIMConfig,
    MLMConfig,
    Objective,
    ObjectivesConfig,
    ObjectiveSet,
    build_objectives,
    sample_negatives,
)

CFG = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=1, heads=2, max_frames=4),
                  text=TextConfig(width=32, depth=1, heads=2, max_tokens=12),
                  fusion=FusionConfig(depth=1, heads=2), embed_dim=16)
TOK = TokenInfo(vocab_size=40, pad_id=0, mask_id=4, cls_id=2, sep_id=3)
ALL = ObjectivesConfig(mlm=MLMConfig(weight=1.0), fusion_mlm=MLMConfig(weight=1.0),
                       mim=MIMConfig(weight=1.0, decoder_width=32), itm=ITMConfig(weight=1.0))


def _batch(video: bool, b: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (b, 8), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    key = "frames" if video else "pixels"
    shape = (b, 4, 3, 32, 32) if video else (b, 3, 32, 32)
    return {key: torch.randn(*shape, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_all_objectives_run_and_backprop(video, loss):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, loss=loss), TOK.vocab_size)
    objs = build_objectives(ALL, model, TOK)
    assert [o.name for o in objs] == ["contrastive", "mlm", "fusion_mlm", "mim", "itm"]
    module = ObjectiveSet(model, objs)
    total, metrics = module(_batch(video))
    assert torch.isfinite(total)
    for name in ("contrastive", "mlm", "fusion_mlm", "mim", "itm"):
        assert torch.isfinite(metrics[f"loss/{name}"]), name
    total.backward()
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"


def test_every_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(CFG, TOK.vocab_size)
    module = ObjectiveSet(model, build_objectives(ALL, model, TOK))
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3)
    batch = _batch(False, b=8)
    first = last = None
    for step in range(25):
        torch.manual_seed(step % 2)  # masks alternate between two draws: the loss can fall
        loss, metrics = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if first is None:
            first = metrics
        last = metrics
    for name in ("contrastive", "mlm", "fusion_mlm", "mim", "itm"):
        assert last[f"loss/{name}"] < first[f"loss/{name}"], name


def test_hard_negatives_never_pick_the_positive_or_a_duplicate():
    sim = torch.randn(6, 6) * 5
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    for _ in range(50):
        neg = sample_negatives(sim, same, hard=True)
        assert (neg != torch.arange(6)).all()
        assert neg[0] != 1 and neg[1] != 0
    # Hard: the most similar non-positive dominates.
    sim = torch.zeros(4, 4)
    sim[0, 3] = 20.0
    picks = torch.stack([sample_negatives(sim, torch.zeros(4, 4, dtype=torch.bool), hard=True)[0]
                         for _ in range(50)])
    assert (picks == 3).float().mean() > 0.9
    # hard_fraction mixes in uniform negatives: 0.5 * 1 + 0.5 / 3 of the picks go to column 3.
    torch.manual_seed(0)
    picks = torch.stack([sample_negatives(sim, torch.zeros(4, 4, dtype=torch.bool), hard=True, hard_fraction=0.5)[0]
                         for _ in range(2000)])
    assert abs((picks == 3).float().mean().item() - 2 / 3) < 0.04
    assert {1, 2, 3} == set(picks.tolist())


def test_extra_objective_factories_are_added():
    class Norm(Objective):
        name = "norm"

        def step(self, model, batch):
            return model.encode_image(batch["pixels"]).pow(2).sum(), {}

    model = build_model(CFG, TOK.vocab_size)
    objs = build_objectives(ObjectivesConfig(), model, TOK, extra=[lambda m, t: Norm(0.5)])
    assert [o.name for o in objs] == ["contrastive", "norm"]
    _, metrics = ObjectiveSet(model, objs)(_batch(False))
    assert metrics["loss/norm"].item() == pytest.approx(6.0, rel=1e-4)


def test_objectives_needing_fusion_refuse_a_model_without_it():
    model = build_model(dataclasses.replace(CFG, fusion=FusionConfig(depth=0)), TOK.vocab_size)
    with pytest.raises(ValueError, match="fusion"):
        build_objectives(ObjectivesConfig(itm=ITMConfig(weight=1.0)), model, TOK)
