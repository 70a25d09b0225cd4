"""Per-device lookup metadata of a plan, grouped into width classes.

Tables live row packed in one [R, W] slab per device (see layout.py), but an id only needs its
table's packed width w' (a divisor of W) of contiguous values. Gathering all W would make a
dim-4 table cost as much as a dim-128 one, and the cost oracle times this code, so lookups are
split into *width classes*: one class per distinct w' in the group, each gathering, pooling and
updating [.., w'] arrays. A device's work is then proportional to its ids x their packed widths.

Within a group, positions are ordered class by class; each table owns `hotness` consecutive
positions of its class and one *slot* (a pooled [w'] vector) of that class. The class sizes
(positions, slots) are the maxima over devices, so every device runs the same shapes; a class
has at least MIN_SLOTS slots (see there). All arrays are numpy [D, ...] int32 built once per plan.
"""

from __future__ import annotations

import dataclasses

import flax
import numpy as np

# Padding slots get this key offset so that no real key ever maps to them.
NO_KEY = np.iinfo(np.int32).max
# Every class has at least this many slots, padding ones included. With one slot, XLA:CPU
# turns the backward's per-position gather of slot gradients ([1, N, c] -> [L, N, c]) into a
# broadcast with a transposing layout copy feeding the scatter (optimized HLO; an optimization
# barrier there did not help, a second slot does): a dim-128 table of 100 ids per sample alone
# in its class took 21 ms per SGD backward at batch 512 instead of 8 with a second (empty) slot,
# on AMD EPYC (benchmarks/lone_table_classes.py). A plan that spreads a class one table per
# device, as class balancing does, hit this on every device.
MIN_SLOTS = 2


@flax.struct.dataclass
class ClassMeta:
    """One width class c of a group: L_c id positions pooled into S_c slots of c values.

    Array fields are numpy [D, ...] in a plan's `GroupMeta`, jnp [...] (no D) in one device's view
    (`device_step.device_meta`, or indexed inside shard_map). `max_rows` is static (a pytree
    aux field), so jit keeps it a Python int even when the metadata is a traced argument.

    Attributes:
      chunk_off: [D, L_c] index of each position's table's first c-wide chunk in the slab viewed
        as [R * W / c, c]; a table packs W / c logical rows per physical row, so logical row i
        is chunk chunk_off + i.
      slot: [D, L_c] slot of each position (ascending; padding positions -> S_c - 1).
      slot_key_off: [D, S_c] first logical row (dedup key) of each slot's table, ascending;
        NO_KEY on padding slots.
      slot_chunk_off: [D, S_c] `chunk_off` of each slot's table.
      slot_dim: [D, S_c] real dim of each slot's table (0 on padding slots).
      in_src: [D, S_c, c] group output column feeding (slot, value); O (the zero column) if none.
      max_rows: most logical rows of this class on any device: a bound on its unique ids.
      first_pos: the class's first position in the group's ids; its L_c positions follow (static,
        so a class's ids are a slice, not a gather).
    """

    chunk_off: np.ndarray
    slot: np.ndarray
    slot_key_off: np.ndarray
    slot_chunk_off: np.ndarray
    slot_dim: np.ndarray
    in_src: np.ndarray
    max_rows: int = flax.struct.field(pytree_node=False)
    first_pos: int = flax.struct.field(pytree_node=False)

    @property
    def width(self) -> int:
        """c, the packed width of every table in the class."""
        return self.in_src.shape[-1]

    @property
    def num_slots(self) -> int:
        """S_c."""
        return self.in_src.shape[-2]

    @property
    def num_positions(self) -> int:
        """L_c."""
        return self.slot.shape[-1]


@flax.struct.dataclass
class LookupMeta:
    """A group's lookup metadata as arrays: what `device_lookup` / `device_update` read.

    Attributes:
      out_src: [D, O] index of each output column into the classes' pooled values, flattened
        class by class ([N, S_c * c] each); F (their total) selects a zero column.
      classes: the width classes, narrowest first.
    """

    out_src: np.ndarray
    classes: tuple[ClassMeta, ...]


