"""Evaluation through Ray Data against a direct in-process computation, and the `mm evaluate` CLI.

The corpus is real Parquet (IMAGE_SCHEMA) with real JPEGs and a real WordPiece tokenizer; the
model is a real (tiny, untrained) VLModel saved with mm.checkpoint. Helpers here are reused by
tests/test_finetune.py and tests/test_export.py.
"""

from __future__ import annotations

import io
import json
import shutil
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
        head = module.objectives["mlm"].head
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


# ----------------------------------------------------------------------------- ITM re-ranking


def test_rerank_topk_promotes_the_true_pair_only_within_k():
    """A scorer that prefers the true pair puts it first when ITC ranked it within k; candidates
    past k keep their ITC order and are never scored or promoted."""
    from mm.metrics import recall_at_k, rerank_topk

    truth = np.array([2, 0, 5, 1, 3])  # query q's positive gallery item
    topk = np.array([[0, 1, 2, 3, 4],   # positive at rank 3
                     [3, 0, 1, 2, 4],   # rank 2
                     [5, 0, 1, 2, 3],   # rank 1 already
                     [0, 2, 3, 4, 1],   # rank 5: outside k=3
                     [4, 0, 3, 1, 2]])  # rank 3
    itc = np.tile(np.linspace(0.9, 0.5, 5, dtype=np.float32), (5, 1))
    seen = []

    def score(rows, cols):
        seen.extend(zip(rows.tolist(), cols.tolist()))
        return np.where(cols == truth[rows], 10.0, 0.0) + np.where(cols == 1, 100.0, 0.0) * (rows == 3)

    q_keys, g_keys = truth, np.arange(6)
    before = recall_at_k(topk, q_keys, g_keys, (1, 3, 5))
    out = rerank_topk(topk, itc, score, 3, block_rows=2)
    after = recall_at_k(out, q_keys, g_keys, (1, 3, 5))
    assert before[1] == pytest.approx(0.2) and before[3] == pytest.approx(0.8)
    assert after[1] == pytest.approx(0.8) and after[3] == pytest.approx(0.8) and after[5] == 1.0
    assert (out[:, 3:] == topk[:, 3:]).all()  # past k: untouched ITC order
    assert out[3].tolist() == [0, 2, 3, 4, 1]  # query 3's favourite (item 1, at ITC rank 5) not promoted
    assert sorted(seen) == sorted((q, int(g)) for q in range(5) for g in topk[q, :3])  # only top-k pairs scored
    for q in range(5):  # a permutation of the same candidates
        assert sorted(out[q, :3]) == sorted(topk[q, :3])
    # ITC breaks ITM ties (score = ITM + ITC): an indifferent scorer keeps the ITC order
    assert (rerank_topk(topk, itc, lambda r, c: np.zeros(len(r)), 3) == topk).all()


