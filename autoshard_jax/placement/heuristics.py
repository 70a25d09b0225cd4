"""Heuristic placers: random, the papers' greedy family, TorchRec-style greedy, SPMD greedy.

All return each table's device (table-wise only: none of them decides on row_wise or replicated)
and respect memory exactly (`memory.MemoryModel`), or raise `PlacementError` naming the table.
The greedy family is the LPT rule of the AutoShard/DreamShard/NeuroShard `sharders.py`: tables by
descending key (ties: larger size, then lower index) onto the device with the smallest key sum
that still fits (ties: smaller size sum, then lower index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autoshard_jax.cost.analytical import DEFAULT_BANDWIDTH, Bandwidth, analytical_device_ms
from autoshard_jax.placement.memory import MemoryModel
from autoshard_jax.tables.spec import TableSpec

GREEDY_KEYS = ("dim_greedy", "size_greedy", "lookup_greedy", "size_lookup_greedy")
HEURISTICS = ("random",) + GREEDY_KEYS + ("torchrec_greedy", "spmd_greedy")


def greedy_key(specs: Sequence[TableSpec], method: str) -> np.ndarray:
    """The papers' cost keys: dim, size, dim x pooling, dim x pooling x log10(rows)."""
    dim = np.asarray([s.dim for s in specs], float)
    pool = np.asarray([s.pooling_factor for s in specs], float)
    rows = np.asarray([s.rows for s in specs], float)
    if method == "dim_greedy":
        return dim
    if method == "size_greedy":
        return rows * dim * 4 / 2**30
    if method == "lookup_greedy":
        return dim * pool
    if method == "size_lookup_greedy":
        return dim * pool * np.log10(np.maximum(rows, 1.0))
    raise ValueError(f"unknown greedy key {method!r}")


class _State:
    """Running per-device memory (packed rows) of a placement under construction."""

    def __init__(self, specs, num_devices: int, mem: MemoryModel):
        self.specs, self.mem = specs, mem
        self.phys_D = np.zeros(num_devices, np.int64)
        self.keys_D = np.zeros(num_devices, np.int64)
        self.device_T = np.full(len(specs), -1, np.int64)

    def fits_D(self, t: int) -> np.ndarray:
        fits = self.mem.fits_D(t, self.phys_D, self.keys_D)
        if not fits.any():
            raise self.mem.does_not_fit(self.specs, t, len(self.phys_D))
        return fits

    def place(self, t: int, d: int) -> None:
        self.device_T[t] = d
        self.phys_D[d] += self.mem.phys_T[t]
        self.keys_D[d] += self.mem.keys_T[t]


def _size_T(specs) -> np.ndarray:
    return np.asarray([s.rows * s.dim for s in specs], float)


def lpt(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel, key_T: np.ndarray,
        order_T: np.ndarray | None = None) -> np.ndarray:
    """Greedy LPT: tables by descending key onto the least-loaded (key sum) device that fits."""
    size_T = _size_T(specs)
    if order_T is None:
        order_T = sorted(range(len(specs)), key=lambda t: (-key_T[t], -size_T[t], t))
    st = _State(specs, num_devices, mem)
    load_D = np.zeros(num_devices)
    size_D = np.zeros(num_devices)
    for t in order_T:
        fits = st.fits_D(t)
        d = min(np.flatnonzero(fits), key=lambda d: (load_D[d], size_D[d], d))
        st.place(t, int(d))
        load_D[d] += key_T[t]
        size_D[d] += size_T[t]
    return st.device_T


def random_placement(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel,
                     seed: int = 0) -> np.ndarray:
    """Each table on a uniformly random device among those it fits on (largest first, so a
    random plan rarely dead-ends where a legal one exists)."""
    rng = np.random.default_rng(seed)
    st = _State(specs, num_devices, mem)
    for t in np.argsort(-mem.phys_T, kind="stable"):
        st.place(int(t), int(rng.choice(np.flatnonzero(st.fits_D(int(t))))))
    return st.device_T


def torchrec_greedy(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel,
                    batch_size: int, bandwidth: Bandwidth = DEFAULT_BANDWIDTH) -> np.ndarray:
    """TorchRec's GreedyPerfPartitioner on the analytical estimator: shards by descending
    storage (its default SortBy.STORAGE) onto the rank with the lowest perf total that fits
    (min-heap on (perf, rank))."""
    perf_T = np.asarray([analytical_device_ms([s], batch_size, bandwidth) for s in specs])
    storage_T = np.asarray([mem.table_bytes(t) for t in range(len(specs))], float)
    order = sorted(range(len(specs)), key=lambda t: (-storage_T[t], t))
    st = _State(specs, num_devices, mem)
    perf_D = np.zeros(num_devices)
    for t in order:
        d = min(np.flatnonzero(st.fits_D(t)), key=lambda d: (perf_D[d], d))
        st.place(t, int(d))
        perf_D[d] += perf_T[t]
    return st.device_T


def spmd_greedy(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel,
                class_T: np.ndarray) -> np.ndarray:
    """Balances each width class's lookup work (id slots x packed width) across devices.

    The SPMD program sizes every class to its busiest device, so each class is its own LPT
    problem: tables by descending work onto the device with the least work *in that class*
    (ties: least total work, then fewest bytes, then lower index).
    """
    work_T = np.asarray([math.ceil(s.pooling_factor) * s.dim for s in specs], float)
    size_T = _size_T(specs)
    order = sorted(range(len(specs)), key=lambda t: (-work_T[t], -size_T[t], t))
    st = _State(specs, num_devices, mem)
    k = int(class_T.max()) + 1
    class_KxD = np.zeros((k, num_devices))
    total_D = np.zeros(num_devices)
    size_D = np.zeros(num_devices)
    for t in order:
        c = class_T[t]
        d = min(np.flatnonzero(st.fits_D(t)),
                key=lambda d: (class_KxD[c, d], total_D[d], size_D[d], d))
        st.place(t, int(d))
        class_KxD[c, d] += work_T[t]
        total_D[d] += work_T[t]
        size_D[d] += size_T[t]
    return st.device_T
