"""Per-device lookup metadata of a plan, grouped into width classes.

Tables live row packed in one [R, W] slab per device (see layout.py), but an id only needs its
table's packed width w' (a divisor of W) of contiguous values. Gathering all W would make a
dim-4 table cost as much as a dim-128 one, and the cost oracle times this code, so lookups are
split into *width classes*: one class per distinct w' in the group, each gathering, pooling and
updating [.., w'] arrays. A device's work is then proportional to its ids x their packed widths.

Within a group, positions are ordered class by class; each table owns `hotness` consecutive
positions of its class and one *slot* (a pooled [w'] vector) of that class. The class sizes
(positions, slots) are the maxima over devices, so every device runs the same shapes. All
arrays are numpy [D, ...] int32 built once per plan.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# Padding slots get this key offset so that no real key ever maps to them.
NO_KEY = np.iinfo(np.int32).max


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticInt:
    """A plan constant that sets array sizes; a leafless pytree node, so jit keeps it static
    even when the metadata is passed as an argument (as the cost oracle does)."""

    value: int


@dataclasses.dataclass(frozen=True)
class ClassMeta:
    """One width class of a group: positions [pos0, pos0 + L_c) and S_c slots of width c."""

    width: int  # c, the packed width of every table in the class
    pos0: int  # first position of the class in the group
    row_off: np.ndarray  # [D, L_c] physical row offset of each position's table
    pack: np.ndarray  # [D, L_c] logical rows per physical row
    slot: np.ndarray  # [D, L_c] slot of each position (sorted; padding positions -> S_c - 1)
    slot_key_off: np.ndarray  # [D, S_c] first logical row (key) of each slot's table, ascending
    slot_row_off: np.ndarray  # [D, S_c]
    slot_pack: np.ndarray  # [D, S_c]
    slot_dim: np.ndarray  # [D, S_c] real dim of each slot's table (0 on padding slots)
    in_src: np.ndarray  # [D, S_c, c] group output column feeding (slot, col); O = zero column
    max_rows: int  # most logical rows of this class on any device: a bound on unique ids

    def arrays(self) -> dict[str, np.ndarray]:
        """[D, ...] arrays, "pos" (the class's positions in the group) and "max_rows"."""
        out = {k: getattr(self, k) for k in
               ("row_off", "pack", "slot", "slot_key_off", "slot_row_off", "slot_pack",
                "slot_dim", "in_src")}
        pos_L = np.arange(self.pos0, self.pos0 + self.row_off.shape[1], dtype=np.int32)
        out["pos"] = np.broadcast_to(pos_L, self.row_off.shape)
        out["max_rows"] = StaticInt(self.max_rows)
        return out


@dataclasses.dataclass(frozen=True)
class GroupMeta:
    """Width classes of one lookup group plus where each table's ids and columns go."""

    classes: tuple[ClassMeta, ...]
    out_src: np.ndarray  # [D, O] index into the classes' pooled values, flattened; F = zero
    num_positions: int
    pos: dict  # (device, table) -> first position
    col: dict  # (device, table) -> first output column

    @property
    def num_cols(self) -> int:
        return self.out_src.shape[1]

    def arrays(self) -> dict:
        """{"out_src": [D, O], "classes": ({name: [D, ...]}, ...)}; index [d] for a device."""
        return {"out_src": self.out_src, "classes": tuple(c.arrays() for c in self.classes)}


def group_meta(members, specs) -> GroupMeta:
    """Lays out classes, positions, slots and output columns for per-device `Placed` lists."""
    d_count = len(members)
    widths = sorted({p.wpad for m in members for p in m})
    cols = [sum(specs[p.table].dim for p in m) for m in members]
    n_col = max(1, max(cols))
    classes, pos, col = [], {}, {}
    flat0 = pos0 = 0
    slot_of = {}  # (device, table) -> (class index, slot, flat pooled index of column 0)
    for c in widths:
        mine = [[p for p in m if p.wpad == c] for m in members]
        n_pos = max(sum(specs[p.table].hotness for p in m) for m in mine)
        n_slots = max(len(m) for m in mine)
        arr = {k: np.zeros((d_count, n_pos), np.int32) for k in ("row_off", "pack", "slot")}
        arr["pack"][:] = 1
        arr["slot"][:] = n_slots - 1
        sl = {k: np.zeros((d_count, n_slots), np.int32)
              for k in ("slot_key_off", "slot_row_off", "slot_pack", "slot_dim")}
        sl["slot_key_off"][:] = NO_KEY
        sl["slot_pack"][:] = 1
        for d, m in enumerate(mine):
            p0 = 0
            for s, p in enumerate(m):
                h = specs[p.table].hotness
                arr["row_off"][d, p0:p0 + h], arr["pack"][d, p0:p0 + h] = p.row_off, p.pack
                arr["slot"][d, p0:p0 + h] = s
                sl["slot_key_off"][d, s], sl["slot_row_off"][d, s] = p.key_off, p.row_off
                sl["slot_pack"][d, s], sl["slot_dim"][d, s] = p.pack, specs[p.table].dim
                pos[d, p.table] = pos0 + p0
                slot_of[d, p.table] = (len(classes), s, flat0 + s * c)
                p0 += h
        max_rows = max(1, max(sum(p.local_rows for p in m) for m in mine))
        classes.append(ClassMeta(c, pos0, **arr, **sl,
                                 in_src=np.full((d_count, n_slots, c), n_col, np.int32),
                                 max_rows=max_rows))
        pos0 += n_pos
        flat0 += n_slots * c
    out_src = np.full((d_count, n_col), flat0, np.int32)
    for d, m in enumerate(members):
        c0 = 0
        for p in m:
            dim = specs[p.table].dim
            k, s, flat = slot_of[d, p.table]
            out_src[d, c0:c0 + dim] = flat + np.arange(dim)
            classes[k].in_src[d, s, :dim] = c0 + np.arange(dim)
            col[d, p.table] = c0
            c0 += dim
    return GroupMeta(tuple(classes), out_src, max(1, pos0), pos, col)


def concat_meta(sh: GroupMeta, rep: GroupMeta) -> GroupMeta:
    """The update's group: sh positions/columns (padded to sh's size) then the replicated ones.

    Keys of sh and rep never overlap (a table is in one group), so the classes stay separate.
    """
    n_sh, n_col = sh.num_positions, sh.num_cols + rep.num_cols
    f_sh = sum(c.in_src.shape[1] * c.width for c in sh.classes)
    f_rep = sum(c.in_src.shape[1] * c.width for c in rep.classes)
    classes = [dataclasses.replace(c, in_src=np.where(c.in_src == sh.num_cols, n_col, c.in_src))
               for c in sh.classes]
    classes += [dataclasses.replace(
        c, pos0=c.pos0 + n_sh,
        in_src=np.where(c.in_src == rep.num_cols, n_col, c.in_src + sh.num_cols))
        for c in rep.classes]
    out_src = np.concatenate([np.where(sh.out_src == f_sh, f_sh + f_rep, sh.out_src),
                              rep.out_src + f_sh], axis=1).astype(np.int32)
    pos = {**sh.pos, **{k: v + n_sh for k, v in rep.pos.items()}}
    col = {**sh.col, **{k: v + sh.num_cols for k, v in rep.col.items()}}
    return GroupMeta(tuple(classes), out_src, n_sh + rep.num_positions, pos, col)