def test_reranked_retrieval_metrics_on_embeddings():
    """With a constant ITM score the *_itm recalls equal the ITC ones; with an oracle and k = N
    every query's positive comes first, in both directions."""
    from mm.metrics import reranked_retrieval_metrics, retrieval_metrics

    rng = np.random.default_rng(0)
    media = rng.normal(size=(6, 8)).astype(np.float32)
    media /= np.linalg.norm(media, axis=1, keepdims=True)
    t2m = np.array([0, 1, 2, 3, 4, 5, 0, 3])  # two captions for media 0 and 3
    text = media[t2m] + 0.9 * rng.normal(size=(8, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    itc, _ = retrieval_metrics(media, text, t2m, ks=(1, 5))
    flat = reranked_retrieval_metrics(media, text, t2m, lambda t, m: np.zeros(len(t)),
                                      lambda m, t: np.zeros(len(t)), 4, ks=(1, 5), block_rows=3, rerank_rows=2)
    assert flat == {f"{k}_itm": v for k, v in itc.items()}
    assert itc["image_retrieval_recall@1"] < 1.0 and itc["text_retrieval_recall@1"] < 1.0  # room to improve
    oracle = reranked_retrieval_metrics(media, text, t2m, lambda t, m: 50.0 * (t2m[t] == m),
                                        lambda m, t: 50.0 * (t2m[t] == m), 8, ks=(1, 5))
    assert oracle["image_retrieval_recall@1_itm"] == 1.0 and oracle["text_retrieval_recall@1_itm"] == 1.0


def make_itm_run(run: Path, corpus: Path, itm: bool = True, seed: int = 0) -> Path:
    """A tiny model with a fusion encoder, saved as RUN/model, plus RUN/manifest.json and a step
    checkpoint holding the objectives' heads (an ITM head when ``itm``), as `mm pretrain` leaves them."""
    import dataclasses

    import torch

    from mm.checkpoint import save_model, save_train_state, write_json
    from mm.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
    from mm.data import load_token_info
    from mm.models import build_model
    from mm.objectives import ITMConfig, ObjectivesConfig, ObjectiveSet, build_objectives
    from mm.train import PretrainConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=2, heads=2),
                      text=TextConfig(width=32, depth=1, heads=2, max_tokens=16),
                      fusion=FusionConfig(depth=1, heads=2), embed_dim=16)
    tokens = load_token_info(str(corpus / "tokenizer"))
    model = build_model(cfg, tokens.vocab_size)
    pcfg = PretrainConfig(model=cfg, objectives=ObjectivesConfig(itm=ITMConfig(weight=1.0 if itm else 0.0)))
    module = ObjectiveSet(model, build_objectives(pcfg.objectives, model, tokens))
    if itm:
        with torch.no_grad():  # an ITM head whose match logits spread over a few units
            module.objectives["itm"].head.fc.weight.normal_(0.0, 2.0)
    save_model(model, cfg, run / "model", corpus / "tokenizer")
    save_train_state(run / "ray" / "step_00000001", {k: v.clone() for k, v in module.state_dict().items()},
                     {"state": {}, "param_groups": []}, {"step": 1})
    write_json(run / "manifest.json", {"config": dataclasses.asdict(pcfg)})
    return run


def test_itm_rerank_end_to_end(ray_session, corpus_and_run, tmp_path):
    """evaluate_run with rerank_k: *_itm recalls beside the unchanged ITC ones, equal to a brute-force
    re-ranking over all pairs fused in-process (rerank_k = N re-ranks every candidate)."""
    import torch

    import mm
    from mm.evaluate import EvalConfig, evaluate_run, load_itm_head

    corpus, _ = corpus_and_run
    run = make_itm_run(tmp_path / "itm", corpus)
    val, img, txt, _, _ = _direct(corpus, run)
    n = len(val)
    res = evaluate_run(run, corpus, EvalConfig(batch_rows=5, rerank_k=n, rerank_batch=7, ks=(1, 5, 10)),
                       tasks=("retrieval",))
    m, c = res["metrics"]["retrieval"], res["chance"]["retrieval"]
    itc_names = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert set(m) == itc_names | {f"{x}_itm" for x in itc_names} and set(c) == set(m)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    # brute force: every (text, image) pair through the fusion encoder at once
    model, head = mm.load(str(run)).eval(), load_itm_head(run / "model", n)
    from mm.data import PreprocessConfig, pad_ids, preprocess_batch

    mc = model.cfg
    pre = PreprocessConfig(image_px=mc.vision.image_px, mean=mc.vision.mean, std=mc.vision.std,
                           max_tokens=mc.text.max_tokens, pad_id=0, max_frames=1, pad_to_longest=True)
    x = preprocess_batch({"image": np.array([r["image"] for r in val], dtype=object),
                          "input_ids": [np.array(r["input_ids"]) for r in val]}, pre)
    ids, mask = pad_ids([np.array(r["input_ids"]) for r in val], 0, mc.text.max_tokens, True)
    with torch.inference_mode():
        vt = model.vision_tokens(torch.from_numpy(x["pixels"]))
        tt = model.text_tokens(torch.from_numpy(ids), torch.from_numpy(mask))
        ti, ii = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        fused = model.fuse(tt[ti.reshape(-1)], torch.from_numpy(mask)[ti.reshape(-1)], vt[ii.reshape(-1)])[:, 0]
        itm = head(fused)[:, 1].reshape(n, n).numpy()  # (text, image)
    score = itm + txt @ img.T
    t2i = np.argsort(-score, axis=1, kind="stable")
    i2t = np.argsort(-score.T, axis=1, kind="stable")
    for k in (1, 5, 10):
        assert m[f"image_retrieval_recall@{k}_itm"] == pytest.approx(np.mean([i in t2i[i, :k] for i in range(n)]))
        assert m[f"text_retrieval_recall@{k}_itm"] == pytest.approx(np.mean([i in i2t[i, :k] for i in range(n)]))
    assert (t2i != np.argsort(-(txt @ img.T), axis=1, kind="stable")).any()  # the ITM head does re-rank


