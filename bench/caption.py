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
3. ``mm finetune --task caption`` of that run on each corpus, once per fine-tune recipe
   (``RECIPES``: configs/finetune.yaml's 100 steps at 3e-4, and 150 steps at 1e-3; ``--recipe`` to
   pick), towers frozen, the run's decoder trains; it writes eval.json (Bleu_1..4, ROUGE_L, CIDEr
   beside the baseline's: the most frequent training caption for every item) and captions.jsonl;
4. the control, like for like: a model of coca.yaml's towers AND decoder (same pooling, same
   width) with seeded random weights (``mm.models.build_model``, saved with the corpus tokenizer),
   fine-tuned by ``mm finetune --task caption`` with the towers frozen and the same recipes;
5. every fine-tuned run's teacher-forced caption loss (and token accuracy) on the val split, no
   augmentation (``val_caption_loss``): the headline recipe of each modality is the one with the
   lowest control val loss (chosen on loss, generous to the control, never on CIDEr); beside it
   each arm's own lowest-val-loss recipe (``*_own_best``);
6. ``mm evaluate --task caption`` of the CoCa run as pretrained (its decoder, no fine-tune);
7. throughput, decoder on vs off: two short back-to-back ``mm pretrain`` runs
   (``--throughput-steps``) with coca.yaml and pretrain.yaml on the same corpora, the median of
   their logged ``samples_per_s`` after the first window; the load average is recorded beside it
   (a shared 2-core machine: the figure is indicative).

The demo's CoCa pretraining draws a quarter of its batches from the videos (``DEMO_PRETRAIN``;
proportional to rows, 77 train clips beside 1,200 images gave them 6 %). ``attributes``: per run,
how many generated captions name the reference's shape / colour / direction (videos) or position
(images) right, parsed with the demo's own word lists.

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


def _last_loss(run: Path) -> float | None:
    from mm.train import read_metrics

    losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    return round(losses[-1], 4) if losses else None


def random_towers(work: Path, config: Path, tokenizer: Path) -> Path:
    """A model of ``config``'s towers and decoder (coca.yaml: the CoCa arm's architecture, pooling
    included) with seeded random weights."""
    import torch

    from core.config import load_config
    from mm.checkpoint import save_model
    from mm.data import load_token_info
    from mm.models import build_model
    from mm.train import PretrainConfig

    out = work / "random_towers" / "model"
    if not (out / "config.json").is_file():
        model_cfg = load_config(PretrainConfig, str(config), []).model
        if not model_cfg.decoder.layers:
            raise SystemExit(f"{config} has no decoder: the control must match the CoCa arm's")
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


def val_caption_loss(run: Path, data: Path, split: str = "val", reverse_time: bool = False) -> dict:
    """The run's decoder on ``split``: teacher-forced next-token cross-entropy and token accuracy
    (mean over the predicted tokens, [SEP] included, no augmentation): the recipe criterion.
    ``reverse_time``: each clip's frames in reverse order against the same references (a model
    that reads the direction of motion loses; one that sees the frames as a set does not)."""
    import dataclasses

    import numpy as np
    import pyarrow.compute as pc
    import torch
    import torch.nn.functional as F

    from mm.checkpoint import load_model, model_dir
    from mm.data import DataConfig, PreprocessConfig, corpus_dataset, load_token_info, preprocess_batch
    from mm.objectives import caption_targets, vision_tokens

    d = model_dir(run)
    model, cfg = load_model(d)
    model.eval()
    prompt = ()
    if cfg.decoder.prompt:
        from transformers import AutoTokenizer

        from mm.generate import prompt_token_ids
        prompt = prompt_token_ids(AutoTokenizer.from_pretrained(str(d / "tokenizer")), cfg.decoder.prompt)
    pre = dataclasses.replace(PreprocessConfig.build(cfg, DataConfig(), load_token_info(str(d / "tokenizer")).pad_id,
                                                     train=False), pad_to_longest=True)
    ds = corpus_dataset(data)
    media = "frames" if "frames" in ds.schema.names else "image"
    table = ds.to_table(columns=["sample_id", media, "input_ids"], filter=pc.field("split") == split)
    total, tokens, right = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, table.num_rows, 64):
            rows = {k: np.array(table[k][start:start + 64].to_pylist(), dtype=object) for k in table.column_names}
            batch = {k: torch.from_numpy(v) for k, v in preprocess_batch(rows, pre).items()}
            if reverse_time and "frames" in batch:
                batch["frames"] = batch["frames"].flip(1)
            ids, mask, labels = caption_targets(batch["input_ids"], batch["attention_mask"], prompt)
            logits = model.decoder(model.decoder.context(vision_tokens(model, batch)), ids, mask)
            picked = labels != -100
            total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            tokens += int(picked.sum())
            right += int((logits.argmax(-1)[picked] == labels[picked]).sum())
    return {"loss": round(total / tokens, 4), "token_acc": round(right / tokens, 4), "rows": table.num_rows}


