"""Exact per-device memory legality of table-wise placements, as `ShardingPlan.validate` counts it.

Execution allocates one [R, W] slab per device (W = widest table), R = 1 spare row + the busiest
device's packed rows, plus optimizer state per value ("element") or per logical row ("row"). So a
table's cost is its packed physical rows, and a placement is legal while
`(1 + max_d phys_d) * W * 4 * (1 + elem) + max(1, max_d keys_d) * 4 * row <= budget`. Placers track
phys_d / keys_d and ask `fits` before placing, so every plan they return validates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from autoshard_jax.errors import InputError
from autoshard_jax.optim.sparse import BYTES_PER_VALUE, ELEMENT, ROW, state_kinds
from autoshard_jax.sharding.layout import padded_width
from autoshard_jax.tables.spec import TableSpec


class PlacementError(InputError):
    """No legal placement: the message names the table that does not fit."""


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Packed rows of every table and the byte formula of one device's allocation."""

    budget: int
    width: int
    phys_T: np.ndarray  # int64 physical rows of each table (row packed)
    keys_T: np.ndarray  # int64 logical rows
    pack_T: np.ndarray  # int64 logical rows per physical row
    bytes_per_phys: int  # W x 4 x (1 + element-state leaves)
    bytes_per_key: int  # 4 x row-state leaves

    def allocated(self, phys_max, keys_max):
        return (1 + phys_max) * self.bytes_per_phys + np.maximum(1, keys_max) * self.bytes_per_key

    def table_bytes(self, t: int) -> int:
        return int(self.phys_T[t] * self.bytes_per_phys + self.keys_T[t] * self.bytes_per_key)

    def fits_D(self, t: int, phys_D: np.ndarray, keys_D: np.ndarray) -> np.ndarray:
        """Which devices can take table t given the packed rows already on each device."""
        phys = np.maximum(phys_D.max(), phys_D + self.phys_T[t])
        keys = np.maximum(keys_D.max(), keys_D + self.keys_T[t])
        return self.allocated(phys, keys) <= self.budget

    def row_wise_D(self, t: int, num_devices: int) -> tuple[int, int]:
        """(physical, logical) rows a row_wise table t puts on each device (its 1/D shard)."""
        local = -(-int(self.keys_T[t]) // num_devices)
        return -(-local // int(self.pack_T[t])), local

    def does_not_fit(self, specs: Sequence[TableSpec], t: int, num_devices: int
                     ) -> PlacementError:
        return PlacementError(
            f"table {specs[t].name!r} ({self.table_bytes(t)} bytes packed, with optimizer state) "
            f"does not fit on any of the {num_devices} devices with memory_bytes_per_device="
            f"{self.budget}: raise the memory or the device count")


def memory_model(specs: Sequence[TableSpec], budget: int, row_optimizer: str = "sgd"
                 ) -> MemoryModel:
    kinds = state_kinds(row_optimizer)
    n_elem = sum(k == ELEMENT for k in kinds.values())
    n_row = sum(k == ROW for k in kinds.values())
    width = max(s.dim for s in specs)
    pack_T = np.asarray([width // padded_width(s.dim, width) for s in specs], np.int64)
    keys_T = np.asarray([s.rows for s in specs], np.int64)
    phys_T = -(-keys_T // pack_T)
    return MemoryModel(int(budget), width, phys_T, keys_T, pack_T,
                       width * BYTES_PER_VALUE * (1 + n_elem), BYTES_PER_VALUE * n_row)
