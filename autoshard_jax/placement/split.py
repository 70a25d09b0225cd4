"""Row-wise splits of the tables that set a max_device plan's slowest device.

A table-wise plan can go no lower than its costliest table alone, and on many tasks that table
sets the maximum (`search` module doc): on session 30's held-out 16-device tasks every good
plan's slowest device held one table, the same one, and the plans measured within noise of each
other. Splitting such a table row-wise over all D devices (`sharding.plan`: row r on device
r % D) leaves each device a 1/D shard that sees 1/D of the ids, the way TorchRec's planner
shards tables too large or too hot for one device and NeuroShard's beam search splits the
costliest tables (column-wise there) before placing them.

The refinement decides this explicitly and on the cost model, for max_device (`split_heavy`):
split the costliest table, rebalance the others around its shards, keep it if the predicted
maximum falls by `min_gain` within memory, and go on to the next. A plan's `device_T` marks a
split table ROW_WISE; `expand` turns such a plan into the table-wise one over shards that the
cost model and the per-device measurement (`evaluate.device_tables`) score. Communication is
outside the max_device objective for every plan alike; the spmd objective's measured step
includes it, and its searches do not split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from autoshard_jax.placement.costs import (
    Cost,
    class_onehot,
    floor_D,
    plan_costs,
    single_costs,
    table_features,
)
from autoshard_jax.placement.memory import MemoryModel
from autoshard_jax.placement.search import local_search
from autoshard_jax.tables.spec import TableSpec

ROW_WISE = -1  # device_T entry of a table split row-wise over every device


def row_wise_shard(spec: TableSpec, num_devices: int) -> TableSpec:
    """One device's shard of a row_wise table: ceil(rows / D) rows, 1/D of the ids."""
    return dataclasses.replace(spec, rows=max(1, -(-spec.rows // num_devices)),
                               pooling_factor=spec.pooling_factor / num_devices)


def _flat_devices(device_T: np.ndarray, num_devices: int) -> np.ndarray:
    """Each table's or shard's device in `expand`'s order: the whole tables, then per ROW_WISE
    table its shards 0..D-1."""
    rows = np.flatnonzero(device_T == ROW_WISE)
    return np.concatenate([device_T[device_T != ROW_WISE], np.tile(np.arange(num_devices),
                                                                   len(rows))])


def expand(specs: Sequence[TableSpec], device_T: np.ndarray, num_devices: int
           ) -> tuple[list[TableSpec], np.ndarray]:
    """The table-wise equivalent of a plan with ROW_WISE tables: each such table becomes D
    shards, shard d on device d, appended after the table-wise tables."""
    device_T = np.asarray(device_T, np.int64)
    out = [specs[t] for t in np.flatnonzero(device_T != ROW_WISE)]
    for t in np.flatnonzero(device_T == ROW_WISE):
        out += [row_wise_shard(specs[t], num_devices)] * num_devices
    return out, _flat_devices(device_T, num_devices)


def _rows_D(mem: MemoryModel, device_T: np.ndarray, num_devices: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(physical, logical) rows on each device of a plan with ROW_WISE tables."""
    flat = _flat_memory(mem, device_T, num_devices)
    flat_D = _flat_devices(device_T, num_devices)
    return (np.bincount(flat_D, flat.phys_T, num_devices),
            np.bincount(flat_D, flat.keys_T, num_devices))


def _allocated(mem: MemoryModel, device_T: np.ndarray, num_devices: int) -> float:
    phys, keys = _rows_D(mem, device_T, num_devices)
    return float(mem.allocated(phys.max(), keys.max()))


def fits(mem: MemoryModel, device_T: np.ndarray, num_devices: int) -> bool:
    """Memory legality of a plan with ROW_WISE tables (`memory` module's formula)."""
    return _allocated(mem, np.asarray(device_T, np.int64), num_devices) <= mem.budget


def make_room(mem: MemoryModel, device_T: np.ndarray, num_devices: int) -> np.ndarray | None:
    """A legal plan from one over memory, by moving whole tables off the fullest device, each
    time the move that shrinks the allocation most (None: no move shrinks it). A split adds a
    shard to every device, the fullest included, and frees its table's device: the room is
    there, on another device."""
    device_T = np.asarray(device_T, np.int64).copy()
    while not fits(mem, device_T, num_devices):
        now = _allocated(mem, device_T, num_devices)
        phys, keys = _rows_D(mem, device_T, num_devices)
        full = {int(np.argmax(phys)), int(np.argmax(keys))}
        best, best_T = now, None
        for t in np.flatnonzero(np.isin(device_T, list(full))):
            for d in range(num_devices):
                if d == device_T[t]:
                    continue
                cand = device_T.copy()
                cand[t] = d
                after = _allocated(mem, cand, num_devices)
                if after < best:
                    best, best_T = after, cand
        if best_T is None:
            return None
        device_T = best_T
    return device_T


def predicted_device_ms(specs: Sequence[TableSpec], device_T: np.ndarray, num_devices: int,
                        cost: Cost) -> np.ndarray:
    """Each device's predicted cost ([D]), floored by its costliest table or shard alone."""
    flat, flat_D = expand(specs, device_T, num_devices)
    dev_D, _ = plan_costs(cost, flat, flat_D, num_devices)
    single = single_costs(cost, table_features(flat), class_onehot(flat))
    assign = np.eye(num_devices, dtype=np.float32)[flat_D]
    return np.maximum(dev_D, np.asarray(floor_D(jnp.asarray(assign), jnp.asarray(single))))


def split_heavy(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel, cost: Cost,
                device_T: np.ndarray, min_gain: float = 0.10, max_splits: int = 8,
                max_rounds: int = 50, time_budget_s: float = 20.0) -> np.ndarray:
    """`device_T` with tables split row-wise while that lowers the predicted maximum (module
    doc). Each step splits the costliest whole table (by predicted cost alone), makes room for
    its shards where they do not fit (`make_room`), then lets the local search
    (`search.local_search`) rebalance the whole tables around the shards, which stay put: the
    split frees its table's device, and only with the others' tables moved onto it does the
    maximum fall where that table was not alone at the top. The rebalancing takes moves that
    only even out the devices too; the split as a whole must gain. It stops at the first step
    that cannot fit in memory or is not predicted to lower the maximum by `min_gain`, or when
    `time_budget_s` is spent."""
    device_T = np.asarray(device_T, np.int64).copy()
    if num_devices < 2:
        return device_T
    t0 = time.perf_counter()
    single_T = single_costs(cost, table_features(specs), class_onehot(specs))
    best = predicted_device_ms(specs, device_T, num_devices, cost).max()
    for _ in range(max_splits):
        whole = np.flatnonzero(device_T != ROW_WISE)
        left = time_budget_s - (time.perf_counter() - t0)
        if not len(whole) or left <= 0:
            break
        cand = device_T.copy()
        cand[whole[np.argmax(single_T[whole])]] = ROW_WISE
        cand = make_room(mem, cand, num_devices)
        if cand is None:
            break
        whole = np.flatnonzero(cand != ROW_WISE)
        flat, flat_D = expand(specs, cand, num_devices)
        pinned = np.arange(len(flat)) >= len(whole)  # expand puts the shards last
        flat_D = local_search(flat, num_devices, _flat_memory(mem, cand, num_devices), cost,
                              "max_device", flat_D, max_rounds=max_rounds,
                              time_budget_s=left, pinned_T=pinned)
        cand[whole] = flat_D[:len(whole)]
        value = predicted_device_ms(specs, cand, num_devices, cost).max()
        if value > best * (1 - min_gain):
            break
        device_T, best = cand, value
    return device_T


def _flat_memory(mem: MemoryModel, device_T: np.ndarray, num_devices: int) -> MemoryModel:
    """`mem` for the tables of `expand(specs, device_T, num_devices)`, in its order."""
    whole = np.flatnonzero(device_T != ROW_WISE)
    phys, keys, pack = [mem.phys_T[whole]], [mem.keys_T[whole]], [mem.pack_T[whole]]
    for t in np.flatnonzero(device_T == ROW_WISE):
        p, k = mem.row_wise_D(int(t), num_devices)
        phys.append(np.full(num_devices, p))
        keys.append(np.full(num_devices, k))
        pack.append(np.full(num_devices, mem.pack_T[t]))
    return dataclasses.replace(mem, phys_T=np.concatenate(phys), keys_T=np.concatenate(keys),
                               pack_T=np.concatenate(pack))
