"""Embeddings of a corpus split, computed on Ray Data: the one pass every evaluation task reads.

    emb = embed_split("runs/pre/model", "corpora/demo", "val", EvalConfig())
    emb.media_emb, emb.text_emb      # (N, D) per row, sorted by sample_id

The split's Parquet rows stream through ``Embedder`` actors (each loads the model once, decodes
with ``mm.data.preprocess_batch`` and encodes); only the embeddings come back to the driver.
Several models of one architecture share one pass (``embed_split_multi``: WiSE-FT's points).
Rows with the same media (``media_key``) are one gallery item with several captions.
Tested in tests/test_evaluate.py and tests/test_api.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mm.eval_inputs import EvalConfig


def media_key(blob) -> str:
    """Content key of one image (bytes) or clip (list of frame bytes): rows with the same media
    are one gallery item with several captions (CLIP_benchmark's texts_image_index)."""
    h = hashlib.blake2b(digest_size=12)
    for part in ([blob] if isinstance(blob, (bytes, bytearray)) else list(blob)):
        h.update(bytes(part))
    return h.hexdigest()


class Embedder:
    """Ray Data callable class: numpy batch of corpus rows -> embeddings under one or several models.

    Loads each model once per actor; several models (WiSE-FT's interpolation points, before/after
    a fine-tune) share one pass over the data: columns ``media_emb/i``, ``text_emb/i``, ``feature/i``.
    """

    def __init__(self, model_dirs: list[str], features: bool = False, pad_id: int = 0) -> None:
        import torch

        import mm
        from mm.data import DataConfig, PreprocessConfig

        torch.set_num_threads(1)
        self.torch = torch
        self.models = [mm.load(d).eval() for d in model_dirs]
        c = self.models[0].cfg
        for m in self.models[1:]:
            if (m.cfg.vision.image_px, m.cfg.vision.mean, m.cfg.vision.std, m.cfg.text.max_tokens) != \
                    (c.vision.image_px, c.vision.mean, c.vision.std, c.text.max_tokens):
                raise ValueError("models embedded in one pass must share their preprocessing")
        self.pre = replace(PreprocessConfig.build(c, DataConfig(), pad_id, train=False),
                           pad_to_longest=True)
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mm.data import preprocess_batch

        media_col = "image" if "image" in batch else "frames"
        x = preprocess_batch(batch, self.pre)
        t = self.torch
        out = {"sample_id": np.asarray(batch["sample_id"]).astype(str),
               "media_key": np.array([media_key(b) for b in batch[media_col]])}
        pix = t.from_numpy(x["pixels"][:, None] if "pixels" in x else x["frames"])  # (B, T, 3, H, W)
        ids, mask = t.from_numpy(x["input_ids"]), t.from_numpy(x["attention_mask"])
        with t.inference_mode():
            for i, model in enumerate(self.models):
                tokens = model.vision_tokens(pix)  # (B, 1+M, Wv)
                out[f"media_emb/{i}"] = model.project_vision(tokens).float().numpy()
                out[f"text_emb/{i}"] = model.encode_text(ids, mask).float().numpy()
                if self.features:
                    out[f"feature/{i}"] = model.vision.pool(tokens).float().numpy()
        labels = batch.get("label")
        out["label"] = (np.array(["" if v is None else str(v) for v in labels]) if labels is not None
                        else np.full(len(out["sample_id"]), "", dtype=str))
        return out


@dataclass
class Embeddings:
    """Per-row embeddings of one split, sorted by sample_id (deterministic whatever the plan's order)."""

    sample_id: np.ndarray
    media_key: np.ndarray
    label: np.ndarray  # "" where unlabelled
    media_emb: np.ndarray  # (N, D)
    text_emb: np.ndarray  # (N, D)
    feature: np.ndarray | None = None  # (N, Wv) pooled pre-projection, for probes


def embed_split_multi(model_dirs: list[str | Path], data_dir: str | Path, split: str, cfg: EvalConfig, *,
                      features: bool = False, max_rows: int = 0) -> list[Embeddings]:
    """Stream one split through ``Embedder`` actors once, for every model; only embeddings reach the driver."""
    import pyarrow.parquet as pq
    import ray.data
    from ray.data.expressions import col

    from mm.data import _data_files, data_files, load_token_info

    fs, paths = _data_files(str(data_dir))  # a local dir or a URI
    names = pq.read_schema(paths[0], filesystem=fs).names
    files = data_files(str(data_dir))
    media = "frames" if "frames" in names else "image"
    columns = ["sample_id", media, "input_ids"] + (["label"] if "label" in names else [])
    pad_id = load_token_info(str(Path(model_dirs[0]) / "tokenizer")).pad_id
    ds = (ray.data.read_parquet(files)
          .filter(expr=col("split") == split)  # pushed down into the Parquet read
          .select_columns(columns))
    if max_rows:
        ds = ds.limit(max_rows)
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model_dirs": [str(d) for d in model_dirs],
                                                         "features": features, "pad_id": pad_id},
                        batch_size=cfg.batch_rows, batch_format="numpy", num_cpus=cfg.actor_cpus,
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors))
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError(f"split {split!r} of {data_dir} has no rows")
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["sample_id"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    return [Embeddings(sample_id=cols["sample_id"], media_key=cols["media_key"], label=cols["label"],
                       media_emb=cols[f"media_emb/{i}"], text_emb=cols[f"text_emb/{i}"],
                       feature=cols.get(f"feature/{i}")) for i in range(len(model_dirs))]


def embed_split(model_dir: str | Path, data_dir: str | Path, split: str, cfg: EvalConfig, *,
                features: bool = False, max_rows: int = 0) -> Embeddings:
    return embed_split_multi([model_dir], data_dir, split, cfg, features=features, max_rows=max_rows)[0]


__all__ = ["media_key", "Embedder", "Embeddings", "embed_split_multi", "embed_split"]
