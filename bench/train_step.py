"""Training-step throughput: our loop's step (mm.train.train_step) against OpenCLIP's
(open_clip_train.train.train_one_epoch), same tiny towers, same batches, same process.

    .venv/bin/python bench/train_step.py                  # CPU, prints JSON
    .venv/bin/python bench/train_step.py --ray-feed       # also: data-wait fraction with Ray Data feeding
    .venv/bin/python bench/train_step.py --curves docs/pretrain_objectives.png   # loss curves per objective

Both sides: a ViT (64 px, patch 8, width 128, depth 3, 4 heads) and a 2-layer width-128 text
transformer into a 128-d space, CLIP loss, AdamW, cosine schedule, grad clipping at 1.0, fp32 on
CPU (bf16 autocast on GPU). OpenCLIP runs its own ``train_one_epoch`` over a DataLoader of the
pre-built batches (its text tower always runs the full context length, as it does in training);
ours runs ``train_step`` on the same batches trimmed to the longest caption, as our loop does,
and once more at the full length ("ours_full_context") to separate the two effects. Runs are
interleaved (ours, theirs, ours, ...) and the median taken, because the machine may be shared.

With ``--ray-feed`` a 2-worker ``mm.train.fit`` on a synthetic corpus reports the data-wait
fraction of step time (first logged window excluded: it holds the pipeline start). With a GPU,
``--mfu`` measures ViT-B/16 + 12-layer text tower in bf16: model FLOPs per step from
``torch.utils.flop_counter`` over the peak bf16 FLOP/s given by ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, CONTEXT, WIDTH = 1000, 32, 128


def make_batches(n: int, batch: int, px: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(8, 17, (batch,), generator=g)  # captions of 8-16 tokens
        ids = torch.zeros(batch, CONTEXT, dtype=torch.long)
        mask = torch.zeros(batch, CONTEXT, dtype=torch.long)
        for i, n_tok in enumerate(lengths.tolist()):
            ids[i, :n_tok] = torch.randint(5, VOCAB, (n_tok,), generator=g)
            ids[i, 0], ids[i, n_tok - 1] = 2, VOCAB - 1  # [CLS] ... EOT (OpenCLIP pools at argmax id)
            mask[i, :n_tok] = 1
        out.append({"pixels": torch.randn(batch, 3, px, px, generator=g), "input_ids": ids, "attention_mask": mask})
    return out


# -- ours ----------------------------------------------------------------------------------------
def build_ours(px: int, device: str):
    from mm.config import ModelConfig, TextConfig, VisionConfig
    from mm.data import TokenInfo
    from mm.models import build_model
    from mm.objectives import ObjectivesConfig, ObjectiveSet, build_objectives
    from mm.optim import OptimConfig, build_optimizer, build_scheduler
    from mm.train import TrainConfig

    cfg = ModelConfig(vision=VisionConfig(image_px=px, patch_px=8, width=WIDTH, depth=3, heads=4, pool="token"),
                      text=TextConfig(width=WIDTH, depth=2, heads=4, max_tokens=CONTEXT, pool="cls"),
                      embed_dim=WIDTH)
    tokens = TokenInfo(vocab_size=VOCAB, pad_id=0, mask_id=4, cls_id=2, sep_id=3)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    module = ObjectiveSet(model, build_objectives(ObjectivesConfig(), model, tokens)).to(device)
    ocfg = OptimConfig(lr=5e-4, warmup_steps=2)
    opt = build_optimizer(module, ocfg)
    sched = build_scheduler(opt, ocfg, 1000)
    return module, opt, sched, TrainConfig(grad_clip_norm=1.0)


def run_ours(state, batches: list[dict], trim: bool, amp) -> float:
    from mm.data import trim_padding
    from mm.train import train_step

    module, opt, sched, t = state
    params = [p for p in module.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    module.train()
    t0 = time.perf_counter()
    for b in batches:
        b = trim_padding(b) if trim else b
        train_step(module, opt, scaler, [b], t, amp, params)
        sched.step()
    _sync()
    return time.perf_counter() - t0


# -- OpenCLIP --------------------------------------------------------------------------------------
def build_openclip(px: int, device: str):
    import open_clip
    from open_clip_train.scheduler import cosine_lr

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=WIDTH,
        vision_cfg=open_clip.CLIPVisionCfg(layers=3, width=WIDTH, head_width=WIDTH // 4, patch_size=8, image_size=px),
        text_cfg=open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=4, layers=2),
        output_dict=True,  # as open_clip_train builds it
    ).to(device)
    # OpenCLIP main.py's parameter groups: no decay on gains, biases, embeddings, logit scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.1}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    sched = cosine_lr(opt, 5e-4, 2, 1000)
    loss = open_clip.ClipLoss()
    return model, opt, sched, loss


class _DataInfo:
    """What train_one_epoch reads from open_clip_train.data.DataInfo (whose module needs
    webdataset's extras to import)."""

    def __init__(self, loader):
        self.dataloader = loader

    def set_epoch(self, epoch: int) -> None:
        pass


class _Loader:
    """The attributes train_one_epoch reads from a DataInfo's dataloader."""

    def __init__(self, pairs):
        self.pairs, self.num_batches = pairs, len(pairs)
        self.num_samples = sum(len(p[0]) for p in pairs)

    def __iter__(self):
        return iter(self.pairs)


def run_openclip(state, batches: list[dict], device: str, precision: str, epoch: int) -> float:
    from open_clip_train.train import train_one_epoch

    model, opt, sched, loss = state
    loader = _Loader([(b["pixels"], b["input_ids"]) for b in batches])
    args = SimpleNamespace(device=device, precision=precision, accum_freq=1, batch_size=len(batches[0]["pixels"]),
                           world_size=1, rank=0, local_rank=0, distributed=False, horovod=False, distill=False,
                           grad_clip_norm=1.0, log_every_n_steps=10 ** 9, skip_scheduler=False, wandb=False,
                           save_logs=False, checkpoint_path="", val_frequency=0, epochs=10 ** 6)
    t0 = time.perf_counter()
    train_one_epoch(model, {"train": _DataInfo(loader)}, loss, epoch, opt, None, sched, None, args)
    _sync()
    return time.perf_counter() - t0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- Ray Data feeding --------------------------------------------------------------------------------
def ray_feed(steps: int) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_data import make_corpus

    from core.config import load_config
    from core.runtime import init_ray
    from mm.train import PretrainConfig, fit, read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp) / "corpus", n=600, seed=0)
        init_ray(num_cpus=os.cpu_count())
        cfg = load_config(PretrainConfig, str(ROOT / "configs" / "pretrain.yaml"),
                          [f"train.max_steps={steps}", "train.log_every_steps=10",
                           f"train.checkpoint_every_steps={steps}"])
        t0 = time.time()
        fit(cfg, [str(corpus)], str(Path(tmp) / "run"))
        lines = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    later = lines[1:] or lines
    return {"ray_feed_steps": steps, "ray_feed_wall_s": round(time.time() - t0, 1),
            "data_wait_frac_after_first_window": round(statistics.mean(m["data_wait_frac"] for m in later), 4),
            "data_wait_frac_first_window": round(lines[0]["data_wait_frac"], 4),
            "samples_per_s_2_workers": round(statistics.mean(m["samples_per_s"] for m in later), 1),
            "final_loss": round(lines[-1]["loss"], 4)}


