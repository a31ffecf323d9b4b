"""mm.data on real Parquet and real JPEG: decode, resize, normalise, pad, video frame sampling,
deterministic augmentation, and the Ray Data dataset helper.

Also home of ``make_corpus``: a tiny synthetic curated corpus (coloured shapes, moving shapes for
video, templated captions, a WordPiece tokenizer saved in Hugging Face format) in the schema of
pipelines/schema.py, used by the other mm tests.

    .venv/bin/pytest tests/test_data.py -x -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from mm.config import ModelConfig, TextConfig, VisionConfig
from mm.data import (
    DataConfig,
    PreprocessConfig,
    build_dataset,
    corpus_info,
    load_token_info,
    pad_ids,
    preprocess_batch,
)
from pipelines.schema import IMAGE_SCHEMA, VIDEO_SCHEMA, assign_split, make_sample_id

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "the {c} {s} on a white background", "{c} {s}")
WORDS = sorted({w for t in TEMPLATES for w in t.replace("{c}", "").replace("{s}", "").split()}
               | set(COLOURS) | set(SHAPES) | set(DIRECTIONS) | {"moving", "video", "of"})


def save_tokenizer(out: Path) -> None:
    """A WordPiece tokenizer over the corpus words, BERT specials, [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(out))


def draw(colour: str, shape: str, cx: float, cy: float, r: float, px: int = 64) -> Image.Image:
    img = Image.new("RGB", (px, px), (245, 245, 240))
    d = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_corpus(out: str | Path, modality: str = "image", n: int = 64, seed: int = 0, frames: int = 4,
                val_fraction: float = 0.1) -> Path:
    """Write a curated corpus dir: data/part-*.parquet, tokenizer/, manifest.json."""
    from transformers import AutoTokenizer

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    save_tokenizer(out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        r = float(rng.uniform(8, 14))
        cx, cy = rng.uniform(r + 2, 62 - r, size=2)
        if modality == "image":
            img = jpeg(draw(c, s, cx, cy, r))
            caption = rng.choice(TEMPLATES).format(c=c, s=s)
            media = {"image": img}
            sid = make_sample_id(img)
        else:
            dname = rng.choice(list(DIRECTIONS))
            dx, dy = DIRECTIONS[dname]
            clip = [jpeg(draw(c, s, 32 + dx * (k - frames / 2) * 6, 32 + dy * (k - frames / 2) * 6, r))
                    for k in range(frames)]
            caption = f"a {c} {s} moving {dname}"
            media = {"frames": clip, "frame_times_s": [k * 0.5 for k in range(frames)], "start_s": 0.0,
                     "end_s": frames * 0.5}
            sid = make_sample_id(*clip, str(i))
        rows.append({"sample_id": sid, "source": "synthetic", "key": f"{i:05d}", "caption": caption, **media,
                     "width": 64, "height": 64, "phash": int(i), "input_ids": tok(caption)["input_ids"],
                     "split": assign_split(sid, val_fraction), "label": f"{c} {s}"})
    schema = IMAGE_SCHEMA if modality == "image" else VIDEO_SCHEMA
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), out / "data" / f"part-{k}.parquet")
    (out / "manifest.json").write_text(json.dumps({"synthetic": True, "n": n, "modality": modality}))
    return out


TINY = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=1, heads=2, max_frames=4),
                   text=TextConfig(width=32, depth=1, heads=2, max_tokens=16), embed_dim=32)


def _pre(augment: bool = False, **kw) -> PreprocessConfig:
    return PreprocessConfig.build(TINY, DataConfig(augment=augment, **kw), pad_id=0, train=True, seed=3)


