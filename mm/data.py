"""From curated Parquet rows to model tensors, inside Ray Data map stages; shared by training and
evaluation.

    pre = PreprocessConfig.build(model_cfg, data_cfg, tokens.pad_id, train=True)
    ds = build_dataset(corpus_dir, "train", pre, data_cfg)   # ray.data.Dataset of numpy batches
    batch = preprocess_batch({"image": ..., "input_ids": ...}, pre)   # the same, on one batch

``preprocess_batch`` decodes JPEG (with PIL's draft mode, which lets libjpeg decode at a reduced
size), resizes the short side to ``image_px`` and centre-crops (or, for training with
``augment``, takes a random-resized crop and optional flip, drawn from (seed, sample_id) so a
resumed run sees the same crops), normalises with the model's mean/std, and pads ``input_ids``
with the tokenizer's pad id. Videos become (T, 3, H, W) with ``max_frames`` frames sampled evenly
(repeating frames when the clip has fewer), all frames of a clip cropped alike.

Token padding: Ray Data concatenates map outputs into training batches of another size, so the
dataset pads to ``max_tokens`` (fixed shape) and the loop trims each batch to its longest caption
(``trim_padding``); a direct call with ``pad_to_longest=True`` pads to the longest in the batch.

Tested in tests/test_data.py (real Parquet, real JPEG, a real local Ray).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from core.storage import is_uri, local_dir, resolve
from mm.config import ModelConfig


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 32  # per worker, per micro-step
    # One weight per corpus, in --data order: the chance that a step draws its batch from that
    # corpus. Empty: proportional to each corpus's rows in the split.
    mix_weights: tuple[float, ...] = ()
    augment: bool = True
    crop_scale_min: float = 0.8
    flip: bool = False  # off by default: captions may say "left"/"right"
    shuffle_buffer_rows: int = 256
    prefetch_batches: int = 2
    map_batch_rows: int = 32
    map_cpus: float = 0.25  # fractional: on small machines the trainers hold most CPUs (RAY_NOTES.md)
    # A corpus whose decoded split fits in this many MiB is decoded once and kept in Ray's object
    # store: every later epoch only re-splits blocks instead of re-reading and re-decoding (a
    # small corpus otherwise pays Ray Data's start-up cost every few steps). Augmentation is
    # drawn per sample from (seed, sample_id), so caching changes no result. 0 disables.
    cache_max_mb: int = 1024

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if any(w < 0 for w in self.mix_weights):
            raise ValueError("mix_weights must be >= 0")


@dataclass(frozen=True)
class TokenInfo:
    vocab_size: int
    pad_id: int
    mask_id: int
    cls_id: int
    sep_id: int

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.cls_id, self.sep_id, self.mask_id)


@dataclass(frozen=True)
class PreprocessConfig:
    image_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_tokens: int
    pad_id: int
    max_frames: int
    augment: bool = False
    crop_scale_min: float = 0.8
    flip: bool = False
    seed: int = 0
    pad_to_longest: bool = False
    keep_columns: tuple[str, ...] = ()  # passed through unchanged (e.g. "label" for fine-tuning)

    @classmethod
    def build(cls, model: ModelConfig, data: DataConfig, pad_id: int, *, train: bool, seed: int = 0,
              keep_columns: tuple[str, ...] = ()) -> PreprocessConfig:
        return cls(image_px=model.vision.image_px, mean=model.vision.mean, std=model.vision.std,
                   max_tokens=model.text.max_tokens, pad_id=pad_id, max_frames=model.vision.max_frames,
                   augment=train and data.augment, crop_scale_min=data.crop_scale_min,
                   flip=train and data.flip, seed=seed, keep_columns=keep_columns)


# -- one batch ---------------------------------------------------------------------------------
def _row_rng(seed: int, sample_id: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.blake2b(str(sample_id).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, h])


def _crop_box(w: int, h: int, cfg: PreprocessConfig, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """Random-resized crop (Inception-style, area in [crop_scale_min, 1], ratio 3/4..4/3) or the
    centre square."""
    if rng is not None:
        for _ in range(10):
            area = w * h * rng.uniform(cfg.crop_scale_min, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return x, y, x + cw, y + ch
    s = min(w, h)
    x, y = (w - s) // 2, (h - s) // 2
    return x, y, x + s, y + s


def decode_image(jpeg: bytes, cfg: PreprocessConfig, rng: np.random.Generator | None = None,
                 flip: bool = False) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG...) -> (3, H, W) float32, normalised."""
    img = Image.open(io.BytesIO(jpeg))
    img.draft("RGB", (cfg.image_px * 2, cfg.image_px * 2))  # JPEG DCT scaling: decode smaller
    return transform_image(img, cfg, rng, flip)


def transform_image(img: Image.Image, cfg: PreprocessConfig, rng: np.random.Generator | None = None,
                    flip: bool = False) -> np.ndarray:
    """A PIL image -> (3, H, W) float32: crop, resize to ``image_px``, normalise (``mm.load``'s
    ``preprocess`` calls it on images a user already holds)."""
    img = img.convert("RGB")
    box = _crop_box(img.width, img.height, cfg, rng)
    img = img.resize((cfg.image_px, cfg.image_px), Image.BICUBIC, box=box)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return x.transpose(2, 0, 1)


