"""Period streams for online training under temporal shift.

A stream holds periods 0..T-1; each period is a batch-contract dict (batch.py) over all its rows.
`PeriodStream` hands out only the periods already revealed: the first `initial` at construction,
then one more per `deploy()`. Evaluation data for period t+1 is what `deploy()` returns, so no
code path can train or select on the future before the model for it is fixed.

Sources: a synthetic drifting CTR teacher (per-period Bayes NE known), Criteo TSV days (the core
reader) and MovieLens-100k (fgd/movielens.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from autoshard_jax.data.batch import Batch
from autoshard_jax.data.criteo_tsv import CriteoTSVReader
from autoshard_jax.data.synthetic import SyntheticClickStream
from autoshard_jax.errors import ConfigError, DataError
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train.metrics import bayes_reference

DRIFTS = ("none", "linear", "periodic", "abrupt")


class FutureLeakError(RuntimeError):
    """Asked for a period that the protocol has not revealed yet (a bug in the caller)."""


class PeriodStream:
    """Reveals periods one deployment at a time.

    Args:
      load: period index -> Batch (all rows of that period); called lazily, results cached.
      num_periods: T.
      initial: periods revealed before any deployment (pretraining + the first update period).
      info: period index -> dict of per-period reference values (e.g. Bayes NE), or None.
    """

    def __init__(self, load: Callable[[int], Batch], num_periods: int, initial: int,
                 info: Callable[[int], dict] | None = None):
        if not 1 <= initial <= num_periods:
            raise ValueError(f"initial must be in [1, {num_periods}], got {initial}")
        self._load, self._info = load, info
        self.num_periods = num_periods
        self.revealed = initial
        self._cache: dict[int, Batch] = {}

    def period(self, t: int) -> Batch:
        """All rows of period t; refuses any period not yet revealed."""
        if not 0 <= t < self.revealed:
            raise FutureLeakError(f"period {t} is not revealed (revealed: 0..{self.revealed - 1});"
                                  " deploy the model for it first")
        if t not in self._cache:
            self._cache[t] = self._load(t)
        return self._cache[t]

    def deploy(self) -> tuple[int, Batch]:
        """Marks the model trained on periods < revealed as deployed; reveals the next period."""
        if self.revealed >= self.num_periods:
            raise FutureLeakError(f"all {self.num_periods} periods are already revealed")
        self.revealed += 1
        t = self.revealed - 1
        return t, self.period(t)

    def info(self, t: int) -> dict:
        """Reference values of a revealed period (empty for real data)."""
        self.period(t)  # same guard
        return self._info(t) if self._info else {}

    def forget_before(self, t: int) -> None:
        """Drops cached periods < t (memory); they can still be reloaded."""
        for k in [k for k in self._cache if k < t]:
            del self._cache[k]


def drift_angles(kind: str, speed: float, num_periods: int, cycle: int = 2,
                 change_every: int = 5) -> np.ndarray:
    """Teacher rotation angle (radians) per period.

    none: 0; linear: speed * t; periodic: speed * (t mod cycle) (regimes that recur every `cycle`
    periods); abrupt: speed * floor(t / change_every) (unannounced jumps).
    """
    t = np.arange(num_periods, dtype=np.float64)
    if kind == "none":
        return np.zeros(num_periods)
    if kind == "linear":
        return speed * t
    if kind == "periodic":
        return speed * np.mod(t, cycle)
    if kind == "abrupt":
        return speed * np.floor(t / change_every)
    raise ConfigError(f"config.data.drift must be one of {DRIFTS}, got {kind!r}")


class DriftingTeacher:
    """Two independent synthetic teachers over one feature law, mixed by a rotation angle.

    logit_a(x) = mu_A + cos(a) (l_A(x) - mu_A) + sin(a) (sigma_A / sigma_B) (l_B(x) - mu_B), with
    l_A, l_B the `teacher_logit` of two `SyntheticClickStream`s (seeds s and s + 7919) on the
    features of A, and mu, sigma their mean and spread on a calibration sample of A's features.
    Angle 0 is exactly A's teacher; rotating keeps the logit's mean and variance (so the CTR and
    the teacher's AUC stay roughly constant) while the conditional click law moves.
    """

    def __init__(self, tables: Sequence[TableSpec], num_dense: int, seed: int, zipf_a: float,
                 calib_samples: int = 16384):
        self.a = SyntheticClickStream(tables, num_dense, seed, zipf_a)
        self.b = SyntheticClickStream(tables, num_dense, seed + 7919, zipf_a)
        calib = self.a.batch(0, calib_samples, split="eval")
        la, lb = self.a.teacher_logit(calib), self.b.teacher_logit(calib)
        self.mu_a, self.mu_b = float(la.mean()), float(lb.mean())
        self.ratio = float(la.std() / max(lb.std(), 1e-9))
        self.seed = seed

    def logit(self, batch: Batch, angle: float) -> np.ndarray:
        la, lb = self.a.teacher_logit(batch), self.b.teacher_logit(batch)
        return (self.mu_a + math.cos(angle) * (la - self.mu_a)
                + math.sin(angle) * self.ratio * (lb - self.mu_b))

    def period(self, t: int, num_samples: int, angle: float) -> tuple[Batch, dict]:
        """Period t's rows (features from A's law, labels from the rotated teacher) and its
        reference values (Bayes log loss / NE of the teacher on exactly these rows)."""
        batch = dict(self.a.batch(t, num_samples, split="train"))
        logit_N = self.logit(batch, angle)
        p_N = 1.0 / (1.0 + np.exp(-logit_N))
        rng = np.random.default_rng([self.seed, 11, t])
        batch["label"] = (rng.random(num_samples) < p_N).astype(np.float32)
        ref = bayes_reference(batch["label"], logit_N)
        info = {"angle": float(angle), "bayes_logloss": ref["bayes_logloss"],
                "bayes_ne": ref["bayes_ne"], "teacher_logit": logit_N}
        return batch, info


def synthetic_stream(tables: Sequence[TableSpec], num_dense: int, seed: int, zipf_a: float,
                     drift: str, speed: float, num_periods: int, samples_per_period: int,
                     initial: int, cycle: int = 2, change_every: int = 5) -> PeriodStream:
    """A drifting synthetic stream; info(t) carries the period's Bayes NE and teacher logits."""
    angles = drift_angles(drift, speed, num_periods, cycle, change_every)
    teacher = DriftingTeacher(tables, num_dense, seed, zipf_a)
    infos: dict[int, dict] = {}

    def load(t):
        batch, infos[t] = teacher.period(t, samples_per_period, float(angles[t]))
        return batch

    return PeriodStream(load, num_periods, initial, info=lambda t: infos[t])


