"""Static per-device layout of a sharding plan: packed slabs, id positions and output columns.

SPMD needs one equally shaped buffer per device, so every device holds one `[R, W]` slab (W = the
widest table). Narrow tables are *row packed*: a width-w table is padded to w' (the smallest
divisor of W that is >= w) and stored as k = W / w' logical rows per physical row, so a plan costs
about its real bytes instead of (largest table) x (devices). Each device's slab is ordered
row-wise shards, replicated tables, then its table-wise tables; the first two have the same offsets
on every device.

Lookups are described per device by *positions*: each table owns `hotness` consecutive id positions
per sample and one pooled *slot* whose first `dim` columns are copied to the device's output
columns; positions and slots are grouped by packed width (lookup_meta.py), so an id reads only
its table's w' values, never the whole W. Two position groups exist: "sh" (row-wise +
table-wise, fed by the ids all_to_all, full batch) and "rep" (replicated tables, local batch).
"all" is both, used by the update. Everything here is numpy and built once per plan, so shapes
are static and one plan compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from autoshard_jax.errors import InputError
from autoshard_jax.optim.sparse import BYTES_PER_VALUE, ELEMENT, StateKinds
from autoshard_jax.sharding.lookup_meta import GroupMeta, concat_meta, group_meta
from autoshard_jax.tables.spec import TableSpec


class PlanError(InputError):
    """A plan that cannot run; the message names the table, device or field at fault."""


def padded_width(dim: int, width: int) -> int:
    """The packed width of a table: the smallest divisor of `width` that is >= dim.

    Args:
      dim: the table's width.
      width: the slab width W.

    Returns:
      w', which divides W, so W / w' logical rows share a physical row.
    """
    for w in range(dim, width + 1):
        if width % w == 0:
            return w
    raise ValueError(f"table dim {dim} exceeds the slab width {width}")


@dataclasses.dataclass(frozen=True)
class Placed:
    """One table's copy or shard on one device."""

    table: int  # index into the specs
    device: int
    kind: str  # "table_wise" | "row_wise" | "replicated"
    local_rows: int  # logical rows allocated on this device
    pack: int  # logical rows per physical row
    wpad: int  # packed width (divides W)
    row_off: int  # first physical row in the slab
    key_off: int  # first logical row (row-state index, dedup key)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything static about executing a plan: slab shape, table locations, lookup metadata."""

    specs: tuple[TableSpec, ...]
    kinds: tuple[str, ...]  # placement type per table
    devices: tuple[int | None, ...]  # owner of each table-wise table, else None
    num_devices: int
    width: int  # W
    phys_rows: int  # R, physical rows per device slab
    keys: int  # A, logical rows per device (row-state length)
    placed: tuple[tuple[Placed, ...], ...]  # per device
    sh: GroupMeta
    rep: GroupMeta
    all: GroupMeta

    def where(self, table: int, device: int) -> Placed | None:
        for p in self.placed[device]:
            if p.table == table:
                return p
        return None

    # --- memory --------------------------------------------------------------------------
    def real_bytes(self, state: StateKinds) -> list[int]:
        """Per device: bytes of the table values and optimizer state it must hold, unpadded.

        Args:
          state: the optimizer's state kinds (`optim.sparse.state_kinds`); {} for params only.

        Returns:
          [D] byte counts.
        """
        out = []
        for d in range(self.num_devices):
            total = 0
            for p in self.placed[d]:
                s = self.specs[p.table]
                rows = _rows_on(s.rows, p, self.num_devices)
                total += rows * s.dim * BYTES_PER_VALUE
                for kind in state.values():
                    total += rows * (s.dim if kind == ELEMENT else 1) * BYTES_PER_VALUE
            out.append(total)
        return out

    def used_bytes(self, state: StateKinds) -> list[int]:
        """Per device: packed bytes its own tables occupy (padding inside its slab included).

        Args:
          state: the optimizer's state kinds; {} for params only.

        Returns:
          [D] byte counts.
        """
        out = []
        for d in range(self.num_devices):
            phys = sum(-(-p.local_rows // p.pack) for p in self.placed[d])
            keys = sum(p.local_rows for p in self.placed[d])
            total = phys * self.width * BYTES_PER_VALUE
            for kind in state.values():
                total += (phys * self.width if kind == ELEMENT else keys) * BYTES_PER_VALUE
            out.append(total)
        return out

    def allocated_bytes(self, state: StateKinds) -> int:
        """Bytes every device allocates: the slab and state padded to the largest device.

        Args:
          state: the optimizer's state kinds; {} for params only.

        Returns:
          Bytes per device (the same on every device under SPMD).
        """
        total = self.phys_rows * self.width * BYTES_PER_VALUE
        for kind in state.values():
            total += (self.phys_rows * self.width if kind == ELEMENT else self.keys) \
                * BYTES_PER_VALUE
        return total

    def padding_overhead(self, state: StateKinds | None = None) -> float:
        """Allocated bytes over all devices / real bytes (1.0 = no padding).

        Replicas count as real: each device needs its copy.

        Args:
          state: the optimizer's state kinds; None for params only.

        Returns:
          The ratio, >= 1.
        """
        state = state or {}
        return self.allocated_bytes(state) * self.num_devices / max(1, sum(self.real_bytes(state)))

    # --- host-side data movement ----------------------------------------------------------
    def pack_device(self, tables: Mapping[str, np.ndarray], device: int,
                    per_row: bool = False) -> np.ndarray:
        """One device's packed slab (or row state) from per-table host arrays.

        Args:
          tables: {name: [rows, dim]} (or {name: [rows]} with per_row).
          device: the device index d.
          per_row: pack ROW state ([A]) instead of a slab or ELEMENT state ([R, W]).

        Returns:
          float32 [R, W], or [A] with per_row.
        """
        if per_row:
            out = np.zeros((self.keys,), np.float32)
        else:
            out = np.zeros((self.phys_rows, self.width), np.float32)
        for p in self.placed[device]:
            s = self.specs[p.table]
            local = _local_rows_of(np.asarray(tables[s.name], np.float32), p, self.num_devices)
            if per_row:
                out[p.key_off:p.key_off + local.shape[0]] = local
                continue
            n_phys = -(-p.local_rows // p.pack)
            buf = np.zeros((n_phys * p.pack, p.wpad), np.float32)
            buf[:local.shape[0], :s.dim] = local
            out[p.row_off:p.row_off + n_phys] = buf.reshape(n_phys, self.width)
        return out

    def unpack(self, stacked: np.ndarray, per_row: bool = False,
               replica_device: int = 0) -> dict[str, np.ndarray]:
        """Per-table host arrays from every device's slab (or row state); `pack_device` inverted.

        Args:
          stacked: [D, R, W] slabs (or [D, A] row state with per_row).
          per_row: unpack ROW state.
          replica_device: the device whose copy of replicated tables is returned.

        Returns:
          {name: [rows, dim]} (or {name: [rows]}).
        """
        out = {}
        for t, s in enumerate(self.specs):
            full = np.zeros((s.rows,) if per_row else (s.rows, s.dim), np.float32)
            for d in range(self.num_devices):
                p = self.where(t, d)
                if p is None or (p.kind == "replicated" and d != replica_device):
                    continue
                n = _rows_on(s.rows, p, self.num_devices)
                if per_row:
                    local = stacked[d, p.key_off:p.key_off + n]
                else:
                    n_phys = -(-p.local_rows // p.pack)
                    block = stacked[d, p.row_off:p.row_off + n_phys]
                    local = block.reshape(n_phys * p.pack, p.wpad)[:n, :s.dim]
                if p.kind == "row_wise":
                    full[d::self.num_devices] = local
                else:
                    full[:] = local
            out[s.name] = full
        return out

    def route_ids(self, ids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Host preprocessing: each device's ids in its local row numbering.

        ids_BxDxL[:, d] holds every id that device d looks up for the whole batch: its
        table-wise tables' ids, and for row-wise tables the ids it owns (row r lives on device
        r % D as local row r // D), -1 elsewhere.

        Args:
          ids: per table, int32 [B, hotness] ids with -1 padding.

        Returns:
          (ids_BxDxL of group "sh", sent by the all_to_all; ids_BxLr of group "rep").
        """
        b = ids[0].shape[0]
        send = np.full((b, self.num_devices, self.sh.num_positions), -1, np.int32)
        rep = np.full((b, self.rep.num_positions), -1, np.int32)
        for d in range(self.num_devices):
            for p in self.placed[d]:
                ids_BxH = ids[p.table]
                h = ids_BxH.shape[1]
                if p.kind == "replicated":
                    if d == 0:
                        at = self.rep.pos[0, p.table]
                        rep[:, at:at + h] = ids_BxH
                    continue
                at = self.sh.pos[d, p.table]
                if p.kind == "row_wise":
                    mine = (ids_BxH >= 0) & (ids_BxH % self.num_devices == d)
                    ids_BxH = np.where(mine, ids_BxH // self.num_devices, -1)
                send[:, d, at:at + h] = ids_BxH
        return send, rep

    def device_inputs(self, ids: Sequence[np.ndarray], g_pooled: Sequence[np.ndarray],
                      device: int) -> tuple[np.ndarray, np.ndarray]:
        """What `device` sees in the update for a full batch, so its step can run alone.

        These are exactly the inputs the all_to_all / all_gather deliver in sharded training
        (cost oracle, tests).

        Args:
          ids: per table, int32 [B, hotness] ids with -1 padding.
          g_pooled: per table, float32 [B, dim] gradients of the pooled vectors.
          device: the device index d.

        Returns:
          (ids_BxL, g_BxO) of group "all" for device d.
        """
        send, rep = self.route_ids(ids)
        b = send.shape[0]
        g_BxO = np.zeros((b, self.all.num_cols), np.float32)
        for (d, t), c in self.all.col.items():
            if d == device:
                g_BxO[:, c:c + self.specs[t].dim] = g_pooled[t]
        return np.concatenate([send[:, device], rep], axis=1), g_BxO


def _rows_on(rows: int, p: Placed, num_devices: int) -> int:
    """Logical rows of a table that actually live on p.device."""
    if p.kind == "row_wise":
        return len(range(p.device, rows, num_devices))
    return rows


def _local_rows_of(table: np.ndarray, p: Placed, num_devices: int) -> np.ndarray:
    return table[p.device::num_devices] if p.kind == "row_wise" else table


def _check_int32_indexing(phys_rows: int, width: int, keys: int, members) -> None:
    """Ids, row keys and chunk numbers are int32 on device; refuse layouts beyond that.

    The narrowest packed width c addresses the slab as [R * W / c, c] rows, so a device slab of
    2**31 * c values or more (8 GiB of fp32 for c = 1) would index past int32.
    """
    min_wpad = min((p.wpad for m in members for p in m), default=width)
    if phys_rows * (width // min_wpad) >= 2**31 - 1 or keys >= 2**31 - 1:
        raise PlanError(
            f"a device slab of {phys_rows} x {width} values ({keys} logical rows) is too large "
            "for int32 indexing: spread the largest tables over more devices (row_wise) or use "
            "more devices")


def build_layout(specs: Sequence[TableSpec], placements: Mapping[str, Mapping],
                 num_devices: int, width: int | None = None) -> Layout:
    """The static layout of structurally valid placements (see `ShardingPlan.validate`).

    Args:
      specs: the tables.
      placements: {name: {"type": ..., "device"?: d}} as in plan.json.
      num_devices: D.
      width: the slab width W (default: the widest table).

    Returns:
      The Layout: slab shape, where each table lives, lookup metadata per group.

    Raises:
      PlanError: if a device slab is too large for int32 indexing.
    """
    specs = tuple(specs)
    width = width or max(s.dim for s in specs)
    kinds = tuple(placements[s.name]["type"] for s in specs)
    devices = tuple(placements[s.name].get("device") if k == "table_wise" else None
                    for s, k in zip(specs, kinds, strict=True))
    order = [t for t, k in enumerate(kinds) if k == "row_wise"] + \
        [t for t, k in enumerate(kinds) if k == "replicated"]
    members: list[list[Placed]] = []
    for d in range(num_devices):
        own = order + [t for t, dev in enumerate(devices) if dev == d]
        row = key = 0
        placed = []
        for t in own:
            s = specs[t]
            local = -(-s.rows // num_devices) if kinds[t] == "row_wise" else s.rows
            wpad = padded_width(s.dim, width)
            pack = width // wpad
            placed.append(Placed(t, d, kinds[t], local, pack, wpad, row, key))
            row += -(-local // pack)
            key += local
        members.append(placed)
    # +1: a spare row that stays zero; padding ids (-1) read it instead of being masked.
    phys_rows = 1 + max(sum(-(-p.local_rows // p.pack) for p in m) for m in members)
    keys = max(1, max(sum(p.local_rows for p in m) for m in members))
    _check_int32_indexing(phys_rows, width, keys, members)
    sh_members = [[p for p in m if p.kind != "replicated"] for m in members]
    rep_members = [[p for p in m if p.kind == "replicated"] for m in members]
    sh = group_meta(sh_members, specs)
    rep = group_meta(rep_members, specs)
    return Layout(specs, kinds, devices, num_devices, width, phys_rows, keys,
                  tuple(tuple(m) for m in members), sh, rep, concat_meta(sh, rep))
