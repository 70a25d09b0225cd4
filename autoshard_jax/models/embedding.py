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


def uniform_table_init(rows: int, chunk_rows: int = 1 << 16):
    """U(-sqrt(1/rows), sqrt(1/rows)), the public DLRM / torch reference initialisation.

    Big tables are filled chunk by chunk inside a loop so that initialisation never holds more
    than one chunk of random bits beside the table: a plain `jax.random.uniform` of a 10M-row
    table briefly needs several table-sized temporaries.
    """
    scale = (1.0 / rows) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        if shape[0] <= chunk_rows:
            return jax.random.uniform(key, shape, dtype, -scale, scale)
        num_chunks = -(-shape[0] // chunk_rows)

        def fill_chunk(i, table):
            # The last chunk starts at rows - chunk_rows and overlaps its neighbour.
            start = jnp.minimum(i * chunk_rows, shape[0] - chunk_rows)
            chunk = jax.random.uniform(jax.random.fold_in(key, i), (chunk_rows, *shape[1:]),
                                       dtype, -scale, scale)
            return jax.lax.dynamic_update_slice_in_dim(table, chunk, start, axis=0)

        return jax.lax.fori_loop(0, num_chunks, fill_chunk, jnp.zeros(shape, dtype))

    return init


class EmbeddingBagCollection(nn.Module):
    """One table per categorical feature; parameters are keyed by table name.

    Input is a tuple of ids_BxH arrays in table order; output a tuple of pooled_BxE arrays.
    """

    tables: Sequence[TableSpec]
    combiner: str = "sum"

    def setup(self):
        check_combiner(self.combiner)
        self.tables_ = {s.name: self.param(s.name, uniform_table_init(s.rows), (s.rows, s.dim))
                        for s in self.tables}

    def __call__(self, ids: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        if len(ids) != len(self.tables):
            raise ValueError(f"expected ids for {len(self.tables)} tables, got {len(ids)}")
        return tuple(embedding_bag(self.tables_[s.name], ids_BxH, self.combiner)
                     for s, ids_BxH in zip(self.tables, ids, strict=True))
