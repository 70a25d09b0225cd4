"""The DLRM train step: dense autodiff + sparse in-place embedding updates, and its setup.

The step is written against an `embedding.EmbeddingStage`: `LocalEmbeddingStage` keeps every
table on one device, `sharding.stage.ShardedEmbeddingStage` places them by a plan. The dense
half is differentiated with respect to its parameters and the pooled vectors, so no table-sized
gradient ever exists. `setup_training` compiles a stage's step against an abstract state, the
one setup the train loop and the benchmarks share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import optax

from autoshard_jax.data.batch import Batch
from autoshard_jax.embedding import (
    EmbeddingStage,
    LocalEmbeddingStage,
    TrainState,
    abstract_train_state,
    init_train_state,
)

# Re-exported: the training API (stage, state, init) in one import.
__all__ = [
    "EmbeddingStage",
    "LocalEmbeddingStage",
    "TrainSetup",
    "TrainState",
    "abstract_train_state",
    "bce_with_logits",
    "dense_loss_and_grads",
    "init_train_state",
    "jit_train_step",
    "make_eval_step",
    "make_train_step",
    "setup_training",
]


def bce_with_logits(logits_B: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Mean binary cross-entropy.

    Args:
      logits_B: model outputs.
      labels_B: 0/1 labels.

    Returns:
      The scalar mean loss.
    """
    return optax.sigmoid_binary_cross_entropy(logits_B, labels_B).mean()


def dense_loss_and_grads(dense_model: nn.Module, dense_params: dict, batch: Batch,
                         pooled: Sequence[jax.Array]
                         ) -> tuple[jax.Array, jax.Array, dict, tuple[jax.Array, ...]]:
    """The loss and its gradients w.r.t. the dense parameters and the pooled embeddings.

    Args:
      dense_model: (dense_BxQ, pooled) -> logits_B.
      dense_params: its parameters.
      batch: a batch with "dense" and "label".
      pooled: one [B, dim] pooled vector per table.

    Returns:
      (loss, logits_B, g_dense, g_pooled), g_pooled one [B, dim] per table.
    """

    def loss_fn(params, pooled):
        logits_B = dense_model.apply({"params": params}, batch["dense"], pooled)
        return bce_with_logits(logits_B, batch["label"]), logits_B

    (loss, logits_B), (g_dense, g_pooled) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(dense_params, tuple(pooled))
    return loss, logits_B, g_dense, g_pooled


def make_train_step(dense_model: nn.Module, stage: EmbeddingStage,
                    dense_tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The train step of a DLRM whose embeddings run in `stage`.

    Args:
      dense_model: the dense half.
      stage: the embedding stage.
      dense_tx: the dense optimizer.

    Returns:
      (state, batch) -> (state, {"loss"}), batch from `stage.prepare_batch`; jit it with the
      stage's state shardings and donate_argnums=0 (`setup_training` does).
    """

    def train_step(state: TrainState, batch: Batch):
        tables = state.params["embedding"]
        ids = stage.route(batch["ids"])  # once: the lookup's routing is the update's
        pooled = stage.lookup(tables, ids)
        loss, _, g_dense, g_pooled = dense_loss_and_grads(
            dense_model, state.params["dense"], batch, pooled)
        updates, dense_opt_state = dense_tx.update(
            g_dense, state.opt_state["dense"], state.params["dense"])
        dense_params = optax.apply_updates(state.params["dense"], updates)
        tables, emb_opt_state = stage.update(
            tables, state.opt_state["embedding"], ids, g_pooled, state.step)
        new_state = TrainState(
            step=state.step + 1,
            params={"embedding": tables, "dense": dense_params},
            opt_state={"embedding": emb_opt_state, "dense": dense_opt_state},
        )
        return new_state, {"loss": loss}

    return train_step


def make_eval_step(dense_model: nn.Module,
                   stage: EmbeddingStage) -> Callable[[dict, Batch], jax.Array]:
    """The eval step.

    Args:
      dense_model: the dense half.
      stage: the embedding stage.

    Returns:
      (params, batch) -> logits_B, batch from `stage.prepare_batch`.
    """

    def eval_step(params: dict, batch: Batch) -> jax.Array:
        pooled = stage.lookup(params["embedding"], stage.route(batch["ids"]))
        return dense_model.apply({"params": params["dense"]}, batch["dense"], pooled)

    return eval_step


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """A stage's compiled programs and the abstract state they were compiled against.

    Attributes:
      stage: the embedding stage.
      abstract: the TrainState's shapes, dtypes and shardings (the checkpoint restore target).
      init: rng -> the initial TrainState, created on the devices placed like `abstract`.
      train_step: compiled (state, batch) -> (state, {"loss"}); donates the state and accepts
        only batches shaped like the example (static shapes: one compilation).
      eval_step: jitted (params, batch) -> logits_B.
      place: host batch -> device batch (`stage.prepare_batch`).
    """

    stage: EmbeddingStage
    abstract: TrainState
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]
    eval_step: Callable[[dict, Batch], jax.Array]
    place: Callable[[Batch], Batch]


def jit_train_step(dense_model: nn.Module, stage: EmbeddingStage,
                   dense_tx: optax.GradientTransformation, state: TrainState):
    """`make_train_step` jitted with the stage's state shardings and donation (not compiled).

    Args:
      dense_model, stage, dense_tx: as for `make_train_step`.
      state: a TrainState (or its abstract form) of `stage`.

    Returns:
      The jitted step.
    """
    shardings = stage.state_shardings(state)
    return jax.jit(make_train_step(dense_model, stage, dense_tx),
                   in_shardings=(shardings, None), out_shardings=(shardings, None),
                   donate_argnums=0)


def setup_training(stage: EmbeddingStage, dense_model: nn.Module,
                   dense_tx: optax.GradientTransformation, example_batch: Batch) -> TrainSetup:
    """Compiles the train step against an abstract state, before any table exists.

    A resumed run restores into `abstract` and never holds a fresh state beside the restored
    one; a new run calls `init`.

    Args:
      stage: the embedding stage (local or sharded).
      dense_model: the dense half.
      dense_tx: the dense optimizer.
      example_batch: a host batch with the run's shapes.

    Returns:
      The TrainSetup.
    """
    abstract = abstract_train_state(stage, dense_model, dense_tx, example_batch)
    shardings = stage.state_shardings(abstract)
    train_step = jit_train_step(dense_model, stage, dense_tx, abstract).lower(
        abstract, stage.prepare_batch(example_batch)).compile()

    # Created inside jit with the state's shardings: each device makes only its own part.
    init = jax.jit(lambda rng: init_train_state(rng, dense_model, stage, dense_tx,
                                                example_batch), out_shardings=shardings)

    return TrainSetup(stage, abstract, init, train_step,
                      jax.jit(make_eval_step(dense_model, stage)), stage.prepare_batch)
