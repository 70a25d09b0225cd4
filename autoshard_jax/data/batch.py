"""The batch contract shared by every data source and every consumer.

A batch is a dict of host numpy arrays:
  "dense": float32 [B, Q] (Q = num_dense), already log1p-transformed non-negative counts;
  "ids":   tuple of int32 [B, H_t], one per table in spec order, H_t = spec.hotness;
           -1 marks an empty (padded) slot, every real id is in [0, rows_t);
  "label": float32 [B] holding 0.0 / 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from autoshard_jax.errors import InputError
from autoshard_jax.tables.spec import TableSpec

Batch = dict[str, Any]


def check_ids(ids: Sequence[np.ndarray], tables: Sequence[TableSpec]) -> None:
    """Refuses ids outside [-1, rows): the one id check between the data and the tables.

    Data sources run it once per batch (`DataSource`), so the step never sees a bad id; the
    stages' gathers would otherwise clip or drop one silently.

    Args:
      ids: per table, an integer [B, H] array.
      tables: the table specs, in feature order.

    Raises:
      InputError: naming the feature (0-based index), the table and the offending value.
    """
    if len(ids) != len(tables):
        raise InputError(f"batch has ids for {len(ids)} features, the model has {len(tables)} "
                         "tables")
    for t, (spec, ids_BxH) in enumerate(zip(tables, ids, strict=True)):
        if ids_BxH.size == 0:
            continue
        lo, hi = int(ids_BxH.min()), int(ids_BxH.max())
        if lo < -1 or hi >= spec.rows:
            bad = lo if lo < -1 else hi
            raise InputError(f"feature {t} (table {spec.name!r}, {spec.rows} rows): id {bad} is "
                             f"out of range [-1, {spec.rows}); ids are never clipped, fix the "
                             "data or the table sizes")


def check_batch(batch: Batch, tables: Sequence[TableSpec], num_dense: int | None = None) -> None:
    """Raise ValueError naming the first violation of the batch contract (cheap; for tests)."""
    for key in ("dense", "ids", "label"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}")
    dense_BxQ, label_B, ids = batch["dense"], batch["label"], batch["ids"]
    if dense_BxQ.dtype != np.float32 or dense_BxQ.ndim != 2:
        raise ValueError(f"'dense' must be float32 [B, Q], got {dense_BxQ.dtype} {dense_BxQ.shape}")
    b = dense_BxQ.shape[0]
    if num_dense is not None and dense_BxQ.shape[1] != num_dense:
        raise ValueError(f"'dense' has {dense_BxQ.shape[1]} features, expected {num_dense}")
    if not np.all(np.isfinite(dense_BxQ)) or np.any(dense_BxQ < 0):
        raise ValueError("'dense' must be finite and non-negative (log1p of counts)")
    if label_B.dtype != np.float32 or label_B.shape != (b,):
        raise ValueError(f"'label' must be float32 [{b}], got {label_B.dtype} {label_B.shape}")
    if not np.all((label_B == 0) | (label_B == 1)):
        raise ValueError("'label' must hold only 0.0 and 1.0")
    if not isinstance(ids, tuple) or len(ids) != len(tables):
        raise ValueError(f"'ids' must be a tuple of {len(tables)} arrays")
    for spec, ids_BxH in zip(tables, ids, strict=True):
        if ids_BxH.dtype != np.int32 or ids_BxH.shape != (b, spec.hotness):
            raise ValueError(f"ids of table {spec.name!r} must be int32 [{b}, {spec.hotness}], "
                             f"got {ids_BxH.dtype} {ids_BxH.shape}")
    check_ids(ids, tables)
