"""Per-table features: the 21 numbers every cost model and placement policy sees of a table.

The feature set of AutoShard / DreamShard (rows, dim, pooling factor, size, 17 reuse bins), kept
raw here; models normalise them (log scales, z-scores) with statistics stored beside their weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoshard_jax.tables.spec import NUM_REUSE_BINS, TableSpec

FEATURE_NAMES = ("rows", "dim", "pooling_factor", "size_gb",
                 *(f"bin_{i}" for i in range(NUM_REUSE_BINS)))
NUM_FEATURES = len(FEATURE_NAMES)
# Without a measured reuse histogram a table is assumed to have no reuse (every row seen once).
NO_REUSE_HIST = (1.0,) + (0.0,) * (NUM_REUSE_BINS - 1)


def table_features(specs: Sequence[TableSpec]) -> np.ndarray:
    """Raw features [T, 21] float32: rows, dim, pooling factor, fp32 GB, reuse bins."""
    out = np.zeros((len(specs), NUM_FEATURES), np.float32)
    for t, s in enumerate(specs):
        hist = s.reuse_hist if s.reuse_hist is not None else NO_REUSE_HIST
        out[t, :4] = (s.rows, s.dim, s.pooling_factor, s.param_bytes() / 2**30)
        out[t, 4:] = hist
    return out
