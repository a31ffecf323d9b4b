"""Fine-tuning pieces on real (tiny) models, and `mm finetune` end to end (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mm.config import ModelConfig, TextConfig, VisionConfig
from mm.finetune import (
    Classify,
    PrepareModel,
    interpolate_states,
    merge_lora_state,
    prompt_lookup,
)
from mm.models import VLModel
from mm.probe import ClassifierHead, fit_linear_head, load_classifier, save_classifier

TINY = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=2, heads=2),
                   text=TextConfig(width=32, depth=2, heads=2, max_tokens=16), embed_dim=16)


def _model(seed=0) -> VLModel:
    torch.manual_seed(seed)
    return VLModel(TINY, vocab_size=50).eval()


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_only_adapters_and_merges_exactly():
    model = PrepareModel("lora", ("vision", "text"), lora_rank=4, lora_alpha=8.0)(_model())
    names = _trainable(model)
    assert names and all(".lora_" in n for n in names)
    assert any("vision.vit.blocks.1.attn.qkv.lora_A" in n for n in names)
    assert any("text.bert.encoder.layer.0.attention.self.query.lora_B" in n for n in names)
    assert not any("mlp" in n or "intermediate" in n for n in names)  # attention projections only
    with torch.no_grad():  # make the adapters non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    pixels, ids = torch.randn(3, 3, 32, 32), torch.randint(5, 50, (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want_i, want_t = model.encode_image(pixels), model.encode_text(ids, mask)
    merged = merge_lora_state(model.state_dict(), scaling=8.0 / 4)
    plain = _model(seed=1)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(pixels), want_i, atol=1e-5)
        assert torch.allclose(plain.encode_text(ids, mask), want_t, atol=1e-5)
        assert not torch.allclose(_model().encode_image(pixels), want_i, atol=1e-3)  # the adapters mattered


def test_prepare_model_trainable_sets():
    full = _trainable(PrepareModel("full", ("vision",))(_model()))
    assert any(n.startswith("vision.vit.blocks.0") for n in full) and "vision_proj.weight" in full
    assert not any(n.startswith(("text", "logit")) for n in full)
    last = _trainable(PrepareModel("last_n", ("vision",), last_n_blocks=1)(_model()))
    assert any(n.startswith("vision.vit.blocks.1.") for n in last)
    assert not any(n.startswith("vision.vit.blocks.0.") for n in last)
    assert "vision.vit.norm.weight" in last and "vision_proj.weight" in last
    assert not any("patch_embed" in n for n in last)
    both = _trainable(PrepareModel("full", ("vision", "text"), train_scale=True)(_model()))
    assert "logit_scale" in both and "text_proj.weight" in both and "logit_bias" not in both


def test_wise_ft_interpolation():
    a, b = _model(0).state_dict(), _model(1).state_dict()
    assert all(torch.equal(v, a[k]) for k, v in interpolate_states(a, b, 0.0).items())
    assert all(torch.equal(v, b[k]) for k, v in interpolate_states(a, b, 1.0).items())
    mid = interpolate_states(a, b, 0.25)
    k = "vision_proj.weight"
    assert torch.allclose(mid[k], 0.75 * a[k] + 0.25 * b[k])
    with pytest.raises(ValueError):
        interpolate_states(a, {k: b[k]}, 0.5)


def test_linear_head_fits_separable_data_and_logs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, 120)
    x = centres[y] + rng.normal(size=(120, 8)) * 0.3
    log: list = []
    head = fit_linear_head(x, y, 3, weight_decay=1e-4, max_iters=50, log_to=log)
    assert (head.logits(x).argmax(1) == y).mean() == 1.0
    assert log[0]["loss/probe"] == pytest.approx(np.log(3), rel=1e-4)  # zero init: uniform
    assert log[-1]["loss/probe"] < 0.1


def test_classifier_head_roundtrip(tmp_path):
    head = ClassifierHead(["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.5, -1], np.float32))
    back = load_classifier(save_classifier(head, tmp_path / "clf"))
    assert back.classes == ["a", "b"]
    x = np.ones((1, 3), np.float32)
    assert np.allclose(back.logits(x), [[3.5, 11.0]])
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classes.json", "head.safetensors"]


def test_classify_objective_reads_targets_from_prompt_tokens():
    lookup = prompt_lookup([[2, 7, 3], [2, 8, 3], [2, 7, 9, 3]])
    with pytest.raises(ValueError):
        prompt_lookup([[2, 7, 3], [2, 7, 3]])
    w = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    obj = Classify(w, np.zeros(3, np.float32), lookup, 0.0)
    ids = torch.tensor([[2, 8, 3, 0], [2, 7, 9, 3], [2, 7, 3, 0]])
    mask = (ids != 0).long()
    assert obj.targets(ids, mask).tolist() == [1, 2, 0]
    model = _model()
    pixels = torch.randn(3, 3, 32, 32)
    loss, metrics = obj.step(model, {"pixels": pixels, "input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        logits = model.encode_image(pixels) @ torch.from_numpy(w).T
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 0])).item(),
                                        rel=1e-5)
    loss.backward()
    assert obj.classifier.weight.grad is not None


def test_cli_bad_inputs_fail_before_work(tmp_path, capsys):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_data import save_tokenizer
    from test_evaluate import make_corpus, make_model

    from jobs.finetune import main

    corpus = make_corpus(tmp_path / "c", n=8)
    unlabelled = tmp_path / "u"
    shutil.copytree(corpus, unlabelled)
    for f in (unlabelled / "data").glob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", pa.nulls(len(t), pa.string())), f)
    make_model(tmp_path / "pre", corpus)
    base = ["--init", str(tmp_path / "pre"), "--data", str(corpus), "--out", str(tmp_path / "ft")]
    assert main(["--init", str(tmp_path / "x"), *base[2:], "--task", "classify"]) == 2
    assert "--init" in capsys.readouterr().err
    assert main([*base, "--task", "retrieval", "--set", "finetune.strategy=head_only"]) == 2
    assert "retrieval" in capsys.readouterr().err
    assert main([*base, "--task", "classify", "--set", "finetune.strategy=bogus"]) == 2
    assert "valid choices" in capsys.readouterr().err
    assert main(["--init", str(tmp_path / "pre"), "--data", str(unlabelled), "--out", str(tmp_path / "ft"),
                 "--task", "classify"]) == 2
    assert "labelled" in capsys.readouterr().err
    othertok = tmp_path / "t"  # the same rows, another vocabulary: mm.data.same_tokenizer refuses it
    shutil.copytree(corpus, othertok)
    shutil.rmtree(othertok / "tokenizer")
    save_tokenizer(othertok / "tokenizer")
    assert main(["--init", str(tmp_path / "pre"), "--data", str(othertok), "--out", str(tmp_path / "ft"),
                 "--task", "retrieval"]) == 2
    assert "tokenizer differs from --init's" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_init_refuses_model_overrides_it_would_drop(tmp_path, cli_errors):
    """--init starts from the run's saved model: a model.* override (--set or the config file's
    model section) that differs from it used to be dropped silently; now it is refused before any
    work, in one line naming the key and both values. One that equals the saved value passes, and
    model.decoder.* applies to --task caption on a run without a decoder (a fresh decoder)."""
    from test_evaluate import make_corpus, make_model

    from jobs.finetune import check_inputs, main, model_keys
    from mm.finetune import FinetuneConfig

    corpus = make_corpus(tmp_path / "c", n=8)
    make_model(tmp_path / "pre", corpus)  # vision.width 32, text.depth 1, no decoder
    out = tmp_path / "ft"
    base = ["--init", str(tmp_path / "pre"), "--data", str(corpus), "--out", str(out)]

    def refused(*extra, task="retrieval") -> str:
        assert main([*base, "--task", task, *extra]) == 2
        lines = cli_errors()
        assert len(lines) == 1, lines
        return lines[0]

    assert "model.vision.width=64 differs from the --init run's 32" in refused("--set", "model.vision.width=64")
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("model:\n  text: {depth: 3}\nfinetune: {strategy: full}\n")
    assert "model.text.depth=3 differs from the --init run's 1" in refused("--config", str(cfg_file))
    assert "finetune.strategy and finetune.towers" in refused("--set", "model.lock.vision=true")
    assert "model.decoder.layers=1 differs" in refused("--set", "model.decoder.layers=1")  # retrieval has no decoder
    assert not out.exists()

    def accepted(overrides, task="retrieval") -> None:
        from core.config import load_config

        cfg = load_config(FinetuneConfig, None, overrides)
        check_inputs(str(tmp_path / "pre"), str(corpus), task, str(out), cfg, model_keys(None, overrides))

    accepted(["model.vision.width=32", "model.text.depth=1", "optim.lr=0.001"])  # the saved values: nothing dropped
    accepted(["model.decoder.layers=1", "model.decoder.width=32", "model.decoder.heads=2"], task="caption")
    assert model_keys(str(cfg_file), ["model.embed_dim=16", "train.max_steps=2"]) == ["text.depth", "embed_dim"]


FAST = ["--set", "train.max_steps=4", "--set", "train.num_workers=1", "--set", "data.batch_size=8",
        "--set", "train.log_every_steps=2", "--set", "train.checkpoint_every_steps=4",
        "--set", "finetune.wise_ft_alphas=[0.5]", "--set", "eval.batch_rows=32"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["head_only", "lora"])
def test_finetune_end_to_end(ray_session, tmp_path, strategy):
    from test_evaluate import make_corpus, make_model

    import mm
    from jobs.finetune import main

    corpus = make_corpus(tmp_path / "c", n=64)
    make_model(tmp_path / "pre", corpus)
    out = tmp_path / "ft"
    assert main(["--init", str(tmp_path / "pre"), "--data", str(corpus), "--out", str(out), "--task", "classify",
                 "--set", f"finetune.strategy={strategy}", *FAST]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["metrics"]) == {"classify", "zeroshot", "retrieval"}
    assert [p["alpha"] for p in ev["wise_ft"]] == [0.0, 0.5, 1.0]
    assert "zeroshot/acc1/pretrained" in ev["retention"] and "classify/acc1/finetuned" in ev["retention"]
    assert ev["metrics"]["classify"]["acc1"] == ev["retention"]["classify/acc1/finetuned"]
    model = mm.load(str(out))  # plain model: LoRA merged
    assert not any("lora" in k for k in model.state_dict())
    page = (out / "report.html").read_text()
    assert "WiSE-FT curve" in page and "Confusion matrix" in page
    if strategy == "head_only":
        # the probe fits the train split of this easy set; the backbone is the pretrained one
        assert ev["metrics"]["classify"]["acc1"] >= 0.75
        assert ev["metrics"]["zeroshot"] == ev["wise_ft"][0]["metrics"]["zeroshot"]
        assert (out / "features" / "train.npz").is_file()


def test_every_strategy_is_one_table_entry():
    """finetune.strategy's values are STRATEGIES' keys; lp_ft and flyp train as full does."""
    from typing import get_args

    from mm.finetune import STRATEGIES, TASKS, Strategy

    assert set(STRATEGIES) == set(get_args(Strategy)) and set(TASKS) == {"classify", "retrieval", "caption"}
    assert STRATEGIES["lp_ft"].trainable is STRATEGIES["flyp"].trainable is STRATEGIES["full"].trainable
    assert STRATEGIES["head_only"].trainable is None
    full = {n for n, p in PrepareModel("full", ("vision",))(_model()).named_parameters() if p.requires_grad}
    assert {n for n, p in PrepareModel("lp_ft", ("vision",))(_model()).named_parameters() if p.requires_grad} == full


# -- --task caption (mm/caption.py through mm.finetune's TASKS) ----------------------------------
def test_caption_cli_bad_inputs_fail_before_work(tmp_path, cli_errors):
    """Empty references, references longer than the context, a run without a vision tower, a
    corpus without captions, a strategy that cannot apply: one line each, exit 2, nothing written."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_evaluate import make_corpus, make_model

    from jobs.finetune import main

    corpus = make_corpus(tmp_path / "c", n=12)
    make_model(tmp_path / "pre", corpus)

    def variant(name, **columns):
        """A copy of the corpus with whole columns of every shard replaced (None: dropped)."""
        d = tmp_path / name
        shutil.copytree(corpus, d)
        for f in sorted((d / "data").glob("*.parquet")):
            t = pq.read_table(f)
            for col, fn in columns.items():
                i = t.schema.get_field_index(col)
                field = t.schema.field(i)
                t = t.set_column(i, field, pa.array(fn(t[col].to_pylist()), field.type)) if fn else t.drop_columns([col])
            pq.write_table(t, f)
        return d

    out = tmp_path / "ft"

    def refused(data, *extra, init=tmp_path / "pre") -> str:
        assert main(["--init", str(init), "--data", str(data), "--out", str(out), "--task", "caption",
                     *extra]) == 2
        lines = cli_errors()
        assert len(lines) == 1, lines
        return lines[0]

    assert "2 rows have an empty caption" in refused(variant("e", caption=lambda c: [""] + c[1:]))  # one a shard
    assert "has no captions" in refused(variant("n", caption=lambda c: [""] * len(c)))
    assert "no caption column" in refused(variant("x", caption=None))
    long = variant("l", input_ids=lambda ids: [i[:1] + i[1:-1] * 6 + i[-1:] for i in ids])
    assert "longer than the model's context" in refused(long)
    assert "caption takes full, last_n, lora" in refused(corpus, "--set", "finetune.strategy=lp_ft")
    assert "adapts a trained decoder" in refused(corpus, "--set", "finetune.strategy=lora")
    assert "model.decoder.max_tokens 8 <" in refused(corpus, "--set", "model.decoder.layers=1",
                                                     "--set", "model.decoder.max_tokens=8")
    assert "caption.max_tokens 70 > 63" in refused(corpus, "--set", "caption.max_tokens=70")
    novision = tmp_path / "novision" / "model"
    shutil.copytree(tmp_path / "pre" / "model", novision)
    meta = json.loads((novision / "config.json").read_text())
    del meta["model"]["vision"]
    (novision / "config.json").write_text(json.dumps(meta))
    assert "has no vision tower" in refused(corpus, init=novision.parent)
    assert not out.exists()