def _clip_params(cfg: PreprocessConfig, sample_id) -> tuple[np.random.Generator | None, bool]:
    if not cfg.augment:
        return None, False
    rng = _row_rng(cfg.seed, sample_id)
    return rng, bool(cfg.flip and rng.random() < 0.5)


def pad_ids(rows, pad_id: int, max_tokens: int, pad_to_longest: bool) -> tuple[np.ndarray, np.ndarray]:
    """List of 1-D id arrays -> (B, L) int64 ids and attention mask. Rows longer than max_tokens are
    cut and keep their last token ([SEP])."""
    rows = [np.asarray(r, dtype=np.int64) for r in rows]
    rows = [r if len(r) <= max_tokens else np.concatenate([r[: max_tokens - 1], r[-1:]]) for r in rows]
    length = max((len(r) for r in rows), default=1) if pad_to_longest else max_tokens
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def frame_indices(n: int, t: int) -> np.ndarray:
    """The ``t`` frames of an ``n``-frame clip the model sees: evenly spaced; a short clip repeats
    frames rather than padding, so every frame is real."""
    return np.linspace(0, n - 1, t).round().astype(int)


def preprocess_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Curated rows (numpy batch format) -> {"pixels" (B,3,H,W) | "frames" (B,T,3,H,W),
    "input_ids" (B,L), "attention_mask" (B,L)} plus ``cfg.keep_columns``."""
    n = len(batch["input_ids"])
    ids_col = batch.get("sample_id", np.arange(n).astype(str))
    out: dict[str, np.ndarray] = {}
    if "image" in batch:
        pixels = np.empty((n, 3, cfg.image_px, cfg.image_px), np.float32)
        for i in range(n):
            rng, flip = _clip_params(cfg, ids_col[i])
            pixels[i] = decode_image(batch["image"][i], cfg, rng, flip)
        out["pixels"] = pixels
    elif "frames" in batch:
        t = cfg.max_frames
        frames = np.empty((n, t, 3, cfg.image_px, cfg.image_px), np.float32)
        for i in range(n):
            clip = batch["frames"][i]
            if len(clip) == 0:
                raise ValueError(f"video row {ids_col[i]} has no frames")
            idx = frame_indices(len(clip), t)
            rng, flip = _clip_params(cfg, ids_col[i])
            state = rng.bit_generator.state if rng is not None else None
            for j, k in enumerate(idx):
                if rng is not None:
                    rng.bit_generator.state = state  # same crop for every frame of the clip
                frames[i, j] = decode_image(clip[k], cfg, rng, flip)
        out["frames"] = frames
    else:
        raise ValueError("batch has neither an 'image' nor a 'frames' column")
    out["input_ids"], out["attention_mask"] = pad_ids(batch["input_ids"], cfg.pad_id, cfg.max_tokens,
                                                      cfg.pad_to_longest)
    for col in cfg.keep_columns:
        out[col] = batch[col]
    return out


def trim_padding(batch: dict) -> dict:
    """Cut (B, L) token tensors to the longest caption in this batch (works for torch and numpy)."""
    longest = int(batch["attention_mask"].sum(1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :longest],
            "attention_mask": batch["attention_mask"][:, :longest]}


# -- corpora ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusInfo:
    path: str
    modality: str  # "image" | "video"
    rows: dict[str, int]  # split -> rows
    manifest: dict


def _data_files(corpus_dir: str) -> tuple[Any, list[str]]:
    """(filesystem, sorted data/*.parquet paths in it); a local dir or a URI (s3://, gs://)."""
    fs, root, _ = resolve(str(corpus_dir))
    sel = pafs.FileSelector(f"{root.rstrip('/')}/data", allow_not_found=True)
    return fs, sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
                      and i.path.endswith(".parquet"))


def data_files(corpus_dir: str) -> list[str]:
    """The corpus's data/*.parquet as paths or URIs ``ray.data.read_parquet`` reads directly."""
    fs, files = _data_files(corpus_dir)
    prefix = resolve(str(corpus_dir))[2]
    return [prefix + f for f in files]


def corpus_dataset(corpus_dir: str):
    """``pyarrow.dataset`` over the corpus's data/ (a local dir or a URI), for driver-side reads
    of a few columns or rows."""
    import pyarrow.dataset as pads

    fs, root, _ = resolve(str(corpus_dir))
    return pads.dataset(f"{root.rstrip('/')}/data", format="parquet", filesystem=fs)


def _is_dir(corpus_dir: str, sub: str = "") -> bool:
    fs, root, _ = resolve(str(corpus_dir))
    return fs.get_file_info(f"{root.rstrip('/')}/{sub}".rstrip("/")).type == pafs.FileType.Directory


def check_corpus(corpus_dir: str) -> None:
    """Raise ValueError with one line unless ``corpus_dir`` (a path or URI) looks like a curated corpus."""
    try:
        if not _is_dir(corpus_dir):
            raise ValueError(f"data dir {corpus_dir} does not exist")
        if not _data_files(corpus_dir)[1]:
            raise ValueError(f"data dir {corpus_dir} has no data/*.parquet (is it a curated corpus?)")
        if not _is_dir(corpus_dir, "tokenizer"):
            raise ValueError(f"data dir {corpus_dir} has no tokenizer/ (is it a curated corpus?)")
    except OSError as e:  # credentials, a missing bucket, a timeout: one line naming the URI
        raise ValueError(f"data dir {corpus_dir}: {str(e).splitlines()[0]}") from None


def corpus_tokenizer_dir(corpus_dir: str) -> str:
    """The corpus's tokenizer/ as a local directory (fetched once per node for a URI)."""
    return local_dir(f"{str(corpus_dir).rstrip('/')}/tokenizer")


def corpus_info(corpus_dir: str) -> CorpusInfo:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    check_corpus(corpus_dir)
    fs, files = _data_files(corpus_dir)
    names = pq.read_schema(files[0], filesystem=fs).names
    modality = "video" if "frames" in names else "image"
    rows: dict[str, int] = {}
    for f in files:
        counts = pc.value_counts(pq.read_table(f, columns=["split"], filesystem=fs)["split"])
        for c in counts.to_pylist():
            rows[c["values"]] = rows.get(c["values"], 0) + c["counts"]
    mfs, root, _ = resolve(str(corpus_dir))
    mpath = f"{root.rstrip('/')}/manifest.json"
    manifest = {}
    if mfs.get_file_info(mpath).type == pafs.FileType.File:
        with mfs.open_input_stream(mpath) as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    path = str(corpus_dir).rstrip("/") if is_uri(str(corpus_dir)) else str(Path(corpus_dir).resolve())
    return CorpusInfo(path, modality, rows, manifest)


def load_token_info(tokenizer_dir: str) -> TokenInfo:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_dir(tokenizer_dir))
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("pad", "mask", "cls", "sep")}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer {tokenizer_dir} has no {', '.join(missing)} token")
    return TokenInfo(vocab_size=len(tok), pad_id=ids["pad"], mask_id=ids["mask"], cls_id=ids["cls"],
                     sep_id=ids["sep"])


def same_tokenizer(dir_a: str | Path, dir_b: str | Path) -> bool:
    """Whether two tokenizer dirs (paths or URIs) hold one vocabulary (token -> id, added tokens
    included): only then do a corpus's input_ids mean what a model's text tower learned, and two
    corpora mix. The one tokenizer check of pretraining, evaluation and fine-tuning."""
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(local_dir(str(d))).get_vocab() for d in (dir_a, dir_b))
    return a == b


def decoded_mb(info: CorpusInfo, split: str | None, pre: PreprocessConfig) -> float:
    """Size of a decoded split in MiB (float32 pixels, int64 tokens)."""
    rows = info.rows.get(split, 0) if split else sum(info.rows.values())
    frames = pre.max_frames if info.modality == "video" else 1
    return rows * (frames * 3 * pre.image_px ** 2 * 4 + pre.max_tokens * 16) / 2 ** 20


def build_dataset(corpus: str | CorpusInfo, split: str | None, pre: PreprocessConfig, data: DataConfig):
    """One corpus split as a ``ray.data.Dataset`` of preprocessed numpy batches (``split=None``: all
    rows); materialised when it fits ``data.cache_max_mb``. ``corpus`` is a corpus directory or the
    ``CorpusInfo`` a caller already built (which saves reading every file's split column again)."""
    import ray.data
    from ray.data.expressions import col

    info = corpus if isinstance(corpus, CorpusInfo) else corpus_info(corpus)
    corpus_dir = info.path
    media = "frames" if info.modality == "video" else "image"
    columns = ["sample_id", media, "input_ids", *[c for c in pre.keep_columns if c != "sample_id"]]
    # Filter and projection are pushed down into the Parquet reads by Ray Data's optimizer.
    ds = ray.data.read_parquet(f"{corpus_dir}/data", num_cpus=data.map_cpus)  # a path or a URI
    if split:
        ds = ds.filter(expr=col("split") == split)
    ds = ds.select_columns(columns)
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"cfg": pre}, batch_format="numpy",
                        batch_size=data.map_batch_rows, num_cpus=data.map_cpus)
    if decoded_mb(info, split, pre) <= data.cache_max_mb:
        ds = ds.materialize()
    return ds


__all__ = ["DataConfig", "TokenInfo", "PreprocessConfig", "CorpusInfo", "preprocess_batch", "decode_image",
           "transform_image", "frame_indices", "pad_ids", "trim_padding", "decoded_mb", "check_corpus", "corpus_info",
           "load_token_info", "same_tokenizer", "build_dataset", "corpus_tokenizer_dir", "data_files", "corpus_dataset"]