def criteo_stream(path: str, tables: Sequence[TableSpec], num_dense: int, initial: int,
                  kaggle_days: int = 0, skip_bad_lines: bool = False,
                  max_rows_per_period: int = 0) -> PeriodStream:
    """Criteo TSV days as periods, in order (a directory of day files or one file split into
    `kaggle_days` chunks), read by the core reader so bad lines behave as in training.
    `kaggle_days` applies to a single file only; a directory's day files are the periods."""
    if os.path.isdir(path) or not kaggle_days:
        kaggle_days = 0
    probe = CriteoTSVReader(path, tables, num_dense, kaggle_days=kaggle_days or None)
    num_periods = len(probe.segments)
    if num_periods < initial + 1:
        raise DataError(f"{path}: {num_periods} days, need more than the {initial} periods "
                        "used before the first test period")

    def load(t):
        reader = CriteoTSVReader(path, tables, num_dense, days=[t],
                                 kaggle_days=kaggle_days or None,
                                 skip_bad_lines=skip_bad_lines, drop_last=False)
        chunks = []
        rows = 0
        for b in reader.batches(8192):
            chunks.append(b)
            rows += len(b["label"])
            if max_rows_per_period and rows >= max_rows_per_period:
                break
        batch = concat_batches(chunks)
        return take_rows(batch, np.arange(min(rows, max_rows_per_period or rows)))

    return PeriodStream(load, num_periods, initial)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    return {"dense": np.concatenate([b["dense"] for b in batches]),
            "ids": tuple(np.concatenate(c) for c in zip(*[b["ids"] for b in batches],
                                                          strict=True)),
            "label": np.concatenate([b["label"] for b in batches])}


def take_rows(batch: Batch, rows_N: np.ndarray) -> Batch:
    return {"dense": batch["dense"][rows_N], "ids": tuple(i[rows_N] for i in batch["ids"]),
            "label": batch["label"][rows_N]}


def num_rows(batch: Batch) -> int:
    return int(batch["label"].shape[0])