_COLOURS = r"\b(red|orange|yellow|green|blue|purple|pink|white|black|grey|gray|brown|cyan|magenta)\b"


def _attribute_words() -> dict[str, dict[str, str]]:
    """The demo's phrase -> canonical value, per attribute (longest phrases are matched first)."""
    from pipelines import demo_captions as dc

    return {"shape": {w: k for k, ws in dc._SHAPE_WORDS.items() for w in ws},
            "size": {w: k for k, ws in dc._SIZE_WORDS.items() for w in ws},
            "direction": {w: k for k, ws in dc._DIR_PHRASES.items() for w in ws},
            "position": {**{p: k for k, ps in dc._POS_PHRASES.items() for p in ps},
                         **{p: k for k, ps in dc._POS_HEADS.items() for p in ps}}}


def _attributes(caption: str, words: dict[str, dict[str, str]]) -> dict[str, str]:
    cap = caption.lower()
    out = {}
    colour = re.search(_COLOURS, cap)
    if colour:
        out["colour"] = colour.group(1)
    for attr, table in words.items():
        for w in sorted(table, key=len, reverse=True):
            if re.search(rf"\b{re.escape(w)}\b", cap):
                out[attr] = table[w]
                break
    if "direction" in out:  # a clip's "moving left" is no position
        out.pop("position", None)
    return out


def attribute_hits(run: Path) -> dict:
    """How many generated captions (captions.jsonl) name the reference's shape, colour, size and
    direction (clips) or position (images) right: {attribute: [right, items whose reference names
    it]}. Chance: shape 1/6, size 1/2, direction 1/4, position 1/5."""
    words = _attribute_words()
    hits: dict[str, list[int]] = {}
    for line in (run / "captions.jsonl").read_text().splitlines():
        x = json.loads(line)
        gen, ref = _attributes(x["generated"], words), _attributes(x["references"][0], words)
        for attr, value in ref.items():
            h = hits.setdefault(attr, [0, 0])
            h[0] += gen.get(attr) == value
            h[1] += 1
    return {k: hits[k] for k in sorted(hits)}


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


# Fine-tune recipes, each run by both arms (--set overrides of configs/finetune.yaml).
RECIPES = {"r100_lr3e-4": [],  # finetune.yaml as it is: 100 steps at 3e-4, warm-up 10
           "r150_lr1e-3": ["train.max_steps=150", "optim.lr=1.0e-3", "optim.warmup_steps=20"]}
