"""Caption metrics (mm/caption_metrics.py): the PTB-style tokenizer, BLEU, ROUGE-L and CIDEr
against hand-computed cases, and the most-frequent-caption baseline.

    .venv/bin/pytest tests/test_caption_metrics.py -x -q
"""

from __future__ import annotations

import math

import pytest

from mm.caption_metrics import bleu, caption_scores, cider, most_frequent_caption, rouge_l, tokenize


# -- metrics -----------------------------------------------------------------------------------
def test_tokenize_as_ptb_tokenizer_then_punctuation_removed():
    assert tokenize("A Red circle, moving LEFT.") == ["a", "red", "circle", "moving", "left"]
    assert tokenize("Don't stop... it's a well-known dog!") == ["do", "n't", "stop", "it", "'s", "a", "well-known",
                                                               "dog"]


def test_bleu_rouge_by_hand():
    # candidate vs reference: 1-grams 5/6 clipped matches, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3
    hyp = {"a": tokenize("the cat sat on the mat")}
    ref = {"a": [tokenize("the cat is on the mat")]}
    b1, b2, b3, b4 = bleu(hyp, ref)
    assert b1 == pytest.approx(5 / 6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b3 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    # pycocoevalcap's smoothing: 0 matches count as 1e-15, so Bleu_4 is tiny, not 0
    assert b4 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** (1 / 4), rel=1e-6)
    # LCS "the cat on the mat" = 5 of 6 both ways: F = 5/6 whatever beta
    assert rouge_l(hyp["a"], ref["a"]) == pytest.approx(5 / 6)
    # brevity penalty: c = 2, closest reference length r = 3 (of 3 and 6) -> exp(1 - 3/2)
    b = bleu({"a": ["the", "cat"]}, {"a": [["the", "cat", "sat"], "the cat sat on the mat".split()]})
    assert b[0] == pytest.approx(math.exp(1 - 3 / 2))
    assert b[1] == pytest.approx(math.exp(1 - 3 / 2))
    # ROUGE_L with beta 1.2: LCS 2, precision 2/2, recall 2/3 (the best reference)
    p, r = 1.0, 2 / 3
    assert rouge_l(["the", "cat"], [["the", "cat", "sat"]]) == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))


def test_bleu_is_corpus_level():
    """Matches and lengths are summed over images before the ratio (not a mean of sentence BLEUs)."""
    hyp = {"a": ["x", "y"], "b": ["p", "q", "r", "s"]}
    ref = {"a": [["x", "z"]], "b": [["p", "q", "r", "s"]]}
    assert bleu(hyp, ref)[0] == pytest.approx((1 + 4) / (2 + 4))
    assert bleu(hyp, ref)[1] == pytest.approx(math.sqrt(5 / 6 * (0 + 3) / (1 + 3)))


def test_cider_known_cases():
    # Two images, no n-gram shared between their references: idf = log 2 everywhere, a candidate
    # equal to its reference has cosine 1 for every n it has -> 10 x (orders present) / 4.
    refs = {"a": ["a red circle moving left"], "b": ["two blue squares"]}
    scores = cider({k: tokenize(v) for k, v in {"a": "a red circle moving left", "b": "two blue squares"}.items()},
                   {k: [tokenize(r) for r in v] for k, v in refs.items()})
    assert scores[1]["a"] == pytest.approx(10.0)
    assert scores[1]["b"] == pytest.approx(7.5)  # no 4-gram in three words
    # an n-gram in every image's references has idf 0: identical references give CIDEr 0
    same = cider({"a": ["red", "circle"], "b": ["red", "circle"]}, {"a": [["red", "circle"]], "b": [["red", "circle"]]})
    assert same[0] == 0.0
    # the Gaussian length penalty, on the bigram count (pycocoevalcap): candidate "w1 w2" vs
    # reference "w1 w2 w3 w4" in a set with an unrelated second image. 1-grams: cosine of
    # [c, c] and [c, c, c, c] with clipping = 2c^2 / (sqrt(2)c * 2c) = 1/sqrt(2); 2-grams: 1 / sqrt(3);
    # 3-, 4-grams 0; bigram counts 1 and 3 -> penalty exp(-4 / 72).
    got = cider({"a": ["w1", "w2"], "b": ["z"]}, {"a": [["w1", "w2", "w3", "w4"]], "b": [["z"]]})[1]["a"]
    assert got == pytest.approx(10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72))


def test_caption_scores_names_and_perfect_candidates():
    refs = {"1": ["a red circle on the left", "red circle"], "2": ["a blue square moving up", "blue square"],
            "3": ["a green triangle", "green triangle on grey"]}
    perfect = caption_scores({k: v[0] for k, v in refs.items()}, refs)
    assert list(perfect) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert perfect["Bleu_1"] == pytest.approx(1.0) and perfect["ROUGE_L"] == pytest.approx(1.0)
    baseline = caption_scores({k: "a red circle on the left" for k in refs}, refs)
    assert all(baseline[m] < perfect[m] for m in perfect)
    with pytest.raises(ValueError, match="no \\(non-empty\\) reference"):
        caption_scores({"1": "x"}, {"1": ["  "]})


def test_most_frequent_caption():
    assert most_frequent_caption(["A cat.", "a cat", "dog", "Dog", "bird"]) == "a cat"  # tie -> alphabetical
    assert most_frequent_caption(["x y", "z", "x y."]) == "x y"
    with pytest.raises(ValueError):
        most_frequent_caption(["", " "])
