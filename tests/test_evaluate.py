"""Evaluation through Ray Data against a direct in-process computation, and the `mm evaluate` CLI.

The corpus is real Parquet (IMAGE_SCHEMA) with real JPEGs and a real WordPiece tokenizer; the
model is a real (tiny, untrained) VLModel saved with mm.checkpoint. Helpers here are reused by
tests/test_finetune.py and tests/test_export.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.schema import IMAGE_SCHEMA, make_sample_id

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "disc")


def build_tokenizer(texts: list[str], out: Path) -> None:
    """A real BERT-style WordPiece tokenizer ([CLS] ... [SEP]) in Hugging Face format."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(out))


def _image(colour, shape: str, i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = np.full((48, 48, 3), 128, np.uint8) + rng.integers(0, 20, (48, 48, 3)).astype(np.uint8)
    img = Image.fromarray(arr)
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    box = (8 + i % 5, 8 + i % 3, 38, 38)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_corpus(root: Path, n: int = 48, val_every: int = 3, labelled: bool = True) -> Path:
    """A tiny curated corpus: coloured shapes, label = colour, caption = "a {colour} {shape}"."""
    rows = []
    names = list(COLOURS)
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % 2]
        rows.append({"caption": f"a {colour} {shape} number {i % 7}", "image": _image(COLOURS[colour], shape, i),
                     "label": colour if labelled else None, "split": "val" if i % val_every == 0 else "train"})
    build_tokenizer([r["caption"] for r in rows] + [f"a photo of a {c}." for c in names], root / "tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    table = pa.Table.from_pylist([{
        "sample_id": make_sample_id(r["image"], r["caption"]), "source": "test", "key": f"k{i}",
        "caption": r["caption"], "image": r["image"], "width": 48, "height": 48, "phash": i,
        "input_ids": tok(r["caption"])["input_ids"], "split": r["split"], "label": r["label"]}
        for i, r in enumerate(rows)], schema=IMAGE_SCHEMA)
    (root / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, n // 2), root / "data" / "part-0.parquet")
    pq.write_table(table.slice(n // 2), root / "data" / "part-1.parquet")
    (root / "manifest.json").write_text("{}")
    return root


def make_model(run: Path, corpus: Path, seed: int = 0) -> Path:
    import torch

    from mm.checkpoint import save_model
    from mm.config import ModelConfig, TextConfig, VisionConfig
    from mm.data import load_token_info
    from mm.models import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=2, heads=2),
                      text=TextConfig(width=32, depth=1, heads=2, max_tokens=16), embed_dim=16)
    model = build_model(cfg, load_token_info(str(corpus / "tokenizer")).vocab_size)
    save_model(model, cfg, run / "model", corpus / "tokenizer")
    return run


@pytest.fixture(scope="module")
def corpus_and_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    corpus = make_corpus(root / "corpus")
    run = make_model(root / "run", corpus)
    return corpus, run


def _direct(corpus: Path, run: Path):
    """Embeddings computed in-process, without Ray, for the val split."""
    import torch
    from transformers import AutoTokenizer

    import mm
    from mm.data import PreprocessConfig, preprocess_batch
    from mm.evaluate import zeroshot_weights

    model = mm.load(str(run))
    tok = AutoTokenizer.from_pretrained(str(run / "model" / "tokenizer"))
    t = pq.read_table(corpus / "data").to_pylist()
    val = sorted((r for r in t if r["split"] == "val"), key=lambda r: r["sample_id"])
    c = model.cfg
    pre = PreprocessConfig(image_px=c.vision.image_px, mean=c.vision.mean, std=c.vision.std,
                           max_tokens=c.text.max_tokens, pad_id=tok.pad_token_id, max_frames=1, pad_to_longest=True)
    x = preprocess_batch({"image": np.array([r["image"] for r in val], dtype=object),
                          "input_ids": [np.array(r["input_ids"]) for r in val]}, pre)
    with torch.inference_mode():
        img = model.encode_image(torch.from_numpy(x["pixels"])).numpy()
        txt = model.encode_text(torch.from_numpy(x["input_ids"]), torch.from_numpy(x["attention_mask"])).numpy()
    classes = sorted(COLOURS)
    w = zeroshot_weights(model, tok, classes, ["a photo of a {c}."])
    return val, img, txt, w, classes


def test_evaluate_matches_direct_computation(ray_session, corpus_and_run, tmp_path):
    """`mm evaluate` (Ray Data actors, blocked top-k) == brute force in-process; eval.json, samples, report."""
    from jobs.evaluate import main

    corpus, run = corpus_and_run
    (tmp_path / "t.json").write_text(json.dumps(["a photo of a {c}."]))
    out = tmp_path / "ev" / "eval.json"
    assert main(["--model", str(run), "--data", str(corpus), "--out", str(out),
                 "--set", f"templates_path={tmp_path / 't.json'}", "--set", "batch_rows=5",
                 "--set", "block_rows=3", "--set", "block_cols=4", "--set", "ks=[1,2,5]"]) == 0
    res = json.loads(out.read_text())
    val, img, txt, w, classes = _direct(corpus, run)
    n = len(val)
    assert res["counts"]["rows"] == n == res["counts"]["media"] == res["counts"]["texts"]
    # zero-shot, brute force with a stable argsort (ties to the lower class index)
    targets = np.array([classes.index(r["label"]) for r in val])
    ranks = np.argsort(-(img @ w.T), axis=1, kind="stable")
    zs = res["metrics"]["zeroshot"]
    assert zs["acc1"] == pytest.approx(float((ranks[:, 0] == targets).mean()), abs=1e-6)
    assert zs["acc5"] == 1.0  # 4 classes
    assert res["chance"]["zeroshot"]["acc1"] == 0.25
    assert np.asarray(res["confusion_matrix"]["matrix"]).sum() == n
    # retrieval, brute force over the full similarity matrix
    sim = txt @ img.T
    t2i = np.argsort(-sim, axis=1, kind="stable")
    i2t = np.argsort(-sim.T, axis=1, kind="stable")
    assert set(res["metrics"]["retrieval"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                                                for k in (1, 2, 5)}
    for k in (1, 2, 5):
        want_t2i = float(np.mean([i in t2i[i, :k] for i in range(n)]))
        want_i2t = float(np.mean([i in i2t[i, :k] for i in range(n)]))
        assert res["metrics"]["retrieval"][f"image_retrieval_recall@{k}"] == pytest.approx(want_t2i, abs=1e-6)
        assert res["metrics"]["retrieval"][f"text_retrieval_recall@{k}"] == pytest.approx(want_i2t, abs=1e-6)
        assert res["chance"]["retrieval"][f"image_retrieval_recall@{k}"] == pytest.approx(k / n)
    assert "samples" not in res
    samples = json.loads((out.parent / "eval_samples.json").read_text())
    assert len(samples["retrievals"]) == 4 and all(len(q["hits"]) == 5 for q in samples["retrievals"])
    assert (out.parent / "report.html").is_file()


def test_templates_and_classes(tmp_path):
    from mm.evaluate import class_prompts, load_templates

    (tmp_path / "a.json").write_text(json.dumps(["a {c}", "the {c}"]))
    (tmp_path / "b.json").write_text(json.dumps({"cat": ["a cat", "kitty"], "dog": ["a dog"]}))
    (tmp_path / "c.json").write_text(json.dumps(["no placeholder"]))
    assert class_prompts(["x", "y"], load_templates(tmp_path / "a.json")) == [["a x", "the x"], ["a y", "the y"]]
    assert class_prompts(["dog", "cat"], load_templates(tmp_path / "b.json")) == [["a dog"], ["a cat", "kitty"]]
    with pytest.raises(ValueError):
        load_templates(tmp_path / "c.json")


def test_cli_bad_paths_fail_before_work(tmp_path, capsys):
    from jobs.evaluate import main

    corpus = make_corpus(tmp_path / "c", n=6)
    assert main(["--model", str(tmp_path / "nope"), "--data", str(corpus), "--out", str(tmp_path / "e.json")]) == 2
    assert "--model" in capsys.readouterr().err
    make_model(tmp_path / "r", corpus)
    assert main(["--model", str(tmp_path / "r"), "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nodata" in err
    (tmp_path / "dir.json").mkdir()
    assert main(["--model", str(tmp_path / "r"), "--data", str(corpus), "--out", str(tmp_path / "dir.json")]) == 2


@pytest.mark.slow
def test_masked_modelling_uses_the_runs_heads(ray_session, corpus_and_run, tmp_path):
    """MLM accuracy/loss and MIM loss with heads read from the run's step checkpoint."""
    import math
    import shutil

    import torch

    from mm.checkpoint import save_train_state, write_json
    from mm.data import load_token_info
    from mm.evaluate import EvalConfig, evaluate_run
    from mm.objectives import MIMConfig, MLMConfig, ObjectivesConfig, ObjectiveSet, build_objectives
    from mm.train import PretrainConfig

    corpus, run0 = corpus_and_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    import mm

    model = mm.load(str(run))
    tokens = load_token_info(str(corpus / "tokenizer"))
    pcfg = PretrainConfig(model=model.cfg, objectives=ObjectivesConfig(mlm=MLMConfig(weight=1.0),
                                                                       mim=MIMConfig(weight=1.0)))
    module = ObjectiveSet(model, build_objectives(pcfg.objectives, model, tokens))
    with torch.no_grad():  # an MLM head whose logits are its bias: 10 at token id 7, 0 elsewhere
        head = module.objectives[1].head
        for p in head.parameters():
            p.zero_()
        head.predictions.bias[7] = 10.0
    save_train_state(run / "ray" / "step_00000001", {k: v.clone() for k, v in module.state_dict().items()},
                     {"state": {}, "param_groups": []},
                     {"step": 1})
    import dataclasses

    write_json(run / "manifest.json", {"config": dataclasses.asdict(pcfg)})
    res = evaluate_run(run, corpus, EvalConfig(batch_rows=8), tasks=("masked",))
    m, c = res["metrics"]["masked"], res["chance"]["masked"]
    assert set(m) == {"mlm_accuracy", "mlm_loss", "mim_loss"}
    assert c["mlm_accuracy"] == pytest.approx(1 / tokens.vocab_size) and c["mlm_loss"] == pytest.approx(
        math.log(tokens.vocab_size))
    # the constant head's loss is exactly computable: -log softmax(10 at id 7, 0 elsewhere) for non-7 labels
    # logits = bias: loss per masked token = log(e^10 + V - 1) - 10 * [label == 7], linear in accuracy
    v = tokens.vocab_size
    assert m["mlm_loss"] == pytest.approx(math.log(math.exp(10) + v - 1) - 10 * m["mlm_accuracy"], rel=1e-4)
    assert 0.0 <= m["mlm_accuracy"] < 0.5
    assert math.isfinite(m["mim_loss"]) and m["mim_loss"] > 0