# The demo's CoCa pretraining: a quarter of the batches from the videos (--data images, videos).
DEMO_PRETRAIN = ["data.mix_weights=[0.75,0.25]"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="scratch directory (stages already in it are reused)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--images", type=int, default=1500, help="clean demo images (mm demo's default)")
    p.add_argument("--videos", type=int, default=96, help="clean demo clips (mm demo's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emoji", default=None, metavar="CORPUS", help="an `mm data emoji` corpus instead of the demo")
    p.add_argument("--pretrain-set", action="append", default=None,
                   help=f"override the CoCa pretraining (demo default: {' '.join(DEMO_PRETRAIN)})")
    p.add_argument("--recipe", action="append", choices=sorted(RECIPES), default=None,
                   help="fine-tune recipes to run, both arms each (default: all)")
    p.add_argument("--finetune-set", action="append", default=[],
                   help="one more override of every caption fine-tune, both arms alike")
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
    pretrain_set = a.pretrain_set if a.pretrain_set is not None else ([] if a.emoji else DEMO_PRETRAIN)
    data_args = [x for c in corpora.values() for x in ("--data", str(c))]
    coca = work / "pretrain_coca"
    if not (coca / "model").is_dir():
        res["pretrain_coca_s"] = mm("pretrain", *data_args, "--out", str(coca), "--config",
                                    str(CONFIGS / "coca.yaml"), *sets(pretrain_set))
    res["pretrain_mix_weights"] = json.loads((coca / "manifest.json").read_text()).get("mix_weights")
    random = random_towers(work, CONFIGS / "coca.yaml", next(iter(corpora.values())) / "tokenizer")
    recipes = {r: RECIPES[r] + a.finetune_set for r in (a.recipe or RECIPES)}
    res["recipes"] = recipes
    res["finetune"], res["headline"] = {}, {}
    for cname in sorted(corpora, key=lambda c: c != "videos"):  # the 18-clip case first: the one in doubt
        corpus = corpora[cname]
        for rname, extra in recipes.items():
            for init, run_init in (("coca", coca), ("random_towers", random)):
                run = work / f"caption_{init}_{cname}_{rname}"
                secs = None
                if not (run / "eval.json").is_file():
                    secs = mm("finetune", "--init", str(run_init), "--data", str(corpus), "--task", "caption",
                              "--out", str(run), "--config", str(CONFIGS / "finetune.yaml"), *sets(extra))
                key = f"{init}/{cname}/{rname}"
                res["finetune"][key] = {**caption_result(run / "eval.json"), "seconds": secs, "overrides": extra,
                                        "val_loss": val_caption_loss(run, corpus), "attributes": attribute_hits(run),
                                        **({"val_loss_time_reversed": val_caption_loss(run, corpus, reverse_time=True)}
                                           if cname == "videos" else {}),
                                        "train_loss_last": _last_loss(run)}
                print(json.dumps({key: {"CIDEr": res["finetune"][key]["CIDEr"],
                                        "val_loss": res["finetune"][key]["val_loss"]}}), flush=True)
        best = min(recipes, key=lambda r: res["finetune"][f"random_towers/{cname}/{r}"]["val_loss"]["loss"])
        res["headline"][cname] = {"recipe": best, "rule": "lowest random-towers val caption loss",
                                  **{init: {"CIDEr": res["finetune"][f"{init}/{cname}/{best}"]["CIDEr"],
                                            "val_loss": res["finetune"][f"{init}/{cname}/{best}"]["val_loss"]["loss"]}
                                     for init in ("coca", "random_towers")},
                                  "baseline_CIDEr": res["finetune"][f"coca/{cname}/{best}"]["baseline"]["CIDEr"]}
        for init in ("coca", "random_towers"):  # each arm's own pick, same candidates, same rule
            own = min(recipes, key=lambda r: res["finetune"][f"{init}/{cname}/{r}"]["val_loss"]["loss"])
            res["headline"][cname][f"{init}_own_best"] = {"recipe": own, **{
                k: res["finetune"][f"{init}/{cname}/{own}"][k] for k in ("CIDEr", "val_loss", "attributes")}}
    res["pretrained_decoder"] = {}
    for cname, corpus in corpora.items():  # the CoCa decoder as pretrained, through mm evaluate
        out = work / f"eval_coca_{cname}" / "eval.json"
        if not out.is_file():
            mm("evaluate", "--model", str(coca), "--data", str(corpus), "--task", "caption", "--out", str(out))
        res["pretrained_decoder"][f"coca_no_finetune/{cname}"] = {**caption_result(out),
                                                                  "val_loss": val_caption_loss(coca, corpus)}
    if not a.emoji:
        res["attribute_oracle"] = {c: oracle_captions(d) for c, d in corpora.items()}
    res["throughput"] = {}
    for name, config in (("decoder_on (coca.yaml)", "coca.yaml"), ("decoder_off (pretrain.yaml)", "pretrain.yaml")
                         ) if a.throughput_steps else ():
        run = work / f"throughput_{config[:-5]}"
        before = os.getloadavg()
        if not (run / "model").is_dir():
            mm("pretrain", *data_args, "--out", str(run), "--config", str(CONFIGS / config),
               *sets([f"train.max_steps={a.throughput_steps}", f"train.checkpoint_every_steps={a.throughput_steps}"]))
        res["throughput"][name] = {"samples_per_s": throughput(run), "load_avg_before": before,
                                   "load_avg_after": os.getloadavg()}
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
