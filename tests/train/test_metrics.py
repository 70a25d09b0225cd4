"""Metrics against brute-force references and known values."""

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoshard_jax.train import metrics


def auc_by_pairs(labels_N: np.ndarray, scores_N: np.ndarray) -> float:
    """O(N^2) definition: fraction of (pos, neg) pairs ranked right, ties counting half."""
    pos_P = scores_N[labels_N == 1]
    neg_Q = scores_N[labels_N == 0]
    above_PxQ = pos_P[:, None] > neg_Q[None, :]
    tied_PxQ = pos_P[:, None] == neg_Q[None, :]
    return float((above_PxQ.sum() + 0.5 * tied_PxQ.sum()) / above_PxQ.size)


def sigmoid(x_N: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x_N))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_counting_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    labels_N = rng.integers(0, 2, size=500)
    scores_N = rng.integers(0, 7, size=500).astype(np.float32)  # ~70 examples per tied score
    assert metrics.auc(labels_N, scores_N) == pytest.approx(auc_by_pairs(labels_N, scores_N))


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 60),
)
def test_auc_property(data, n):
    labels_N = data.draw(hnp.arrays(np.int8, n, elements=st.integers(0, 1)))
    if labels_N.min() == labels_N.max():
        labels_N[0] = 1 - labels_N[0]
    scores_N = data.draw(
        hnp.arrays(np.float64, n, elements=st.sampled_from([-np.inf, -2.0, 0.0, 0.5, 3.0, np.inf]))
        | hnp.arrays(np.float64, n, elements=st.floats(-1e6, 1e6))
    )
    assert metrics.auc(labels_N, scores_N) == pytest.approx(auc_by_pairs(labels_N, scores_N))


