"""The caption task (mm/caption.py): corpus and model checks, adding a decoder and the
fine-tune strategies, ``mm finetune --task caption`` then ``mm evaluate --task caption``, the
decoder's prompt, and the decoder's export (transformers, ``mm export``).

    .venv/bin/pytest tests/test_caption_task.py -x -q
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_caption import CFG, COCA, TOK  # noqa: E402

from mm.config import DecoderConfig  # noqa: E402
from mm.generate import generate_ids  # noqa: E402
from mm.models import build_model  # noqa: E402
from mm.objectives import ObjectiveSet, build_objectives  # noqa: E402


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in sorted((corpus / "data").glob("*.parquet")):
        t = pq.read_table(f)
        for name, fn in columns.items():
            i = t.schema.get_field_index(name)
            field = t.schema.field(i)
            t = (t.set_column(i, field, pa.array(fn(t[name].to_pylist()), type=field.type)) if fn
                 else t.drop_columns([name]))
        pq.write_table(t, f)


def test_caption_corpus_and_model_checks(tmp_path, caplog):
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

    # references holding [UNK] (a vocabulary of other captions): one warning, no refusal
    import logging

    from transformers import AutoTokenizer

    unk = AutoTokenizer.from_pretrained(str(good / "tokenizer")).unk_token_id
    unknown = make_corpus(tmp_path / "unk", n=24, seed=1, val_fraction=0.3)
    _rewrite(unknown, input_ids=lambda ids: [x[:1] + [unk] + x[2:] if i % 2 else x for i, x in enumerate(ids)])
    with caplog.at_level(logging.WARNING, logger="mm.caption"):
        check_caption_corpus(good, 16)
        assert not caplog.records
        check_caption_corpus(unknown, 16)
    assert len(caplog.records) == 1 and "50% of the reference captions hold [UNK]" in caplog.records[0].message

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
