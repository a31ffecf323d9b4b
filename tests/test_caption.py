"""Captioning: the decoder and its objective, generation (greedy, beam search), the caption
metrics against hand-computed cases, and a short real training run through ``mm.train.fit``.

    .venv/bin/pytest tests/test_caption.py -x -q
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mm.caption_metrics import bleu, caption_scores, cider, most_frequent_caption, rouge_l, tokenize  # noqa: E402
from mm.config import DecoderConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from mm.data import TokenInfo  # noqa: E402
from mm.generate import generate_ids, sequence_logprob  # noqa: E402
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


# -- generation --------------------------------------------------------------------------------
def _manual_greedy(lm, context, bos, eos, steps):
    ids = torch.full((context.shape[0], 1), bos)
    with torch.no_grad():
        for _ in range(steps):
            nxt = lm(input_ids=ids, encoder_hidden_states=context, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    rows = []
    for row in ids[:, 1:].tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


def _trained_decoder():
    """A decoder fit for a few steps on a fixed batch, so its captions depend on the image."""
    torch.manual_seed(0)
    model = build_model(CFG, TOK.vocab_size)
    cfg = ObjectivesConfig(contrastive=ContrastiveConfig(weight=0.0), captioning=CaptioningConfig(weight=1.0))
    module = ObjectiveSet(model, build_objectives(cfg, model, TOK))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    batch = _batch(b=8)
    for _ in range(40):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batch


def test_greedy_matches_step_by_step_argmax_and_one_beam_batched():
    model, batch = _trained_decoder()
    with torch.no_grad():
        context = model.decoder.context(model.vision_tokens(batch["pixels"]))
    kw = dict(bos_id=2, eos_id=3, pad_id=0, max_tokens=10)
    greedy = generate_ids(model.decoder.lm, context, **kw)
    assert greedy == _manual_greedy(model.decoder.lm, context, 2, 3, 10)
    assert generate_ids(model.decoder.lm, context, num_beams=1, **kw) == greedy
    # captions depend on the image: the fitted decoder writes each image's own caption
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert greedy == [row[1:n - 1] for row, n in zip(ids.tolist(), mask.sum(1).tolist())]
    # batched equals one at a time, for greedy and beam search
    for beams in (1, 3):
        together = generate_ids(model.decoder.lm, context, num_beams=beams, **kw)
        alone = [generate_ids(model.decoder.lm, context[i:i + 1], num_beams=beams, **kw)[0] for i in range(4)]
        assert together[:4] == alone


@pytest.mark.parametrize("pool", [0, 4])
def test_search_scores_as_the_uncached_forward(pool):
    """Regression: transformers' cached generation of BertLMHeadModel (4.57) drifts from its own
    forward pass (on the demo, greedy wrote "a little, a little )" where the forward's argmax
    path is "a photo of a little yellow star shape at the bottom"). On an untrained decoder, whose
    near-flat distributions expose any drift, greedy is the forward's step-by-step argmax and
    beam search finds a caption at least as likely."""
    torch.manual_seed(1)
    cfg = dataclasses.replace(CFG, decoder=DecoderConfig(layers=2, width=32, heads=2, max_tokens=16,
                                                         attn_pool_tokens=pool))
    model = build_model(cfg, TOK.vocab_size).eval()
    with torch.no_grad():
        context = model.decoder.context(model.vision_tokens(_batch()["pixels"]))
    kw = dict(bos_id=2, eos_id=3, pad_id=0, max_tokens=12)
    greedy = generate_ids(model.decoder.lm, context, **kw)
    assert greedy == _manual_greedy(model.decoder.lm, context, 2, 3, 12)
    beam = generate_ids(model.decoder.lm, context, num_beams=3, length_penalty=0.0, **kw)
    for g, b, c in zip(greedy, beam, context):
        lp = [sequence_logprob(model.decoder.lm, c[None], torch.tensor([[2, *s, 3]]))[0] for s in (g, b)]
        assert lp[1] >= lp[0] - 1e-4


def _toy_lm():
    """A decoder whose next-token distribution depends on the last token only, built so greedy
    search is myopic: from [CLS] (1), A (3) has p 0.6 and B (4) 0.4, but after A every
    continuation is unlikely (three words at 1/3) while after B one word (7) has p 0.95; every
    word then ends the caption ([SEP], 2). Greedy: A x [SEP], p 0.6 / 3 = 0.2; best: B 7 [SEP], 0.38."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    p = torch.full((8, 8), 1e-6)
    p[1, 3], p[1, 4] = 0.6, 0.4
    p[3, 5] = p[3, 6] = p[3, 7] = 1 / 3
    p[4, 7], p[4, 5] = 0.95, 0.05
    p[5:, 2] = 1.0
    p[2, 2] = 1.0
    logp = (p / p.sum(1, keepdim=True)).log()

    class ToyLM(PreTrainedModel, GenerationMixin):
        config_class = PretrainedConfig

        def __init__(self):
            super().__init__(PretrainedConfig(vocab_size=8, is_decoder=True, num_hidden_layers=1))
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, encoder_hidden_states=None, **kwargs):
            return CausalLMOutputWithCrossAttentions(logits=logp[input_ids])

    return ToyLM().eval()


