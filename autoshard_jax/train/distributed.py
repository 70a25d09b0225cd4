"""Host-side helpers of multi-process (multi-host) runs: this process's rows, gathered rows.

Every process of a `jax.distributed` run holds its rows of each global batch (see
`data.source.DataSource`); metrics that do not decompose (exact AUC) need every row on the host,
in the global order, which is the order a single-process run sees them in.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-split global array, in global order, on the host.

    Args:
      x: an array split (or replicated) along axis 0 (host arrays pass through).

    Returns:
      numpy [b, ...]: the rows held by this process's devices (replicas taken once).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def gather_rows(per_batch: Sequence[np.ndarray]) -> np.ndarray:
    """Every process's rows of a list of batches, flattened in global order.

    Args:
      per_batch: this process's rows of each batch, [b] each (the same b and count on every
        process: process p holds rows p*b .. (p+1)*b - 1 of every global batch).

    Returns:
      numpy [num_batches * b * process_count]: batch by batch, process by process, as a
      single-process run would list them. A collective: every process must call it.
    """
    local_NxB = np.stack([np.asarray(x).reshape(-1) for x in per_batch])
    if jax.process_count() == 1:
        return local_NxB.reshape(-1)
    all_PxNxB = np.asarray(multihost_utils.process_allgather(local_NxB))
    return all_PxNxB.transpose(1, 0, 2).reshape(-1)
