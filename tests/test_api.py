"""The library API (mm/pretrained.py): ``mm.load`` with ``preprocess`` and ``tokenize`` gives the
embeddings evaluation computes (its ``Embedder`` on curated rows), locally and from S3 (a real
S3 API server, tests/s3.py); a saved model dir is refused by transformers' loaders.

    .venv/bin/pytest tests/test_api.py -q
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from s3 import s3_server  # noqa: E402,F401
from test_evaluate import build_tokenizer  # noqa: E402

import mm  # noqa: E402
from mm.checkpoint import save_model  # noqa: E402
from mm.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from mm.models import VLModel  # noqa: E402

CFG = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=2, heads=4, max_frames=3,
                                      stem="conv", pool="max"),
                  text=TextConfig(width=32, depth=2, heads=4, max_tokens=8), embed_dim=16)
CAPTIONS = ["a red circle", "a blue square on a green field", "two green stars and a blue square"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    build_tokenizer(CAPTIONS, root / "tok")
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = VLModel(CFG, len(AutoTokenizer.from_pretrained(str(root / "tok"))))
    save_model(model, CFG, root / "run" / "model", root / "tok")
    return root / "run"


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ImageDraw.Draw(img).ellipse((size[0] // 4, size[1] // 5, size[0] // 2, size[1] // 2), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _evaluation(run: Path, media_col: str, media: list, captions: list[str]) -> dict[str, np.ndarray]:
    """What ``mm evaluate`` computes for curated rows: its Embedder on a batch of them, with the
    caption ids the curation step writes."""
    from mm.data import load_token_info
    from mm.evaluate import Embedder
    from pipelines.tokenize import encode_captions

    ids = encode_captions(captions, str(run / "model" / "tokenizer"), CFG.text.max_tokens)
    batch = {"sample_id": np.array([f"s{i}" for i in range(len(media))]),
             media_col: np.array(media + [None], dtype=object)[:-1],
             "input_ids": np.array([np.array(x, np.int32) for x in ids] + [None], dtype=object)[:-1]}
    pad_id = load_token_info(str(run / "model" / "tokenizer")).pad_id
    return Embedder([str(run / "model")], pad_id=pad_id)(batch)


def test_three_lines_give_evaluations_embeddings(run, tmp_path):
    small, large = _jpeg((60, 44), 1), _jpeg((300, 220), 2)  # large: JPEG draft decoding is active
    (tmp_path / "large.jpg").write_bytes(large)
    want = _evaluation(run, "image", [small, large], CAPTIONS[:2])

    model = mm.load(run)
    assert not model.training
    with torch.no_grad():
        got_small = model.encode_image(model.preprocess(Image.open(io.BytesIO(small))))  # a PIL image
        got_large = model.encode_image(model.preprocess(tmp_path / "large.jpg"))  # a path: evaluation's decode
        got_text = model.encode_text(**model.tokenize(CAPTIONS[:2]))
        got_batch = model.encode_image(model.preprocess([small, large]))
    assert got_small.shape == (1, CFG.embed_dim)
    as_array = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"))  # e.g. a decoded video frame
    assert torch.equal(model.preprocess(as_array), model.preprocess(Image.open(io.BytesIO(small))))
    np.testing.assert_allclose(got_small[0].numpy(), want["media_emb/0"][0], atol=1e-6)
    np.testing.assert_allclose(got_large[0].numpy(), want["media_emb/0"][1], atol=1e-6)
    np.testing.assert_allclose(got_batch.numpy(), want["media_emb/0"], atol=1e-6)
    np.testing.assert_allclose(got_text.numpy(), want["text_emb/0"], atol=1e-6)
    one = model.encode_text(**model.tokenize("a red circle"))
    np.testing.assert_allclose(one[0].detach().numpy(), want["text_emb/0"][0], atol=1e-6)


def test_clips_and_long_texts_follow_evaluation(run):
    clip = [_jpeg((48, 40), 10 + k) for k in range(5)]  # 5 frames -> max_frames 3, evenly spaced
    long = " ".join(["a blue square on a green field"] * 4)  # cut to max_tokens, keeping [SEP]
    want = _evaluation(run, "frames", [clip], [long])

    model = mm.load(run / "model")
    pil_clip = [Image.open(io.BytesIO(f)) for f in clip]
    with torch.no_grad():
        x = model.preprocess([pil_clip])
        assert x.shape == (1, CFG.vision.max_frames, 3, 32, 32)
        got = model.encode_video(x)
        tokens = model.tokenize([long])
        got_text = model.encode_text(**tokens)
    assert tokens["input_ids"].shape == (1, CFG.text.max_tokens)
    np.testing.assert_allclose(got.numpy(), want["media_emb/0"], atol=1e-6)
    np.testing.assert_allclose(got_text.numpy(), want["text_emb/0"], atol=1e-6)
    with pytest.raises(TypeError, match="preprocess takes"):
        model.preprocess(42)


def test_load_from_s3(run, s3_server, tmp_path):  # noqa: F811 (the fixture imported above)
    import pyarrow.fs as pafs

    uri = s3_server.bucket("runs") + "/demo"
    pafs.copy_files(str(run), uri)
    cache = tmp_path / "cache"
    model = mm.load(uri, cache_dir=cache)
    local = mm.load(run)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), local.encode_image(pixels))
        assert torch.equal(model.encode_text(**model.tokenize(CAPTIONS)), local.encode_text(**local.tokenize(CAPTIONS)))
    copies = list((cache / "models").iterdir())
    assert len(copies) == 1 and (copies[0] / "tokenizer").is_dir()
    stamp = (copies[0] / ".mm-source.json").stat().st_mtime_ns
    mm.load(uri, cache_dir=cache)  # unchanged remote files: the cached copy is reused
    assert (copies[0] / ".mm-source.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds no model"):
        mm.load(s3_server.bucket("empty") + "/nothing", cache_dir=cache)


def test_a_saved_model_is_not_a_transformers_model(run):
    import json

    from transformers import AutoConfig, AutoModel

    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["format"] == "mm-vlmodel/1" and meta["library"] == "mm"
    for loader in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match="mm-vlmodel"):
            loader(str(run / "model"))
