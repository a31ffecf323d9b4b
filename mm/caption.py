"""The captioning task: what ``mm finetune --task caption`` and ``mm evaluate --task caption``
call (the model, objective, search and metrics live in mm/models/decoder.py, mm/objectives.py,
mm/generate.py and mm/caption_metrics.py).

Fine-tuning (``train_caption``):

    summary = train_caption("runs/pre", "corpora/demo", "runs/cap", pretrain_cfg, CaptionStrategy())

checks the inputs before any work (``check_caption_model``, ``check_caption_corpus``), gives
the run a decoder if it has none (``add_decoder``: the init's weights plus a fresh decoder of
``CaptionStrategy.decoder``, written to ``RUN/init_model``), and runs ``mm.train.fit`` with the
captioning objective (``caption_objectives``: the decoder's prompt tokenised by the corpus
tokenizer) and a ``prepare_model`` hook choosing what trains (``PrepareCaption``):

* ``full``: the whole decoder (and its vision pooler);
* ``last_n``: the decoder's last ``last_n_blocks`` layers and its vision pooler;
* ``lora``: LoRA adapters on the decoder's self- and cross-attention (needs a trained decoder:
  the init must have one); merge them into the weights afterwards (``mm.finetune``'s merge);
* ``towers``: ``()`` keeps the towers frozen (the default; a frozen-tower decoder is a "captioning
  probe"), ``("vision",)`` also adapts the vision tower with the same strategy. The text tower
  never trains here: the captioning loss does not reach it.

Evaluation (``evaluate_captions``): the split's rows stream through ``Captioner`` actors on Ray
Data (each loads the model once and generates with ``mm.generate``); the captions are scored
against the references, all captions of the same media (``mm.embed.media_key``), with
Bleu_1..4, ROUGE_L and CIDEr, beside the same scores of the trivial baseline (the most frequent
training caption for every item). It returns the eval.json sections (``metrics.caption``,
``chance.caption`` = the baseline's scores) and writes ``captions.jsonl``: one line per row,
``{"sample_id", "media_key", "generated", "references"}``. ``caption_samples`` picks a few items
with thumbnails for the report (``caption_grid_html`` renders them).

Every refusal is a ``ValueError`` with one line, raised before any work; references that hold
[UNK] tokens (a vocabulary trained on other captions) get one warning (``warn_unknown_tokens``). Tested in
tests/test_caption.py. Over ~450 lines on purpose: one task's checks, training hooks,
evaluation and export read together; splitting the checks from the code they guard would
scatter one contract over files.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from mm.config import DecoderConfig
from mm.objectives import Captioning, CaptioningConfig, ContrastiveConfig, ObjectivesConfig

log = logging.getLogger(__name__)

_DECODER_LORA = r"decoder\.lm\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\.(self\.(query|key|value)|output\.dense)"
_VISION_LORA = r"vision\.vit\.blocks\.\d+\.attn\.(qkv|proj)"


@dataclass(frozen=True)
class CaptionStrategy:
    """What caption fine-tuning trains. ``decoder``: the decoder added to a run that has none
    (a run's own decoder is kept as it is)."""

    strategy: Literal["full", "last_n", "lora"] = "full"
    towers: tuple[Literal["vision"], ...] = ()
    last_n_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(layers=2))
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.last_n_blocks < 1 or self.lora_rank < 1:
            raise ValueError("last_n_blocks and lora_rank must be >= 1")
        if self.decoder.layers < 1:
            raise ValueError("the decoder added for captioning needs decoder.layers >= 1")


@dataclass(frozen=True)
class CaptionEvalConfig:
    split: str = "val"
    max_tokens: int = 20  # new tokens per caption
    num_beams: int = 3  # BLIP's captioning default; 1 is greedy
    length_penalty: float = 1.0
    batch_rows: int = 32
    num_actors: int = 1
    actor_cpus: float = 1.0
    max_rows: int = 0  # 0: the whole split
    samples: int = 12  # items with thumbnails for the report
    thumb_px: int = 96

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.num_beams < 1 or self.batch_rows < 1 or self.num_actors < 1:
            raise ValueError("max_tokens, num_beams, batch_rows and num_actors must be >= 1")


