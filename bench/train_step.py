"""Training-step throughput: our loop's step (mm.train.train_step) against OpenCLIP's
(open_clip_train.train.train_one_epoch), same tiny towers, same batches, same process.

    .venv/bin/python bench/train_step.py                  # CPU, prints JSON
    .venv/bin/python bench/train_step.py --ray-feed       # also: data-wait fraction with Ray Data feeding

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

    from jobs.config import load_config
    from jobs.runtime import init_ray
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-px", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-feed", action="store_true")
    ap.add_argument("--ray-steps", type=int, default=120)
    ap.add_argument("--mfu", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.bfloat16 if device == "cuda" else None
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

    out = {"device": device, "threads": a.threads, "steps": a.steps, "batch": a.batch, "image_px": a.image_px,
           "repeats": a.repeats, "open_clip_version": open_clip.__version__, "torch": torch.__version__,
           "samples_per_s": {k: round(v, 1) for k, v in sps.items()},
           "ratio_ours_over_openclip": round(sps["ours"] / sps["openclip"], 3),
           "ratio_ours_full_context_over_openclip": round(sps["ours_full_context"] / sps["openclip"], 3),
           "params": {"ours": sum(p.numel() for p in ours[0].model.parameters()),
                      "openclip": sum(p.numel() for p in theirs[0].parameters())}}
    if a.ray_feed:
        out.update(ray_feed(a.ray_steps))
    if a.mfu:
        out.update(mfu(a.peak_tflops, batch=128, steps=10) if device == "cuda" else {"mfu": "no GPU here"})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
