"""Helpers shared by the test modules (imported as `helpers`; conftest puts tests/ on the path)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoshard_jax.tables.spec import TableSpec


def random_batches(specs: Sequence[TableSpec], n: int, batch: int, dense_dim: int,
                   seed: int = 0, pad: float = 0.25) -> list[dict]:
    """Host batches with Zipf-skewed ids, `pad` of the slots -1, duplicates within bags and
    across the batch (sample 0 is one id repeated), and an empty last bag."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = []
        for s in specs:
            ids_BxH = np.minimum(rng.zipf(1.3, (batch, s.hotness)) - 1, s.rows - 1)
            ids_BxH = ids_BxH.astype(np.int32)
            ids_BxH[rng.random(ids_BxH.shape) < pad] = -1
            ids_BxH[0, :] = s.rows - 1
            ids_BxH[-1, :] = -1
            ids.append(ids_BxH)
        out.append({"dense": rng.normal(size=(batch, dense_dim)).astype(np.float32),
                    "ids": tuple(ids),
                    "label": rng.integers(0, 2, batch).astype(np.float32)})
    return out


def override(config, overrides: dict):
    """Sets dotted keys ("data.zipf_a") of an ml_collections config in place; returns it."""
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config
