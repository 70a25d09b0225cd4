"""A synthetic, Criteo-shaped click stream with a known teacher.

Why synthetic: tests, benchmarks and scaling sweeps need click data of any table shape without a
1 TB download, and a known teacher gives the Bayes-optimal log loss / AUC to measure models against.

Each batch is a pure function of (seed, split, index, batch_size), so any batch can be produced out
of order and a resumed run sees exactly the same data. A batch of more than BLOCK_ROWS samples is
made of blocks drawn independently, so a process of a multi-host run generates only the blocks
holding its rows of the global batch (`rows=`), and the batch does not depend on the process
count. Nothing is ever stored per row: ids come from
a bounded Zipf law remapped by an affine bijection mod rows, and the teacher's per-id weights are
hashes of (seed, table, id).
"""

from __future__ import annotations

import collections
import concurrent.futures
import gzip
import itertools
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

from autoshard_jax.data.batch import Batch
from autoshard_jax.data.hashing import hash_gaussians
from autoshard_jax.tables.spec import TableSpec

SPLITS = {"train": 0, "eval": 1}
_CALIB_STREAM, _TEACHER_STREAM = 2, 3
_CALIB_SAMPLES = 16384
_MAX_COUNT = 2**31 - 1
# Share of the teacher's logit variance from dense features, per-id weights and id-id interactions.
_SHARES = (0.3, 0.45, 0.25)
# Samples per independently drawn block of a batch (a batch up to this size is one block).
BLOCK_ROWS = 4096


