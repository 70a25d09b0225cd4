"""DLRM (Naumov et al. 2019) with dot or concatenation interaction and optional DCNv2 cross layers.

The dense half computes in `dtype` (float32, or bfloat16 for accelerators) while its parameters
stay float32: inputs are cast on entry, logits return as float32.

The model is two modules: `EmbeddingBagCollection` (sparse, updated row-wise) and `DLRMDense`
(bottom MLP, interaction, cross layers, top MLP; updated by optax). Training differentiates the
dense module with respect to its parameters and the pooled embeddings, then updates embedding rows
sparsely, so the two halves are separate parameter subtrees: params = {"embedding", "dense"}.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.models.embedding import EmbeddingBagCollection
from autoshard_jax.tables.spec import TableSpec

INTERACTIONS = ("dot", "cat")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype -> compute dtype

dense_init = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")  # public DLRM init


class MLP(nn.Module):
    """ReLU MLP; the last layer is linear when `final_activation` is False."""

    features: Sequence[int]
    final_activation: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        for i, width in enumerate(self.features):
            x_BxI = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype,
                             name=f"layer_{i}")(x_BxI)
            if i < len(self.features) - 1 or self.final_activation:
                x_BxI = nn.relu(x_BxI)
        return x_BxI


def compute_dtype(dtype: Any) -> Any:
    """A jnp dtype from a config name ("float32", "bfloat16") or a dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return dtype


def num_dot_features(num_vectors: int, self_interaction: bool) -> int:
    n = num_vectors
    return n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2