@dataclasses.dataclass(frozen=True)
class GroupMeta:
    """Width classes of one lookup group plus where each table's ids and columns go.

    Attributes:
      meta: the [D, ...] arrays (index [d], or `device_step.device_meta`, for one device).
      num_positions: L, id positions per sample (the widest device's, summed over classes).
      pos: {(device, table): the table's first position}.
      col: {(device, table): the table's first output column}.
    """

    meta: LookupMeta
    num_positions: int
    pos: dict
    col: dict

    @property
    def classes(self) -> tuple[ClassMeta, ...]:
        return self.meta.classes

    @property
    def num_cols(self) -> int:
        """O, output columns per sample."""
        return self.meta.out_src.shape[1]

    def arrays(self) -> LookupMeta:
        """The [D, ...] metadata of every device."""
        return self.meta


def group_meta(members, specs) -> GroupMeta:
    """Lays out classes, positions, slots and output columns of one lookup group.

    Args:
      members: per device, the `layout.Placed` entries of the group's tables on it.
      specs: all table specs (Placed.table indexes them).

    Returns:
      The group's GroupMeta; class sizes are the maxima over devices.
    """
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
        n_slots = max(MIN_SLOTS, max(len(m) for m in mine))
        arr = {k: np.zeros((d_count, n_pos), np.int32) for k in ("chunk_off", "slot")}
        arr["slot"][:] = n_slots - 1
        sl = {k: np.zeros((d_count, n_slots), np.int32)
              for k in ("slot_key_off", "slot_chunk_off", "slot_dim")}
        sl["slot_key_off"][:] = NO_KEY
        for d, m in enumerate(mine):
            p0 = 0
            for s, p in enumerate(m):
                h = specs[p.table].hotness
                chunk_off = p.row_off * p.pack  # pack = W / c rows of c values per slab row
                arr["chunk_off"][d, p0:p0 + h], arr["slot"][d, p0:p0 + h] = chunk_off, s
                sl["slot_key_off"][d, s], sl["slot_chunk_off"][d, s] = p.key_off, chunk_off
                sl["slot_dim"][d, s] = specs[p.table].dim
                pos[d, p.table] = pos0 + p0
                slot_of[d, p.table] = (len(classes), s, flat0 + s * c)
                p0 += h
        max_rows = max(1, max(sum(p.local_rows for p in m) for m in mine))
        classes.append(ClassMeta(**arr, **sl,
                                 in_src=np.full((d_count, n_slots, c), n_col, np.int32),
                                 max_rows=max_rows, first_pos=pos0))
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
    return GroupMeta(LookupMeta(out_src, tuple(classes)), max(1, pos0), pos, col)


def concat_meta(sh: GroupMeta, rep: GroupMeta) -> GroupMeta:
    """The update's group: sh positions/columns (padded to sh's size) then the replicated ones.

    Keys of sh and rep never overlap (a table is in one group), so the classes stay separate.

    Args:
      sh: the all_to_all group (table-wise and row-wise tables).
      rep: the replicated group.

    Returns:
      The "all" group, whose ids are [sh ids, rep ids] and columns [sh cols, rep cols].
    """
    n_sh, n_col = sh.num_positions, sh.num_cols + rep.num_cols
    f_sh = sum(c.num_slots * c.width for c in sh.classes)
    f_rep = sum(c.num_slots * c.width for c in rep.classes)
    classes = [c.replace(in_src=np.where(c.in_src == sh.num_cols, n_col, c.in_src))
               for c in sh.classes]
    classes += [c.replace(
        first_pos=c.first_pos + n_sh,
        in_src=np.where(c.in_src == rep.num_cols, n_col, c.in_src + sh.num_cols))
        for c in rep.classes]
    out_src = np.concatenate([np.where(sh.meta.out_src == f_sh, f_sh + f_rep, sh.meta.out_src),
                              rep.meta.out_src + f_sh], axis=1).astype(np.int32)
    pos = {**sh.pos, **{k: v + n_sh for k, v in rep.pos.items()}}
    col = {**sh.col, **{k: v + sh.num_cols for k, v in rep.col.items()}}
    return GroupMeta(LookupMeta(out_src, tuple(classes)), n_sh + rep.num_positions, pos, col)
