"""CTR evaluation metrics on the host: exact AUC, log loss, normalized entropy (NE), accuracy.

Everything runs in float64 numpy over the full evaluation set (up to a few million examples), so
the numbers are exact and independent of how the evaluation was batched or sharded. Logits are
the preferred input: probabilities near 0 or 1 lose precision in float32, logits do not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "EvalAccumulator",
    "accuracy",
    "auc",
    "bayes_reference",
    "binary_entropy",
    "evaluate_predictions",
    "log_loss",
    "log_loss_from_logits",
    "normalized_entropy",
]


def _as_pair(labels_N: Any, values_N: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Converts to float64 1-D arrays and rejects mismatched shapes, empty input and NaN."""
    labels_N = np.asarray(labels_N, dtype=np.float64)
    values_N = np.asarray(values_N, dtype=np.float64)
    if labels_N.ndim != 1 or labels_N.shape != values_N.shape:
        raise ValueError(
            f"labels and {name} must be 1-D arrays of the same shape, got "
            f"{labels_N.shape} and {values_N.shape}"
        )
    if labels_N.size == 0:
        raise ValueError("cannot compute a metric over zero examples")
    if np.isnan(values_N).any():
        raise ValueError(f"{name} contain NaN ({int(np.isnan(values_N).sum())} of {values_N.size})")
    if np.isnan(labels_N).any() or (labels_N < 0).any() or (labels_N > 1).any():
        raise ValueError("labels must lie in [0, 1] (click labels are 0 or 1)")
    return labels_N, values_N


def _check_binary(labels_N: np.ndarray) -> None:
    if not np.isin(labels_N, (0.0, 1.0)).all():
        raise ValueError("AUC needs binary labels (0 or 1)")


def auc(labels_N: Any, scores_N: Any) -> float:
    """Exact ROC AUC via the Mann-Whitney U statistic; tied scores count half.

    Sorting once makes this O(N log N), and average ranks over tie groups make it equal to the
    pair-counting definition P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg).
    Scores may be probabilities or logits (AUC only depends on their order); +-inf is allowed.
    """
    labels_N, scores_N = _as_pair(labels_N, scores_N, "scores")
    _check_binary(labels_N)
    num_pos = float(labels_N.sum())
    num_neg = labels_N.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"AUC is undefined with only one class present ({int(num_pos)} positives, "
            f"{int(num_neg)} negatives)"
        )
    order_N = np.argsort(scores_N, kind="stable")
    sorted_N = scores_N[order_N]
    # Tie groups are runs of equal sorted scores; each member gets the group's mean 1-based rank.
    is_start_N = np.empty(sorted_N.size, dtype=bool)
    is_start_N[0] = True
    np.not_equal(sorted_N[1:], sorted_N[:-1], out=is_start_N[1:])
    starts_G = np.flatnonzero(is_start_N)
    ends_G = np.append(starts_G[1:], sorted_N.size)
    mean_rank_G = 0.5 * (starts_G + ends_G + 1)
    ranks_N = np.repeat(mean_rank_G, ends_G - starts_G)
    pos_rank_sum = float(ranks_N @ labels_N[order_N])
    return (pos_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def log_loss(labels_N: Any, probs_N: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities, clipped to [eps, 1 - eps] to stay finite."""
    labels_N, probs_N = _as_pair(labels_N, probs_N, "probs")
    probs_N = np.clip(probs_N, eps, 1.0 - eps)
    return float(-np.mean(labels_N * np.log(probs_N) + (1.0 - labels_N) * np.log1p(-probs_N)))


def log_loss_from_logits(labels_N: Any, logits_N: Any) -> float:
    """Mean binary cross-entropy of logits; exact for large |logit| where probs would saturate.

    Uses softplus(x) - y * x = max(x, 0) - y * x + log1p(exp(-|x|)).
    """
    labels_N, logits_N = _as_pair(labels_N, logits_N, "logits")
    if not np.isfinite(logits_N).all():
        raise ValueError("logits must be finite")
    per_example_N = (
        np.maximum(logits_N, 0.0) - labels_N * logits_N + np.log1p(np.exp(-np.abs(logits_N)))
    )
    return float(np.mean(per_example_N))


def binary_entropy(p: Any) -> np.ndarray:
    """Entropy (nats) of Bernoulli(p), elementwise; p is clipped to (0, 1) to stay finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1.0 - p) * np.log1p(-p))


