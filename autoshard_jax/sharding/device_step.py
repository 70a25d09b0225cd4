"""One device's embedding work: packed lookup + pooling, and the sparse in-place row update.

These are the functions the `shard_map` body of `ShardedEmbeddingStage` calls on each device's
local slab, and the cost hook (`device_embedding_step`) a cost oracle times on a single device:
what it measures is exactly what training runs. Inputs are that device's slab [R, W], its
optimizer state, its routed ids [N, L] (local row numbers, -1 = padding) and its metadata (one
device's row of a `layout.GroupMeta`, see `device_meta`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.optim.sparse import RowOptimizer

Meta = dict[str, jax.Array]  # row_off/pack/wpad/width/key_off/slot: [L]; out_src: [O]


def device_meta(group, device: int) -> Meta:
    """Device `device`'s metadata of a `layout.GroupMeta` as jnp arrays (for a lone device)."""
    return {k: jnp.asarray(v[device]) for k, v in group.arrays().items()}


def _window_dims(ndim: int):
    return dict(offset_dims=(ndim,), start_index_map=(0,))


def _window_gather(flat_X: jax.Array, start: jax.Array, width: int) -> jax.Array:
    """flat_X[start + e] for e < width, one contiguous window per start: [..., width]."""
    dims = jax.lax.GatherDimensionNumbers(collapsed_slice_dims=(), **_window_dims(start.ndim))
    return jax.lax.gather(flat_X, start[..., None], dims, slice_sizes=(width,),
                          mode=jax.lax.GatherScatterMode.CLIP)