# ----------------------------------------------------------------------------- input checks


def check_caption_model(model_dir: str | Path, need_decoder: bool) -> dict:
    """The saved model's config (``config.json``'s ``model``); refuses one without a vision tower
    and, with ``need_decoder``, one without a caption decoder."""
    from mm.checkpoint import model_dir as find_model_dir
    from mm.checkpoint import read_json

    d = find_model_dir(model_dir)
    meta = read_json(d / "config.json")
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vision"), dict):
        raise ValueError(f"{model_dir} has no vision tower (config.json has no model.vision): captioning "
                         "describes images and videos")
    if need_decoder and not (model.get("decoder") or {}).get("layers"):
        raise ValueError(f"{model_dir} has no caption decoder: train one with the captioning objective "
                         "(configs/coca.yaml) or `mm finetune --task caption`")
    return model


def check_caption_corpus(data_dir: str | Path, max_tokens: int, splits: Sequence[str] = ("train", "val")) -> dict:
    """Refuse a corpus ``--task caption`` cannot use: no captions, an empty caption (a row
    without a reference), a caption longer than the model's context (``max_tokens`` tokens,
    [CLS] and [SEP] included: it would be cut), or an empty split. Returns rows per split."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files = sorted(str(f) for f in (Path(data_dir) / "data").glob("*.parquet"))
    if not files:
        raise ValueError(f"--data {data_dir} holds no data/*.parquet: not a curated corpus")
    ds = pads.dataset(files, format="parquet")
    if "caption" not in ds.schema.names:
        raise ValueError(f"--data {data_dir} has no caption column: --task caption needs a captioned corpus")
    table = ds.to_table(columns=["sample_id", "caption", "input_ids", "split"],
                        filter=pc.field("split").isin(list(splits)))
    counts = {s: int(pc.sum(pc.equal(table["split"], s)).as_py() or 0) for s in splits}
    captions = table["caption"].to_pylist()
    empty = [i for i, c in enumerate(captions) if c is None or not c.strip()]
    if len(empty) == len(captions):
        raise ValueError(f"--data {data_dir} has no captions (every {'/'.join(splits)} caption is empty): "
                         "--task caption needs a captioned corpus")
    if empty:
        raise ValueError(f"--data {data_dir}: {len(empty)} rows have an empty caption (e.g. sample_id "
                         f"{table['sample_id'][empty[0]].as_py()}); every row needs a reference caption")
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.max() > max_tokens:
        i = int(lengths.argmax())
        n = int((lengths > max_tokens).sum())
        raise ValueError(f"--data {data_dir}: {n} captions are longer than the model's context ({int(lengths[i])} "
                         f"tokens > text.max_tokens {max_tokens}, e.g. sample_id {table['sample_id'][i].as_py()}); "
                         "curate with shorter captions or train a model with a longer text.max_tokens")
    missing = [s for s, n in counts.items() if n == 0]
    if missing:
        raise ValueError(f"--data {data_dir} has no {missing[0]} rows")
    warn_unknown_tokens(data_dir, table)
    return counts


UNK_WARN_SHARE = 0.02  # of the references' rows holding an [UNK] token


def unknown_token_share(data_dir: str | Path, table) -> tuple[float, float, str | None]:
    """(share of rows whose ``input_ids`` hold the corpus tokenizer's [UNK], share of tokens that
    are [UNK], one such caption) for ``table``'s rows; (0, 0, None) when the tokenizer has no
    unknown token. A decoder can never write a word its references hold as [UNK]: generation
    skips the special token ("a video of" came out as "a of")."""
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    from core.storage import local_dir

    unk = AutoTokenizer.from_pretrained(local_dir(str(Path(data_dir) / "tokenizer"))).unk_token_id
    if unk is None or not table.num_rows:
        return 0.0, 0.0, None
    ids = table["input_ids"]
    flat = pc.list_flatten(ids)
    n_unk_tokens = int(pc.sum(pc.equal(flat, unk)).as_py() or 0)
    rows = [i for i, x in enumerate(ids.to_pylist()) if unk in x]
    example = table["caption"][rows[0]].as_py() if rows else None
    return len(rows) / table.num_rows, n_unk_tokens / max(len(flat), 1), example


def warn_unknown_tokens(data_dir: str | Path, table) -> float:
    """Log one warning when over ``UNK_WARN_SHARE`` of the references hold [UNK] (a tokenizer
    trained on other captions, e.g. video captions tokenised with an image corpus's vocabulary);
    returns the row share."""
    rows, tokens, example = unknown_token_share(data_dir, table)
    if rows > UNK_WARN_SHARE:
        log.warning(
            "--data %s: %.0f%% of the reference captions hold [UNK] (%.1f%% of their tokens, e.g. %r): "
            "the decoder can never write those words; curate with a tokenizer trained on these captions",
            data_dir, 100 * rows, 100 * tokens, example)
    return rows


# ----------------------------------------------------------------------------- fine-tuning


def add_decoder(init: str | Path, decoder: DecoderConfig, out: str | Path, seed: int = 0) -> Path:
    """A model dir with a caption decoder: ``init``'s own when it has one, else ``out`` holding
    ``init``'s weights plus a freshly initialised ``decoder`` (seeded), and its tokenizer."""
    import torch

    from mm.checkpoint import load_model, model_dir, save_model
    from mm.models.decoder import CaptionDecoder

    src = model_dir(init)
    model, cfg = load_model(src)
    if model.decoder is not None:
        return src
    if cfg.text.max_tokens - 1 > decoder.max_tokens:
        raise ValueError(f"decoder.max_tokens {decoder.max_tokens} < the run's captions "
                         f"(text.max_tokens {cfg.text.max_tokens})")
    cfg = dataclasses.replace(cfg, decoder=decoder)
    torch.manual_seed(seed)
    model.decoder = CaptionDecoder(decoder, model.vision.width, model.vocab_size)
    model.cfg = cfg
    tokenizer = src / "tokenizer"
    return save_model(model, cfg, out, tokenizer if tokenizer.is_dir() else None)


def caption_objectives(tokenizer_dir: str | Path, decoder: DecoderConfig, weight: float = 1.0,
                       label_smoothing: float = 0.0) -> tuple[ObjectivesConfig, list]:
    """The objectives of caption fine-tuning for ``mm.train.fit``: (config, extra factories).
    Captioning alone (no contrastive); with a decoder prompt it is built by a factory carrying the
    prompt's token ids (``CaptioningFactory``), as the loop's objectives never see the tokenizer."""
    from transformers import AutoTokenizer

    from mm.generate import prompt_token_ids

    cap = CaptioningConfig(weight=weight, label_smoothing=label_smoothing)
    if not decoder.prompt:
        return ObjectivesConfig(contrastive=ContrastiveConfig(weight=0.0), captioning=cap), []
    ids = prompt_token_ids(AutoTokenizer.from_pretrained(str(tokenizer_dir)), decoder.prompt)
    return ObjectivesConfig(contrastive=ContrastiveConfig(weight=0.0)), [CaptioningFactory(cap, ids)]


@dataclass
class CaptioningFactory:
    """Picklable ``(model, tokens) -> Captioning`` with the decoder prompt's token ids."""

    cfg: CaptioningConfig
    prompt_ids: tuple[int, ...] = ()

    def __call__(self, model, tokens) -> Captioning:
        return Captioning(self.cfg, model, self.prompt_ids)


@dataclass
class PrepareCaption:
    """The ``prepare_model`` hook of caption fine-tuning (runs on every worker): freezes
    everything, then opens the decoder (and ``towers``) per ``strategy`` (module docstring)."""

    strategy: str = "full"
    towers: tuple[str, ...] = ()
    last_n_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __call__(self, model):
        if model.decoder is None:
            raise ValueError("caption fine-tuning needs a decoder (mm.caption.add_decoder)")
        model.requires_grad_(False)
        if self.strategy == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            target = "|".join([_DECODER_LORA] + [_VISION_LORA for t in self.towers if t == "vision"])
            inject_adapter_in_model(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha,
                                               lora_dropout=self.lora_dropout, target_modules=f"^({target})$"), model)
            return model  # the adapters alone train
        if self.strategy == "last_n":
            for blk in list(model.decoder.blocks)[-self.last_n_blocks:]:
                blk.requires_grad_(True)
            model.decoder.pool.requires_grad_(True)
        else:
            model.decoder.requires_grad_(True)
        if "vision" in self.towers:
            tower = model.vision
            if self.strategy == "last_n":
                for blk in list(tower.blocks)[-self.last_n_blocks:]:
                    blk.requires_grad_(True)
                tower.norm.requires_grad_(True)
                if getattr(tower, "temporal", None) is not None:
                    for m in list(tower.temporal)[-self.last_n_blocks:]:
                        m.requires_grad_(True)
            else:
                tower.requires_grad_(True)
        return model