def test_auc_known_values_and_invariance():
    labels_N = np.array([0, 0, 1, 1])
    assert metrics.auc(labels_N, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.auc(labels_N, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert metrics.auc(labels_N, np.zeros(4)) == 0.5
    logits_N = np.random.default_rng(0).normal(size=4)
    assert metrics.auc(labels_N, logits_N) == metrics.auc(labels_N, sigmoid(logits_N))


def test_auc_large_input_is_fast_enough():
    rng = np.random.default_rng(0)
    labels_N = rng.integers(0, 2, size=2_000_000)
    scores_N = rng.normal(size=2_000_000).astype(np.float32) + 0.5 * labels_N
    assert 0.6 < metrics.auc(labels_N, scores_N) < 0.7


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "one class"),
        ([0, 0], [0.1, 0.2], "one class"),
        ([0, 1], [0.1, 0.2, 0.3], "same shape"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 2], [0.1, 0.2], r"\[0, 1\]"),
        ([0, 0.5], [0.1, 0.2], "binary"),
        ([], [], "zero examples"),
    ],
)
def test_auc_bad_input(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        metrics.auc(np.array(labels), np.array(scores))


def test_log_loss_matches_formula():
    rng = np.random.default_rng(1)
    labels_N = rng.integers(0, 2, size=1000)
    logits_N = rng.normal(scale=3.0, size=1000)
    probs_N = sigmoid(logits_N)
    expected = -np.mean(labels_N * np.log(probs_N) + (1 - labels_N) * np.log(1 - probs_N))
    assert metrics.log_loss(labels_N, probs_N) == pytest.approx(expected, rel=1e-6)
    assert metrics.log_loss_from_logits(labels_N, logits_N) == pytest.approx(expected, rel=1e-12)


def test_log_loss_from_logits_is_stable_for_large_logits():
    labels_N = np.array([1.0, 0.0, 1.0, 0.0])
    logits_N = np.array([800.0, -800.0, -800.0, 800.0])
    # Right with huge confidence costs ~0; wrong costs |logit|.
    assert metrics.log_loss_from_logits(labels_N, logits_N) == pytest.approx(1600.0 / 4)
    assert math.isfinite(metrics.log_loss(labels_N, sigmoid(logits_N)))  # clipped, not inf


def test_log_loss_rejects_non_finite_logits():
    with pytest.raises(ValueError, match="finite"):
        metrics.log_loss_from_logits(np.array([0, 1]), np.array([0.0, np.inf]))


def test_ne_is_one_when_predicting_the_mean_ctr():
    labels_N = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    ctr = labels_N.mean()
    probs_N = np.full(10, ctr)
    assert metrics.normalized_entropy(labels_N, probs_N=probs_N) == pytest.approx(1.0)
    logits_N = np.full(10, np.log(ctr / (1 - ctr)))
    assert metrics.normalized_entropy(labels_N, logits_N=logits_N) == pytest.approx(1.0)


def test_ne_known_value_and_better_model_is_below_one():
    labels_N = np.array([1, 0, 0, 0])
    probs_N = np.array([0.9, 0.1, 0.1, 0.1])
    entropy = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    expected = -np.log(0.9) / entropy
    assert metrics.normalized_entropy(labels_N, probs_N=probs_N) == pytest.approx(expected)
    assert expected < 1.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_ne_undefined_for_constant_labels(labels):
    with pytest.raises(ValueError, match="mean CTR"):
        metrics.normalized_entropy(np.array(labels), logits_N=np.zeros(3))


def test_ne_needs_exactly_one_prediction_kind():
    with pytest.raises(ValueError, match="exactly one"):
        metrics.normalized_entropy(np.array([0, 1]))
    with pytest.raises(ValueError, match="exactly one"):
        metrics.normalized_entropy(np.array([0, 1]), logits_N=np.zeros(2), probs_N=np.zeros(2))


def test_accuracy():
    labels_N = np.array([1, 0, 1, 0])
    probs_N = np.array([0.7, 0.2, 0.4, 0.6])
    assert metrics.accuracy(labels_N, probs_N) == 0.5
    assert metrics.accuracy(labels_N, probs_N, threshold=0.3) == 0.75
    assert metrics.accuracy(labels_N, probs_N, threshold=0.65) == 0.75


def test_evaluate_predictions_is_consistent_with_the_parts():
    rng = np.random.default_rng(2)
    labels_N = rng.integers(0, 2, size=300)
    logits_N = rng.normal(size=300) + labels_N
    out = metrics.evaluate_predictions(labels_N, logits_N)
    assert set(out) == {"auc", "log_loss", "ne", "accuracy", "ctr", "num_examples"}
    assert out["auc"] == metrics.auc(labels_N, logits_N)
    assert out["log_loss"] == metrics.log_loss_from_logits(labels_N, logits_N)
    assert out["ne"] == metrics.normalized_entropy(labels_N, logits_N=logits_N)
    assert out["accuracy"] == metrics.accuracy(labels_N, sigmoid(logits_N))
    assert out["ctr"] == labels_N.mean()
    assert out["num_examples"] == 300
    assert all(type(v) in (float, int) for v in out.values())


def test_accumulator_equals_one_shot_evaluation_and_drops_padding():
    rng = np.random.default_rng(3)
    labels_N = rng.integers(0, 2, size=1000).astype(np.float32)
    logits_N = rng.normal(size=1000).astype(np.float32)
    acc = metrics.EvalAccumulator()
    for start in range(0, 1000, 128):  # last batch is 104 real rows padded to 128
        labels_B = np.zeros(128, np.float32)
        logits_B = np.full(128, 99.0, np.float32)
        n = min(128, 1000 - start)
        labels_B[:n] = labels_N[start : start + n]
        logits_B[:n] = logits_N[start : start + n]
        acc.add(labels_B.reshape(16, 8), logits_B.reshape(16, 8), mask_B=np.arange(128) < n)
    assert acc.num_examples == 1000
    assert acc.compute() == metrics.evaluate_predictions(labels_N, logits_N)
    acc.reset()
    with pytest.raises(ValueError, match="empty"):
        acc.compute()


def test_accumulator_accepts_jax_arrays_and_rejects_mismatch():
    import jax.numpy as jnp

    acc = metrics.EvalAccumulator()
    acc.add(jnp.array([0.0, 1.0]), jnp.array([-1.0, 2.0]))
    assert acc.compute()["auc"] == 1.0
    with pytest.raises(ValueError, match="must match"):
        acc.add(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="mask"):
        acc.add(np.zeros(2), np.zeros(2), mask_B=np.ones(3, bool))
