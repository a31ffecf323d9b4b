"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes them, in pure Python:
Bleu_1..Bleu_4, ROUGE_L and CIDEr, under pycocoevalcap's names.

    scores = caption_scores({"img1": ["a red circle"]}, {"img1": ["a red circle", "red circle"]})
    # {"Bleu_1": ..., "Bleu_2": ..., "Bleu_3": ..., "Bleu_4": ..., "ROUGE_L": ..., "CIDEr": ...}

Each follows pycocoevalcap's scorer line by line (its tokenizer, METEOR and SPICE need Java and
are not here):

* BLEU (Papineni et al. 2002; ``bleu_scorer.py``): corpus-level. Clipped n-gram matches and
  candidate n-grams are summed over all images, Bleu_n is the geometric mean of the 1..n
  precisions ((correct + 1e-15) / (guess + 1e-9)), times the brevity penalty exp(1 - r/c) when
  the total candidate length c is below r, the sum over images of the reference length closest
  to each candidate's ("closest").
* ROUGE_L (Lin 2004; ``rouge.py``): per image, LCS precision and recall against each reference,
  the maxima combined as F with beta 1.2; the corpus score is the mean over images.
* CIDEr (Vedantam et al. 2015; ``cider_scorer.py``, the CIDEr-D variant the COCO server reports
  as CIDEr): TF-IDF vectors of 1..4-grams, idf from the references of the evaluated set
  (log(images) - log(max(1, df))), per n the clipped cosine min(h, r) * r / (|h| |r|) times the
  Gaussian length penalty exp(-(lh - lr)^2 / 72), where the length is the candidate's bigram count
  (as pycocoevalcap computes it); mean over n, mean over references, x 10, mean over images.

Texts are tokenised by ``tokenize`` first: lower case, words split from punctuation (and
English clitics split off as Stanford's PTB tokenizer does: "don't" -> "do n't"), the punctuation
tokens pycocoevalcap's ``PTBTokenizer`` removes dropped. The trivial baseline
(``most_frequent_caption``) gives every image the most frequent training caption.
Tested in tests/test_caption.py against hand-computed cases.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")
# pycocoevalcap/tokenizer/ptbtokenizer.py: the tokens it drops after tokenising.
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}
_TOKEN = re.compile(r"n't|[a-z0-9]+(?:[-_][a-z0-9]+)*|'[a-z]+|\.\.\.|--|``|''|\S")
_CLITIC = re.compile(r"(?<=[a-z])(n't|'s|'re|'ve|'ll|'d|'m)\b")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (pycocoevalcap's PTBTokenizer, in Python)."""
    text = _CLITIC.sub(r" \1", text.lower().replace("’", "'"))
    return [t for t in _TOKEN.findall(text) if t not in PUNCTUATIONS and re.search(r"[a-z0-9]", t)]


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(hyps: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> list[str]:
    if set(hyps) != set(refs):
        missing = sorted(set(hyps) ^ set(refs))[:3]
        raise ValueError(f"candidates and references cover different images, e.g. {missing}")
    if not hyps:
        raise ValueError("no captions to score")
    empty = [k for k, r in refs.items() if not r or not any(x.strip() for x in r)]
    if empty:
        raise ValueError(f"{len(empty)} images have no (non-empty) reference caption, e.g. {empty[0]!r}")
    return sorted(hyps)


def bleu(hyps: Mapping[str, list[str]], refs: Mapping[str, list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised candidates and references (pycocoevalcap's, option 'closest')."""
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for k in sorted(hyps):
        words = hyps[k]
        counts = _ngrams(words, n)
        max_ref: dict[tuple, int] = {}
        for r in refs[k]:
            for g, c in _ngrams(r, n).items():
                max_ref[g] = max(max_ref.get(g, 0), c)
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs[k])[1]
        for g, c in counts.items():
            correct[len(g) - 1] += min(max_ref.get(g, 0), c)
        for j in range(n):
            guess[j] += max(0, len(words) - j)
    tiny, small = 1e-15, 1e-9
    scores, prod = [], 1.0
    ratio = (test_len + tiny) / (ref_len + small)
    for j in range(n):
        prod *= (correct[j] + tiny) / (guess[j] + small)
        s = prod ** (1.0 / (j + 1))
        scores.append(s * math.exp(1 - 1 / ratio) if ratio < 1 else s)
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """ROUGE-L of one tokenised candidate against its references (pycocoevalcap's ``Rouge``)."""
    if not hyp:
        return 0.0
    prec = [_lcs(r, hyp) / len(hyp) for r in refs]
    rec = [_lcs(r, hyp) / len(r) if r else 0.0 for r in refs]
    p, r = max(prec), max(rec)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def cider(hyps: Mapping[str, list[str]], refs: Mapping[str, list[list[str]]], n: int = 4,
          sigma: float = 6.0) -> tuple[float, dict[str, float]]:
    """CIDEr (pycocoevalcap's CIDEr-D) over the set: (mean, per image)."""
    keys = sorted(hyps)
    ref_counts = {k: [_ngrams(r, n) for r in refs[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        df.update({g for c in ref_counts[k] for g in c})
    log_images = math.log(float(len(keys)))

    def vec(counts: Counter):
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            j = len(g) - 1
            v[j][g] = tf * (log_images - math.log(max(1.0, df[g])))
            norm[j] += v[j][g] ** 2
            if j == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    per: dict[str, float] = {}
    for k in keys:
        vh, nh, lh = vec(_ngrams(hyps[k], n))
        total = 0.0
        for rc in ref_counts[k]:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for j in range(n):
                val = sum(min(x, vr[j].get(g, 0.0)) * vr[j].get(g, 0.0) for g, x in vh[j].items())
                if nh[j] != 0 and nr[j] != 0:
                    val /= nh[j] * nr[j]
                total += val * penalty / n
        per[k] = total / len(ref_counts[k]) * 10.0
    return sum(per.values()) / len(per), per


def caption_scores(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Bleu_1..4, ROUGE_L and CIDEr of one candidate per image id against its references."""
    keys = _check(candidates, references)
    hyps = {k: tokenize(candidates[k]) for k in keys}
    refs = {k: [tokenize(r) for r in references[k] if r.strip()] for k in keys}
    out = {f"Bleu_{i + 1}": s for i, s in enumerate(bleu(hyps, refs))}
    out["ROUGE_L"] = sum(rouge_l(hyps[k], refs[k]) for k in keys) / len(keys)
    out["CIDEr"] = cider(hyps, refs)[0]
    return out


def most_frequent_caption(captions: Iterable[str]) -> str:
    """The trivial baseline's caption: the most frequent one (compared after ``tokenize``, so case
    and punctuation variants count together; ties go to the alphabetically first)."""
    counts = Counter(" ".join(tokenize(c)) for c in captions if c and c.strip())
    if not counts:
        raise ValueError("no training captions for the most-frequent-caption baseline")
    return min(counts, key=lambda c: (-counts[c], c))


__all__ = ["METRICS", "tokenize", "bleu", "rouge_l", "cider", "caption_scores", "most_frequent_caption"]