def check_caption_strategy(s: CaptionStrategy, init_has_decoder: bool, cnn_vision: bool) -> None:
    if s.strategy == "lora" and not init_has_decoder:
        raise ValueError("strategy lora adapts a trained decoder and this run has none: fine-tune it with full or "
                         "last_n first (the new decoder starts random)")
    if s.strategy == "lora" and "vision" in s.towers and cnn_vision:
        raise ValueError("strategy lora targets attention projections; a CNN vision tower has none")


def train_caption(init: str | Path, data: str | Path, out: str | Path, cfg, s: CaptionStrategy) -> dict:
    """Caption fine-tuning of ``init`` on ``data`` into ``out`` (module docstring); ``cfg`` is a
    ``mm.train.PretrainConfig`` (optim, data, train; its model comes from the init). Ray must be
    initialised. Returns ``mm.train.fit``'s summary plus ``init_model``, the dir training started
    from. LoRA adapters stay in RUN/model: merge them with ``mm.finetune``'s merge."""
    from mm.checkpoint import model_dir
    from mm.train import fit

    src = model_dir(init)
    model_cfg = check_caption_model(src, need_decoder=False)
    has_decoder = bool((model_cfg.get("decoder") or {}).get("layers"))
    check_caption_strategy(s, has_decoder, bool(model_cfg["vision"].get("torchvision_name")))
    check_caption_corpus(data, int(model_cfg["text"]["max_tokens"]), splits=("train",))
    run = Path(out).resolve()
    start = add_decoder(src, s.decoder, run / "init_model", seed=cfg.train.seed)
    from mm.checkpoint import load_model

    _, start_cfg = load_model(start)
    objectives, extra = caption_objectives(start / "tokenizer" if (start / "tokenizer").is_dir()
                                           else Path(data) / "tokenizer", start_cfg.decoder,
                                           label_smoothing=s.label_smoothing)
    summary = fit(dataclasses.replace(cfg, objectives=objectives), [str(data)], str(run), init=str(start),
                  objectives=extra,
                  prepare_model=PrepareCaption(s.strategy, tuple(s.towers), s.last_n_blocks, s.lora_rank,
                                               s.lora_alpha, s.lora_dropout))
    return {**summary, "init_model": str(start)}