@pytest.mark.slow  # two Ray Train runs and a Ray Data captioning pass: ~2-3 min on 2 cores
def test_pretrain_then_finetune_caption_has_a_decoder_that_generates(ray_session, tmp_path):
    """A tiny `mm pretrain`, then `mm finetune --task caption`: a decoder added to the run (towers
    frozen by default), eval.json's caption scores beside the baseline's, captions.jsonl, the
    report's samples, and the run loads with mm.load and generates."""
    from test_data import make_corpus
    from test_train import TINY

    import mm
    from jobs.finetune import main as finetune_main
    from jobs.pretrain import main as pretrain_main
    from mm.caption_metrics import METRICS
    from mm.checkpoint import read_tensors

    corpus = make_corpus(tmp_path / "c", n=32, seed=3, val_fraction=0.25)
    small = ["train.num_workers=1", "train.max_steps=4", "train.checkpoint_every_steps=4", "train.log_every_steps=2"]
    sets = [a for kv in [*TINY, *small] for a in ("--set", kv)]
    assert pretrain_main(["--data", str(corpus), "--out", str(tmp_path / "pre"), *sets]) == 0
    out = tmp_path / "cap"
    decoder = ["model.decoder.layers=1", "model.decoder.width=32", "model.decoder.heads=2", "model.decoder.max_tokens=24",
               "caption.max_tokens=6", "caption.num_beams=2", "caption.samples=2", "data.batch_size=8"]
    assert finetune_main(["--init", str(tmp_path / "pre"), "--data", str(corpus), "--out", str(out), "--task",
                          "caption", *sets, *[a for kv in decoder for a in ("--set", kv)]]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["finetune"]["task"] == "caption" and ev["finetune"]["strategy"] == "full"
    assert list(ev["metrics"]["caption"]) == list(METRICS) == list(ev["chance"]["caption"])
    rows = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == ev["counts"]["caption"]["rows"] > 0 and all(r["references"] for r in rows)
    samples = json.loads((out / "eval_samples.json").read_text())["captions"]
    assert len(samples) == 2 and samples[0]["image"] and "caption_samples" not in ev
    assert (out / "report.html").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss/captioning" in lines[-1] and "loss/contrastive" not in lines[-1]
    model = mm.load(str(out))
    assert model.decoder is not None and model.cfg.decoder.layers == 1
    captions = model.generate(torch.zeros(2, 3, 32, 32), max_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    pre, tuned = read_tensors(tmp_path / "pre" / "model" / "model.safetensors"), read_tensors(
        out / "model" / "model.safetensors")
    assert all(torch.equal(pre[k], tuned[k]) for k in pre)  # finetune.towers defaults to none for caption


def test_pretrain_init_refuses_a_model_override_it_would_drop(tmp_path, cli_errors):
    """mm pretrain --init keeps the run's model config (lock.* aside): a --set model.* that
    differs used to be dropped silently; now it exits 2 in one line before any work."""
    from test_evaluate import make_corpus, make_model

    from jobs.pretrain import main

    corpus = make_corpus(tmp_path / "c", n=8)
    make_model(tmp_path / "pre", corpus)  # vision.width 32
    out = tmp_path / "cont"
    assert main(["--init", str(tmp_path / "pre"), "--data", str(corpus), "--out", str(out),
                 "--set", "model.vision.width=64"]) == 2
    lines = cli_errors()
    assert len(lines) == 1 and "model.vision.width=64 differs from the --init run's 32" in lines[0], lines
    assert not out.exists()