def test_beam_search_beats_myopic_greedy_on_a_toy_model():
    lm = _toy_lm()
    context = torch.zeros(2, 1, 4)
    kw = dict(bos_id=1, eos_id=2, pad_id=0, max_tokens=5)
    greedy = generate_ids(lm, context, num_beams=1, **kw)
    beam = generate_ids(lm, context, num_beams=2, **kw)
    assert greedy[0][0] == 3 and beam == [[4, 7], [4, 7]]

    def likelihood(row):
        return sequence_logprob(lm, context[:1], torch.tensor([[1, *row, 2]])).exp().item()

    assert likelihood(greedy[0]) == pytest.approx(0.2, rel=1e-3)
    assert likelihood(beam[0]) == pytest.approx(0.38, rel=1e-3)


# -- metrics -----------------------------------------------------------------------------------
def test_tokenize_as_ptb_tokenizer_then_punctuation_removed():
    assert tokenize("A Red circle, moving LEFT.") == ["a", "red", "circle", "moving", "left"]
    assert tokenize("Don't stop... it's a well-known dog!") == ["do", "n't", "stop", "it", "'s", "a", "well-known",
                                                               "dog"]


def test_bleu_rouge_by_hand():
    # candidate vs reference: 1-grams 5/6 clipped matches, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3
    hyp = {"a": tokenize("the cat sat on the mat")}
    ref = {"a": [tokenize("the cat is on the mat")]}
    b1, b2, b3, b4 = bleu(hyp, ref)
    assert b1 == pytest.approx(5 / 6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b3 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    # pycocoevalcap's smoothing: 0 matches count as 1e-15, so Bleu_4 is tiny, not 0
    assert b4 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** (1 / 4), rel=1e-6)
    # LCS "the cat on the mat" = 5 of 6 both ways: F = 5/6 whatever beta
    assert rouge_l(hyp["a"], ref["a"]) == pytest.approx(5 / 6)
    # brevity penalty: c = 2, closest reference length r = 3 (of 3 and 6) -> exp(1 - 3/2)
    b = bleu({"a": ["the", "cat"]}, {"a": [["the", "cat", "sat"], "the cat sat on the mat".split()]})
    assert b[0] == pytest.approx(math.exp(1 - 3 / 2))
    assert b[1] == pytest.approx(math.exp(1 - 3 / 2))
    # ROUGE_L with beta 1.2: LCS 2, precision 2/2, recall 2/3 (the best reference)
    p, r = 1.0, 2 / 3
    assert rouge_l(["the", "cat"], [["the", "cat", "sat"]]) == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))


def test_bleu_is_corpus_level():
    """Matches and lengths are summed over images before the ratio (not a mean of sentence BLEUs)."""
    hyp = {"a": ["x", "y"], "b": ["p", "q", "r", "s"]}
    ref = {"a": [["x", "z"]], "b": [["p", "q", "r", "s"]]}
    assert bleu(hyp, ref)[0] == pytest.approx((1 + 4) / (2 + 4))
    assert bleu(hyp, ref)[1] == pytest.approx(math.sqrt(5 / 6 * (0 + 3) / (1 + 3)))