# ----------------------------------------------------------------------------- evaluation


class Captioner:
    """Ray Data callable class: corpus rows -> one generated caption per row (model loaded once)."""

    def __init__(self, model_dir: str, cfg: CaptionEvalConfig) -> None:
        import torch

        import mm
        from mm.data import DataConfig, PreprocessConfig, load_token_info

        torch.set_num_threads(max(1, int(cfg.actor_cpus)))
        self.torch = torch
        self.model = mm.load(model_dir).eval()
        pad_id = load_token_info(str(Path(model_dir) / "tokenizer")).pad_id
        self.pre = dataclasses.replace(PreprocessConfig.build(self.model.cfg, DataConfig(), pad_id, train=False),
                                       pad_to_longest=True)
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mm.data import preprocess_batch
        from mm.embed import media_key
        from mm.generate import generate

        media = "image" if "image" in batch else "frames"
        x = preprocess_batch(batch, self.pre)
        pix = self.torch.from_numpy(x["pixels"] if "pixels" in x else x["frames"])
        c = self.cfg
        generated = generate(self.model, pix, max_tokens=c.max_tokens, num_beams=c.num_beams,
                             length_penalty=c.length_penalty, batch_size=c.batch_rows)
        return {"sample_id": np.asarray(batch["sample_id"]).astype(str),
                "media_key": np.array([media_key(b) for b in batch[media]]),
                "reference": np.asarray(batch["caption"]).astype(str), "generated": np.array(generated, dtype=str)}


