"""TorchRec-style analytical cost estimator: bytes moved / bandwidth, no fusion or locality.

Follows `torchrec/distributed/planner/shard_estimators.py` (research/sharding.md §4) for a
table-wise shard at global batch B: ids read (B x pooling x 4 B, int32 here), rows read
(B x pooling x max(dim, 32) x 4 B), pooled output written (B x dim x 4 B), scaled by TorchRec's
width penalty (1.75 below dim 64, 1.15 below 128) and divided by the device bandwidth; backward
with the fused optimizer costs 2x forward. It is linear in bytes, so it misses exactly what the
learned cost model is for (fused multi-table costs, reuse); the cost work uses it as a baseline
and placement uses it until a learned model is given.

Two settings, as everywhere in the project: *max_device* (each device's own tables; the papers')
and *spmd* (one padded program: every width class is sized to its most loaded device, plus the
all_to_all exchange of ids and pooled vectors, forward and backward).

`analytical_cost_fn` has the placement `cost_fn(feats_TxF, assign_TxD, class_TxK) ->
(device_ms_D, spmd_ms)` signature of `cost/network.py`, so RL and search run on either.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.tables.spec import TableSpec

BYTES_PER_VALUE = 4
BYTES_PER_ID = 4
BWD_COMPUTE_MULTIPLIER = 2.0  # TorchRec: backward + fused optimizer = 2 x forward
MIN_READ_DIM = 32  # TorchRec: rows are read at least 32 values wide

CostFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class BoundCost:
    """A cost function fixed to one table set.

    A device's cost depends on its tables only through the sums of per-table rows (for the
    network, DeepSets sums; in general, the device's column of the assignment), so a planner
    that adds one table at a time keeps each device's sums and asks `device_ms(sums_DxR)`:
    O(D R) per step instead of a [T, D] product with every table.
    """

    cost_of: Callable  # assign_TxD -> (device_ms_D, spmd_ms)
    rows_TxR: jax.Array
    device_ms: Callable  # sums_DxR (assign_TxD.T @ rows_TxR) -> device_ms_D

    @staticmethod
    def of(cost_fn: CostFn, feats_TxF: jax.Array, class_TxK: jax.Array) -> BoundCost:
        """Any cost function: the rows are one-hot, so the sums are the assignment itself."""
        return BoundCost(lambda assign_TxD: cost_fn(feats_TxF, assign_TxD, class_TxK),
                         jnp.eye(feats_TxF.shape[0], dtype=jnp.float32),
                         lambda sums_DxT: cost_fn(feats_TxF, sums_DxT.T, class_TxK)[0])


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Bandwidths in GB/s (1e9 bytes). CPU defaults are rough; fit `device_gbps` to oracle
    measurements with `fit_device_gbps` to calibrate the estimator on a backend."""

    device_gbps: float = 10.0
    a2a_gbps: float = 5.0


DEFAULT_BANDWIDTH = Bandwidth()

def width_penalty(dim: float) -> float:
    """TorchRec's kernel penalty for narrow rows."""
    return 1.0 if dim >= 128 else 1.15 if dim >= 64 else 1.75


def table_fwd_bytes(spec: TableSpec, batch_size: int) -> float:
    """Penalised bytes the forward lookup of one table-wise table moves at global batch B."""
    lookups = batch_size * spec.pooling_factor
    moved = (lookups * BYTES_PER_ID + lookups * max(spec.dim, MIN_READ_DIM) * BYTES_PER_VALUE
             + batch_size * spec.dim * BYTES_PER_VALUE)
    return moved * width_penalty(spec.dim)


def analytical_device_ms(specs: Sequence[TableSpec], batch_size: int,
                         bandwidth: Bandwidth = DEFAULT_BANDWIDTH) -> float:
    """Forward + backward + update ms of one device's table-wise tables (papers' protocol)."""
    fwd = sum(table_fwd_bytes(s, batch_size) for s in specs)
    return (1.0 + BWD_COMPUTE_MULTIPLIER) * fwd / (bandwidth.device_gbps * 1e9) * 1e3


def analytical_plan_ms(specs: Sequence[TableSpec], device_of: Sequence[int], num_devices: int,
                       batch_size: int, bandwidth: Bandwidth = DEFAULT_BANDWIDTH
                       ) -> tuple[list[float], float]:
    """(per-device ms, SPMD ms) of a table-wise plan given as each table's device."""
    feats = _basic_feats(specs)
    assign = np.zeros((len(specs), num_devices), np.float32)
    assign[np.arange(len(specs)), np.asarray(device_of)] = 1.0
    widths = sorted({s.dim for s in specs})
    cls = np.zeros((len(specs), len(widths)), np.float32)
    cls[np.arange(len(specs)), [widths.index(s.dim) for s in specs]] = 1.0
    dev, spmd = _cost(jnp.asarray(feats), jnp.asarray(assign), jnp.asarray(cls),
                      batch_size, bandwidth)
    return [float(x) for x in dev], float(spmd)


def fit_device_gbps(specs_per_set: Sequence[Sequence[TableSpec]], measured_ms: Sequence[float],
                    batch_size: int) -> float:
    """Least-squares device bandwidth (GB/s) so that `analytical_device_ms` fits measurements
    (ms = bytes x k; k = 1 / bandwidth, fitted through the origin)."""
    moved = np.asarray([(1.0 + BWD_COMPUTE_MULTIPLIER) * sum(table_fwd_bytes(s, batch_size)
                                                             for s in group)
                        for group in specs_per_set])
    ms = np.asarray(measured_ms, float)
    k = float(moved @ ms / max(moved @ moved, 1e-30))  # ms per byte
    return 1e3 / (k * 1e9) if k > 0 else math.inf


