"""The library API: a saved model with its eval transform and its tokenizer, in three lines.

    import mm
    model = mm.load("runs/demo")                 # a run dir, its model/, or s3://bucket/runs/demo
    image = model.encode_image(model.preprocess(Image.open("cat.jpg")))   # (1, D), L2-normalised
    text = model.encode_text(**model.tokenize(["a red circle", "two stars"]))  # (2, D)

``mm.load`` returns the ``VLModel`` in eval mode (no Ray needed) with two callables attached, as
OpenCLIP hands back a model, its transforms and its tokenizer:

* ``model.preprocess(x)``: the evaluation transform (``mm.data``: centre crop, resize to
  ``image_px``, the run's mean/std), never a twin of it. ``x`` is one image or a list of them ->
  (B, 3, H, W) for ``encode_image``; a list of clips (each a list of frames) -> (B, T, 3, H, W)
  for ``encode_video``, ``max_frames`` sampled as evaluation samples them. An image is a PIL
  image, an (H, W, 3) uint8 array, a file path or encoded bytes; paths and bytes are decoded
  exactly as evaluation decodes a corpus row (JPEG draft mode included), so their embeddings
  equal ``mm evaluate``'s.
* ``model.tokenize(texts)``: the run's own tokenizer (``RUN/model/tokenizer``) ->
  ``{"input_ids", "attention_mask"}`` (B, L) tensors, cut to ``max_tokens`` as evaluation cuts
  prompts (``mm.evaluate.encode_prompts``), for ``encode_text(**...)``.

A URI (``s3://``, ``gs://``, anything ``pyarrow.fs`` opens) is copied into a local cache first
(``$MM_CACHE_DIR``, default ``~/.cache/mm``; reused while the remote files' sizes and times are
unchanged), then loaded like a local directory.

Tested in tests/test_api.py (local and against a real S3 API server, moto_server).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.storage import is_uri, resolve
from mm.checkpoint import CheckpointError, load_model, model_dir
from mm.data import DataConfig, PreprocessConfig, decode_image, frame_indices, pad_ids, transform_image


class Preprocess:
    """Images or clips -> the tensors ``encode_image`` / ``encode_video`` take (see module doc)."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, x):
        import torch

        if _is_image(x):
            return torch.from_numpy(self._image(x)[None])  # (1, 3, H, W)
        if not isinstance(x, Sequence) or isinstance(x, str) or not len(x):
            raise TypeError("preprocess takes an image (PIL, array, path or bytes), a list of images, "
                            f"or a list of clips (lists of frames); got {type(x).__name__}")
        if all(_is_image(item) for item in x):
            return torch.from_numpy(np.stack([self._image(item) for item in x]))  # (B, 3, H, W)
        return torch.from_numpy(np.stack([self._clip(clip) for clip in x]))  # (B, T, 3, H, W)

    def _image(self, x) -> np.ndarray:
        from PIL import Image

        if isinstance(x, (bytes, bytearray)):
            return decode_image(bytes(x), self.cfg)
        if isinstance(x, (str, os.PathLike)):
            return decode_image(Path(x).read_bytes(), self.cfg)
        if isinstance(x, np.ndarray):
            x = Image.fromarray(x)
        return transform_image(x, self.cfg)

    def _clip(self, frames) -> np.ndarray:
        if not isinstance(frames, Sequence) or not len(frames) or not all(_is_image(f) for f in frames):
            raise TypeError("a clip is a non-empty list of frames (PIL images, arrays, paths or bytes)")
        return np.stack([self._image(frames[k]) for k in frame_indices(len(frames), self.cfg.max_frames)])


def _is_image(x) -> bool:
    from PIL import Image

    return (isinstance(x, (Image.Image, bytes, bytearray, str, os.PathLike))
            or (isinstance(x, np.ndarray) and x.ndim == 3))


class Tokenize:
    """Strings -> ``{"input_ids", "attention_mask"}`` with the run's tokenizer (loaded on first use)."""

    def __init__(self, tokenizer_dir: Path, max_tokens: int) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.max_tokens = max_tokens
        self._tok = None

    @property
    def tokenizer(self):
        """The run's ``transformers`` tokenizer."""
        if self._tok is None:
            from transformers import AutoTokenizer

            if not self.tokenizer_dir.is_dir():
                raise CheckpointError(f"{self.tokenizer_dir} not found: this model was saved without its tokenizer")
            self._tok = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        return self._tok

    def __call__(self, texts: str | Sequence[str]) -> dict:
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        input_ids, mask = pad_ids(ids, self.tokenizer.pad_token_id, self.max_tokens, pad_to_longest=True)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


def load(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """A saved model (run dir, model dir or their URI) in eval mode, with ``preprocess`` and
    ``tokenize`` attached."""
    d = fetch_model_dir(str(path), cache_dir) if is_uri(str(path)) else model_dir(path)
    model, cfg = load_model(d)
    model.eval()
    # pad_id 0: the pixel transform never pads ids; Tokenize pads with the tokenizer's own.
    model.preprocess = Preprocess(PreprocessConfig.build(cfg, DataConfig(), 0, train=False))
    model.tokenize = Tokenize(d / "tokenizer", cfg.text.max_tokens)
    return model


def default_cache_dir() -> Path:
    base = os.environ.get("MM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mm"
    return Path(base)


def fetch_model_dir(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Copy the model dir at ``uri`` (a run's ``model/`` or the model dir itself) into the local
    cache; returns the local copy. A copy whose files match the remote ones is reused."""
    import pyarrow.fs as pafs

    fs, root, _ = resolve(uri)
    root = root.rstrip("/")
    for remote in (f"{root}/model", root):
        if fs.get_file_info(f"{remote}/config.json").type == pafs.FileType.File:
            break
    else:
        raise CheckpointError(f"{uri} holds no model (expected config.json + model.safetensors, or model/)")
    infos = [i for i in fs.get_file_info(pafs.FileSelector(remote, recursive=True)) if i.type == pafs.FileType.File]
    listing = sorted([i.path[len(remote) + 1:], i.size, i.mtime_ns] for i in infos)
    source = {"uri": uri, "model": remote, "files": listing}
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / "models" / hashlib.sha256(f"{uri}|{remote}".encode()).hexdigest()[:20]
    stamp = dest / ".mm-source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == source:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for rel, _, _ in listing:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{remote}/{rel}") as src, open(tmp / rel, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        (tmp / ".mm-source.json").write_text(json.dumps(source))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


__all__ = ["load", "fetch_model_dir", "default_cache_dir", "Preprocess", "Tokenize"]
