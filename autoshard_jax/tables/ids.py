"""Id batches drawn from a table's statistics, and the reuse histogram of id batches.

A `TableSpec` says how many ids a sample looks up (pooling factor) and how often the rows a batch
touches are reused (`reuse_hist`: the fraction of unique rows whose access count falls in each of
the 17 dlrm_datasets bins (0,1], (1,2], (2,4], ..., (16384,32768], >32768). The cost of a lookup
depends on both (more ids, fewer unique rows to update, more cache hits), so the cost oracle draws
its ids here. The histogram is a statistic of one batch: drawn at batch size B, the ids reproduce
it at B.
"""

from __future__ import annotations

import math

import numpy as np

from autoshard_jax.tables.spec import NUM_REUSE_BINS, TableSpec

# Bin i holds counts in (LOW[i], HIGH[i]]; the last bin is open, drawn up to twice its bound.
_HIGH = np.array([2**i for i in range(NUM_REUSE_BINS - 1)] + [2**(NUM_REUSE_BINS - 1)], np.int64)
_LOW = np.concatenate([[0], _HIGH[:-1]])


def reuse_bin(counts: np.ndarray) -> np.ndarray:
    """Bin index of each access count (>= 1): ceil(log2(count)), the last bin open-ended."""
    counts = np.asarray(counts, np.int64)
    if counts.size and counts.min() < 1:
        raise ValueError("access counts must be >= 1")
    exponent = np.ceil(np.log2(counts.astype(np.float64)) - 1e-9).astype(np.int64)
    return np.minimum(exponent, NUM_REUSE_BINS - 1)


def reuse_histogram(ids: np.ndarray) -> np.ndarray:
    """Fraction of the unique rows in `ids` (ignoring -1) per reuse bin: float64 [17]."""
    ids = np.asarray(ids).reshape(-1)
    _, counts = np.unique(ids[ids >= 0], return_counts=True)
    hist = np.bincount(reuse_bin(counts), minlength=NUM_REUSE_BINS).astype(np.float64)
    return hist / max(1, counts.size)


def bag_lengths(pooling_factor: float, hotness: int, batch_size: int,
                rng: np.random.Generator) -> np.ndarray:
    """Ids per sample: floor or ceil of the pooling factor, as many ceils as make the mean exact."""
    low = math.floor(pooling_factor)
    num_high = int(round((pooling_factor - low) * batch_size))
    lengths = np.full(batch_size, low, np.int64)
    lengths[rng.permutation(batch_size)[:num_high]] += 1
    return np.minimum(lengths, hotness)


def _bin_bounds(total, xp):
    """Each bin's (low, high] access counts in a batch of `total` lookups (broadcast [..., 17]):
    no row is accessed more often than the batch has lookups."""
    total = xp.asarray(total)[..., None]
    shape = (1,) * (total.ndim - 1) + (NUM_REUSE_BINS,)
    return (xp.minimum(xp.reshape(_LOW + 1, shape), total),
            xp.minimum(xp.reshape(_HIGH, shape), total))


def mean_access_count(hist, total, xp=np):
    """Mean lookups per unique row of a batch of `total` lookups with reuse histogram `hist`
    ([..., 17], normalised here), counts log-uniform within a bin as `generate_ids` draws them."""
    low, high = _bin_bounds(total, xp)
    span = xp.log((high + 1.0) / low)
    mean_bin = xp.where(span > 0, (high + 1.0 - low) / xp.maximum(span, 1e-12), low)
    weight = hist / xp.maximum(xp.sum(hist, axis=-1, keepdims=True), 1e-12)
    return xp.sum(weight * mean_bin, axis=-1)


def unique_rows(rows, pooling_factor, hist, batch_size: int, xp=np):
    """Rows a batch of `batch_size` samples touches (continuous; `generate_ids` draws this many,
    rounded): lookups over mean lookups per row, at most the table's rows. The histogram alone
    hides it: a trace of reuse in the top bins puts 17 or 2,000 unique rows behind the same
    12k lookups, and on the CPU such tables' steps differ by 2x (session 30)."""
    total = xp.maximum(pooling_factor * batch_size, 1.0)
    return xp.clip(total / xp.maximum(mean_access_count(hist, total, xp), 1e-12), 1.0, rows)


def _access_counts(hist: np.ndarray, total: int, rows: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Access counts of distinct rows, binned by `hist`, summing to `total`."""
    hist = np.asarray(hist, np.float64)
    hist = hist / hist.sum()
    low, high = _bin_bounds(total, np)
    num_rows = int(min(rows, max(1, round(total / float(mean_access_count(hist, total))))))
    bins = rng.choice(NUM_REUSE_BINS, size=num_rows, p=hist)
    log_c = rng.uniform(np.log(low[bins]), np.log(high[bins] + 1.0))
    counts = np.clip(np.floor(np.exp(log_c)), low[bins], high[bins]).astype(np.int64)
    # Hit the total exactly: trim or extend the largest counts (they sit in the widest bins,
    # so the histogram moves least), keeping every count >= 1.
    order = np.argsort(-counts, kind="stable")
    diff = total - int(counts.sum())
    i = 0
    while diff != 0:
        j = order[i % num_rows]
        step = diff if diff > 0 else -min(-diff, counts[j] - 1)
        counts[j] += step
        diff -= step
        i += 1
        if i > 4 * num_rows and diff < 0:
            raise ValueError("cannot fit the histogram into this many lookups")
    return counts


def generate_ids(spec: TableSpec, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """int32 ids [batch_size, hotness] (-1 = empty slot) matching the spec's statistics.

    The mean bag length equals the pooling factor (to 1 / batch_size); with a `reuse_hist`, the
    batch's reuse histogram matches it within sampling noise of the number of unique rows (tested:
    total variation < 0.06 once a batch touches >= 500 unique rows); without one, ids are uniform.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths_B = bag_lengths(spec.pooling_factor, spec.hotness, batch_size, rng)
    total = int(lengths_B.sum())
    ids_BxH = np.full((batch_size, spec.hotness), -1, np.int32)
    if total == 0:
        return ids_BxH
    if spec.reuse_hist is None or sum(spec.reuse_hist) <= 0:
        flat = rng.integers(0, spec.rows, total)
    else:
        counts = _access_counts(np.asarray(spec.reuse_hist), total, spec.rows, rng)
        rows = _distinct_rows(spec.rows, counts.size, rng)
        flat = rng.permutation(np.repeat(rows, counts))
    mask_BxH = np.arange(spec.hotness)[None, :] < lengths_B[:, None]
    ids_BxH[mask_BxH] = flat
    return ids_BxH


def _distinct_rows(rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct row ids in [0, rows), without materialising a permutation of a huge table."""
    if n * 4 >= rows:
        return rng.permutation(rows)[:n]
    picked = np.unique(rng.integers(0, rows, 2 * n))
    while picked.size < n:
        picked = np.unique(np.concatenate([picked, rng.integers(0, rows, n)]))
    return rng.permutation(picked)[:n]