# --- the placement cost_fn signature -------------------------------------------------------
# Raw feature columns used here (FEATURE_NAMES order: rows, dim, pooling_factor, size, bins).
_DIM, _POOL = 1, 2


def _basic_feats(specs: Sequence[TableSpec]) -> np.ndarray:
    """[T, 3] rows, dim, pooling_factor: the analytical model needs no more."""
    return np.asarray([[s.rows, s.dim, s.pooling_factor] for s in specs], np.float32)


def exchange_terms(feats_TxF: jax.Array, assign_TxD: jax.Array, class_TxK: jax.Array
                   ) -> jax.Array:
    """[2]: id positions and output columns per sample that a plan's collectives carry, padded
    as `sharding.layout` pads them (per width class the busiest device's positions, summed; the
    widest device's columns). For table-wise plans 4 B (positions + 2 columns) (D-1)/D is
    `cost.oracle.exchange_bytes`; row-wise and replicated tables count on every device."""
    dim_T, slots_T = feats_TxF[:, _DIM], jnp.maximum(1.0, jnp.ceil(feats_TxF[:, _POOL]))
    positions = jnp.einsum("td,tk,t->dk", assign_TxD, class_TxK, slots_T).max(0).sum()
    columns = jnp.maximum(1.0, (dim_T @ assign_TxD).max())
    return jnp.stack([positions, columns])


def _width_terms(dim_T):
    """(TorchRec's width penalty, bytes read per id) per table, as `table_fwd_bytes`."""
    pen_T = jnp.where(dim_T >= 128, 1.0, jnp.where(dim_T >= 64, 1.15, 1.75))
    return pen_T, jnp.maximum(dim_T, MIN_READ_DIM) * BYTES_PER_VALUE


def _ms_per_byte(bw: Bandwidth) -> float:
    return (1.0 + BWD_COMPUTE_MULTIPLIER) / (bw.device_gbps * 1e9) * 1e3


def _table_ms(feats_TxF, batch_size: int, bw: Bandwidth):
    """[T] each table's own device ms: the papers' cost is linear in a device's bytes."""
    dim_T, pool_T = feats_TxF[:, _DIM], feats_TxF[:, _POOL]
    pen_T, read_T = _width_terms(dim_T)
    fwd_T = batch_size * (pool_T * (BYTES_PER_ID + read_T) + dim_T * BYTES_PER_VALUE) * pen_T
    return fwd_T * _ms_per_byte(bw)


def _cost(feats_TxF, assign_TxD, class_TxK, batch_size: int, bw: Bandwidth):
    dim_T, pool_T = feats_TxF[:, _DIM], feats_TxF[:, _POOL]
    pen_T, read_T = _width_terms(dim_T)
    # Papers' setting: linear in each device's own bytes.
    device_ms_D = _table_ms(feats_TxF, batch_size, bw) @ assign_TxD
    # SPMD: every device runs each width class padded to its busiest device (static hotness
    # slots, the class's width and penalty) plus the widest output, then the exchange.
    slots_T = jnp.ceil(pool_T)
    slots_KxD = (class_TxK * slots_T[:, None]).T @ assign_TxD
    per_slot_K = jnp.max(jnp.where(class_TxK > 0, ((BYTES_PER_ID + read_T) * pen_T)[:, None],
                                   0.0), axis=0)
    cols_D = dim_T @ assign_TxD
    program = batch_size * (jnp.sum(jnp.max(slots_KxD, axis=1) * per_slot_K)
                            + jnp.max(cols_D) * BYTES_PER_VALUE * 1.75)
    d = assign_TxD.shape[1]
    frac = (d - 1) / d
    positions, columns = exchange_terms(feats_TxF, assign_TxD, class_TxK)
    exchange = batch_size * frac * (positions * BYTES_PER_ID + 2.0 * columns * BYTES_PER_VALUE)
    spmd_ms = program * _ms_per_byte(bw) + exchange / (bw.a2a_gbps * 1e9) * 1e3
    return device_ms_D, spmd_ms


@functools.lru_cache(maxsize=32)
def analytical_cost_fn(batch_size: int, bandwidth: Bandwidth = DEFAULT_BANDWIDTH) -> CostFn:
    """`cost_fn(feats_TxF, assign_TxD, class_TxK) -> (device_ms_D, spmd_ms)`, pure and jittable.

    feats are raw `table_features` (rows, dim, pooling_factor, ...); a zero row of assign_TxD is a
    table not yet placed; class_TxK is each table's one-hot width class. Memoised: the same
    settings give the same function, so jitted callers compile once per process.
    """

    def cost_fn(feats_TxF, assign_TxD, class_TxK):
        return _cost(feats_TxF, assign_TxD, class_TxK, batch_size, bandwidth)

    def bind(feats_TxF, class_TxK) -> BoundCost:
        """A device's ms is the sum of its tables' own ms: one row per table (see BoundCost)."""
        ms_Tx1 = _table_ms(feats_TxF, batch_size, bandwidth)[:, None]
        return BoundCost(lambda assign_TxD: cost_fn(feats_TxF, assign_TxD, class_TxK),
                         ms_Tx1, lambda sums_DxR: sums_DxR[:, 0])

    cost_fn.bind = bind
    return cost_fn