def test_cider_known_cases():
    # Two images, no n-gram shared between their references: idf = log 2 everywhere, a candidate
    # equal to its reference has cosine 1 for every n it has -> 10 x (orders present) / 4.
    refs = {"a": ["a red circle moving left"], "b": ["two blue squares"]}
    scores = cider({k: tokenize(v) for k, v in {"a": "a red circle moving left", "b": "two blue squares"}.items()},
                   {k: [tokenize(r) for r in v] for k, v in refs.items()})
    assert scores[1]["a"] == pytest.approx(10.0)
    assert scores[1]["b"] == pytest.approx(7.5)  # no 4-gram in three words
    # an n-gram in every image's references has idf 0: identical references give CIDEr 0
    same = cider({"a": ["red", "circle"], "b": ["red", "circle"]}, {"a": [["red", "circle"]], "b": [["red", "circle"]]})
    assert same[0] == 0.0
    # the Gaussian length penalty, on the bigram count (pycocoevalcap): candidate "w1 w2" vs
    # reference "w1 w2 w3 w4" in a set with an unrelated second image. 1-grams: cosine of
    # [c, c] and [c, c, c, c] with clipping = 2c^2 / (sqrt(2)c * 2c) = 1/sqrt(2); 2-grams: 1 / sqrt(3);
    # 3-, 4-grams 0; bigram counts 1 and 3 -> penalty exp(-4 / 72).
    got = cider({"a": ["w1", "w2"], "b": ["z"]}, {"a": [["w1", "w2", "w3", "w4"]], "b": [["z"]]})[1]["a"]
    assert got == pytest.approx(10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72))


def test_caption_scores_names_and_perfect_candidates():
    refs = {"1": ["a red circle on the left", "red circle"], "2": ["a blue square moving up", "blue square"],
            "3": ["a green triangle", "green triangle on grey"]}
    perfect = caption_scores({k: v[0] for k, v in refs.items()}, refs)
    assert list(perfect) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert perfect["Bleu_1"] == pytest.approx(1.0) and perfect["ROUGE_L"] == pytest.approx(1.0)
    baseline = caption_scores({k: "a red circle on the left" for k in refs}, refs)
    assert all(baseline[m] < perfect[m] for m in perfect)
    with pytest.raises(ValueError, match="no \\(non-empty\\) reference"):
        caption_scores({"1": "x"}, {"1": ["  "]})


def test_most_frequent_caption():
    assert most_frequent_caption(["A cat.", "a cat", "dog", "Dog", "bird"]) == "a cat"  # tie -> alphabetical
    assert most_frequent_caption(["x y", "z", "x y."]) == "x y"
    with pytest.raises(ValueError):
        most_frequent_caption(["", " "])


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


# -- the caption task (mm/caption.py) ----------------------------------------------------------
def _tiny_model_dir(tmp_path, corpus, decoder=DecoderConfig()):
    """A saved model of the test corpus's vocabulary (untrained towers), as `mm finetune --init` takes."""
    from mm.checkpoint import save_model
    from mm.data import load_token_info

    cfg = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, max_tokens=16), decoder=decoder)
    torch.manual_seed(0)
    model = build_model(cfg, load_token_info(str(corpus / "tokenizer")).vocab_size)
    return save_model(model, cfg, tmp_path / "init" / "model", corpus / "tokenizer")


def _rewrite(corpus, **columns):
    """Replace whole columns of every shard (bad-input corpora)."""
    import pyarrow.parquet as pq

    for f in sorted((corpus / "data").glob("*.parquet")):
        t = pq.read_table(f)
        for name, fn in columns.items():
            i = t.schema.get_field_index(name)
            t = t.set_column(i, t.schema.field(i), [fn(t[name].to_pylist())]) if fn else t.drop_columns([name])
        pq.write_table(t, f)


