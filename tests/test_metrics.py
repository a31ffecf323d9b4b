"""Metrics against hand-computed examples, including ties and multiple positives."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm import metrics as M


def test_topk_accuracy_hand_computed():
    # 4 samples, 6 classes.
    logits = np.array([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # target 0: rank 1
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.6],   # target 1: rank 3 (5 > 0 > 1)
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # target 0: rank 6 -> miss at 5
        [0.1, 0.2, 0.3, 0.9, 0.8, 0.7],   # target 5: rank 3
    ])
    targets = np.array([0, 1, 0, 5])
    acc = M.topk_accuracy(logits, targets, (1, 2, 3, 5))
    assert acc == {1: 0.25, 2: 0.25, 3: 0.75, 5: 0.75}


def test_topk_ties_go_to_lower_index():
    # All classes tied: the ranking is 0, 1, 2, ...; target 1 is rank 2, target 0 rank 1.
    logits = np.zeros((2, 4))
    assert M.topk_rows(logits, 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    acc = M.topk_accuracy(logits, np.array([0, 3]), (1, 3))
    assert acc == {1: 0.5, 3: 0.5}
    # A tie between classes 2 and 1 at the top: 1 wins.
    assert M.predict(np.array([[0.0, 0.7, 0.7]])).tolist() == [1]
    assert M.topk_rows(np.array([[0.0, 0.7, 0.7]]), 2).tolist() == [[1, 2]]


def test_topk_handles_negative_scores():
    scores = np.array([[-0.5, -0.1, -0.9, 0.2, -0.1]])
    assert M.topk_rows(scores, 5).tolist() == [[3, 1, 4, 0, 2]]


def test_mean_per_class_recall_hand_computed():
    targets = np.array([0, 0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 0])
    # class 0: 3/4, class 1: 1/2, class 2: 0/1 -> mean 5/12; accuracy would be 4/7.
    assert M.mean_per_class_recall(preds, targets) == pytest.approx(5 / 12)
    from sklearn.metrics import balanced_accuracy_score
    assert M.mean_per_class_recall(preds, targets) == pytest.approx(balanced_accuracy_score(targets, preds))


def test_confusion_matrix_rows_are_true_classes():
    cm = M.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_classification_metrics_and_chance():
    logits = np.eye(3)[[0, 1, 1]]
    out = M.classification_metrics(logits, np.array([0, 1, 2]))
    assert out["acc1"] == pytest.approx(2 / 3)
    assert out["acc5"] == 1.0  # only 3 classes: top-5 holds them all
    assert out["mean_per_class_recall"] == pytest.approx(2 / 3)
    assert M.classification_chance(10) == {"acc1": 0.1, "acc5": 0.5, "mean_per_class_recall": 0.1}


def test_retrieval_multiple_positives_and_directions():
    # 3 images (one-hot embeddings), 5 captions; captions 0,1 -> image 0, 2 -> image 1, 3,4 -> image 2.
    images = np.eye(3, dtype=np.float32)
    texts = np.array([
        [1.0, 0.0, 0.0],   # t0 (img 0): best image 0 -> hit@1
        [0.0, 0.9, 0.1],   # t1 (img 0): ranks 1, 2, 0 -> miss@1, miss@2, hit@3
        [0.0, 1.0, 0.0],   # t2 (img 1): hit@1
        [0.5, 0.0, 0.5],   # t3 (img 2): tie between 0 and 2 -> 0 first -> hit@2 only
        [0.0, 0.0, 1.0],   # t4 (img 2): hit@1
    ], dtype=np.float32)
    t2i = np.array([0, 0, 1, 2, 2])
    metrics, chance = M.retrieval_metrics(images, texts, t2i, ks=(1, 2, 3))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert metrics["image_retrieval_recall@3"] == 1.0
    # image -> text. image 0 scores texts [1, 0, 0, .5, 0] -> t0 first: hit@1 (positives t0, t1).
    # image 1 scores [0, .9, 1, 0, 0] -> t2 first: hit@1.
    # image 2 scores [0, .1, 0, .5, 1] -> t4 first: hit@1.
    assert metrics["text_retrieval_recall@1"] == 1.0
    # chance: text->image has 1 positive of 3: k/3. image->text: images 0 and 2 have 2 positives
    # of 5 texts, image 1 has 1. P(hit@1) = [2/5, 1/5, 2/5] -> 1/3.
    assert chance["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert chance["image_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert chance["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    # @2: 1 - C(3,2)/C(5,2) = 0.7 for 2 positives; 2/5 for one -> (0.7 + 0.4 + 0.7) / 3
    assert chance["text_retrieval_recall@2"] == pytest.approx(1.8 / 3)


def test_image_to_text_multiple_positives_any_counts():
    # image 0 has captions t1 and t2; t0 belongs to image 1 and scores highest for image 0.
    images = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    texts = np.array([[1.0, 0.0], [0.6, 0.4], [0.8, 0.2]], dtype=np.float32)
    metrics, _ = M.retrieval_metrics(images, texts, np.array([1, 0, 0]), ks=(1, 2))
    # image 0 ranks t0, t2, t1: miss@1, hit@2 (t2). image 1 ranks t1(.4), t2(.2), t0(0): miss@1, miss@2.
    assert metrics["text_retrieval_recall@1"] == 0.0
    assert metrics["text_retrieval_recall@2"] == 0.5


def test_video_names():
    metrics, chance = M.retrieval_metrics(np.eye(2), np.eye(2), np.array([0, 1]), media="video", ks=(1,))
    assert metrics == {"video_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    assert chance == {"video_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.5}


def test_chance_recall_closed_form():
    assert M.chance_recall_at_k(np.array([1]), 1000, 10) == pytest.approx(0.01)
    assert M.chance_recall_at_k(np.array([2]), 4, 2) == pytest.approx(1 - 1 / 6)
    assert M.chance_recall_at_k(np.array([3]), 4, 2) == 1.0
    assert M.chance_recall_at_k(np.array([2]), 100, 5) == pytest.approx(1 - math.comb(98, 5) / math.comb(100, 5))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 40), st.integers(1, 12), st.integers(1, 7), st.integers(1, 9),
       st.integers(0, 2**31 - 1))
def test_blocked_topk_equals_stable_sort(n_q, n_g, k, block_rows, block_cols, seed):
    rng = np.random.default_rng(seed)
    # few distinct values -> many ties
    q = rng.integers(-2, 3, size=(n_q, 3)).astype(np.float32)
    g = rng.integers(-2, 3, size=(n_g, 3)).astype(np.float32)
    got = M.topk_indices(q, g, k, block_rows=block_rows, block_cols=block_cols)
    want = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :k]
    assert np.array_equal(got, want)
