"""Caption search (mm/generate.py): greedy as the step-by-step argmax, beam search batched and
alone, scores as the uncached forward, and beam search beating myopic greedy on a toy model.

    .venv/bin/pytest tests/test_caption_generate.py -x -q
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_caption import CFG, TOK, _batch  # noqa: E402

from mm.config import DecoderConfig  # noqa: E402
from mm.generate import generate_ids, sequence_logprob  # noqa: E402
from mm.models import build_model  # noqa: E402
from mm.objectives import (  # noqa: E402
    CaptioningConfig,
    ContrastiveConfig,
    ObjectivesConfig,
    ObjectiveSet,
    build_objectives,
)


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