def test_caption_corpus_and_model_checks(tmp_path):
    from test_data import make_corpus

    from mm.caption import check_caption_corpus, check_caption_model

    good = make_corpus(tmp_path / "good", n=24, seed=1, val_fraction=0.3)
    counts = check_caption_corpus(good, 16)
    assert counts["train"] + counts["val"] == 24 and counts["val"] > 0
    bad = make_corpus(tmp_path / "empty_ref", n=24, seed=1, val_fraction=0.3)
    _rewrite(bad, caption=lambda c: ["" if i == 3 else x for i, x in enumerate(c)])  # one per shard
    with pytest.raises(ValueError, match="2 rows have an empty caption"):
        check_caption_corpus(bad, 16)
    none = make_corpus(tmp_path / "none", n=24, seed=1, val_fraction=0.3)
    _rewrite(none, caption=lambda c: [""] * len(c))
    with pytest.raises(ValueError, match="has no captions"):
        check_caption_corpus(none, 16)
    nocol = make_corpus(tmp_path / "nocol", n=24, seed=1, val_fraction=0.3)
    _rewrite(nocol, caption=None)
    with pytest.raises(ValueError, match="no caption column"):
        check_caption_corpus(nocol, 16)
    with pytest.raises(ValueError, match=r"longer than the model's context \(\d+ tokens > text.max_tokens 4"):
        check_caption_corpus(good, 4)
    with pytest.raises(ValueError, match="no val rows"):
        check_caption_corpus(make_corpus(tmp_path / "noval", n=8, seed=1, val_fraction=0.0), 16)

    plain = _tiny_model_dir(tmp_path, good)
    assert check_caption_model(plain, need_decoder=False)["decoder"]["layers"] == 0
    with pytest.raises(ValueError, match="has no caption decoder"):
        check_caption_model(plain, need_decoder=True)
    novision = tmp_path / "novision"
    novision.mkdir()
    (novision / "config.json").write_text('{"format": "mm-vlmodel/1", "model": {"text": {}}}')
    with pytest.raises(ValueError, match="has no vision tower"):
        check_caption_model(novision, need_decoder=False)


def test_add_decoder_keeps_the_towers_and_prepare_caption_strategies(tmp_path):
    from test_data import make_corpus

    import mm
    from mm.caption import PrepareCaption, add_decoder, check_caption_strategy, strategy_from_finetune
    from mm.checkpoint import load_model

    corpus = make_corpus(tmp_path / "c", n=8, seed=1)
    plain = _tiny_model_dir(tmp_path, corpus)
    grown_dir = add_decoder(plain, DecoderConfig(layers=1, width=32, heads=2, max_tokens=24), tmp_path / "grown")
    grown, cfg = load_model(grown_dir)
    before, _ = load_model(plain)
    assert cfg.decoder.layers == 1 and grown.decoder is not None
    for k, v in before.state_dict().items():
        assert torch.equal(grown.state_dict()[k], v), k
    assert (grown_dir / "tokenizer" / "tokenizer.json").is_file()
    assert add_decoder(grown_dir, DecoderConfig(layers=3), tmp_path / "again") == grown_dir  # kept as it is
    assert mm.load(grown_dir).generate(torch.zeros(1, 3, 32, 32), max_tokens=3) is not None

    def trainable(prep):
        m, _ = load_model(grown_dir)
        return {n for n, p in prep(m).named_parameters() if p.requires_grad}

    full = trainable(PrepareCaption("full"))
    assert full and all(n.startswith("decoder.") for n in full)
    last = trainable(PrepareCaption("last_n", last_n_blocks=1))
    assert last < full and all(n.startswith(("decoder.lm.bert.encoder.layer.0.", "decoder.pool.")) for n in last)
    lora = trainable(PrepareCaption("lora", lora_rank=2))
    assert lora and all("lora_" in n and n.startswith("decoder.") for n in lora)
    assert any(".crossattention." in n for n in lora)
    with_vision = trainable(PrepareCaption("full", towers=("vision",)))
    assert any(n.startswith("vision.") for n in with_vision) and not any(n.startswith("text.") for n in with_vision)
    with pytest.raises(ValueError, match="adapts a trained decoder"):
        check_caption_strategy(strategy_from_finetune("lora", "none", 1, 8, 16.0, 0.0), False, False)
    with pytest.raises(ValueError, match="does not apply to --task caption"):
        strategy_from_finetune("head_only", "none", 1, 8, 16.0, 0.0)


