"""DLRM (Naumov et al. 2019) with dot or concatenation interaction and optional DCNv2 cross layers.

The model is two modules: `EmbeddingBagCollection` (sparse, updated row-wise) and `DLRMDense`
(bottom MLP, interaction, cross layers, top MLP; updated by optax). Training differentiates the
dense module with respect to its parameters and the pooled embeddings, then updates embedding rows
sparsely, so the two halves are separate parameter subtrees: params = {"embedding", "dense"}.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from autoshard_jax.models.embedding import EmbeddingBagCollection
from autoshard_jax.tables.spec import TableSpec

INTERACTIONS = ("dot", "cat")

dense_init = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")  # public DLRM init


class MLP(nn.Module):
    """ReLU MLP; the last layer is linear when `final_activation` is False."""

    features: Sequence[int]
    final_activation: bool = True

    @nn.compact
    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        for i, width in enumerate(self.features):
            x_BxI = nn.Dense(width, kernel_init=dense_init, name=f"layer_{i}")(x_BxI)
            if i < len(self.features) - 1 or self.final_activation:
                x_BxI = nn.relu(x_BxI)
        return x_BxI


def num_dot_features(num_vectors: int, self_interaction: bool) -> int:
    n = num_vectors
    return n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2


def dot_interaction(bottom_BxE: jax.Array, pooled_BxFxE: jax.Array,
                    self_interaction: bool = False) -> jax.Array:
    """Bottom output concatenated with the pairwise dot products of all F+1 vectors.

    Pairs (i, j) with j < i (or j <= i with self-interaction), in row-major lower-triangle order,
    the order of the public DLRM.
    """
    vectors_BxNxE = jnp.concatenate([bottom_BxE[:, None, :], pooled_BxFxE], axis=1)
    gram_BxNxN = jnp.einsum("bne,bme->bnm", vectors_BxNxE, vectors_BxNxE)
    n = vectors_BxNxE.shape[1]
    rows, cols = jnp.tril_indices(n, k=0 if self_interaction else -1)
    return jnp.concatenate([bottom_BxE, gram_BxNxN[:, rows, cols]], axis=1)


def cat_interaction(bottom_BxE: jax.Array, pooled: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate([bottom_BxE, *pooled], axis=1)


class CrossNetwork(nn.Module):
    """DCNv2 cross layers x_{l+1} = x_0 * (W x_l + b) + x_l, with W = U V when `rank` > 0."""

    num_layers: int
    rank: int = 0

    @nn.compact
    def __call__(self, x0_BxI: jax.Array) -> jax.Array:
        width = x0_BxI.shape[-1]
        x_BxI = x0_BxI
        for i in range(self.num_layers):
            if self.rank:
                low_BxR = nn.Dense(self.rank, use_bias=False, kernel_init=dense_init,
                                   name=f"cross_{i}_v")(x_BxI)
                proj_BxI = nn.Dense(width, kernel_init=dense_init, name=f"cross_{i}_u")(low_BxR)
            else:
                proj_BxI = nn.Dense(width, kernel_init=dense_init, name=f"cross_{i}")(x_BxI)
            x_BxI = x0_BxI * proj_BxI + x_BxI
        return x_BxI


class DLRMDense(nn.Module):
    """Everything in DLRM except the embedding tables: (dense_BxQ, pooled) -> logits_B."""

    bottom_mlp: Sequence[int]
    top_mlp: Sequence[int]
    interaction: str = "dot"
    self_interaction: bool = False
    num_cross_layers: int = 0
    cross_rank: int = 0

    @nn.compact
    def __call__(self, dense_BxQ: jax.Array, pooled: Sequence[jax.Array]) -> jax.Array:
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1 output, got {tuple(self.top_mlp)}")
        bottom_BxE = MLP(self.bottom_mlp, name="bottom_mlp")(dense_BxQ)
        if self.interaction == "dot":
            dims = {p.shape[-1] for p in pooled} | {bottom_BxE.shape[-1]}
            if len(dims) != 1:
                raise ValueError("dot interaction needs the bottom MLP output and every table to "
                                 f"share one width, got widths {sorted(dims)}")
            x_BxI = dot_interaction(bottom_BxE, jnp.stack(pooled, axis=1), self.self_interaction)
        else:
            x_BxI = cat_interaction(bottom_BxE, pooled)
        if self.num_cross_layers:
            x_BxI = CrossNetwork(self.num_cross_layers, self.cross_rank, name="cross")(x_BxI)
        logits_Bx1 = MLP(self.top_mlp, final_activation=False, name="top_mlp")(x_BxI)
        return logits_Bx1[:, 0]


class DLRM(nn.Module):
    """Full DLRM: (dense_BxQ, ids tuple of [B, H_t]) -> logits_B."""

    tables: Sequence[TableSpec]
    bottom_mlp: Sequence[int]
    top_mlp: Sequence[int]
    interaction: str = "dot"
    self_interaction: bool = False
    num_cross_layers: int = 0
    cross_rank: int = 0
    combiner: str = "sum"

    def setup(self):
        self.embedding = EmbeddingBagCollection(self.tables, self.combiner)
        self.dense = DLRMDense(self.bottom_mlp, self.top_mlp, self.interaction,
                               self.self_interaction, self.num_cross_layers, self.cross_rank)

    def __call__(self, dense_BxQ: jax.Array, ids: Sequence[jax.Array]) -> jax.Array:
        return self.dense(dense_BxQ, self.embedding(ids))
