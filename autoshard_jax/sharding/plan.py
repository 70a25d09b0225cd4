"""The versioned sharding plan (`plan.json`) and its validation against table specs.

A plan says where every table lives: on one device (table_wise), split by rows over all devices
(row_wise: row r on device r % D) or copied to every device (replicated). Placement code returns
plans, execution consumes them; validation runs before any buffer is allocated, so a plan that
cannot fit is refused with the device and the number of bytes it is over.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from autoshard_jax.optim.sparse import RowOptimizer, StateKinds, state_kinds
from autoshard_jax.sharding import layout as layout_lib
from autoshard_jax.sharding.layout import PlanError
from autoshard_jax.tables.spec import TableSpec, load_versioned_json

PLAN_VERSION = 1
PLACEMENT_TYPES = ("table_wise", "row_wise", "replicated")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Placement of every table on a mesh of `num_devices` devices.

    Attributes:
      num_devices: D, the size of the mesh's single axis "d".
      memory_bytes_per_device: budget M for tables + optimizer state on each device.
      placements: {table: {"type": "table_wise", "device": d} | {"type": "row_wise"} |
        {"type": "replicated"}}.
      meta: free-form provenance (placer, seed, predicted cost, ...), kept in the JSON.
    """

    num_devices: int
    memory_bytes_per_device: int
    placements: Mapping[str, Mapping[str, Any]]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not _is_int(self.num_devices) or self.num_devices < 1:
            raise PlanError(f"'num_devices' must be a positive integer, got {self.num_devices!r}")
        m = self.memory_bytes_per_device
        if not _is_int(m) or m < 1:
            raise PlanError(f"'memory_bytes_per_device' must be a positive integer, got {m!r}")
        if not isinstance(self.placements, Mapping):
            raise PlanError("'placements' must be an object {table: placement}")
        if not isinstance(self.meta, Mapping):
            raise PlanError("'meta' must be an object")
        for name, p in self.placements.items():
            _check_placement(name, p, self.num_devices)
        object.__setattr__(self, "placements",
                           {k: dict(v) for k, v in self.placements.items()})
        object.__setattr__(self, "meta", dict(self.meta))

    def to_json(self) -> dict:
        """The plan.json object (with "version")."""
        return {"version": PLAN_VERSION, "num_devices": self.num_devices,
                "memory_bytes_per_device": self.memory_bytes_per_device,
                "placements": {k: dict(v) for k, v in self.placements.items()},
                "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, d: Any) -> ShardingPlan:
        """A plan from a plan.json object; raises PlanError naming a bad or unknown field."""
        if not isinstance(d, dict):
            raise PlanError("plan.json must hold a JSON object")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan 'version' must be {PLAN_VERSION}, got {d.get('version')!r}")
        for key in ("num_devices", "memory_bytes_per_device", "placements"):
            if key not in d:
                raise PlanError(f"plan is missing required field {key!r}")
        unknown = set(d) - {"version", "num_devices", "memory_bytes_per_device", "placements",
                            "meta"}
        if unknown:
            raise PlanError(f"plan has unknown fields {sorted(unknown)}")
        return cls(d["num_devices"], d["memory_bytes_per_device"], d["placements"],
                   d.get("meta", {}))

    def validate(self, specs: Sequence[TableSpec], row_optimizer: RowOptimizer | str = "sgd",
                 num_devices: int | None = None) -> layout_lib.Layout:
        """Checks the plan against the tables, device count and memory; returns its layout.

        Memory counted is what execution allocates on each device: the packed slab and optimizer
        state padded to the largest device (see `Layout.allocated_bytes`), not just real bytes.

        Args:
          specs: the tables; every one must be placed, and only they.
          row_optimizer: the optimizer (or its name), for its state's bytes.
          num_devices: the mesh's size, if known; must equal the plan's.

        Returns:
          The plan's Layout.

        Raises:
          PlanError: naming the table, device or field at fault.
        """
        if num_devices is not None and num_devices != self.num_devices:
            raise PlanError(f"plan is for {self.num_devices} devices, the mesh has {num_devices}")
        names = [s.name for s in specs]
        known = set(names)
        unknown = sorted(set(self.placements) - known)
        if unknown:
            raise PlanError(f"plan places unknown tables {unknown}")
        missing = [n for n in names if n not in self.placements]
        if missing:
            raise PlanError(f"plan does not place tables {missing}")
        if len(known) != len(names):
            raise PlanError("table specs have duplicate names")
        layout = layout_lib.build_layout(specs, self.placements, self.num_devices)
        check_memory(layout, self.memory_bytes_per_device, state_kinds(row_optimizer))
        return layout


def _check_placement(name: Any, p: Any, num_devices: int) -> None:
    if not isinstance(name, str) or not name:
        raise PlanError(f"placement keys must be table names, got {name!r}")
    where = f"table {name!r}"
    if not isinstance(p, Mapping):
        raise PlanError(f"{where}: placement must be an object, got {p!r}")
    kind = p.get("type")
    if kind not in PLACEMENT_TYPES:
        raise PlanError(f"{where}: unknown placement type {kind!r}; "
                        f"choose from {list(PLACEMENT_TYPES)}")
    allowed = {"type", "device"} if kind == "table_wise" else {"type"}
    extra = set(p) - allowed
    if extra:
        raise PlanError(f"{where}: {kind} placement has unknown fields {sorted(extra)}")
    if kind == "table_wise":
        if "device" not in p:
            raise PlanError(f"{where}: table_wise placement needs a 'device'")
        dev = p["device"]
        if not _is_int(dev):
            raise PlanError(f"{where}: 'device' must be an integer, got {dev!r}")
        if not 0 <= dev < num_devices:
            raise PlanError(f"{where}: device {dev} is out of range for {num_devices} devices")


def check_memory(layout: layout_lib.Layout, budget: int, kinds: StateKinds) -> None:
    """Refuses a layout whose per-device allocation exceeds the budget.

    Args:
      layout: a plan's layout.
      budget: memory_bytes_per_device.
      kinds: the optimizer's state kinds.

    Raises:
      PlanError: naming the fullest device, its tables and the bytes over.
    """
    allocated = layout.allocated_bytes(kinds)
    if allocated <= budget:
        return
    used, real = layout.used_bytes(kinds), layout.real_bytes(kinds)
    dev = max(range(layout.num_devices), key=lambda d: (used[d], real[d]))
    tables = [layout.specs[p.table].name for p in layout.placed[dev]]
    raise PlanError(
        f"device {dev} exceeds memory_bytes_per_device={budget} by {allocated - budget} bytes: "
        f"every device allocates {allocated} bytes (tables + optimizer state, packed and padded "
        f"to the largest device; device {dev} holds {real[dev]} real bytes of tables {tables})")


def plan_from_mapping(mapping: Mapping[str, int | str], num_devices: int,
                      memory_bytes_per_device: int, meta: Mapping[str, Any] | None = None,
                      ) -> ShardingPlan:
    """A plan from a compact mapping.

    Args:
      mapping: {table: device} (table_wise) or {table: "row_wise" | "replicated"}.
      num_devices: D.
      memory_bytes_per_device: the budget M.
      meta: provenance kept in the JSON.

    Returns:
      The ShardingPlan (structurally checked; `validate` it against the tables).
    """
    placements = {}
    for name, where in mapping.items():
        if isinstance(where, str):
            placements[name] = {"type": where}
        else:
            placements[name] = {"type": "table_wise", "device": where}
    return ShardingPlan(num_devices, memory_bytes_per_device, placements, meta or {})


def save_plan(path: str | os.PathLike, plan: ShardingPlan) -> None:
    """Writes plan.json."""
    with open(path, "w") as f:
        json.dump(plan.to_json(), f, indent=1)


def load_plan(path: str | os.PathLike) -> ShardingPlan:
    """Reads and structurally checks plan.json; call `validate` with the table specs next."""
    return load_versioned_json(path, "plan", ShardingPlan.from_json, PlanError)
