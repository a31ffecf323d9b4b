"""ITM re-ranking of retrieval (ALBEF/BLIP as LAVIS runs it): each query's top ``rerank_k`` ITC
candidates are re-scored with the fusion encoder + ITM head (score = ITM match logit + ITC
cosine) and reported as ``*_itm`` beside the ITC recalls.

    pcfg, ckpt = itm_checkpoint(model_dir, rerank_k)       # refuses a run without an ITM head
    scorer = ITMScorer(model_dir, data_dir, emb, first, cfg)
    logits = scorer.score(text_rows, media_items)          # (P,) ITM match logits

The ITM head belongs to the objective, not to the exported model: it is read by name
(``objectives.itm.head.*``) from the run's last Ray Train step checkpoint (RUN/ray/step_*),
with RUN/manifest.json's config. Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from mm.embed import Embeddings
from mm.eval_inputs import EvalConfig, run_dir_of


def itm_checkpoint(model_dir: Path, rerank_k: int):
    """The run's pretraining config and last step checkpoint holding an ITM head, or a one-line
    ValueError naming ``rerank_k``. The ITM head belongs to the objective, not to the exported
    model: it is read from RUN/ray/step_* with RUN/manifest.json's config, as ``masked`` does."""
    from core.config import build
    from mm.checkpoint import read_json
    from mm.train import PretrainConfig

    run = run_dir_of(Path(model_dir))
    ckpts = sorted(run.glob("ray/step_*/train_state.json"))
    why = None
    if not (run / "manifest.json").is_file() or not ckpts:
        why = f"{run} has no manifest.json and ray/step_* checkpoint to read an ITM head from"
    else:
        pcfg = build(PretrainConfig, read_json(run / "manifest.json")["config"])
        if pcfg.model.fusion.depth <= 0 or pcfg.objectives.itm.weight <= 0:
            why = f"run {run} trained no ITM head (model.fusion.depth > 0 and objectives.itm.weight > 0)"
    if why:
        raise ValueError(f"rerank_k={rerank_k} needs a model with an ITM head: {why}; set rerank_k=0")
    ckpt = ckpts[-1].parent
    _check_same_fusion(Path(model_dir), ckpt, rerank_k)
    return pcfg, ckpt


def _check_same_fusion(model_dir: Path, ckpt: Path, rerank_k: int) -> None:
    """The ITM head pairs with the fusion encoder it was trained with: refuse a step checkpoint
    whose fusion weights differ from the model's (a model saved from another step or run), and
    one that keys its heads by position (saved before heads were keyed by objective name)."""
    import torch
    from safetensors import safe_open

    from mm.checkpoint import check_named_objectives
    from mm.checkpoint import model_dir as resolve

    with safe_open(str(resolve(model_dir) / "model.safetensors"), framework="pt") as m, \
            safe_open(str(ckpt / "state.safetensors"), framework="pt") as c:
        have = set(c.keys())
        check_named_objectives(have, ckpt)
        names = [k for k in m.keys() if k.startswith("fusion.")]
        if any(f"model.{k}" not in have or not torch.equal(m.get_tensor(k), c.get_tensor(f"model.{k}"))
               for k in names):
            raise ValueError(f"rerank_k={rerank_k}: the ITM head's checkpoint {ckpt} holds other fusion weights "
                             "than the model (saved from another step or run); set rerank_k=0")


