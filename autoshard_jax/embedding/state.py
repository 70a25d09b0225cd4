"""The training state and its initialisation, for any embedding stage.

Initial values do not depend on the stage: tables are drawn per table from one split of the rng
(`models.embedding.draw_tables`) and the dense half from the other (`init_dense`), so a sharded
run starts from exactly the values of a single-device run with the same seed. Each table row is
drawn from its own key (the table's key folded with the row number,
`models.embedding.draw_rows`), so a device that holds any subset of a table's rows draws exactly
those rows, whatever the device count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from autoshard_jax.data.batch import Batch
from autoshard_jax.tables.spec import TableSpec

if TYPE_CHECKING:
    from autoshard_jax.embedding.stage import EmbeddingStage


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (which equals `step`).

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: {"embedding": the stage's tables, "dense": flax params of the dense model}.
      opt_state: {"embedding": the stage's row-optimizer state, "dense": optax state}.
    """

    step: jax.Array
    params: dict
    opt_state: dict


def init_dense(rng: jax.Array, dense_model: nn.Module, dense_tx: optax.GradientTransformation,
               dense_BxQ: jax.Array, specs: Sequence[TableSpec]) -> tuple[dict, optax.OptState]:
    """The dense model's parameters and optimizer state (the one dense init of the package).

    Args:
      rng: PRNG key of the dense half.
      dense_model: maps (dense_BxQ, pooled tuple of [B, dim]) to logits.
      dense_tx: the dense optimizer.
      dense_BxQ: an example batch's dense features (only its shape matters).
      specs: the tables, for the pooled inputs' widths.

    Returns:
      (params, opt_state).
    """
    b = dense_BxQ.shape[0]

    def init(rng, dense_BxQ):
        pooled = tuple(jnp.zeros((b, s.dim), jnp.float32) for s in specs)
        params = dense_model.init(rng, dense_BxQ, pooled)["params"]
        return params, dense_tx.init(params)

    return jax.jit(init)(rng, jnp.asarray(dense_BxQ))


def init_train_state(rng: jax.Array, dense_model: nn.Module, stage: EmbeddingStage,
                     dense_tx: optax.GradientTransformation, example_batch: Batch) -> TrainState:
    """The initial state; values depend on `rng` only, not on the stage or device count.

    Traceable: jit it with `out_shardings=stage.state_shardings(...)` (as `train.step.
    setup_training` does) so each device creates only its own part of the state.

    Args:
      rng: the run's PRNG key.
      dense_model: the dense half of the model.
      stage: the embedding stage.
      dense_tx: the dense optimizer.
      example_batch: a host batch (shapes only).

    Returns:
      TrainState at step 0.
    """
    emb_rng, dense_rng = jax.random.split(rng)
    tables = stage.init_tables(emb_rng)
    dense_params, dense_opt = init_dense(dense_rng, dense_model, dense_tx,
                                         example_batch["dense"], stage.tables)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"embedding": tables, "dense": dense_params},
        opt_state={"embedding": stage.init_state(tables), "dense": dense_opt},
    )


def abstract_train_state(stage: EmbeddingStage, dense_model: nn.Module,
                         dense_tx: optax.GradientTransformation,
                         example_batch: Batch) -> TrainState:
    """Shapes, dtypes and shardings of `init_train_state`'s result, allocating nothing.

    The target a checkpoint restores into and the train step compiles against.

    Args:
      stage: the embedding stage.
      dense_model: the dense half of the model.
      dense_tx: the dense optimizer.
      example_batch: a host batch (shapes only).

    Returns:
      A TrainState of jax.ShapeDtypeStruct leaves carrying the stage's shardings.
    """
    tables = stage.abstract_tables()
    dense_BxQ = jax.ShapeDtypeStruct(np.shape(example_batch["dense"]), jnp.float32)
    dense_params, dense_opt = jax.eval_shape(
        lambda r, x: init_dense(r, dense_model, dense_tx, x, stage.tables),
        jax.random.key(0), dense_BxQ)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                       params={"embedding": tables, "dense": dense_params},
                       opt_state={"embedding": jax.eval_shape(stage.init_state, tables),
                                  "dense": dense_opt})
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, stage.state_shardings(state))