def test_image_batch_decodes_resizes_normalises_and_pads(tmp_path):
    d = make_corpus(tmp_path / "c", n=8)
    table = pq.read_table(d / "data" / "part-0.parquet")
    batch = {k: table[k].to_numpy(zero_copy_only=False) for k in ("sample_id", "image", "input_ids")}
    out = preprocess_batch(batch, _pre())
    assert out["pixels"].shape == (4, 3, 32, 32) and out["pixels"].dtype == np.float32
    # A white-ish background pixel, normalised with CLIP's statistics, is well above zero.
    assert out["pixels"][:, :, 0, 0].mean() > 1.0
    assert out["input_ids"].shape == (4, 16) and out["attention_mask"].shape == (4, 16)
    lens = [len(x) for x in batch["input_ids"]]
    assert out["attention_mask"].sum(1).tolist() == lens
    assert (out["input_ids"][out["attention_mask"] == 0] == 0).all()
    # Centre crop without augmentation is deterministic and equal to decoding by hand.
    ref = np.asarray(Image.open(io.BytesIO(batch["image"][0])).convert("RGB").resize((32, 32), Image.BICUBIC),
                     dtype=np.float32) / 255.0
    ref = (ref - np.asarray(TINY.vision.mean, np.float32)) / np.asarray(TINY.vision.std, np.float32)
    np.testing.assert_allclose(out["pixels"][0], ref.transpose(2, 0, 1), atol=1e-5)


def test_augmentation_is_deterministic_per_sample_and_differs_across_samples(tmp_path):
    d = make_corpus(tmp_path / "c", n=8)
    table = pq.read_table(d / "data" / "part-0.parquet")
    batch = {k: table[k].to_numpy(zero_copy_only=False) for k in ("sample_id", "image", "input_ids")}
    a = preprocess_batch(batch, _pre(augment=True, crop_scale_min=0.3))["pixels"]
    b = preprocess_batch(batch, _pre(augment=True, crop_scale_min=0.3))["pixels"]
    plain = preprocess_batch(batch, _pre(augment=False))["pixels"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain)


def test_pad_ids_truncates_keeping_sep_and_pads_to_longest():
    ids, mask = pad_ids([[2, 5, 6, 7, 8, 3], [2, 9, 3]], pad_id=0, max_tokens=4, pad_to_longest=True)
    assert ids.tolist() == [[2, 5, 6, 3], [2, 9, 3, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_video_frames_sampled_to_max_frames(tmp_path):
    d = make_corpus(tmp_path / "v", modality="video", n=4, frames=3)
    table = pq.read_table(d / "data" / "part-0.parquet")
    batch = {k: table[k].to_numpy(zero_copy_only=False) for k in ("sample_id", "frames", "input_ids")}
    out = preprocess_batch(batch, _pre(augment=True))
    assert out["frames"].shape == (2, 4, 3, 32, 32)
    # 3 source frames spread over 4 slots: one repeats, the moving shape differs otherwise.
    f = out["frames"][0]
    assert np.allclose(f[1], f[2]) or np.allclose(f[0], f[1]) or np.allclose(f[2], f[3])
    assert not np.allclose(f[0], f[3])


def test_corpus_info_and_tokenizer(tmp_path):
    d = make_corpus(tmp_path / "c", n=40)
    info = corpus_info(str(d))
    assert info.modality == "image" and sum(info.rows.values()) == 40 and info.rows["train"] > 0
    tok = load_token_info(str(d / "tokenizer"))
    assert tok.pad_id == 0 and tok.mask_id == 4 and tok.vocab_size > 10


def test_build_dataset_yields_training_batches(ray_session, tmp_path):
    d = make_corpus(tmp_path / "c", n=40)
    ds = build_dataset(str(d), "train", _pre(), DataConfig(map_batch_rows=8))
    rows = corpus_info(str(d)).rows["train"]
    batches = list(ds.iter_batches(batch_size=8, batch_format="numpy"))
    assert sum(len(b["input_ids"]) for b in batches) == rows
    assert batches[0]["pixels"].shape[1:] == (3, 32, 32)
    assert set(batches[0]) == {"pixels", "input_ids", "attention_mask"}


def test_bad_corpus_dir_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no data/"):
        corpus_info(str(tmp_path))