def generate_split(model_dir: str | Path, data_dir: str | Path, cfg: CaptionEvalConfig) -> list[dict]:
    """Every row of ``cfg.split`` captioned on Ray Data: [{sample_id, media_key, reference,
    generated}] sorted by sample_id."""
    import pyarrow.parquet as pq
    import ray.data
    from ray.data.expressions import col

    files = sorted(str(f) for f in (Path(data_dir) / "data").glob("*.parquet"))
    media = "frames" if "frames" in pq.read_schema(files[0]).names else "image"
    ds = (ray.data.read_parquet(files).filter(expr=col("split") == cfg.split)
          .select_columns(["sample_id", media, "caption", "input_ids"]))
    if cfg.max_rows:
        ds = ds.limit(cfg.max_rows)
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model_dir": str(model_dir), "cfg": cfg},
                        batch_size=cfg.batch_rows, batch_format="numpy", num_cpus=cfg.actor_cpus,
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors))
    rows: list[dict] = []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        cols = {k: v.tolist() for k, v in b.items()}
        rows += [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    if not rows:
        raise ValueError(f"split {cfg.split!r} of {data_dir} has no rows")
    return sorted(rows, key=lambda r: r["sample_id"])


def train_captions(data_dir: str | Path) -> list[str]:
    """The train split's captions (one column, read on the driver)."""
    import pyarrow.compute as pc

    from mm.data import corpus_dataset

    ds = corpus_dataset(data_dir)
    return ds.to_table(columns=["caption"], filter=pc.field("split") == "train")["caption"].to_pylist()


def score_captions(rows: list[dict], baseline: str) -> dict:
    """Per media item: the first row's generated caption against every row's reference.
    -> {"metrics": {...}, "baseline": {...}, "media": n}."""
    from mm.caption_metrics import caption_scores

    refs: dict[str, list[str]] = {}
    cands: dict[str, str] = {}
    for r in rows:
        refs.setdefault(r["media_key"], []).append(r["reference"])
        cands.setdefault(r["media_key"], r["generated"])
    return {"metrics": caption_scores(cands, refs), "baseline": caption_scores({k: baseline for k in refs}, refs),
            "media": len(refs)}


def evaluate_captions(model_dir: str | Path, data_dir: str | Path, cfg: CaptionEvalConfig,
                      captions_out: str | Path | None = None) -> dict:
    """Generate and score the split's captions (module docstring). Ray must be initialised.
    Returns ``{"metrics": {"caption": ...}, "chance": {"caption": baseline scores},
    "baseline": {"caption": ...}, "counts": {"caption": ...}, "caption_samples": [...]}``."""
    from mm.caption_metrics import most_frequent_caption
    from mm.checkpoint import model_dir as find_model_dir

    d = find_model_dir(model_dir)
    model_cfg = check_caption_model(d, need_decoder=True)
    check_caption_corpus(data_dir, int(model_cfg["text"]["max_tokens"]), splits=("train", cfg.split))
    from transformers import AutoTokenizer

    from mm.generate import prompt_token_ids

    prompt = prompt_token_ids(AutoTokenizer.from_pretrained(str(d / "tokenizer")), model_cfg["decoder"]["prompt"])
    limit = int(model_cfg["decoder"]["max_tokens"]) - 1 - len(prompt)
    if cfg.max_tokens > limit:
        raise ValueError(f"max_tokens {cfg.max_tokens} > {limit}, what the decoder's positions leave after "
                         "[CLS] and the prompt")
    baseline = most_frequent_caption(train_captions(data_dir))
    rows = generate_split(d, data_dir, cfg)
    scores = score_captions(rows, baseline)
    refs: dict[str, list[str]] = {}
    for r in rows:
        refs.setdefault(r["media_key"], []).append(r["reference"])
    if captions_out is not None:
        write_captions_jsonl(captions_out, [{"sample_id": r["sample_id"], "media_key": r["media_key"],
                                             "generated": r["generated"], "references": refs[r["media_key"]]}
                                            for r in rows])
    return {"metrics": {"caption": scores["metrics"]}, "chance": {"caption": scores["baseline"]},
            "baseline": {"caption": {"method": "most frequent training caption", "caption": baseline}},
            "counts": {"caption": {"rows": len(rows), "media": scores["media"]}},
            "caption_samples": caption_samples(data_dir, rows, refs, cfg)}


def write_captions_jsonl(path: str | Path, lines: list[dict]) -> Path:
    """RUN/captions.jsonl: one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- report


def caption_samples(data_dir: str | Path, rows: list[dict], refs: dict[str, list[str]],
                    cfg: CaptionEvalConfig) -> list[dict]:
    """The first ``cfg.samples`` media items (by sample_id) with a thumbnail (a video's middle
    frame), the generated caption and the references: [{sample_id, image, generated, references}]."""
    import pyarrow.compute as pc

    from mm.data import corpus_dataset
    from mm.eval_tasks import thumbnail_b64

    picked, seen = [], set()
    for r in rows:
        if r["media_key"] not in seen and len(picked) < cfg.samples:
            seen.add(r["media_key"])
            picked.append(r)
    if not picked:
        return []
    ds = corpus_dataset(data_dir)
    media = "frames" if "frames" in ds.schema.names else "image"
    table = ds.to_table(columns=["sample_id", media],
                        filter=pc.field("sample_id").isin([r["sample_id"] for r in picked]))
    blobs = dict(zip(table["sample_id"].to_pylist(), table[media].to_pylist()))
    return [{"sample_id": r["sample_id"], "image": thumbnail_b64(blobs[r["sample_id"]], cfg.thumb_px),
             "generated": r["generated"], "references": refs[r["media_key"]]} for r in picked]


def caption_grid_html(samples: list[dict]) -> str:
    """A grid of thumbnails with the generated caption (bold) and the references, for report.html."""
    cells = []
    for s in samples:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in s.get("references", []))
        img = f'<img src="data:image/jpeg;base64,{s["image"]}" alt="">' if s.get("image") else ""
        cells.append(f'<div class="hit">{img}<br><b>{html.escape(s.get("generated", ""))}</b>'
                     f"<ul class=meta>{refs}</ul></div>")
    return f'<div class="hits">{"".join(cells)}</div>' if cells else "<p>no captions</p>"


# ----------------------------------------------------------------------------- export


def export_decoder_hf(model, tokenizer_dir: str | Path, out: str | Path) -> dict:
    """The caption decoder for ``mm export --to hf``: ``out/decoder/`` is a transformers
    ``BertLMHeadModel`` directory (with the run's tokenizer; bos/eos/pad = [CLS]/[SEP]/[PAD], so
    its ``generate(..., encoder_hidden_states=context, use_cache=False)`` runs as ``mm.generate``
    does; mm/generate.py says why without the cache) and
    ``out/decoder_context.safetensors`` holds the layers turning the vision tower's tokens (the
    exported timm model's ``forward_features``) into that context. Returns the JSON spec for
    export_config.json: ``{"library", "dir", "context": {"kind": "linear", "layers": [...]} |
    {"kind": "attentional_pooler", ...}, "prompt", "max_tokens"}``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    dec = model.decoder
    if dec is None:
        raise ValueError("this model has no caption decoder to export")
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lm = dec.lm
    for k, v in (("bos_token_id", tok.cls_token_id), ("eos_token_id", tok.sep_token_id),
                 ("pad_token_id", tok.pad_token_id), ("decoder_start_token_id", tok.cls_token_id)):
        setattr(lm.config, k, v)
        setattr(lm.generation_config, k, v)
    lm.save_pretrained(str(out / "decoder"), safe_serialization=True)
    tok.save_pretrained(str(out / "decoder"))
    state = {f"context.{k}": v.detach().cpu().contiguous() for k, v in dec.pool.state_dict().items()}
    save_file(state, str(out / "decoder_context.safetensors"))
    if dec.cfg.attn_pool_tokens:
        ctx = {"kind": "attentional_pooler", "queries": dec.cfg.attn_pool_tokens, "width": dec.cfg.width,
               "vision_width": dec.pool.ln_k.normalized_shape[0], "heads": dec.cfg.heads,
               "usage": "q = LayerNorm(width)[context.ln_q.*](context.query); k = v = "
                        "LayerNorm(vision_width)[context.ln_k.*](tokens); context = torch.nn.MultiheadAttention("
                        "width, heads, kdim=vision_width, vdim=vision_width, batch_first=True)[context.attn.*]"
                        "(q, k, v)[0]"}
    else:
        norm, linear = dec.pool[0], dec.pool[1]
        ctx = {"kind": "linear", "layers": [["layernorm", norm.normalized_shape[0], norm.eps],
                                            ["linear", linear.in_features, linear.out_features, True]],
               "usage": "context = torch.nn.Sequential(LayerNorm, Linear)[context.0.*, context.1.*](tokens)"}
    return {"library": "transformers", "dir": "decoder", "weights": "decoder_context.safetensors", "context": ctx,
            "prompt": dec.cfg.prompt, "max_tokens": dec.cfg.max_tokens}


def strategy_from_finetune(strategy: str, towers: str, last_n_blocks: int, lora_rank: int, lora_alpha: float,
                           lora_dropout: float, decoder: DecoderConfig | None = None) -> CaptionStrategy:
    """``mm finetune``'s strategy fields -> a ``CaptionStrategy``. ``towers``: ``none`` keeps the
    towers frozen, ``vision``/``both`` also adapt the vision tower (the text tower gets no
    captioning gradient); strategies other than full/last_n/lora are refused."""
    if strategy not in ("full", "last_n", "lora"):
        raise ValueError(f"finetune.strategy={strategy} does not apply to --task caption; use full, last_n or lora")
    if towers not in ("none", "vision", "text", "both"):
        raise ValueError(f"finetune.towers={towers}: none, vision, text or both")
    kw = {"decoder": decoder} if decoder is not None else {}
    return CaptionStrategy(strategy=strategy, towers=("vision",) if towers in ("vision", "both") else (),
                           last_n_blocks=last_n_blocks, lora_rank=lora_rank, lora_alpha=lora_alpha,
                           lora_dropout=lora_dropout, **kw)


__all__ = ["CaptionStrategy", "CaptionEvalConfig", "check_caption_model", "check_caption_corpus",
           "unknown_token_share", "warn_unknown_tokens", "add_decoder",
           "caption_objectives", "CaptioningFactory", "PrepareCaption", "check_caption_strategy", "train_caption",
           "Captioner", "generate_split", "train_captions", "score_captions", "evaluate_captions",
           "write_captions_jsonl", "caption_samples", "caption_grid_html", "export_decoder_hf", "strategy_from_finetune"]
