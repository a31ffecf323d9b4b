"""Captioning: the decoder and its objective, and a short real training run through
``mm.train.fit`` (CoCa in the one loop, the saved run generating). Split along concerns: search in
tests/test_caption_generate.py, metrics in tests/test_caption_metrics.py, the caption task
(mm/caption.py: checks, fine-tune, evaluate, export) in tests/test_caption_task.py; they import
this module's toy config (``CFG``, ``TOK``, ``_batch``).

    .venv/bin/pytest tests/test_caption.py tests/test_caption_generate.py tests/test_caption_metrics.py tests/test_caption_task.py -x -q
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mm.config import DecoderConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from mm.data import TokenInfo  # noqa: E402
from mm.models import build_model  # noqa: E402
from mm.objectives import (  # noqa: E402
    CaptioningConfig,
    ContrastiveConfig,
    ObjectivesConfig,
    ObjectiveSet,
    build_objectives,
    caption_targets,
)

CFG = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=1, heads=2, max_frames=4),
                  text=TextConfig(width=32, depth=1, heads=2, max_tokens=12), embed_dim=16,
                  decoder=DecoderConfig(layers=1, width=32, heads=2, max_tokens=16))
TOK = TokenInfo(vocab_size=40, pad_id=0, mask_id=4, cls_id=2, sep_id=3)
COCA = ObjectivesConfig(captioning=CaptioningConfig(weight=2.0))


def _batch(video: bool = False, b: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (b, 8), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0  # one shorter caption: [CLS] w w w [SEP] [PAD]...
    ids[0, 4] = 3
    shape = (b, 4, 3, 32, 32) if video else (b, 3, 32, 32)
    return {"frames" if video else "pixels": torch.randn(*shape, generator=g), "input_ids": ids,
            "attention_mask": mask}


# -- model and objective ----------------------------------------------------------------------


def test_no_decoder_by_default_and_decoder_only_when_asked():
    assert ModelConfig().decoder.layers == 0
    assert build_model(dataclasses.replace(CFG, decoder=DecoderConfig()), 40).decoder is None
    model = build_model(CFG, 40)
    assert model.decoder is not None and model.decoder.lm.config.vocab_size == 40
    # the LM head is tied to the decoder's input embeddings
    assert model.decoder.lm.cls.predictions.decoder.weight is model.decoder.lm.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="decoder.width"):
        DecoderConfig(layers=1, width=30, heads=4)


def test_caption_targets_shift_mask_padding_and_prompt():
    ids = torch.tensor([[2, 10, 11, 3, 0], [2, 12, 13, 14, 3]])
    mask = (ids != 0).long()
    x, m, y = caption_targets(ids, mask)
    assert x.tolist() == [[2, 10, 11, 3], [2, 12, 13, 14]]
    assert y.tolist() == [[10, 11, 3, -100], [12, 13, 14, 3]]
    assert m.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    x, m, y = caption_targets(ids, mask, prompt_ids=(30, 31))
    assert x.tolist() == [[2, 30, 31, 10, 11, 3], [2, 30, 31, 12, 13, 14]]
    assert y.tolist() == [[-100, -100, 10, 11, 3, -100], [-100, -100, 12, 13, 14, 3]]


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("pool", [0, 4])
def test_coca_objectives_run_and_backprop(video, pool):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, decoder=dataclasses.replace(CFG.decoder, attn_pool_tokens=pool))
    model = build_model(cfg, TOK.vocab_size)
    objs = build_objectives(COCA, model, TOK)
    assert [(o.name, o.weight) for o in objs] == [("contrastive", 1.0), ("captioning", 2.0)]
    module = ObjectiveSet(model, objs)
    total, metrics = module(_batch(video))
    assert torch.isfinite(total) and torch.isfinite(metrics["loss/captioning"])
    # near ln(vocab) at initialisation
    assert abs(metrics["loss/captioning"].item() - math.log(40)) < 1.0
    total.backward()
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"


def test_captioning_alone_needs_no_text_tower():
    """Captioning by itself (caption fine-tuning) runs the vision tower and the decoder only."""
    torch.manual_seed(0)
    model = build_model(CFG, TOK.vocab_size)
    cfg = ObjectivesConfig(contrastive=ContrastiveConfig(weight=0.0), captioning=CaptioningConfig(weight=1.0))
    module = ObjectiveSet(model, build_objectives(cfg, model, TOK))
    module(_batch())[0].backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_frozen_features_refuse_captioning():
    """train.frozen_features keeps pooled features only; the decoder needs the vision tokens."""
    from core.config import load_config
    from mm.frozen import check_frozen_features
    from mm.train import PretrainConfig

    base = ["model.lock.vision=true", "model.lock.text=true", "train.frozen_features=true", "data.augment=false"]
    check_frozen_features(load_config(PretrainConfig, None, base), None, None)
    cfg = load_config(PretrainConfig, None, [*base, "model.decoder.layers=1", "objectives.captioning.weight=1.0"])
    with pytest.raises(ValueError, match="captioning need"):
        check_frozen_features(cfg, None, None)


def test_fsdp_shards_every_decoder_block(tmp_path):
    """train.parallel=fsdp: each decoder layer is its own FSDP2 unit, like the towers' blocks
    (one-process gloo group; the two-worker FSDP run is tests/test_train.py's)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from mm.train import TrainConfig, _wrap

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = build_model(dataclasses.replace(CFG, decoder=dataclasses.replace(CFG.decoder, layers=2)), 40)
        module = _wrap(ObjectiveSet(model, build_objectives(COCA, model, TOK)), TrainConfig(parallel="fsdp"),
                       torch.device("cpu"))
        assert all(isinstance(b, FSDPModule) for b in model.decoder.blocks) and len(model.decoder.blocks) == 2
        assert all(isinstance(b, FSDPModule) for b in model.vision.blocks)
        total, _ = module(_batch())
        total.backward()
    finally:
        dist.destroy_process_group()


def test_captioning_needs_a_decoder():
    model = build_model(dataclasses.replace(CFG, decoder=DecoderConfig()), TOK.vocab_size)
    with pytest.raises(ValueError, match="model.decoder.layers"):
        build_objectives(COCA, model, TOK)


def test_decoder_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(CFG, TOK.vocab_size)
    cfg = ObjectivesConfig(contrastive=ContrastiveConfig(weight=0.0), captioning=CaptioningConfig(weight=1.0))
    module = ObjectiveSet(model, build_objectives(cfg, model, TOK))
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    batch = _batch(b=8)
    losses = []
    for _ in range(30):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -- a real training run -----------------------------------------------------------------------
def test_coca_config_builds_contrastive_and_captioning():
    from core.config import load_config, packaged_config
    from mm.train import PretrainConfig

    cfg = load_config(PretrainConfig, packaged_config("coca.yaml"), [])
    model = build_model(cfg.model, 60)
    objs = build_objectives(cfg.objectives, model, dataclasses.replace(TOK, vocab_size=60))
    assert [(o.name, o.weight) for o in objs] == [("contrastive", 1.0), ("captioning", 2.0)]
    assert model.decoder.context(torch.zeros(2, 257, 128)).shape == (2, 64, 128)  # the attentional pooler


def test_captioning_trains_in_the_one_loop_and_the_run_generates(ray_session, tmp_path):
    """CoCa (contrastive + captioning) through mm.train.fit on 2 Ray Train workers; the saved run
    loads with mm.load and captions images without Ray."""
    from test_data import draw, make_corpus
    from test_train import TINY

    import mm
    from core.config import load_config
    from mm.train import PretrainConfig, fit, read_metrics

    corpus = make_corpus(tmp_path / "img", n=64, seed=2)
    run = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [
        *TINY, "model.decoder.layers=1", "model.decoder.width=48", "model.decoder.heads=2",
        "model.decoder.max_tokens=24", "objectives.captioning.weight=2.0", "train.max_steps=16",
        "train.checkpoint_every_steps=16", "optim.lr=0.003"])
    fit(cfg, [str(corpus)], str(run))
    lines = read_metrics(run / "metrics.jsonl")
    assert "loss/captioning" in lines[0] and "captioning/acc" in lines[0] and "loss/contrastive" in lines[0]
    first, last = lines[0]["loss/captioning"], lines[-1]["loss/captioning"]
    assert last < first - 0.5, [m["loss/captioning"] for m in lines]
    model = mm.load(str(run))
    assert model.decoder is not None and model.cfg.decoder.layers == 1
    images = [draw("red", "circle", 32, 32, 12), draw("blue", "square", 30, 34, 10)]
    greedy = model.generate(images, max_tokens=8)
    beam = model.generate(images, max_tokens=8, num_beams=3)
    assert len(greedy) == len(beam) == 2 and all(isinstance(c, str) for c in greedy + beam)
    vocab = set(model.tokenize.tokenizer.get_vocab())
    assert all(w in vocab for c in greedy + beam for w in c.split())
    assert model.generate(torch.zeros(1, 4, 3, 32, 32), max_tokens=4)  # a video: one caption
    with pytest.raises(ValueError, match="max_tokens 30 > 23"):
        model.generate(images, max_tokens=30)