def bayes_reference(labels_N: Any, teacher_logits_N: Any) -> dict[str, float]:
    """Expected-loss view of a known teacher (synthetic data) on a sample.

    Args:
      labels_N: the sample's 0/1 labels.
      teacher_logits_N: the teacher's logits on it.

    Returns:
      ctr (mean label), mean_p, bayes_logloss (mean binary entropy of the teacher's p: the
      expected log loss of a perfect model), constant_logloss (entropy of the mean CTR, the log
      loss of the best constant predictor) and bayes_ne (= bayes / constant log loss).
    """
    labels_N, logits_N = _as_pair(labels_N, teacher_logits_N, "logits")
    p_N = 1.0 / (1.0 + np.exp(-logits_N))
    ctr = float(labels_N.mean())
    bayes = float(binary_entropy(p_N).mean())
    const = float(binary_entropy(ctr))
    return {"ctr": ctr, "mean_p": float(p_N.mean()), "bayes_logloss": bayes,
            "constant_logloss": const,
            "bayes_ne": bayes / const if const > 0 else float("nan")}


def normalized_entropy(
    labels_N: Any,
    *,
    logits_N: Any | None = None,
    probs_N: Any | None = None,
    eps: float = 1e-7,
) -> float:
    """Log loss divided by the entropy of the evaluation set's mean CTR (He et al. 2014).

    NE < 1 means the model beats always predicting the background CTR; NE == 1 means it does not.
    Pass exactly one of logits_N (preferred) or probs_N.
    """
    if (logits_N is None) == (probs_N is None):
        raise ValueError("pass exactly one of logits_N or probs_N")
    if logits_N is not None:
        loss = log_loss_from_logits(labels_N, logits_N)
    else:
        loss = log_loss(labels_N, probs_N, eps=eps)
    ctr = float(np.mean(np.asarray(labels_N, dtype=np.float64)))
    if ctr <= 0.0 or ctr >= 1.0:
        raise ValueError(f"NE is undefined when the mean CTR is {ctr} (entropy 0)")
    return loss / float(binary_entropy(ctr))


def accuracy(labels_N: Any, probs_N: Any, threshold: float = 0.5) -> float:
    """Fraction of examples whose prediction (prob > threshold) matches the 0/1 label."""
    labels_N, probs_N = _as_pair(labels_N, probs_N, "probs")
    return float(np.mean((probs_N > threshold) == (labels_N > 0.5)))


def evaluate_predictions(labels_N: Any, logits_N: Any) -> dict[str, float | int]:
    """All evaluation metrics from labels and logits, as plain Python numbers for JSONL logs."""
    labels_N, logits_N = _as_pair(labels_N, logits_N, "logits")
    return {
        "auc": auc(labels_N, logits_N),
        "log_loss": log_loss_from_logits(labels_N, logits_N),
        "ne": normalized_entropy(labels_N, logits_N=logits_N),
        # logit > 0 is prob > 0.5, without the float rounding of a sigmoid.
        "accuracy": float(np.mean((logits_N > 0.0) == (labels_N > 0.5))),
        "ctr": float(np.mean(labels_N)),
        "num_examples": int(labels_N.size),
    }


class EvalAccumulator:
    """Collects per-batch (labels, logits) on the host and computes exact metrics at the end.

    AUC does not decompose over batches, so the accumulator keeps every example (a few million
    float64 pairs is tens of MB). Padded batches pass a mask so padding never reaches the metrics.
    """

    def __init__(self) -> None:
        self._labels: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []

    @property
    def num_examples(self) -> int:
        return sum(x.size for x in self._labels)

    def add(self, labels_B: Any, logits_B: Any, mask_B: Any | None = None) -> None:
        """Adds one batch; jax arrays are copied to the host here (they must be addressable)."""
        labels_B = np.asarray(labels_B).reshape(-1)
        logits_B = np.asarray(logits_B).reshape(-1)
        if labels_B.shape != logits_B.shape:
            raise ValueError(
                f"labels and logits hold {labels_B.size} and {logits_B.size} values; "
                "they must match"
            )
        if mask_B is not None:
            mask_B = np.asarray(mask_B, dtype=bool).reshape(-1)
            if mask_B.shape != labels_B.shape:
                raise ValueError(f"mask has {mask_B.size} values, batch has {labels_B.size}")
            labels_B, logits_B = labels_B[mask_B], logits_B[mask_B]
        self._labels.append(labels_B.astype(np.float64, copy=True))
        self._logits.append(logits_B.astype(np.float64, copy=True))

    def compute(self) -> dict[str, float | int]:
        """Metrics over everything added so far (see evaluate_predictions)."""
        if not self._labels:
            raise ValueError("EvalAccumulator is empty: add() at least one batch first")
        return evaluate_predictions(np.concatenate(self._labels), np.concatenate(self._logits))

    def reset(self) -> None:
        self._labels.clear()
        self._logits.clear()
