"""Captioning on the built-in demo corpus (images and videos): CIDEr of fine-tuned caption
decoders beside the most-frequent-caption baseline and a frozen-random-towers control, and training
throughput with the decoder on (configs/coca.yaml) vs off (configs/pretrain.yaml).

    python bench/caption.py --work /tmp/capbench [--images 1500 --videos 96] [--out bench/results/caption.json]
    python bench/caption.py --work /tmp/capemoji --emoji CORPUS   # a real captioned set instead

Every stage is the command a user types (subprocess ``python -m jobs.cli ...``), skipped when its
output is already in ``--work`` (rerun to resume):

1. the demo corpus: pipelines/demo_corpus.py's generator (``--images`` clean images, ``--videos``
   clean clips, planted faults on top), one tokenizer trained on both modalities' captions, then
   ``mm curate`` of the images and of the videos with it, as ``mm demo`` does (20% val);
2. ``mm pretrain --config configs/coca.yaml`` on both corpora: CoCa, contrastive + captioning,
   the decoder trains with the towers;
3. ``mm finetune --task caption`` of that run on each corpus with configs/finetune.yaml's recipe
   (towers frozen, the run's decoder trains; ``--finetune-set`` to change it), which writes
   eval.json (Bleu_1..4, ROUGE_L, CIDEr beside the baseline's: the most frequent training caption
   for every item) and captions.jsonl;
4. the control: a model of the same towers with seeded random weights (``mm.models.build_model``,
   saved with the corpus tokenizer), given a fresh decoder by ``mm finetune --task caption`` and
   trained with the towers frozen; ``--control-set`` (default 200 steps at coca.yaml's lr 1e-3: a
   fresh decoder needs more than a fine-tune's budget);
5. ``mm evaluate --task caption`` of the CoCa run as pretrained (its decoder, no fine-tune);
6. throughput, decoder on vs off: two short back-to-back ``mm pretrain`` runs
   (``--throughput-steps``) with coca.yaml and pretrain.yaml on the same corpora, the median of
   their logged ``samples_per_s`` after the first window; the load average is recorded beside it
   (a shared 2-core machine: the figure is indicative).

Also an "attribute oracle": each val item's canonical caption of its true attributes ("a small red
circle on the left", "a large blue star moving up"), parsed from its reference with the demo's own
word lists and scored the same way: what a decoder that reads every attribute right but cannot
guess the reference's random paraphrase scores. Not for the emoji set.

``--emoji CORPUS`` (``mm data emoji --out CORPUS``: real emoji images with their CLDR names, 20%
held out) replaces the demo corpus (pretrained on the emoji corpus itself). Prints one JSON
object; writes nothing outside ``--work`` except ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "core" / "configs"


def mm(*args: str) -> float:
    """Run ``mm ARGS`` (python -m jobs.cli); returns the seconds; exits with its stderr on failure."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"mm {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return round(time.time() - t0, 1)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def demo_corpus(work: Path, n_images: int, n_videos: int, seed: int) -> dict[str, Path]:
    """The demo corpus curated as ``mm demo`` curates it: {"images": DIR, "videos": DIR}."""
    from core.config import load_config
    from pipelines.curate import CurateConfig
    from pipelines.demo_corpus import generate_demo_corpus, source_captions
    from pipelines.tokenize import build_tokenizer

    images, videos = work / "corpus" / "images", work / "corpus" / "videos"
    if not (images / "data").is_dir() or not (videos / "data").is_dir():
        raw = generate_demo_corpus(work / "raw", n_images=n_images, n_videos=n_videos, seed=seed)
        shared = build_tokenizer(source_captions(raw), load_config(CurateConfig, str(CONFIGS / "curate.yaml"), []).tokenizer,
                                 work / "corpus" / "tokenizer")
        base = ["images.image_px=64", "output.val_fraction=0.2", f"tokenizer.path={shared}"]
        mm("curate", *raw["image_sources"], "--out", str(images), *sets(base))
        mm("curate", *raw["video_sources"], "--out", str(videos), "--modality", "video", *sets(base))
    return {"images": images, "videos": videos}


def throughput(run: Path) -> float:
    """Median samples/s over the logged windows after the first (warm-up)."""
    from mm.train import read_metrics

    rates = [m["samples_per_s"] for m in read_metrics(run / "metrics.jsonl") if "samples_per_s" in m]
    return round(statistics.median(rates[1:] or rates), 1)


def random_towers(work: Path, config: Path, tokenizer: Path) -> Path:
    """A model of ``config``'s towers (no decoder) with seeded random weights."""
    import dataclasses

    import torch

    from core.config import load_config
    from mm.checkpoint import save_model
    from mm.config import DecoderConfig
    from mm.data import load_token_info
    from mm.models import build_model
    from mm.train import PretrainConfig

    out = work / "random_towers" / "model"
    if not (out / "config.json").is_file():
        cfg = load_config(PretrainConfig, str(config), [])
        model_cfg = dataclasses.replace(cfg.model, decoder=DecoderConfig())
        torch.manual_seed(0)
        save_model(build_model(model_cfg, load_token_info(str(tokenizer)).vocab_size), model_cfg, out, tokenizer)
    return out


def caption_result(eval_json: Path) -> dict:
    ev = json.loads(eval_json.read_text())
    r = {"CIDEr": round(ev["metrics"]["caption"]["CIDEr"], 3),
         "metrics": {k: round(v, 3) for k, v in ev["metrics"]["caption"].items()},
         "baseline": {k: round(v, 3) for k, v in ev["chance"]["caption"].items()},
         "baseline_caption": ev.get("baseline", {}).get("caption", {}).get("caption"),
         "counts": ev.get("counts", {}).get("caption")}
    lines = [json.loads(x) for x in (eval_json.parent / "captions.jsonl").read_text().splitlines()[:4]]
    r["examples"] = [[x["generated"], x["references"][0]] for x in lines]
    return r


def oracle_captions(data: Path) -> dict | None:
    """CIDEr etc. of each val item's canonical attribute caption (module docstring); None when the
    references are not the demo's templates."""
    import pyarrow.compute as pc

    from mm.caption_metrics import caption_scores
    from mm.data import corpus_dataset
    from pipelines import demo_captions as dc

    rows = corpus_dataset(data).to_table(columns=["sample_id", "caption"],
                                         filter=pc.field("split") == "val").to_pylist()
    words = {**{w: ("shape", k) for k, ws in dc._SHAPE_WORDS.items() for w in ws},
             **{w: ("size", k) for k, ws in dc._SIZE_WORDS.items() for w in ws}}
    phrases = {**{p: dc._POS_PHRASES[k][0] for k, ps in dc._POS_HEADS.items() for p in ps},
               **{p: ps[0] for ps in dc._POS_PHRASES.values() for p in ps},
               **{p: ps[0] for ps in dc._DIR_PHRASES.values() for p in ps}}  # -> the canonical phrase
    colours = r"\b(red|orange|yellow|green|blue|purple|pink|white|black|grey|gray|brown|cyan|magenta)\b"
    cands, refs = {}, {}
    for r in rows:
        cap = r["caption"].lower()
        attrs = {}
        for w in sorted(words, key=len, reverse=True):  # longest first: "star shape" before "star"
            if re.search(rf"\b{re.escape(w)}\b", cap):
                attrs.setdefault(words[w][0], words[w][1])
        for p in sorted(phrases, key=len, reverse=True):
            if re.search(rf"\b{re.escape(p)}\b", cap):
                attrs.setdefault("where", phrases[p])
                break
        colour = re.search(colours, cap)
        if not colour or "shape" not in attrs or "where" not in attrs:
            return None
        tail = attrs["where"]
        size = f"{attrs['size']} " if "size" in attrs else ""
        cands[r["sample_id"]] = f"a {size}{colour.group(1)} {attrs['shape']} {tail}"
        refs[r["sample_id"]] = [r["caption"]]
    return {k: round(v, 3) for k, v in caption_scores(cands, refs).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="scratch directory (stages already in it are reused)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--images", type=int, default=1500, help="clean demo images (mm demo's default)")
    p.add_argument("--videos", type=int, default=96, help="clean demo clips (mm demo's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emoji", default=None, metavar="CORPUS", help="an `mm data emoji` corpus instead of the demo")
    p.add_argument("--pretrain-set", action="append", default=[], help="override the CoCa pretraining")
    p.add_argument("--finetune-set", action="append", default=[], help="override the CoCa run's caption fine-tune")
    p.add_argument("--control-set", action="append",
                   default=["train.max_steps=200", "optim.lr=1.0e-3", "optim.warmup_steps=20"],
                   help="override the random-towers control's fine-tune (default: a fresh decoder's budget, "
                        "200 steps at coca.yaml's lr)")
    p.add_argument("--throughput-steps", type=int, default=40,
                   help="steps of the two back-to-back throughput runs (coca.yaml vs pretrain.yaml); 0: none")
    a = p.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res: dict = {"load_avg_start": os.getloadavg(), "cpus": os.cpu_count()}
    if a.emoji:
        corpora = {"emoji": Path(a.emoji).resolve()}
    else:
        corpora = demo_corpus(work, a.images, a.videos, a.seed)
        res["corpus"] = {"images": a.images, "videos": a.videos, "seed": a.seed}
    data_args = [x for c in corpora.values() for x in ("--data", str(c))]
    coca = work / "pretrain_coca"
    if not (coca / "model").is_dir():
        res["pretrain_coca_s"] = mm("pretrain", *data_args, "--out", str(coca), "--config",
                                    str(CONFIGS / "coca.yaml"), *sets(a.pretrain_set))
    random = random_towers(work, CONFIGS / "pretrain.yaml", next(iter(corpora.values())) / "tokenizer")
    res["finetune"] = {}
    for cname in sorted(corpora, key=lambda c: c != "videos"):  # the 18-clip case first: the one in doubt
        corpus = corpora[cname]
        for init, run_init, extra in (("coca", coca, a.finetune_set), ("random_towers", random, a.control_set)):
            run = work / f"caption_{init}_{cname}"
            secs = None
            if not (run / "eval.json").is_file():
                secs = mm("finetune", "--init", str(run_init), "--data", str(corpus), "--task", "caption",
                          "--out", str(run), "--config", str(CONFIGS / "finetune.yaml"), *sets(extra))
            res["finetune"][f"{init}/{cname}"] = {**caption_result(run / "eval.json"), "seconds": secs,
                                                  "overrides": extra}
            print(json.dumps({f"{init}/{cname}": res["finetune"][f"{init}/{cname}"]["metrics"]}), flush=True)
    res["pretrained_decoder"] = {}
    for cname, corpus in corpora.items():  # the CoCa decoder as pretrained, through mm evaluate
        out = work / f"eval_coca_{cname}" / "eval.json"
        if not out.is_file():
            mm("evaluate", "--model", str(coca), "--data", str(corpus), "--task", "caption", "--out", str(out))
        res["pretrained_decoder"][f"coca_no_finetune/{cname}"] = caption_result(out)
    if not a.emoji:
        res["attribute_oracle"] = {c: oracle_captions(d) for c, d in corpora.items()}
    res["throughput"] = {}
    for name, config in (("decoder_on (coca.yaml)", "coca.yaml"), ("decoder_off (pretrain.yaml)", "pretrain.yaml")
                         ) if a.throughput_steps else ():
        run = work / f"throughput_{config[:-5]}"
        if not (run / "model").is_dir():
            mm("pretrain", *data_args, "--out", str(run), "--config", str(CONFIGS / config),
               *sets([f"train.max_steps={a.throughput_steps}", f"train.checkpoint_every_steps={a.throughput_steps}"]))
        res["throughput"][name] = {"samples_per_s": throughput(run), "load_avg_after": os.getloadavg()}
    res["table_cider"] = {k: {"decoder": v["CIDEr"], "baseline": v["baseline"]["CIDEr"]}
                          for k, v in {**res["finetune"], **res["pretrained_decoder"]}.items()}
    res["load_avg_end"] = os.getloadavg()
    res["total_s"] = round(time.time() - t0, 1)
    res["note"] = "throughput measured on a shared 2-core machine (see the load averages): indicative only"
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
