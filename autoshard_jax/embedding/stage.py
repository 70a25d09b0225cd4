"""The `EmbeddingStage` protocol and `LocalEmbeddingStage`, every table on one device.

A stage owns the embedding half of a training step: it creates the tables and their row-optimizer
state, turns a host batch into its own id layout (`prepare_batch`), looks pooled vectors up and
applies the sparse update given their gradients. The train step (train/step.py) is written
against the protocol; `sharding.stage.ShardedEmbeddingStage` implements it for a plan, with the
same signatures (tests/embedding/test_protocol.py checks them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from autoshard_jax.data.batch import Batch
from autoshard_jax.embedding.state import TrainState
from autoshard_jax.models.embedding import (
    check_combiner,
    draw_tables,
    embedding_bag,
    pool_backward,
)
from autoshard_jax.optim.sparse import RowOptimizer
from autoshard_jax.tables.spec import TableSpec

# A stage's ids: what its `prepare_batch` put in batch["ids"] (a tuple of ids_BxH for the local
# stage, host-routed arrays for the sharded one), passed through its `route` before lookup and
# update. Only the stage that made them reads them.
StageIds = Any


@runtime_checkable
class EmbeddingStage(Protocol):
    """What a training step needs from the embedding half.

    Attributes:
      tables: the table specs, in feature order; pooled vectors come back in this order.
    """

    tables: tuple[TableSpec, ...]

    def init_tables(self, rng: jax.Array) -> dict:
        """Initial tables (params["embedding"]) with `draw_tables`' values for `rng`."""
        ...

    def abstract_tables(self) -> dict:
        """`init_tables`' result as ShapeDtypeStructs with shardings, allocating nothing."""
        ...

    def init_state(self, tables: dict) -> dict:
        """Initial row-optimizer state (opt_state["embedding"]) for `tables`."""
        ...

    def state_shardings(self, state: TrainState) -> TrainState:
        """The sharding of every leaf of a TrainState of this stage."""
        ...

    def prepare_batch(self, batch: Batch) -> Batch:
        """A host batch placed on the stage's devices, ids in the stage's layout."""
        ...

    def route(self, ids: StageIds) -> StageIds:
        """Device-side id routing, once per step: lookup and update both take its result."""
        ...

    def lookup(self, tables: dict, ids: StageIds) -> tuple[jax.Array, ...]:
        """Pooled vectors, one [B, dim] array per table."""
        ...

    def update(self, tables: dict, state: dict, ids: StageIds, g_pooled: Sequence[jax.Array],
               step: jax.Array) -> tuple[dict, dict]:
        """Sparse in-place update of the looked-up rows from the pooled vectors' gradients."""
        ...


@dataclasses.dataclass(frozen=True)
class LocalEmbeddingStage:
    """All tables on one device (the first one), one [R, E] array each.

    Attributes:
      tables: the table specs.
      row_optimizer: the sparse optimizer applied to every table.
      combiner: "sum" or "mean" pooling.
    """

    tables: Sequence[TableSpec]
    row_optimizer: RowOptimizer
    combiner: str = "sum"

    def __post_init__(self):
        check_combiner(self.combiner)
        object.__setattr__(self, "tables", tuple(self.tables))

    @property
    def _sharding(self) -> jax.sharding.Sharding:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def init_tables(self, rng: jax.Array) -> dict:
        keys = jax.random.split(rng, len(self.tables))
        values = jax.jit(lambda keys: draw_tables(keys, self.tables))(keys)
        return {s.name: v for s, v in zip(self.tables, values, strict=True)}

    def abstract_tables(self) -> dict:
        return {s.name: jax.ShapeDtypeStruct((s.rows, s.dim), jnp.float32,
                                             sharding=self._sharding) for s in self.tables}

    def init_state(self, tables: dict) -> dict:
        return {s.name: self.row_optimizer.init(tables[s.name]) for s in self.tables}

    def state_shardings(self, state: TrainState) -> TrainState:
        return jax.tree.map(lambda _: self._sharding, state)

    def prepare_batch(self, batch: Batch) -> Batch:
        return jax.device_put(batch, self._sharding)

    def route(self, ids: StageIds) -> StageIds:
        return ids

    def lookup(self, tables: dict, ids: StageIds) -> tuple[jax.Array, ...]:
        return tuple(embedding_bag(tables[s.name], ids_BxH, self.combiner)
                     for s, ids_BxH in zip(self.tables, ids, strict=True))

    def update(self, tables: dict, state: dict, ids: StageIds, g_pooled: Sequence[jax.Array],
               step: jax.Array) -> tuple[dict, dict]:
        new_tables, new_state = {}, {}
        for s, ids_BxH, g_BxE in zip(self.tables, ids, g_pooled, strict=True):
            g_rows_BxHxE = pool_backward(g_BxE, ids_BxH, self.combiner)
            new_tables[s.name], new_state[s.name] = self.row_optimizer.update(
                tables[s.name], state[s.name], ids_BxH.reshape(-1),
                g_rows_BxHxE.reshape(-1, s.dim), step)
        return new_tables, new_state