def _pair_indices(n: int, self_interaction: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column of each pair in the public DLRM's order, and the [n, n] map from a Gram
    entry to its pair (both triangles; n_pairs where there is none)."""
    rows_P, cols_P = np.tril_indices(n, k=0 if self_interaction else -1)
    pair_NxN = np.full((n, n), len(rows_P))
    pair_NxN[rows_P, cols_P] = pair_NxN[cols_P, rows_P] = np.arange(len(rows_P))
    return rows_P, cols_P, pair_NxN


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pair_dots(vectors_BxNxE: jax.Array, self_interaction: bool) -> jax.Array:
    """Dot products of the lower-triangle pairs of N vectors: [B, N, E] -> [B, P]."""
    rows_P, cols_P, _ = _pair_indices(vectors_BxNxE.shape[1], self_interaction)
    gram_BxNxN = jnp.einsum("bne,bme->bnm", vectors_BxNxE, vectors_BxNxE)
    return gram_BxNxN[:, rows_P, cols_P]


def _pair_dots_fwd(vectors_BxNxE, self_interaction):
    return _pair_dots(vectors_BxNxE, self_interaction), vectors_BxNxE


def _pair_dots_bwd(self_interaction, vectors_BxNxE, g_BxP):
    """d/dv_n = sum_m g_(n,m) v_m over both triangles: one gather into a symmetric [B, N, N]
    (zero where no pair) and one batched matmul. Autodiff of the forward would scatter-add into
    a zeroed Gram and run two matmuls; this is the same sum in one accumulation order."""
    rows_P, cols_P, pair_NxN = _pair_indices(vectors_BxNxE.shape[1], self_interaction)
    if self_interaction:  # d(v_i . v_i)/dv_i = 2 v_i, and a diagonal entry appears once
        g_BxP = g_BxP * jnp.asarray(np.where(rows_P == cols_P, 2.0, 1.0), g_BxP.dtype)[None, :]
    g_BxQ = jnp.concatenate([g_BxP, jnp.zeros_like(g_BxP[:, :1])], axis=1)  # Q = P + 1
    g_BxNxN = g_BxQ[:, pair_NxN]
    return (jnp.einsum("bnm,bme->bne", g_BxNxN, vectors_BxNxE),)


_pair_dots.defvjp(_pair_dots_fwd, _pair_dots_bwd)


def dot_interaction(bottom_BxE: jax.Array, pooled_BxFxE: jax.Array,
                    self_interaction: bool = False) -> jax.Array:
    """Bottom output concatenated with the pairwise dot products of all F+1 vectors.

    Pairs (i, j) with j < i (or j <= i with self-interaction), in row-major lower-triangle order,
    the order of the public DLRM. The gradient is hand-written (`_pair_dots_bwd`): it is the
    autodiff gradient up to float32 summation order, without the Gram-sized scatter.
    """
    vectors_BxNxE = jnp.concatenate([bottom_BxE[:, None, :], pooled_BxFxE], axis=1)
    return jnp.concatenate([bottom_BxE, _pair_dots(vectors_BxNxE, self_interaction)], axis=1)


def cat_interaction(bottom_BxE: jax.Array, pooled: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate([bottom_BxE, *pooled], axis=1)


class CrossNetwork(nn.Module):
    """DCNv2 cross layers x_{l+1} = x_0 * (W x_l + b) + x_l, with W = U V when `rank` > 0."""

    num_layers: int
    rank: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x0_BxI: jax.Array) -> jax.Array:
        width = x0_BxI.shape[-1]
        x_BxI = x0_BxI
        for i in range(self.num_layers):
            if self.rank:
                low_BxR = nn.Dense(self.rank, use_bias=False, kernel_init=dense_init,
                                   dtype=self.dtype, name=f"cross_{i}_v")(x_BxI)
                proj_BxI = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype,
                                    name=f"cross_{i}_u")(low_BxR)
            else:
                proj_BxI = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype,
                                    name=f"cross_{i}")(x_BxI)
            x_BxI = x0_BxI * proj_BxI + x_BxI
        return x_BxI


class DLRMDense(nn.Module):
    """Everything in DLRM except the embedding tables: (dense_BxQ, pooled) -> float32 logits_B.

    `dtype` is the compute dtype (a key of DTYPES or a jnp dtype); parameters are float32.
    """

    bottom_mlp: Sequence[int]
    top_mlp: Sequence[int]
    interaction: str = "dot"
    self_interaction: bool = False
    num_cross_layers: int = 0
    cross_rank: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, dense_BxQ: jax.Array, pooled: Sequence[jax.Array]) -> jax.Array:
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1 output, got {tuple(self.top_mlp)}")
        dtype = compute_dtype(self.dtype)
        dense_BxQ = dense_BxQ.astype(dtype)
        pooled = [p.astype(dtype) for p in pooled]
        bottom_BxE = MLP(self.bottom_mlp, dtype=dtype, name="bottom_mlp")(dense_BxQ)
        if self.interaction == "dot":
            dims = {p.shape[-1] for p in pooled} | {bottom_BxE.shape[-1]}
            if len(dims) != 1:
                raise ValueError("dot interaction needs the bottom MLP output and every table to "
                                 f"share one width, got widths {sorted(dims)}")
            x_BxI = dot_interaction(bottom_BxE, jnp.stack(pooled, axis=1), self.self_interaction)
        else:
            x_BxI = cat_interaction(bottom_BxE, pooled)
        if self.num_cross_layers:
            x_BxI = CrossNetwork(self.num_cross_layers, self.cross_rank, dtype=dtype,
                                 name="cross")(x_BxI)
        logits_Bx1 = MLP(self.top_mlp, final_activation=False, dtype=dtype,
                         name="top_mlp")(x_BxI)
        return logits_Bx1[:, 0].astype(jnp.float32)


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
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = EmbeddingBagCollection(self.tables, self.combiner)
        self.dense = DLRMDense(self.bottom_mlp, self.top_mlp, self.interaction,
                               self.self_interaction, self.num_cross_layers, self.cross_rank,
                               self.dtype)

    def __call__(self, dense_BxQ: jax.Array, ids: Sequence[jax.Array]) -> jax.Array:
        return self.dense(dense_BxQ, self.embedding(ids))
