"""The DLRM train step: dense autodiff + sparse in-place embedding updates.

The step is written against an *embedding stage*: an object with `lookup(tables, ids) -> pooled`
and `update(tables, state, ids, g_pooled, step) -> (tables, state)`. `LocalEmbeddingStage` keeps
every table on one device; the sharding package provides a stage that places tables by a plan.
The dense half is differentiated with respect to its parameters and the pooled vectors, so no
table-sized gradient ever exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autoshard_jax.data.batch import Batch
from autoshard_jax.models.embedding import (
    check_combiner,
    embedding_bag,
    pool_backward,
    uniform_table_init,
)
from autoshard_jax.optim.sparse import RowOptimizer
from autoshard_jax.tables.spec import TableSpec


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (which equals `step`)."""

    step: jax.Array
    params: dict  # {"embedding": {table: [R, E]}, "dense": flax params}
    opt_state: dict  # {"embedding": {table: row state}, "dense": optax state}


class EmbeddingStage(Protocol):
    def init_tables(self, rng: jax.Array) -> dict: ...

    def init_state(self, tables: dict) -> dict: ...

    def lookup(self, tables: dict, ids: Sequence[jax.Array]) -> tuple[jax.Array, ...]: ...

    def update(self, tables: dict, state: dict, ids: Sequence[jax.Array],
               g_pooled: Sequence[jax.Array], step: jax.Array) -> tuple[dict, dict]: ...


@dataclasses.dataclass(frozen=True)
class LocalEmbeddingStage:
    """All tables on the default device, one [R, E] array each."""

    tables: Sequence[TableSpec]
    row_optimizer: RowOptimizer
    combiner: str = "sum"

    def __post_init__(self):
        check_combiner(self.combiner)

    def init_tables(self, rng: jax.Array) -> dict:
        keys = jax.random.split(rng, len(self.tables))
        return {s.name: uniform_table_init(s.rows)(k, (s.rows, s.dim))
                for s, k in zip(self.tables, keys, strict=True)}

    def init_state(self, tables: dict) -> dict:
        return {s.name: self.row_optimizer.init(tables[s.name]) for s in self.tables}

    def lookup(self, tables: dict, ids: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        return tuple(embedding_bag(tables[s.name], ids_BxH, self.combiner)
                     for s, ids_BxH in zip(self.tables, ids, strict=True))

    def update(self, tables: dict, state: dict, ids: Sequence[jax.Array],
               g_pooled: Sequence[jax.Array], step: jax.Array) -> tuple[dict, dict]:
        new_tables, new_state = {}, {}
        for s, ids_BxH, g_BxE in zip(self.tables, ids, g_pooled, strict=True):
            g_rows_BxHxE = pool_backward(g_BxE, ids_BxH, self.combiner)
            new_tables[s.name], new_state[s.name] = self.row_optimizer.update(
                tables[s.name], state[s.name], ids_BxH.reshape(-1),
                g_rows_BxHxE.reshape(-1, s.dim), step)
        return new_tables, new_state


def bce_with_logits(logits_B: jax.Array, labels_B: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits_B, labels_B).mean()


def init_train_state(rng: jax.Array, dense_model: nn.Module, stage: EmbeddingStage,
                     dense_tx: optax.GradientTransformation, example_batch: Batch) -> TrainState:
    """Initial state; call under jax.jit so big tables are created once, on device."""
    emb_rng, dense_rng = jax.random.split(rng)
    tables = stage.init_tables(emb_rng)
    pooled = tuple(jnp.zeros((example_batch["label"].shape[0], s.dim), jnp.float32)
                   for s in stage.tables)
    dense_params = dense_model.init(dense_rng, example_batch["dense"], pooled)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"embedding": tables, "dense": dense_params},
        opt_state={"embedding": stage.init_state(tables), "dense": dense_tx.init(dense_params)},
    )


def dense_loss_and_grads(dense_model: nn.Module, dense_params: dict, batch: Batch,
                         pooled: Sequence[jax.Array]
                         ) -> tuple[jax.Array, jax.Array, dict, tuple[jax.Array, ...]]:
    """Loss, logits and gradients w.r.t. the dense parameters and the pooled embeddings."""

    def loss_fn(params, pooled):
        logits_B = dense_model.apply({"params": params}, batch["dense"], pooled)
        return bce_with_logits(logits_B, batch["label"]), logits_B

    (loss, logits_B), (g_dense, g_pooled) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(dense_params, tuple(pooled))
    return loss, logits_B, g_dense, g_pooled


def make_train_step(dense_model: nn.Module, stage: EmbeddingStage,
                    dense_tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """(state, batch) -> (state, {"loss"}); jit it with donate_argnums=0."""

    def train_step(state: TrainState, batch: Batch):
        tables = state.params["embedding"]
        pooled = stage.lookup(tables, batch["ids"])
        loss, _, g_dense, g_pooled = dense_loss_and_grads(
            dense_model, state.params["dense"], batch, pooled)
        updates, dense_opt_state = dense_tx.update(
            g_dense, state.opt_state["dense"], state.params["dense"])
        dense_params = optax.apply_updates(state.params["dense"], updates)
        tables, emb_opt_state = stage.update(
            tables, state.opt_state["embedding"], batch["ids"], g_pooled, state.step)
        new_state = TrainState(
            step=state.step + 1,
            params={"embedding": tables, "dense": dense_params},
            opt_state={"embedding": emb_opt_state, "dense": dense_opt_state},
        )
        return new_state, {"loss": loss}

    return train_step


def make_eval_step(dense_model: nn.Module,
                   stage: EmbeddingStage) -> Callable[[dict, Batch], jax.Array]:
    """(params, batch) -> logits_B."""

    def eval_step(params: dict, batch: Batch) -> jax.Array:
        pooled = stage.lookup(params["embedding"], batch["ids"])
        return dense_model.apply({"params": params["dense"]}, batch["dense"], pooled)

    return eval_step