def _window_add(flat_X: jax.Array, start_U: jax.Array, values_UxW: jax.Array) -> jax.Array:
    """flat_X[start + e] += values[:, e]; windows starting out of bounds are dropped whole."""
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1,), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,))
    return jax.lax.scatter_add(flat_X, start_U[:, None], values_UxW, dims,
                               mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _chunk_start(ids_NxL: jax.Array, meta: Meta, width: int):
    """Flat slab offset of each id's values and the mask of real (position, column) values.

    A packed id's values sit at physical row row_off + id // pack, columns starting at
    (id % pack) * wpad; columns at or past the table's dim are masked.
    """
    valid_NxL = ids_NxL >= 0
    local_NxL = jnp.maximum(ids_NxL, 0)
    pack_1xL = meta["pack"][None]
    start_NxL = (meta["row_off"][None] + local_NxL // pack_1xL) * width + \
        (local_NxL % pack_1xL) * meta["wpad"][None]
    e_11W = jnp.arange(width, dtype=jnp.int32)[None, None]
    mask_NxLxW = valid_NxL[..., None] & (e_11W < meta["width"][None, :, None])
    return start_NxL, mask_NxLxW


def device_lookup(slab_RxW: jax.Array, ids_NxL: jax.Array, meta: Meta,
                  num_slots: int) -> jax.Array:
    """Sum-pooled lookups of one device, laid out as its output columns: [N, O]."""
    n, num_pos = ids_NxL.shape
    width = slab_RxW.shape[1]
    start_NxL, mask_NxLxW = _chunk_start(ids_NxL, meta, width)
    # One contiguous W-wide window per id (it may run into the next physical row, which the
    # mask drops; the layout keeps a spare last row so no window is clamped).
    rows_NxLxW = _window_gather(slab_RxW.reshape(-1), start_NxL, width)
    rows_NxLxW = jnp.where(mask_NxLxW, rows_NxLxW, 0.0)
    # Bag (sample n, slot s) is segment n * F + s; positions are sorted by slot within a sample.
    seg_NxL = jnp.arange(n, dtype=jnp.int32)[:, None] * num_slots + meta["slot"][None]
    pooled_SxW = jax.ops.segment_sum(rows_NxLxW.reshape(n * num_pos, width), seg_NxL.reshape(-1),
                                     num_segments=n * num_slots, indices_are_sorted=True)
    flat_NxFW = jnp.concatenate([pooled_SxW.reshape(n, num_slots * width),
                                 jnp.zeros((n, 1), slab_RxW.dtype)], axis=1)
    return jnp.take(flat_NxFW, meta["out_src"], axis=1)


def device_update(slab_RxW: jax.Array, state: Mapping[str, jax.Array], ids_NxL: jax.Array,
                  g_NxO: jax.Array, step: jax.Array, meta: Meta, *, num_slots: int,
                  num_keys: int, row_optimizer: RowOptimizer,
                  kinds: Mapping[str, str] | tuple) -> tuple[jax.Array, dict]:
    """Backward of `device_lookup` + the row optimizer applied in place to touched rows only.

    Duplicate ids are combined per logical row (key_off + id), then `row_optimizer.update` runs
    on a compact [U, W] copy of the touched rows with each table's values at column 0, so
    optimizers see the same rows, states and gradients as on unpacked tables. Padding columns
    of the gradient are filled with the row's RMS so that row-wise statistics (mean of g^2 over
    the width) equal the unpacked table's. The deltas are then scatter-added into the slab.
    """
    kinds = dict(kinds)  # a tuple of pairs is accepted too, hashable for jit's static args
    n, num_pos = ids_NxL.shape
    rows, width = slab_RxW.shape
    m = n * num_pos
    g_flat = jnp.zeros((n, num_slots * width + 1), g_NxO.dtype).at[:, meta["out_src"]].add(g_NxO)
    g_NxFxW = g_flat[:, :-1].reshape(n, num_slots, width)
    g_NxLxW = jnp.take(g_NxFxW, meta["slot"], axis=1)
    valid_NxL = ids_NxL >= 0
    e_W = jnp.arange(width, dtype=jnp.int32)
    in_dim_NxLxW = valid_NxL[..., None] & (e_W[None, None] < meta["width"][None, :, None])
    g_NxLxW = jnp.where(in_dim_NxLxW, g_NxLxW, 0.0)

    keys_M = jnp.where(valid_NxL, meta["key_off"][None] + ids_NxL, num_keys).reshape(-1)
    uniq_U, first_U, inv_M = jnp.unique(keys_M, size=m, fill_value=num_keys,
                                        return_index=True, return_inverse=True)
    g_UxW = jax.ops.segment_sum(g_NxLxW.reshape(m, width), inv_M.reshape(-1), num_segments=m)
    pos_U = first_U % num_pos
    valid_U = uniq_U < num_keys
    local_U = uniq_U - meta["key_off"][pos_U]
    pack_U, dim_U = meta["pack"][pos_U], meta["width"][pos_U]
    start_U = (meta["row_off"][pos_U] + local_U // pack_U) * width + \
        (local_U % pack_U) * meta["wpad"][pos_U]
    in_dim_UxW = e_W[None] < dim_U[:, None]
    col_mask_UxW = valid_U[:, None] & in_dim_UxW
    idx_UxW = jnp.where(col_mask_UxW, start_U[:, None] + e_W[None], rows * width)

    slab_F = slab_RxW.reshape(-1)
    old_UxW = _window_gather(slab_F, start_U, width)
    compact = {}
    for name, kind in kinds.items():
        if kind == "row":
            compact[name] = state[name].at[uniq_U].get(mode="fill", fill_value=0.0)
        else:
            compact[name] = state[name].reshape(-1).at[idx_UxW].get(mode="fill", fill_value=0.0)
    rms_U = jnp.sqrt(jnp.sum(g_UxW**2, axis=1) / jnp.maximum(dim_U, 1).astype(g_UxW.dtype))
    g_in_UxW = jnp.where(in_dim_UxW, g_UxW, rms_U[:, None])
    compact_ids_U = jnp.where(valid_U, jnp.arange(m, dtype=jnp.int32), m)
    new_UxW, new_compact = row_optimizer.update(old_UxW, compact, compact_ids_U, g_in_UxW, step)

    delta_UxW = jnp.where(col_mask_UxW, new_UxW - old_UxW, 0.0).astype(slab_RxW.dtype)
    start_U = jnp.where(valid_U, start_U, rows * width)
    slab_RxW = _window_add(slab_F, start_U, delta_UxW).reshape(rows, width)
    new_state = {}
    for name, kind in kinds.items():
        if kind == "row":
            new_state[name] = state[name].at[uniq_U].set(new_compact[name], mode="drop")
        else:
            flat = state[name].reshape(-1).at[idx_UxW].set(new_compact[name], mode="drop")
            new_state[name] = flat.reshape(state[name].shape)
    return slab_RxW, new_state


def device_embedding_step(slab_RxW: jax.Array, state: Mapping[str, jax.Array],
                          ids_NxL: jax.Array, g_NxO: jax.Array, step: jax.Array, meta: Meta, *,
                          num_slots: int, num_keys: int, row_optimizer: RowOptimizer,
                          kinds: Mapping[str, str] | tuple
                          ) -> tuple[jax.Array, jax.Array, dict]:
    """Cost hook: forward + backward + sparse update of one device's tables at batch size N.

    Returns (pooled_NxO, slab_RxW, state). Jit it with donate_argnums=(0, 1) to time the
    in-place update as training runs it; the ids and `meta` come from a `Layout` (the "all"
    group), e.g. `layout.route_ids` on a batch drawn from each table's statistics.
    """
    pooled_NxO = device_lookup(slab_RxW, ids_NxL, meta, num_slots)
    # Make the update depend on the forward so neither is dead code when timed alone.
    g_NxO = g_NxO + 0.0 * pooled_NxO
    slab_RxW, state = device_update(slab_RxW, state, ids_NxL, g_NxO, step, meta,
                                    num_slots=num_slots, num_keys=num_keys,
                                    row_optimizer=row_optimizer, kinds=kinds)
    return pooled_NxO, slab_RxW, state


def constant_fill(row_optimizer: RowOptimizer, kinds: Mapping[str, str]) -> dict[str, float]:
    """Initial value of each state leaf; row optimizers here start from constant fills."""
    probe = row_optimizer.init(jnp.zeros((1, 1), jnp.float32))
    fills = {}
    for name in kinds:
        values = np.asarray(probe[name]).reshape(-1)
        fills[name] = float(values[0])
    return fills