def load_itm_head(model_dir: Path, rerank_k: int):
    """``ITMHead`` with the weights of the run's last step checkpoint."""
    import torch
    from safetensors import safe_open

    from mm.models.heads import ITMHead

    pcfg, ckpt = itm_checkpoint(model_dir, rerank_k)
    prefix = "objectives.itm.head."  # mm.objectives.ObjectiveSet keys each objective by its name
    head = ITMHead(pcfg.model.text.width)
    with safe_open(str(ckpt / "state.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if prefix in k]
        state = {k.split(prefix, 1)[1]: f.get_tensor(k) for k in keys}
    if set(state) != set(head.state_dict()):
        raise ValueError(f"rerank_k: {ckpt} holds no ITM head under {prefix!r} (found {sorted(state)})")
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return head.eval()


class ITMScorer:
    """ITM match logits (``itm_head(fuse(text, media)[:, 0])[:, 1]``, LAVIS's score) of (text row,
    media item) pairs, on the driver, for ``mm.metrics.reranked_retrieval_metrics``.

    Holds the split's token ids and compressed media bytes (not their token features); each call
    decodes and encodes only the media and texts of its pairs and fuses them ``rerank_batch``
    pairs at a time, so memory is one call's pairs, never N x N fused pairs.
    """

    def __init__(self, model_dir: Path, data_dir, emb: Embeddings, first: np.ndarray, cfg: EvalConfig) -> None:
        import pyarrow.compute as pc
        import torch

        import mm
        from mm.data import DataConfig, PreprocessConfig, corpus_dataset, load_token_info

        self.torch = torch
        self.model = mm.load(str(model_dir)).eval()
        self.head = load_itm_head(model_dir, cfg.rerank_k)
        c = self.model.cfg
        pad_id = load_token_info(str(Path(model_dir) / "tokenizer")).pad_id
        self.pre = replace(PreprocessConfig.build(c, DataConfig(), pad_id, train=False),
                           pad_to_longest=True)
        self.batch = cfg.rerank_batch
        ds = corpus_dataset(data_dir)  # a local dir or a URI
        self.media_col = "frames" if "frames" in ds.schema.names else "image"
        table = ds.to_table(columns=["sample_id", "input_ids", self.media_col], filter=pc.field("split") == cfg.split)
        row = {sid: i for i, sid in enumerate(table["sample_id"].to_pylist())}
        ids_col, media_col = table["input_ids"], table[self.media_col]
        self.ids = [np.asarray(ids_col[row[str(s)]].as_py()) for s in emb.sample_id]  # per text row
        self.media_ids = [str(emb.sample_id[j]) for j in first]
        self.media = [media_col[row[s]].as_py() for s in self.media_ids]  # per media item

    def _vision(self, idx: np.ndarray):
        from mm.data import preprocess_batch

        out = []
        for i in range(0, len(idx), self.batch):
            part = idx[i:i + self.batch]
            blobs = np.empty(len(part), dtype=object)
            blobs[:] = [self.media[j] for j in part]
            x = preprocess_batch({self.media_col: blobs, "input_ids": [np.zeros(1, np.int64)] * len(part),
                                  "sample_id": np.array([self.media_ids[j] for j in part])}, self.pre)
            pix = self.torch.from_numpy(x["pixels"][:, None] if "pixels" in x else x["frames"])
            out.append(self.model.vision_tokens(pix))
        return self.torch.cat(out)

    def _text(self, idx: np.ndarray):
        from mm.data import pad_ids

        ids, mask = pad_ids([self.ids[i] for i in idx], self.pre.pad_id, self.pre.max_tokens, True)
        ids, mask = self.torch.from_numpy(ids), self.torch.from_numpy(mask)
        toks = [self.model.text_tokens(ids[i:i + self.batch], mask[i:i + self.batch])
                for i in range(0, len(idx), self.batch)]
        return self.torch.cat(toks), mask

    def score(self, text_idx: np.ndarray, media_idx: np.ndarray) -> np.ndarray:
        """(P,) text rows and (P,) media items -> (P,) ITM match logits."""
        ut, inv_t = np.unique(np.asarray(text_idx), return_inverse=True)
        um, inv_m = np.unique(np.asarray(media_idx), return_inverse=True)
        out = np.empty(len(inv_t), np.float32)
        with self.torch.inference_mode():
            vis = self._vision(um)
            txt, mask = self._text(ut)
            for i in range(0, len(out), self.batch):
                t, m = self.torch.from_numpy(inv_t[i:i + self.batch]), self.torch.from_numpy(inv_m[i:i + self.batch])
                fused = self.model.fuse(txt[t], mask[t], vis[m])[:, 0]
                out[i:i + len(t)] = self.head(fused.float())[:, 1].numpy()
        return out


__all__ = ["itm_checkpoint", "load_itm_head", "ITMScorer"]