def _coprime_multiplier(rows: int, rng: np.random.Generator) -> int:
    """A random multiplier coprime to rows, so id = (rank * m + c) mod rows is a bijection."""
    if rows <= 2:
        return 1
    m = int(rng.integers(rows // 3, rows)) | 1
    while math.gcd(m, rows) != 1:
        m += 2
    return m % rows or 1


class SyntheticClickStream:
    """Deterministic, random-access stream of batches obeying the batch contract (see batch.py).

    Args:
      tables: table specs, one categorical feature per table, in order.
      num_dense: number of dense (integer count) features.
      seed: fixes the id skew mapping, the dense distributions and the teacher.
      zipf_a: exponent of the bounded Zipf law of each table's id ranks (0 = uniform).
      base_ctr: target mean click rate of the teacher.
      teacher_std: standard deviation of the teacher's logit; sets how predictable clicks are
        (the default gives a teacher AUC around 0.8).
      interaction_rank: width of the hashed per-id vectors whose pairwise dot products form the
        teacher's interaction term (the structure a DLRM's dot interaction can learn).
    """

    def __init__(self, tables: Sequence[TableSpec], num_dense: int = 13, seed: int = 0,
                 zipf_a: float = 1.2, base_ctr: float = 0.25, teacher_std: float = 1.35,
                 interaction_rank: int = 4):
        if not tables:
            raise ValueError("need at least one table")
        if zipf_a < 0:
            raise ValueError(f"zipf_a must be >= 0, got {zipf_a}")
        if not 0 < base_ctr < 1:
            raise ValueError(f"base_ctr must be in (0, 1), got {base_ctr}")
        if any(t.rows >= 2**31 for t in tables):
            raise ValueError("table rows must fit int32 ids (< 2**31)")
        self.tables = tuple(tables)
        self.num_dense = num_dense
        self.seed = seed
        self.zipf_a = float(zipf_a)
        self.interaction_rank = interaction_rank
        rng = np.random.default_rng([seed, _TEACHER_STREAM])
        self._mult = [_coprime_multiplier(t.rows, rng) for t in self.tables]
        self._offset = [int(rng.integers(0, t.rows)) for t in self.tables]
        # Dense counts are floor(lognormal): many zeros and a heavy tail, like Criteo's I1..I13.
        self._dense_mu_Q = rng.uniform(-1.0, 4.0, num_dense)
        self._dense_sigma_Q = rng.uniform(0.5, 2.0, num_dense)
        # Teacher: a small MLP on standardised dense features plus hashed per-id terms.
        hidden = 8
        self._w_lin_Q = rng.normal(size=num_dense)
        self._w1_QxK = rng.normal(size=(num_dense, hidden)) / math.sqrt(max(num_dense, 1))
        self._w2_K = rng.normal(size=hidden)
        self._salt_T = rng.integers(0, 2**63, len(self.tables), dtype=np.uint64)
        self._id_scale_T = np.array([1.0 / math.sqrt(max(t.pooling_factor, 1.0))
                                     for t in self.tables])
        self._dense_mean_Q = np.zeros(num_dense)
        self._dense_std_Q = np.ones(num_dense)
        self._part_scale = np.ones(3)
        self._bias = 0.0
        self._calibrate(base_ctr, teacher_std)

    # ---- generation ------------------------------------------------------------------------

    def _ranks(self, rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
        """Bounded Zipf ranks in [0, rows): the inverse CDF of x^-a on [1, rows + 1), floored."""
        u = rng.random(n)
        a = self.zipf_a
        if a == 1.0:
            x = np.exp(u * math.log(rows + 1.0))
        else:
            e = 1.0 - a
            x = (1.0 + u * ((rows + 1.0) ** e - 1.0)) ** (1.0 / e)
        return np.minimum(x.astype(np.int64) - 1, rows - 1)

    def _table_ids(self, rng: np.random.Generator, t: int, b: int) -> np.ndarray:
        spec = self.tables[t]
        h, pf = spec.hotness, spec.pooling_factor
        ranks = self._ranks(rng, spec.rows, b * h).reshape(b, h)
        ids_BxH = ((ranks * self._mult[t] + self._offset[t]) % spec.rows).astype(np.int32)
        if pf < 1.0:
            count_B = (rng.random(b) < pf).astype(np.int64)
        elif h == 1:
            return ids_BxH
        else:
            count_B = np.minimum(1 + rng.poisson(pf - 1.0, b), h)
        ids_BxH[np.arange(h)[None, :] >= count_B[:, None]] = -1
        return ids_BxH

    def _features(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, tuple]:
        z_BxQ = rng.standard_normal((b, self.num_dense))
        counts_BxQ = np.floor(np.exp(np.minimum(self._dense_mu_Q + self._dense_sigma_Q * z_BxQ,
                                                math.log(_MAX_COUNT))))
        ids = tuple(self._table_ids(rng, t, b) for t in range(len(self.tables)))
        return counts_BxQ.astype(np.int64), ids

    def _raw_parts(self, dense_BxQ: np.ndarray, ids: Sequence[np.ndarray]) -> np.ndarray:
        """Unscaled teacher parts [3, B]: dense MLP, sum of per-id weights, id-id interactions."""
        z_BxQ = (dense_BxQ.astype(np.float64) - self._dense_mean_Q) / self._dense_std_Q
        dense_B = z_BxQ @ self._w_lin_Q + np.tanh(z_BxQ @ self._w1_QxK) @ self._w2_K
        ids_BxN = np.concatenate(ids, axis=1)
        hot_N = np.array([t.hotness for t in self.tables])
        salt_N = np.repeat(self._salt_T, hot_N)
        scale_N = np.repeat(self._id_scale_T, hot_N)
        mask_BxN = ids_BxN >= 0
        keys_BxN = ids_BxN.astype(np.int64).astype(np.uint64) ^ salt_N
        g_BxNxG = hash_gaussians(keys_BxN, 1 + self.interaction_rank)
        g_BxNxG *= (mask_BxN * scale_N)[..., None]
        weight_B = g_BxNxG[..., 0].sum(axis=1)
        # Pool each table's vectors, then sum_{t<s} <u_t, u_s> = (|sum u|^2 - sum |u|^2) / 2.
        starts = np.concatenate([[0], np.cumsum(hot_N)[:-1]])
        u_BxTxK = np.add.reduceat(g_BxNxG[..., 1:], starts, axis=1)
        total_BxK = u_BxTxK.sum(axis=1)
        inter_B = 0.5 * ((total_BxK**2).sum(-1) - (u_BxTxK**2).sum(axis=(1, 2)))
        return np.stack([dense_B, weight_B, inter_B])

    def _calibrate(self, base_ctr: float, teacher_std: float) -> None:
        """Fix dense standardisation, part scales and bias on a private calibration sample."""
        counts_BxQ, ids = self._features(np.random.default_rng([self.seed, _CALIB_STREAM]),
                                         _CALIB_SAMPLES)
        dense_BxQ = np.log1p(counts_BxQ.astype(np.float64))
        self._dense_mean_Q = dense_BxQ.mean(axis=0)
        self._dense_std_Q = np.maximum(dense_BxQ.std(axis=0), 1e-6)
        parts_3xB = self._raw_parts(dense_BxQ, ids)
        std_3 = np.maximum(parts_3xB.std(axis=1), 1e-9)
        self._part_scale = teacher_std * np.sqrt(np.array(_SHARES)) / std_3
        s_B = self._part_scale @ parts_3xB
        lo, hi = -30.0, 30.0
        for _ in range(60):  # bisection: mean sigmoid(bias + s) is increasing in bias
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(mid + s_B)))) < base_ctr:
                lo = mid
            else:
                hi = mid
        self._bias = 0.5 * (lo + hi)

    def teacher_logit(self, batch: Batch) -> np.ndarray:
        """The teacher's logit [B] (float64) for a contract batch; labels are Bernoulli(sigmoid)."""
        return self._bias + self._part_scale @ self._raw_parts(batch["dense"], batch["ids"])

    def _generate(self, index: int, batch_size: int, split: str,
                  rows: tuple[int, int] | None = None) -> tuple[Batch, np.ndarray]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if index < 0 or batch_size < 1:
            raise ValueError(f"need index >= 0 and batch_size >= 1, got {index}, {batch_size}")
        lo, hi = rows if rows is not None else (0, batch_size)
        if not 0 <= lo < hi <= batch_size:
            raise ValueError(f"rows {rows} is not a non-empty range of [0, {batch_size})")
        if batch_size <= BLOCK_ROWS:
            batch, counts_BxQ = self._block([self.seed, SPLITS[split], index, batch_size],
                                            batch_size)
        else:
            parts = [self._block([self.seed, SPLITS[split], index, batch_size, j],
                                 min(BLOCK_ROWS, batch_size - j * BLOCK_ROWS))
                     for j in range(lo // BLOCK_ROWS, -(-hi // BLOCK_ROWS))]
            batch = {"dense": np.concatenate([b["dense"] for b, _ in parts]),
                     "ids": tuple(np.concatenate(ids) for ids in
                                  zip(*(b["ids"] for b, _ in parts), strict=True)),
                     "label": np.concatenate([b["label"] for b, _ in parts])}
            counts_BxQ = np.concatenate([c for _, c in parts])
            lo, hi = lo - lo // BLOCK_ROWS * BLOCK_ROWS, hi - lo // BLOCK_ROWS * BLOCK_ROWS
        if (lo, hi) != (0, batch["label"].shape[0]):
            batch = {"dense": batch["dense"][lo:hi], "ids": tuple(i[lo:hi] for i in batch["ids"]),
                     "label": batch["label"][lo:hi]}
            counts_BxQ = counts_BxQ[lo:hi]
        return batch, counts_BxQ

    def _block(self, seed: list[int], n: int) -> tuple[Batch, np.ndarray]:
        rng = np.random.default_rng(seed)
        counts_BxQ, ids = self._features(rng, n)
        dense_BxQ = np.log1p(counts_BxQ.astype(np.float64)).astype(np.float32)
        batch = {"dense": dense_BxQ, "ids": ids}
        p_B = 1.0 / (1.0 + np.exp(-self.teacher_logit(batch)))
        batch["label"] = (rng.random(n) < p_B).astype(np.float32)
        return batch, counts_BxQ

    # ---- public API ------------------------------------------------------------------------

    def batch(self, index: int, batch_size: int, split: str = "train",
              rows: tuple[int, int] | None = None) -> Batch:
        """Batch number `index`; a pure function of (seed, split, index, batch_size).

        `rows=(lo, hi)` returns samples lo..hi-1 of it, generating only the blocks holding them
        (one process's slice of a global batch).
        """
        return self._generate(index, batch_size, split, rows)[0]

    def batches(self, batch_size: int, start: int = 0, num_batches: int | None = None,
                split: str = "train", rows: tuple[int, int] | None = None,
                workers: int = 1) -> Iterator[Batch]:
        """Batches start, start+1, ... (forever when num_batches is None); `rows` as in `batch`.

        One core generates about 150k samples/s of the demo's stream (Intel Xeon, quiet; half
        the time goes to the teacher's hashed Gaussians), far below an accelerator's step rate:
        an H200 ran the demo's loop at 52-65k samples/s. With `workers` > 1, that many threads
        generate the next batches at once (numpy releases the GIL in its array loops; 2 threads
        made 1.38x); batches are pure functions of their index, so the stream is the same.
        """
        stop = start + num_batches if num_batches is not None else None
        indices = itertools.count(start) if stop is None else iter(range(start, stop))
        if workers <= 1:
            for index in indices:
                yield self.batch(index, batch_size, split, rows)
            return
        with concurrent.futures.ThreadPoolExecutor(workers, "synthetic") as pool:
            ahead = collections.deque()
            try:
                for index in indices:
                    ahead.append(pool.submit(self.batch, index, batch_size, split, rows))
                    if len(ahead) >= 2 * workers:
                        yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:  # closed early: drop what was generated ahead
                for future in ahead:
                    future.cancel()

    def teacher_probs(self, batch: Batch) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.teacher_logit(batch)))

    def teacher_predictions(self, num_samples: int, batch_size: int = 8192,
                            split: str = "eval") -> tuple[np.ndarray, np.ndarray]:
        """(labels_N, teacher logits_N) of the first `num_samples` samples of a split.

        The teacher is the best possible model of this stream; scoring its logits with the same
        metrics as a trained model (train/metrics.py, `bayes_reference` for expected losses)
        gives the ceiling a run can reach.
        """
        logits, labels = [], []
        for i in range(math.ceil(num_samples / batch_size)):
            b = self.batch(i, batch_size, split)
            logits.append(self.teacher_logit(b))
            labels.append(b["label"])
        return np.concatenate(labels)[:num_samples], np.concatenate(logits)[:num_samples]

    def write_tsv(self, path: str | os.PathLike, num_samples: int, batch_size: int = 4096,
                  split: str = "train") -> None:
        """Write the first `num_samples` samples as Criteo TSV (gzip if the path ends in .gz).

        Reading the file back with CriteoTSVReader at the same batch_size yields exactly
        `batches(batch_size)`. Only single-hot tables are expressible in the format; an empty bag
        (pooling factor < 1) is written as a missing categorical.
        """
        if any(t.hotness != 1 for t in self.tables):
            raise ValueError("Criteo TSV holds one id per table; every table must have hotness 1")
        fmt = "\t".join(["%d"] * (1 + self.num_dense)) + "".join(["\t%s"] * len(self.tables))
        fmt += "\n"
        opener = gzip.open if os.fspath(path).endswith(".gz") else open
        with opener(path, "wt") as f:
            for i in range(math.ceil(num_samples / batch_size)):
                batch, counts_BxQ = self._generate(i, batch_size, split)
                n = min(batch_size, num_samples - i * batch_size)
                hex_cols = [np.where(ids[:n, 0] >= 0, np.char.mod("%08x", ids[:n, 0]), "")
                            for ids in batch["ids"]]
                num = np.concatenate([batch["label"][:n, None].astype(np.int64), counts_BxQ[:n]],
                                     axis=1).tolist()
                cols = list(zip(*hex_cols, strict=True))
                f.write("".join(fmt % (*a, *c) for a, c in zip(num, cols, strict=True)))
