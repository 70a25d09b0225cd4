"""The embedding stage contract and the single-device stage.

`EmbeddingStage` is what the train step is written against; `LocalEmbeddingStage` (here) keeps
every table on one device and `sharding.stage.ShardedEmbeddingStage` places them by a plan.
`TrainState` and its initialisation live here too, below `sharding/`, so that sharded execution
types the state it lays out instead of guessing its fields.
"""

from autoshard_jax.embedding.stage import EmbeddingStage, LocalEmbeddingStage
from autoshard_jax.embedding.state import (
    TrainState,
    abstract_train_state,
    init_dense,
    init_train_state,
)

__all__ = [
    "EmbeddingStage",
    "LocalEmbeddingStage",
    "TrainState",
    "abstract_train_state",
    "init_dense",
    "init_train_state",
]