def test_caption_finetune_then_evaluate(ray_session, tmp_path):
    """train_caption (a decoder added to a run without one, frozen towers) then evaluate_captions:
    the metrics beside the baseline's, captions.jsonl, report samples."""
    import json

    from test_data import make_corpus
    from test_train import TINY

    from core.config import load_config
    from mm.caption import (
        CaptionEvalConfig,
        CaptionStrategy,
        caption_grid_html,
        evaluate_captions,
        train_caption,
    )
    from mm.caption_metrics import METRICS
    from mm.train import PretrainConfig, read_metrics

    corpus = make_corpus(tmp_path / "c", n=64, seed=5, val_fraction=0.25)
    init = _tiny_model_dir(tmp_path, corpus)
    cfg = load_config(PretrainConfig, None, [*TINY, "train.max_steps=30", "train.checkpoint_every_steps=30",
                                             "optim.lr=0.005", "train.log_every_steps=5"])
    run = tmp_path / "cap"
    s = CaptionStrategy(decoder=DecoderConfig(layers=1, width=48, heads=2, max_tokens=24))
    summary = train_caption(str(init), str(corpus), str(run), cfg, s)
    assert summary["steps"] == 30 and Path(summary["init_model"]) == run / "init_model"
    lines = read_metrics(run / "metrics.jsonl")
    assert "loss/captioning" in lines[0] and "loss/contrastive" not in lines[0]
    assert lines[-1]["loss/captioning"] < lines[0]["loss/captioning"] - 0.5, [m["loss/captioning"] for m in lines]
    # frozen towers: the vision tower is the init's
    from mm.checkpoint import read_tensors

    a, b = read_tensors(init / "model.safetensors"), read_tensors(run / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("decoder.") for k in b)

    result = evaluate_captions(run, corpus, CaptionEvalConfig(num_beams=2, max_tokens=8, samples=3),
                               captions_out=run / "captions.jsonl")
    assert list(result["metrics"]["caption"]) == list(METRICS) == list(result["chance"]["caption"])
    assert all(math.isfinite(v) for v in result["metrics"]["caption"].values())
    assert result["baseline"]["caption"]["caption"]
    rows = [json.loads(x) for x in (run / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == result["counts"]["caption"]["rows"] > 0
    assert all(set(r) == {"sample_id", "media_key", "generated", "references"} and r["references"] for r in rows)
    assert len(result["caption_samples"]) == 3 and result["caption_samples"][0]["image"]
    assert "<img" in caption_grid_html(result["caption_samples"])
    # bad input: a run without a decoder is refused before any work
    with pytest.raises(ValueError, match="no caption decoder"):
        evaluate_captions(init, corpus, CaptionEvalConfig())

    # the command: `mm evaluate --task caption` writes eval.json, captions.jsonl and a report with captions
    from jobs import evaluate as E

    assert E.main(["--model", str(run), "--data", str(corpus), "--out", str(run / "eval.json"),
                   "--task", "caption"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert list(ev["metrics"]["caption"]) == list(METRICS) and list(ev["chance"]["caption"]) == list(METRICS)
    assert (run / "captions.jsonl").is_file() and "Generated captions" in (run / "report.html").read_text()
    assert E.main(["--model", str(init.parent), "--data", str(corpus), "--out", str(tmp_path / "x.json"),
                   "--task", "caption"]) == 2
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("pool", [0, 4])
def test_decoder_exports_as_a_transformers_model(tmp_path, pool):
    """export_decoder_hf: the decoder loads with transformers alone, and its logits and captions
    equal mm's given the context rebuilt from the exported layers."""
    import json

    from safetensors.torch import load_file
    from test_data import save_tokenizer
    from transformers import BertLMHeadModel

    from mm.caption import export_decoder_hf

    save_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, decoder=dataclasses.replace(CFG.decoder, attn_pool_tokens=pool))
    model = build_model(cfg, 40).eval()
    spec = export_decoder_hf(model, tmp_path / "tok", tmp_path / "out")
    json.dumps(spec)
    lm = BertLMHeadModel.from_pretrained(str(tmp_path / "out" / "decoder")).eval()
    w = {k[len("context."):]: v for k, v in load_file(str(tmp_path / "out" / "decoder_context.safetensors")).items()}
    c = spec["context"]
    if c["kind"] == "linear":
        ctx_layers = torch.nn.Sequential(torch.nn.LayerNorm(c["layers"][0][1], eps=c["layers"][0][2]),
                                         torch.nn.Linear(c["layers"][1][1], c["layers"][1][2]))
        ctx_layers.load_state_dict(w)

        def context(tokens):
            return ctx_layers(tokens)
    else:
        ln_q, ln_k = torch.nn.LayerNorm(c["width"]), torch.nn.LayerNorm(c["vision_width"])
        attn = torch.nn.MultiheadAttention(c["width"], c["heads"], kdim=c["vision_width"], vdim=c["vision_width"],
                                           batch_first=True)
        ln_q.load_state_dict({k[5:]: v for k, v in w.items() if k.startswith("ln_q.")})
        ln_k.load_state_dict({k[5:]: v for k, v in w.items() if k.startswith("ln_k.")})
        attn.load_state_dict({k[5:]: v for k, v in w.items() if k.startswith("attn.")})

        def context(tokens):
            q = ln_q(w["query"]).expand(tokens.shape[0], -1, -1)
            return attn(q, ln_k(tokens), ln_k(tokens), need_weights=False)[0]

    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[2, 7, 9, 11, 3]] * 3)
    with torch.no_grad():
        tokens = model.vision_tokens(pixels)
        ours = model.decoder(model.decoder.context(tokens), ids)
        ctx = context(tokens)
        theirs = lm(input_ids=ids, encoder_hidden_states=ctx).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert lm.generation_config.bos_token_id == 2 and lm.generation_config.eos_token_id == 3
    kw = dict(bos_id=2, eos_id=3, pad_id=0, max_tokens=6, num_beams=2)
    assert generate_ids(lm, ctx, **kw) == generate_ids(model.decoder.lm, model.decoder.context(tokens), **kw)


def test_decoder_prompt_is_fed_not_predicted_and_stripped(tmp_path):
    """BLIP's prompt: caption_objectives tokenises model.decoder.prompt with the corpus tokenizer,
    the objective feeds it after [CLS] without predicting it, and generation starts after it."""
    from test_data import save_tokenizer
    from transformers import AutoTokenizer

    from mm.caption import caption_objectives
    from mm.generate import generate

    save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    dec = dataclasses.replace(CFG.decoder, prompt="a photo of")
    cfg = dataclasses.replace(CFG, decoder=dec)
    objectives, extra = caption_objectives(tmp_path / "tok", dec)
    assert objectives.captioning.weight == 0 and objectives.contrastive.weight == 0 and len(extra) == 1
    prompt = tuple(tok("a photo of", add_special_tokens=False)["input_ids"])
    assert extra[0].prompt_ids == prompt and len(prompt) == 3
    torch.manual_seed(0)
    model = build_model(cfg, len(tok))
    tokens = dataclasses.replace(TOK, vocab_size=len(tok))
    with pytest.raises(ValueError, match="must be tokenised"):
        build_objectives(COCA, model, tokens)
    module = ObjectiveSet(model, build_objectives(objectives, model, tokens, extra))
    captions = ["red circle", "blue square", "green triangle", "yellow circle"]
    enc = tok(captions, padding=True, return_tensors="pt")
    batch = {"pixels": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
             "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(30):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert generate(model, batch["pixels"], max_tokens=5, tokenizer=tok) == captions


def test_mm_export_carries_or_refuses_the_decoder(tmp_path):
    """`mm export --to hf` writes the caption decoder beside the towers; `--to openclip` refuses a
    run with one in one line instead of leaving it out silently."""
    import json

    from test_data import make_corpus

    from mm.export import ExportError, export

    corpus = make_corpus(tmp_path / "c", n=8, seed=1)
    src = _tiny_model_dir(tmp_path, corpus, DecoderConfig(layers=1, width=32, heads=2, max_tokens=16))
    out = export(src, tmp_path / "hf", to="hf")
    assert json.loads((out / "export_config.json").read_text())["decoder"]["dir"] == "decoder"
    assert (out / "decoder" / "config.json").is_file()
    with pytest.raises(ExportError, match="decoder"):
        export(src, tmp_path / "oc", to="openclip")
    assert not (tmp_path / "oc").exists()