def test_rerank_without_itm_head_fails_before_work(corpus_and_run, tmp_path, capsys):
    """rerank_k > 0 on a model without an ITM head: one line naming rerank_k, before Ray starts."""
    from jobs.evaluate import main
    from mm.evaluate import EvalConfig, evaluate_run, itm_checkpoint

    corpus, run = corpus_and_run  # an exported model: no manifest, no step checkpoint
    out = tmp_path / "e.json"
    assert main(["--model", str(run), "--data", str(corpus), "--out", str(out), "--set", "rerank_k=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rerank_k=8" in err and not out.exists()
    with pytest.raises(ValueError, match="rerank_k=4 needs a model with an ITM head"):
        evaluate_run(run, corpus, EvalConfig(rerank_k=4), tasks=("retrieval",))  # no Ray: fails first
    no_itm = make_itm_run(tmp_path / "noitm", corpus, itm=False)
    with pytest.raises(ValueError, match="trained no ITM head"):
        itm_checkpoint(no_itm / "model", 4)
    itm_run = make_itm_run(tmp_path / "itm", corpus)
    itm_checkpoint(itm_run / "model", 4)  # the positive case passes
    other = make_itm_run(tmp_path / "other", corpus, seed=1)  # RUN/model from another run
    shutil.rmtree(itm_run / "model")
    shutil.copytree(other / "model", itm_run / "model")
    with pytest.raises(ValueError, match="other fusion weights"):
        itm_checkpoint(itm_run / "model", 4)
    with pytest.raises(ValueError, match="rerank_k"):
        EvalConfig(rerank_k=-1)


def test_objective_heads_are_keyed_by_name_and_a_positional_checkpoint_is_refused(corpus_and_run, tmp_path):
    """The ITM head is saved under ``objectives.itm.*`` whatever else trained; a step checkpoint
    that keys heads by position (written before they were keyed by name) is refused in one line."""
    from safetensors.torch import load_file, save_file

    from mm.checkpoint import CheckpointError, load_train_state
    from mm.evaluate import itm_checkpoint

    corpus, _ = corpus_and_run
    run = make_itm_run(tmp_path / "itm", corpus)
    path = run / "ray" / "step_00000001" / "state.safetensors"
    state = load_file(path)
    assert sorted(k for k in state if k.startswith("objectives.")) == [
        "objectives.itm.head.fc.bias", "objectives.itm.head.fc.weight"]
    save_file({k.replace("objectives.itm.", "objectives.1."): v for k, v in state.items()}, path)
    for load in (lambda: itm_checkpoint(run / "model", 4), lambda: load_train_state(path.parent)):
        with pytest.raises(CheckpointError, match=r"by position \(objectives\.1\.head\.fc\.") as e:
            load()
        assert "\n" not in str(e.value)
