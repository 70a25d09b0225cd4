"""One device's embedding work: packed lookup + pooling, and the sparse in-place row update.

These are the functions the `shard_map` body of `ShardedEmbeddingStage` calls on each device's
local slab, and the cost hook (`device_embedding_step`) a cost oracle times on a single device:
what it measures is exactly what training runs. Inputs are that device's slab [R, W], its
optimizer state, its routed ids [N, L] (local row numbers, -1 = padding) and its metadata (one
device's view of a `lookup_meta.GroupMeta`, see `device_meta`).

Work is done per width class: an id of a table packed at width c reads and writes c values,
so the cost follows each table's ids x dim, not the slab width W.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from autoshard_jax.optim.sparse import ELEMENT, ROW, RowOptimizer, StateKinds
from autoshard_jax.sharding.lookup_meta import NO_KEY, ClassMeta, GroupMeta, LookupMeta

# What a step of a given plan costs depends on this program, so measured costs and the networks
# fitted to them are stamped with its version (`cost.dataset.environment`) and refused by a later
# one. Bump it with any change that alters the cost of the same plan. 1: a width class could
# have one slot; 2: at least `lookup_meta.MIN_SLOTS` (a lone class's backward 2x faster on CPU).
PROGRAM_VERSION = 2


def device_meta(group: GroupMeta, device: int) -> LookupMeta:
    """One device's view of a group's metadata, to run that device's step alone.

    Args:
      group: a `GroupMeta` of a `Layout` (e.g. `layout.all` for the update / cost hook).
      device: the device index d.

    Returns:
      The group's LookupMeta with the leading [D] axis indexed at d, as jnp arrays.
    """
    return jax.tree.map(lambda x: jnp.asarray(x[device]), group.arrays())


def _class_ids(ids_NxL: jax.Array, cls: ClassMeta) -> jax.Array:
    """A class's ids [L_c, N], position-major (a static slice: its positions are contiguous).

    Position-major order makes pooling and its backward move whole [N, c] blocks per position
    instead of N * L_c c-wide rows: on XLA:CPU the parity benchmark's lookup took 5.8 instead
    of 8.6 ms, and its sharded SGD step went from 1.45-1.65x to 1.07-1.11x the local one.
    """
    return ids_NxL[:, cls.first_pos:cls.first_pos + cls.num_positions].T


def _class_chunks(ids_NxL: jax.Array, cls: ClassMeta, padding: int) -> jax.Array:
    """Chunk numbers [L_c, N] of a class's ids in the slab viewed as [R * W / c, c]
    (`_chunks`); padding ids (-1) become `padding`."""
    ids_LxN = _class_ids(ids_NxL, cls)
    return jnp.where(ids_LxN >= 0, cls.chunk_off[:, None] + ids_LxN, padding)


def _chunks(x: jax.Array, c: int) -> jax.Array:
    """A slab-shaped array ([R, W] or flat) viewed as rows of c values (c divides W).
    Whole-row gathers on that view measured 4-8x faster on XLA:CPU than c-wide windows of
    the flat slab."""
    return x.reshape(-1, c)


def device_lookup(slab_RxW: jax.Array, ids_NxL: jax.Array, meta: LookupMeta) -> jax.Array:
    """Sum-pooled lookups of one device, laid out as its output columns.

    Args:
      slab_RxW: the device's packed slab.
      ids_NxL: its routed ids (local row numbers, -1 = padding) for N samples.
      meta: its view of the group's metadata (no D axis).

    Returns:
      pooled_NxO, the device's output columns.
    """
    n = ids_NxL.shape[0]
    rows, width = slab_RxW.shape
    pooled = []
    for cls in meta.classes:
        c = cls.width
        # Padding ids read the layout's spare last row, which is always zero: no mask needed.
        chunk_LxN = _class_chunks(ids_NxL, cls, (rows - 1) * (width // c))
        rows_LxNxC = jnp.take(_chunks(slab_RxW, c), chunk_LxN, axis=0, mode="clip")
        # Positions are sorted by slot: each slot sums its table's hotness blocks.
        pooled_SxNxC = jax.ops.segment_sum(rows_LxNxC, cls.slot, num_segments=cls.num_slots,
                                           indices_are_sorted=True)
        pooled.append(pooled_SxNxC.transpose(0, 2, 1).reshape(-1, n))  # row (slot, value)
    pooled.append(jnp.zeros((1, n), slab_RxW.dtype))
    return jnp.take(jnp.concatenate(pooled, axis=0), meta.out_src, axis=0, mode="clip").T


# Rows per optimizer call. A one-row vmap makes XLA:CPU lower row-wise Adagrad's mean over
# [U, 1, c] to a very slow reduction (25 ms for 21k x 128 vs 4 ms with two rows per call).
_ROWS_PER_CALL = 2


def _per_row(row_optimizer: RowOptimizer):
    """`row_optimizer.update` on a few rows at a time, vmapped over the unique rows.

    Rows arrive deduplicated, so the optimizer's own duplicate combining (a sort with an index
    operand, the slowest op of the step) would be wasted work; row optimizers are row-local by
    construction (their state is [R] or [R, E]), so small independent updates over the unique
    rows are the same update.
    """
    k = _ROWS_PER_CALL

    def chunk(rows_KxC, state_rows, g_KxC, step):
        return row_optimizer.update(rows_KxC, state_rows, jnp.arange(k, dtype=jnp.int32),
                                    g_KxC, step)

    def update(rows_UxC, state_rows, g_UxC, step):
        u = rows_UxC.shape[0]
        pad = -u % k

        def split(x):
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
            return x.reshape((u + pad) // k, k, *x.shape[1:])

        def join(x):
            return x.reshape(u + pad, *x.shape[2:])[:u]

        new, new_state = jax.vmap(chunk, in_axes=(0, 0, 0, None))(
            split(rows_UxC), jax.tree.map(split, state_rows), split(g_UxC), step)
        return join(new), jax.tree.map(join, new_state)

    return update


def _dedup(keys_M: jax.Array, u: int) -> tuple[jax.Array, jax.Array]:
    """(unique keys [u], NO_KEY-filled; each key's index among them [M], u for padding).

    One single-operand sort plus a binary search: on XLA:CPU a sort that carries an index
    operand (what `jnp.unique(return_inverse=True)` does) is several times slower. `u` bounds
    the number of unique keys (the rows the ids can touch), so compact arrays stay small.
    """
    sorted_M = jnp.sort(keys_M)
    first_M = jnp.concatenate([jnp.ones((1,), bool), sorted_M[1:] != sorted_M[:-1]])
    first_M = first_M & (sorted_M != NO_KEY)
    rank_M = jnp.cumsum(first_M, dtype=jnp.int32) - 1
    keys_U = jnp.full((u,), NO_KEY, jnp.int32).at[jnp.where(first_M, rank_M, u)].set(
        sorted_M, mode="drop")
    uid_M = jnp.where(keys_M != NO_KEY, rank_M[jnp.searchsorted(sorted_M, keys_M)], u)
    return keys_U, uid_M


def device_update(slab_RxW: jax.Array, state: Mapping[str, jax.Array], ids_NxL: jax.Array,
                  g_NxO: jax.Array, step: jax.Array, meta: LookupMeta, *,
                  row_optimizer: RowOptimizer, kinds: StateKinds | tuple
                  ) -> tuple[jax.Array, dict]:
    """Backward of `device_lookup` + the row optimizer applied in place to touched rows only.

    Per width class c, duplicate ids are combined per logical row (slot key_off + id), then the
    row optimizer runs on a compact [U, c] copy of the touched rows (U <= the class's rows), so
    optimizers see the same rows, states and gradients as on unpacked tables. Padding columns
    of the gradient (dim..c) are filled with the row's RMS so that row-wise statistics (mean of
    g^2 over the width) equal the unpacked table's. The new rows are then written back into
    the slab.

    Args:
      slab_RxW: the device's packed slab.
      state: its row-optimizer state, {leaf: [A] (ROW) | [R, W] (ELEMENT)}.
      ids_NxL: its routed ids (local row numbers, -1 = padding).
      g_NxO: the gradient of its output columns.
      step: the step number (for learning-rate schedules).
      meta: its view of the group's metadata.
      row_optimizer: the sparse optimizer.
      kinds: the state's kinds (`optim.sparse.state_kinds`), or their items as a tuple (hashable
        for jit's static arguments).

    Returns:
      (slab_RxW, state) updated.
    """
    kinds = dict(kinds)  # a tuple of pairs is accepted too, hashable for jit's static args
    n = ids_NxL.shape[0]
    rows, width = slab_RxW.shape
    slab_F = slab_RxW.reshape(-1)
    flat = {name: state[name].reshape(-1) if kind == ELEMENT else state[name]
            for name, kind in kinds.items()}
    g_OxN = jnp.concatenate([g_NxO, jnp.zeros((n, 1), g_NxO.dtype)], axis=1).T
    update_rows = _per_row(row_optimizer)
    for cls in meta.classes:
        num_slots, c = cls.num_slots, cls.width
        g_SxNxC = jnp.take(g_OxN, cls.in_src.reshape(-1), axis=0, mode="clip").reshape(
            num_slots, c, n).transpose(0, 2, 1)
        # Each position's gradient is its slot's, position-major as `_class_chunks`.
        g_MxC = jnp.take(g_SxNxC, cls.slot, axis=0, mode="clip").reshape(-1, c)
        if not kinds:
            # Stateless (SGD): no per-row statistics, so the optimizer scatters each id's
            # gradient straight into the slab's c-wide rows (duplicates add up), exactly as it
            # does on a local table; no dedup sort is needed.
            chunk_M = _class_chunks(ids_NxL, cls, -1).reshape(-1)
            new_rows, _ = row_optimizer.update(_chunks(slab_F, c), {}, chunk_M, g_MxC, step)
            slab_F = new_rows.reshape(-1)
            continue
        ids_LxN = _class_ids(ids_NxL, cls)
        m = ids_LxN.size
        key_off_L = cls.slot_key_off[cls.slot]
        keys_M = jnp.where(ids_LxN >= 0, key_off_L[:, None] + ids_LxN, NO_KEY).reshape(-1)
        u = min(m, cls.max_rows)
        keys_U, uid_M = _dedup(keys_M, u)
        valid_U = keys_U != NO_KEY
        g_UxC = jax.ops.segment_sum(g_MxC, uid_M, num_segments=u)  # padding (u) is dropped
        # Which slot (table) each key belongs to: slot key offsets ascend.
        s_U = jnp.clip(jnp.searchsorted(cls.slot_key_off, keys_U, side="right") - 1,
                       0, num_slots - 1)
        local_U = keys_U - cls.slot_key_off[s_U]
        dim_U = cls.slot_dim[s_U]
        chunk_U = jnp.where(valid_U, cls.slot_chunk_off[s_U] + local_U, (rows - 1) * (width // c))
        in_dim_UxC = jnp.arange(c, dtype=jnp.int32)[None] < dim_U[:, None]
        old_UxC = jnp.take(_chunks(slab_F, c), chunk_U, axis=0, mode="clip")
        compact = {name: state[name].at[keys_U].get(mode="fill", fill_value=0.0)
                   if kind == ROW else jnp.take(_chunks(flat[name], c), chunk_U, axis=0,
                                                  mode="clip")
                   for name, kind in kinds.items()}
        rms_U = jnp.sqrt(jnp.sum(g_UxC**2, axis=1) / jnp.maximum(dim_U, 1).astype(g_UxC.dtype))
        g_in_UxC = jnp.where(in_dim_UxC, g_UxC, rms_U[:, None])
        new_UxC, new_compact = update_rows(old_UxC, compact, g_in_UxC, step)

        write_UxC = valid_U[:, None] & in_dim_UxC
        drop_U = jnp.where(valid_U, chunk_U, rows * (width // c))  # out of range: dropped
        new_UxC = jnp.where(write_UxC, new_UxC, old_UxC).astype(slab_F.dtype)
        slab_F = _chunks(slab_F, c).at[drop_U].set(new_UxC, mode="drop").reshape(-1)
        for name, kind in kinds.items():
            if kind == ROW:
                flat[name] = flat[name].at[keys_U].set(new_compact[name], mode="drop")
            else:
                new_state_UxC = jnp.where(write_UxC, new_compact[name], compact[name])
                flat[name] = _chunks(flat[name], c).at[drop_U].set(
                    new_state_UxC, mode="drop").reshape(-1)
    new_state = {name: flat[name].reshape(state[name].shape) for name in kinds}
    return slab_F.reshape(rows, width), new_state


def device_embedding_step(slab_RxW: jax.Array, state: Mapping[str, jax.Array],
                          ids_NxL: jax.Array, g_NxO: jax.Array, step: jax.Array,
                          meta: LookupMeta, *, row_optimizer: RowOptimizer,
                          kinds: StateKinds | tuple) -> tuple[jax.Array, jax.Array, dict]:
    """Cost hook: forward + backward + sparse update of one device's tables at batch size N.

    Jit it with donate_argnums=(0, 1) and static_argnames=("row_optimizer", "kinds") to time
    the in-place update as training runs it.

    Args:
      slab_RxW, state, step, row_optimizer, kinds: as for `device_update`.
      ids_NxL, g_NxO: the device's ids and output-column gradients of the layout's "all" group,
        e.g. `layout.device_inputs` on a batch drawn from each table's statistics.
      meta: `device_meta(layout.all, d)`.

    Returns:
      (pooled_NxO, slab_RxW, state): the forward's output and the updated slab and state.
    """
    pooled_NxO = device_lookup(slab_RxW, ids_NxL, meta)
    # Make the update depend on the forward so neither is dead code when timed alone.
    g_NxO = g_NxO + 0.0 * pooled_NxO
    slab_RxW, state = device_update(slab_RxW, state, ids_NxL, g_NxO, step, meta,
                                    row_optimizer=row_optimizer, kinds=kinds)
    return pooled_NxO, slab_RxW, state