# -- loss curves with each objective on/off ----------------------------------------------------------
CURVES = {
    "contrastive": {},
    "+mlm": {"mlm": 0.5},
    "+fusion_mlm": {"fusion_mlm": 0.5},
    "+mim": {"mim": 1.0},
    "+itm": {"itm": 1.0},
    "all": {"mlm": 0.5, "fusion_mlm": 0.5, "mim": 1.0, "itm": 1.0},
}


def curves(out_png: str, steps: int, batch: int) -> dict:
    """Single-process pretraining (train_step on preprocessed synthetic image + video batches,
    mixed 0.7/0.3 as configs/pretrain_full.yaml) with each objective added to ITC; plots each
    run's ITC loss and the all-objectives run's per-objective losses."""
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "tests"))
    from test_data import make_corpus

    from core.config import load_config
    from mm.data import PreprocessConfig, load_token_info, preprocess_batch, trim_padding
    from mm.models import build_model
    from mm.objectives import ObjectiveSet, build_objectives
    from mm.optim import build_optimizer, build_scheduler
    from mm.train import PretrainConfig, train_step

    base = load_config(PretrainConfig, str(ROOT / "configs" / "pretrain_full.yaml"),
                       ["model.vision.depth=2", f"data.batch_size={batch}", "data.augment=false",
                        "optim.warmup_steps=10"])
    with tempfile.TemporaryDirectory() as tmp:
        img = make_corpus(Path(tmp) / "img", n=256, seed=0)
        vid = make_corpus(Path(tmp) / "vid", modality="video", n=96, seed=1)
        tok = load_token_info(str(img / "tokenizer"))
        pre = PreprocessConfig.build(base.model, base.data, tok.pad_id, train=False)
        pools = []
        for d, media in ((img, "image"), (vid, "frames")):
            tab = pq.read_table(d / "data")
            cols = {k: tab[k].to_numpy(zero_copy_only=False) for k in ("sample_id", media, "input_ids")}
            pools.append({k: torch.as_tensor(v) for k, v in preprocess_batch(cols, pre).items()})
    history: dict[str, dict[str, list[float]]] = {}
    for name, weights in CURVES.items():
        obj = base.objectives
        obj = dataclasses.replace(
            obj, mlm=dataclasses.replace(obj.mlm, weight=weights.get("mlm", 0.0)),
            fusion_mlm=dataclasses.replace(obj.fusion_mlm, weight=weights.get("fusion_mlm", 0.0)),
            mim=dataclasses.replace(obj.mim, weight=weights.get("mim", 0.0)),
            itm=dataclasses.replace(obj.itm, weight=weights.get("itm", 0.0)))
        torch.manual_seed(0)
        model = build_model(base.model, tok.vocab_size)
        module = ObjectiveSet(model, build_objectives(obj, model, tok))
        opt = build_optimizer(module, base.optim)
        sched = build_scheduler(opt, base.optim, steps)
        params = [p for p in module.parameters() if p.requires_grad]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        rng = np.random.default_rng(0)
        hist: dict[str, list[float]] = {}
        for step in range(steps):
            pool = pools[0] if rng.random() < 0.7 else pools[1]
            idx = torch.as_tensor(rng.choice(len(pool["input_ids"]), batch, replace=False))
            torch.manual_seed(step)
            m, _, _ = train_step(module, opt, scaler, [trim_padding({k: v[idx] for k, v in pool.items()})],
                                 base.train, None, params)
            sched.step()
            for k, v in m.items():
                if k.startswith("loss/"):
                    hist.setdefault(k[5:], []).append(float(v))
        history[name] = hist
        print(f"curves: {name} done", file=sys.stderr, flush=True)

    def smooth(x, k=10):
        return np.convolve(x, np.ones(k) / k, mode="valid")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, hist in history.items():
        axes[0].plot(smooth(hist["contrastive"]), label=name)
    axes[0].set(title="ITC/VTC loss, objectives added to contrastive", xlabel="step", ylabel="loss (10-step mean)")
    axes[0].legend()
    for k, v in history["all"].items():
        axes[1].plot(smooth(v) / v[0], label=k)
    axes[1].set(title="all objectives: each loss / its first value", xlabel="step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)

    def first_last(v):
        return [round(float(np.mean(v[:10])), 3), round(float(np.mean(v[-10:])), 3)]

    return {"curves_png": out_png, "curves_steps": steps,
            "curves_first10_last10_mean": {n: {k: first_last(v) for k, v in h.items()} for n, h in history.items()}}


def plot_metrics(metrics_path: str, out_png: str) -> dict:
    """Per-objective loss curves of a run's metrics.jsonl (e.g. a configs/pretrain_full.yaml run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mm.train import read_metrics

    lines = read_metrics(metrics_path)
    keys = sorted({k for m in lines for k in m if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([m["step"] for m in lines], [m[k] for m in lines], marker="o", label=k[5:])
    ax.set(xlabel="step", ylabel="loss (mean of 2 workers, per log window)", title=Path(metrics_path).parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    return {"plot": out_png, "first_last": {k[5:]: [round(lines[0][k], 3), round(lines[-1][k], 3)] for k in keys}}


# -- MFU (GPU) ---------------------------------------------------------------------------------------
def mfu(peak_tflops: float, batch: int, steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from mm.config import ModelConfig, TextConfig, VisionConfig
    from mm.data import TokenInfo
    from mm.models import build_model
    from mm.objectives import ObjectivesConfig, ObjectiveSet, build_objectives
    from mm.optim import OptimConfig, build_optimizer
    from mm.train import TrainConfig, train_step

    cfg = ModelConfig(vision=VisionConfig(timm_name="vit_base_patch16_224", image_px=224, patch_px=16, pool="token"),
                      text=TextConfig(width=512, depth=12, heads=8, max_tokens=77), embed_dim=512)
    tok = TokenInfo(vocab_size=49408, pad_id=0, mask_id=4, cls_id=2, sep_id=3)
    model = build_model(cfg, tok.vocab_size)
    module = ObjectiveSet(model, build_objectives(ObjectivesConfig(), model, tok)).cuda()
    opt = build_optimizer(module, OptimConfig())
    params = [p for p in module.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    b = {"pixels": torch.randn(batch, 3, 224, 224, device="cuda"),
         "input_ids": torch.randint(5, 49408, (batch, 77), device="cuda"),
         "attention_mask": torch.ones(batch, 77, dtype=torch.long, device="cuda")}
    t = TrainConfig()
    with FlopCounterMode(display=False) as fc:
        train_step(module, opt, scaler, [b], t, torch.bfloat16, params)
    flops = fc.get_total_flops()
    for _ in range(3):
        train_step(module, opt, scaler, [b], t, torch.bfloat16, params)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(module, opt, scaler, [b], t, torch.bfloat16, params)
    _sync()
    dt = (time.perf_counter() - t0) / steps
    return {"mfu_model": "ViT-B/16 + text 12x512, bf16 autocast", "mfu_batch": batch,
            "step_s": round(dt, 4), "tflops_per_step": round(flops / 1e12, 2),
            "mfu": round(flops / dt / (peak_tflops * 1e12), 4)}


def throughput(a, device: str, amp) -> dict:
    batches = make_batches(a.steps, a.batch, a.image_px)
    if device == "cuda":
        batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    ours, ours_full, theirs = build_ours(a.image_px, device), build_ours(a.image_px, device), \
        build_openclip(a.image_px, device)
    warm = batches[:2]
    run_ours(ours, warm, True, amp)
    run_ours(ours_full, warm, False, amp)
    run_openclip(theirs, warm, device, "amp_bf16" if amp else "fp32", 0)
    t_ours, t_full, t_theirs = [], [], []
    for r in range(a.repeats):
        t_ours.append(run_ours(ours, batches, True, amp))
        t_theirs.append(run_openclip(theirs, batches, device, "amp_bf16" if amp else "fp32", r + 1))
        t_full.append(run_ours(ours_full, batches, False, amp))
    n = a.steps * a.batch
    sps = {k: n / statistics.median(v) for k, v in (("ours", t_ours), ("ours_full_context", t_full),
                                                     ("openclip", t_theirs))}
    import open_clip

    return {"steps": a.steps, "batch": a.batch, "image_px": a.image_px,
           "repeats": a.repeats, "open_clip_version": open_clip.__version__,
           "samples_per_s": {k: round(v, 1) for k, v in sps.items()},
           "ratio_ours_over_openclip": round(sps["ours"] / sps["openclip"], 3),
           "ratio_ours_full_context_over_openclip": round(sps["ours_full_context"] / sps["openclip"], 3),
           "params": {"ours": sum(p.numel() for p in ours[0].model.parameters()),
                      "openclip": sum(p.numel() for p in theirs[0].parameters())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-px", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-feed", action="store_true")
    ap.add_argument("--ray-steps", type=int, default=120)
    ap.add_argument("--curves", metavar="PNG", help="also train with each objective on/off and plot")
    ap.add_argument("--curve-steps", type=int, default=150)
    ap.add_argument("--plot-metrics", nargs=2, metavar=("METRICS_JSONL", "PNG"),
                    help="plot a run's per-objective losses")
    ap.add_argument("--mfu", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.bfloat16 if device == "cuda" else None
    out: dict = {"device": device, "threads": a.threads, "torch": torch.__version__}
    if a.steps > 0:  # --steps 0: skip the OpenCLIP comparison
        out.update(throughput(a, device, amp))
    if a.ray_feed:
        out.update(ray_feed(a.ray_steps))
    if a.plot_metrics:
        out.update(plot_metrics(*a.plot_metrics))
    if a.curves:
        out.update(curves(a.curves, a.curve_steps, batch=16))
    if a.mfu:
        out.update(mfu(a.peak_tflops, batch=128, steps=10) if device == "cuda" else {"mfu": "no GPU here"})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
