"""`mm demo`: the whole chain on the built-in corpus, on a local Ray, in one driver.

    mm demo [--out DIR] [--config configs/demo.yaml] [--set KEY=VALUE ...]

1. generate the demo corpus (pipelines/demo_corpus.py): coloured shapes and moving shapes with
   paraphrased captions, as real WebDataset tars / JPEG+PNG / H.264 MP4, with planted exact and
   near duplicates, bad captions and corrupt media;
2. train one tokenizer on the captions of both, then curate the images and the videos with it;
3. pretrain a small dual-stream model on both corpora (Ray Train, 2 workers);
4. evaluate the pretrained model: zero-shot shape classification and retrieval both ways;
5. fine-tune a shape classifier from the pretrained image tower and evaluate it (WiSE-FT curve,
   zero-shot retention);
6. write report.html for both runs and print the metrics beside chance.

Every stage is the same function its own command runs (`mm curate`, `mm pretrain`, ...).
The smoke test (tests/test_demo.py) runs this on a smaller corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.config import load_config, packaged_config
from jobs.cli import add_common, check_out_dir, run

log = logging.getLogger("mm.demo")


@dataclass(frozen=True)
class DemoConfig:
    n_images: int = 1500                # clean distinct images (planted faults come on top)
    n_videos: int = 96                  # clean distinct videos (>= 2 workers x batch after the val split)
    seed: int = 0
    curate_config: str = str(packaged_config("curate.yaml"))
    curate_overrides: tuple[str, ...] = ("images.image_px=64", "output.val_fraction=0.2")
    pretrain_config: str = str(packaged_config("pretrain.yaml"))
    pretrain_overrides: tuple[str, ...] = ()
    finetune_config: str = str(packaged_config("finetune.yaml"))
    finetune_overrides: tuple[str, ...] = ("finetune.strategy=head_only",)  # a linear probe: seconds, no Ray Train
    evaluate_config: str = str(packaged_config("evaluate.yaml"))
    evaluate_overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_images < 20 or self.n_videos < 0:
            raise ValueError("n_images must be >= 20 and n_videos >= 0")


def run_demo(out: str | Path, cfg: DemoConfig, address: str | None = None) -> dict:
    """Run the chain into ``out``; returns {"pretrain": eval, "finetune": eval, "report": path}."""
    from core.runtime import init_ray
    from mm.evaluate import EvalConfig, evaluate_run, write_eval
    from mm.finetune import FinetuneConfig, finetune
    from mm.report import write_report
    from mm.train import PretrainConfig, fit
    from pipelines.curate import CurateConfig, run_curate
    from pipelines.demo_corpus import generate_demo_corpus, source_captions
    from pipelines.tokenize import build_tokenizer

    # Parse every config first: a bad key fails before any work.
    curate_cfg = load_config(CurateConfig, cfg.curate_config, cfg.curate_overrides)
    pretrain_cfg = load_config(PretrainConfig, cfg.pretrain_config, cfg.pretrain_overrides)
    finetune_cfg = load_config(FinetuneConfig, cfg.finetune_config, cfg.finetune_overrides)
    eval_cfg = load_config(EvalConfig, cfg.evaluate_config, cfg.evaluate_overrides)

    out = Path(out).resolve()
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)
        log.info("%s done in %.1f s", name, timings[name])

    raw = generate_demo_corpus(out / "raw", n_images=cfg.n_images, n_videos=cfg.n_videos, seed=cfg.seed)
    lap("generate")
    init_ray(address)

    images, videos = out / "corpus" / "images", out / "corpus" / "videos"
    if cfg.n_videos and raw["video_sources"] and not curate_cfg.tokenizer.path:
        # One vocabulary for both corpora, trained on both modalities' captions: one trained on
        # the images' alone spelt the video-only words in characters or as [UNK] ("a video of").
        shared = build_tokenizer(source_captions(raw), curate_cfg.tokenizer, out / "corpus" / "tokenizer")
        curate_cfg = dataclasses.replace(
            curate_cfg, tokenizer=dataclasses.replace(curate_cfg.tokenizer, path=str(shared)))
    image_stats = run_curate(raw["image_sources"], str(images), curate_cfg)
    _write_zeroshot_files(images, raw["classes"], raw["templates"])
    corpora = [str(images)]
    video_stats = None
    if cfg.n_videos and raw["video_sources"]:
        video_cfg = dataclasses.replace(
            curate_cfg, modality="video",
            tokenizer=dataclasses.replace(curate_cfg.tokenizer, path=str(images / "tokenizer")))
        video_stats = run_curate(raw["video_sources"], str(videos), video_cfg)
        _write_zeroshot_files(videos, raw["video_classes"], raw["video_templates"])
        corpora.append(str(videos))
    lap("curate")

    pre_run = out / "runs" / "pretrain"
    fit(pretrain_cfg, corpora, str(pre_run))
    lap("pretrain")
    pre_eval = evaluate_run(pre_run, images, eval_cfg)
    write_eval(pre_eval, pre_run / "eval.json")
    report = write_report(pre_run)
    lap("evaluate")

    ft_run = out / "runs" / "finetune"
    ft_eval = finetune(str(pre_run), str(images), "classify", str(ft_run), finetune_cfg)
    lap("finetune")

    summary = {"out": str(out), "curate": {"images": image_stats, "videos": video_stats},
               "pretrain": pre_eval, "finetune": ft_eval, "report": str(report),
               "finetune_report": str(ft_run / "report.html"), "timings_s": timings,
               "total_s": round(time.time() - t0, 1)}
    (out / "demo_summary.json").write_text(json.dumps(_brief(summary), indent=2) + "\n")
    return summary


def _write_zeroshot_files(corpus: Path, classes: list[str], templates: list[str]) -> None:
    """The corpus's own class names and prompts, read by evaluate/finetune by default."""
    (corpus / "classes.json").write_text(json.dumps(list(classes)) + "\n")
    (corpus / "templates.json").write_text(json.dumps(list(templates)) + "\n")


def _brief(summary: dict) -> dict:
    def metrics(ev: dict) -> dict:
        return {"metrics": ev.get("metrics", {}), "chance": ev.get("chance", {})}

    return {**{k: v for k, v in summary.items() if k not in ("pretrain", "finetune")},
            "pretrain": metrics(summary["pretrain"]), "finetune": metrics(summary["finetune"])}


def format_summary(summary: dict) -> str:
    lines = []
    for c in ("images", "videos"):
        st = summary["curate"].get(c)
        if st:
            lines.append(f"curate {c}: {st['inputs']} inputs -> {st['kept']} kept, rejected {st['rejected']}")
    for run_name in ("pretrain", "finetune"):
        ev = summary[run_name]
        for task, values in ev.get("metrics", {}).items():
            chance = ev.get("chance", {}).get(task, {})
            for name, v in values.items():
                if isinstance(v, (int, float)):
                    c = chance.get(name)
                    c_txt = f"   (chance {c:.3f})" if isinstance(c, (int, float)) else ""
                    lines.append(f"{run_name:9s} {task:13s} {name:32s} {v:.3f}{c_txt}")
    lines.append(f"timings (s): {summary['timings_s']}  total {summary['total_s']} s")
    lines.append(f"report: {summary['report']}")
    lines.append(f"fine-tune report: {summary['finetune_report']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    add_common(p)
    return p


def _main(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    cfg = load_config(DemoConfig, args.config, args.overrides)
    summary = run_demo(out, cfg, args.address)
    print(format_summary(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
