"""Embedding bags: multi-hot lookups pooled per feature, with -1 as the padding id.

The lookup is split into `gather_rows` and `pool_rows` so that training can differentiate with
respect to the pooled vectors only and update rows sparsely (see `autoshard_jax/optim`): autodiff
of a gather would otherwise build a table-sized gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from autoshard_jax.tables.spec import TableSpec

COMBINERS = ("sum", "mean")
PAD_ID = -1
# Rows drawn per loop iteration of `draw_tables`: bounds the random bits held beside a table.
INIT_CHUNK_ROWS = 1 << 14


def check_combiner(combiner: str) -> None:
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")


def gather_rows(table_RxE: jax.Array, ids_BxH: jax.Array) -> jax.Array:
    """Rows for each id; padded slots (-1) read row 0 and must be masked by the caller.

    jnp.take would wrap -1 to the last row, so ids are clamped first and the padding never
    reaches a real row's value through `pool_rows` (which masks) nor its update (which drops).
    """
    safe_ids_BxH = jnp.maximum(ids_BxH, 0)
    return jnp.take(table_RxE, safe_ids_BxH, axis=0, mode="clip")


def pool_weights(ids_BxH: jax.Array, combiner: str, dtype=jnp.float32) -> jax.Array:
    """Per-slot pooling weight: 0 for padding, 1 (sum) or 1/count (mean) for real ids."""
    mask_BxH = (ids_BxH >= 0).astype(dtype)
    if combiner == "sum":
        return mask_BxH
    check_combiner(combiner)
    count_Bx1 = jnp.maximum(mask_BxH.sum(axis=1, keepdims=True), 1.0)
    return mask_BxH / count_Bx1


def pool_rows(rows_BxHxE: jax.Array, ids_BxH: jax.Array, combiner: str = "sum") -> jax.Array:
    """Pools gathered rows over the H id slots; a bag of only padding pools to zeros."""
    weights_BxH = pool_weights(ids_BxH, combiner, rows_BxHxE.dtype)
    return jnp.einsum("bhe,bh->be", rows_BxHxE, weights_BxH)


def pool_backward(g_pooled_BxE: jax.Array, ids_BxH: jax.Array, combiner: str = "sum") -> jax.Array:
    """Gradient of `pool_rows` with respect to each gathered row (zero for padded slots)."""
    weights_BxH = pool_weights(ids_BxH, combiner, g_pooled_BxE.dtype)
    return weights_BxH[:, :, None] * g_pooled_BxE[:, None, :]


def embedding_bag(table_RxE: jax.Array, ids_BxH: jax.Array, combiner: str = "sum") -> jax.Array:
    """Pooled embedding of a bag of ids per sample: [R, E] x [B, H] -> [B, E]."""
    return pool_rows(gather_rows(table_RxE, ids_BxH), ids_BxH, combiner)


def draw_rows(key: jax.Array, dim: int, rows_N: jax.Array, scale: float | jax.Array,
              width: int | None = None) -> jax.Array:
    """Rows `rows_N` of a table's initial values (the one table init of the package).

    Row r is U(-scale, scale)^dim drawn from `fold_in(key, r)`: its value depends on the
    table's key and r only, never on which other rows are drawn with it, so a device draws the
    rows it owns and nothing else.

    Args:
      key: the table's PRNG key.
      dim: the table's width.
      rows_N: int32 global row numbers.
      scale: the bound, sqrt(1 / rows) as the public DLRM draws tables (`table_scale`).
      width: draw this many values per row (>= dim; their first dim are the row's). JAX's
        threefry draws element i of a 1-D shape from (key, i) whatever the length
        (jax_threefry_partitionable, the default), so one shape serves tables of any width;
        tests/sharding/test_init.py checks it.

    Returns:
      float32 [N, width or dim].
    """
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (width or dim,),
                                                 jnp.float32, -scale, scale))(rows_N)


def table_scale(spec: TableSpec) -> float:
    """The bound of a table's uniform init: sqrt(1 / rows), as the public DLRM draws it."""
    return (1.0 / spec.rows) ** 0.5


def draw_tables(keys: Sequence[jax.Array], specs: Sequence[TableSpec]) -> list[jax.Array]:
    """Whole tables of `draw_rows` values, filled INIT_CHUNK_ROWS rows at a time.

    Args:
      keys: one PRNG key per table.
      specs: the tables.

    Returns:
      [rows, dim] float32 arrays.
    """
    out = []
    for s, key in zip(specs, keys, strict=True):
        chunk = min(s.rows, INIT_CHUNK_ROWS)
        num_chunks = -(-s.rows // chunk)

        def fill(i, table_RxE, s=s, key=key, chunk=chunk):
            # The last chunk starts at rows - chunk and overlaps its neighbour (same values).
            start = jnp.minimum(i * chunk, s.rows - chunk)
            rows_C = start + jnp.arange(chunk, dtype=jnp.int32)
            return jax.lax.dynamic_update_slice_in_dim(
                table_RxE, draw_rows(key, s.dim, rows_C, table_scale(s)),
                start, axis=0)

        out.append(jax.lax.fori_loop(0, num_chunks, fill, jnp.zeros((s.rows, s.dim),
                                                                     jnp.float32)))
    return out


def table_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """Flax initializer of a [rows, dim] table: `draw_tables`' values, so a flax model and the
    train state draw the same table from the same key."""
    (table_RxE,) = draw_tables([key], [TableSpec("table", shape[0], shape[1])])
    return table_RxE.astype(dtype)


class EmbeddingBagCollection(nn.Module):
    """One table per categorical feature; parameters are keyed by table name.

    Input is a tuple of ids_BxH arrays in table order; output a tuple of pooled_BxE arrays.
    """

    tables: Sequence[TableSpec]
    combiner: str = "sum"

    def setup(self):
        check_combiner(self.combiner)
        self.tables_ = {s.name: self.param(s.name, table_init, (s.rows, s.dim))
                        for s in self.tables}

    def __call__(self, ids: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        if len(ids) != len(self.tables):
            raise ValueError(f"expected ids for {len(self.tables)} tables, got {len(ids)}")
        return tuple(embedding_bag(self.tables_[s.name], ids_BxH, self.combiner)
                     for s, ids_BxH in zip(self.tables, ids, strict=True))