def test_demo_tokenizer_covers_video_captions(tmp_path):
    """The demo's one vocabulary is trained on both modalities' captions (``source_captions``):
    the images' alone turned "a video of" into "a [UNK] of" and spelt "moving" in letters, so
    the decoder could never write the video words (videos CIDEr below a random-tower control)."""
    from pipelines.demo_corpus import generate_demo_corpus, source_captions
    from pipelines.tokenize import TokenizerConfig, train_tokenizer

    raw = generate_demo_corpus(tmp_path / "raw", n_images=120, n_videos=40, video_px=32, seed=0)
    captions = source_captions(raw)
    assert len(captions) >= 160  # the clean ones, their duplicates and the corrupt-media rows
    videos = [c for c in captions if any(w in c for w in ("moving", "sliding", "going", "travelling", "rising",
                                                            "falling"))]
    images = [c for c in captions if c not in set(videos)]
    assert len(videos) >= 40 and not any(c.strip() == "" for c in captions)

    def unk_rows(tok, caps):
        unk = tok.token_to_id("[UNK]")
        return sum(unk in tok.encode(c).ids for c in caps) / len(caps)

    assert unk_rows(train_tokenizer(images, TokenizerConfig()), videos) > 0.1  # the old demo vocabulary
    shared = train_tokenizer(captions, TokenizerConfig())
    assert unk_rows(shared, videos) == 0 and unk_rows(shared, images) == 0
    assert shared.encode("a video of a red star moving up").tokens[1:-1] == \
        ["a", "video", "of", "a", "red", "star", "moving", "up"]
