"""LiT with both towers wholly locked (``train.frozen_features``): the towers' pooled features
are a fixed function of each row, so they are computed once per corpus on Ray Data (``TowerFeatures``
actors, into RUN/features/corpusN/) and the training steps train the projections on them.

    check_frozen_features(cfg, objectives, prepare_model)       # before any work: one line if not
    ds = frozen_feature_dataset(cfg, info, join(run, "features", "corpus0"), pre, vocab_size, init)

Called by ``mm.train.fit``; tested in tests/test_train.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from core.storage import join, write_json
from mm.checkpoint import load_model, local_model_dir
from mm.config import ModelConfig
from mm.data import CorpusInfo, PreprocessConfig, build_dataset, trim_padding
from mm.models import build_model
from mm.objectives import ObjectiveFactory


def check_frozen_features(cfg, objectives: Sequence[ObjectiveFactory] | None,
                          prepare_model: Callable | None) -> None:
    """``train.frozen_features`` holds only when nothing that trains sees more than the pooled
    features. ``cfg``: the run's ``mm.train.PretrainConfig``."""
    m, o = cfg.model, cfg.objectives
    problems = []
    if not (m.lock.vision and m.lock.text) or m.lock.vision_unlocked_blocks or m.lock.text_unlocked_blocks:
        problems.append("both towers must be wholly locked (model.lock.vision/text true, no unlocked blocks)")
    if cfg.data.augment or cfg.data.flip:
        problems.append("data.augment and data.flip must be off (a locked tower's features would change per step)")
    if o.contrastive.weight <= 0 or any(x.weight > 0 for x in (o.mlm, o.fusion_mlm, o.mim, o.itm, o.captioning)):
        problems.append("the contrastive objective must be the only one (MLM, MIM, ITM and captioning need the "
                        "towers' tokens)")
    if objectives or prepare_model is not None:
        problems.append("no extra objectives or model preparation (fine-tuning computes its own cached features)")
    if cfg.train.parallel != "ddp":
        problems.append("train.parallel must be ddp (the towers do not run in the steps)")
    if problems:
        raise ValueError("train.frozen_features: " + "; ".join(problems))


class TowerFeatures:
    """Ray Data callable class: preprocessed rows -> the locked towers' pooled features
    (``vision_feature`` (B, Wv), ``text_feature`` (B, Wt)), from the model a training worker builds."""

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, init: str | None, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = build_model(model_cfg, vocab_size)
        if init:
            # a URI is fetched on this actor's node (core.storage's cache): no shared filesystem needed
            self.model.load_state_dict(load_model(local_model_dir(init))[0].state_dict())
        self.model.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = trim_padding(batch)
        vision = torch.from_numpy(batch["frames"] if "frames" in batch else batch["pixels"][:, None])
        with torch.inference_mode():
            return {"sample_id": np.asarray(batch["sample_id"]).astype(str),
                    "vision_feature": self.model.vision_features(vision).float().numpy(),
                    "text_feature": self.model.text_features(torch.from_numpy(batch["input_ids"]),
                                                             torch.from_numpy(batch["attention_mask"])).float().numpy()}


def frozen_feature_dataset(cfg, info: CorpusInfo, out: str, pre: PreprocessConfig,
                           vocab_size: int, init: str | None):
    """The train split's locked-tower features, written once to ``out`` (Parquet; a local path or a
    URI: RUN/features/corpusN on the run's store, so actors on any node write and read them) and
    read back.

    ``out/features.json`` records what they were computed from (corpus manifest, tower configs,
    the size and mtime of every weight file they load, preprocessing, init); a later run with the
    same inputs (a resume, another projection or another seed) reads them, anything else (a
    weights file replaced in place included) recomputes them. ``init``: a local model dir or a URI
    (each actor's node fetches it).
    """
    import pyarrow.fs as pafs
    import ray.data

    from core.lineage import source_refs
    from core.runtime import worker_cpus
    from core.storage import read_json, remove, resolve

    weights = [p for p in (cfg.model.vision.pretrained_path, cfg.model.text.pretrained_path, init) if p]
    # Not the preprocessing seed: it draws only augmentations, which check_frozen_features refuses,
    # so a run with another train.seed reads the same features.
    preprocess = {k: v for k, v in dataclasses.asdict(pre).items() if k != "seed"}
    key = {"corpus": info.path, "rows": info.rows, "corpus_manifest": info.manifest,
           "vision": dataclasses.asdict(cfg.model.vision), "text": dataclasses.asdict(cfg.model.text),
           "preprocess": preprocess, "init": init, "weight_files": source_refs(weights)}
    key = json.loads(json.dumps(key, default=str))
    stamp, data = join(out, "features.json"), join(out, "data")
    fs, data_path, _ = resolve(data)

    def parquet_files() -> list:
        sel = pafs.FileSelector(data_path, allow_not_found=True)
        return [f for f in fs.get_file_info(sel) if f.type == pafs.FileType.File and f.path.endswith(".parquet")]

    if (read_json(stamp) or {}).get("inputs") != key:
        remove(*resolve(out)[:2])
        t0 = time.time()
        cpus = worker_cpus(cfg.train.num_workers, reserve_cpus=1.0)
        (build_dataset(info, "train", dataclasses.replace(pre, keep_columns=("sample_id",)), cfg.data)
         .map_batches(TowerFeatures, fn_constructor_kwargs={"model_cfg": cfg.model, "vocab_size": vocab_size,
                                                            "init": init, "threads": max(1, int(cpus))},
                      batch_size=cfg.data.map_batch_rows, batch_format="numpy", num_cpus=cpus,
                      compute=ray.data.ActorPoolStrategy(size=cfg.train.num_workers))
         .write_parquet(data))
        rows = sum(_parquet_rows(fs, f.path) for f in parquet_files())
        if rows != info.rows.get("train", 0):
            raise RuntimeError(f"frozen features of {info.path}: {rows} rows written for {info.rows.get('train', 0)} "
                               "train rows")
        write_json(stamp, {"inputs": key, "rows": rows, "seconds": round(time.time() - t0, 1)})
    ds = (ray.data.read_parquet(data, num_cpus=cfg.data.map_cpus)
          .select_columns(["vision_feature", "text_feature"]))
    on_disk_mb = sum(f.size for f in parquet_files()) / 2 ** 20
    return ds.materialize() if on_disk_mb <= cfg.data.cache_max_mb else ds


def _parquet_rows(fs, path: str) -> int:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


__all__ = ["check_frozen_features", "TowerFeatures", "frozen_feature_dataset"]
