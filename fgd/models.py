"""The two models of the online study, behind one (init, logits) interface.

Online training here differentiates the whole parameter pytree densely: the generator forecasts
and mixes full gradients, and the study's tables are small (thousands of rows), so a table-sized
gradient costs microseconds. The core's sparse step (train/step.py) is for tables that are not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from autoshard_jax.data.batch import Batch
from autoshard_jax.models.dlrm import DLRM, MLP
from autoshard_jax.models.embedding import embedding_bag, table_init
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train.step import bce_with_logits

MOVIELENS_FEATURES = ("user", "item", "genre", "history", "gender", "age", "occupation")


class EmbMLP(nn.Module):
    """The temporal-shift literature's base model (ASMG EmbMLP): per-feature embeddings of width
    `dim` (the history bag shares the item table), concatenated, then an MLP 40-20-10-1."""

    vocab: dict
    dim: int = 8
    mlp: Sequence[int] = (40, 20, 10, 1)

    @nn.compact
    def __call__(self, dense_BxD: jax.Array, ids: Sequence[jax.Array]) -> jax.Array:
        del dense_BxD
        tables = {name: self.param(name, table_init, (rows, self.dim))
                  for name, rows in sorted(self.vocab.items())}
        pooled = []
        for feature, ids_BxH in zip(MOVIELENS_FEATURES, ids, strict=True):
            table = tables["item" if feature == "history" else feature]
            pooled.append(embedding_bag(table, ids_BxH, "mean"))
        return MLP(self.mlp, final_activation=False, name="mlp")(
            jnp.concatenate(pooled, axis=1))[:, 0]


@dataclasses.dataclass(frozen=True)
class OnlineModel:
    """A Flax module (dense_BxD, ids) -> logits_B with weighted BCE; params are a plain pytree."""

    module: nn.Module

    def init(self, rng: jax.Array, example: Batch) -> dict:
        return self.module.init(rng, example["dense"], example["ids"])["params"]

    def logits(self, params: dict, batch: Batch) -> jax.Array:
        return self.module.apply({"params": params}, batch["dense"], batch["ids"])

    def loss(self, params: dict, batch: Batch) -> jax.Array:
        """Mean BCE over the batch's real rows (`weight` 0 marks padding rows)."""
        logits_B = self.logits(params, batch)
        weight_B = batch["weight"]
        per_row_B = jax.vmap(bce_with_logits)(logits_B[:, None], batch["label"][:, None])
        return jnp.sum(per_row_B * weight_B) / jnp.maximum(jnp.sum(weight_B), 1.0)


def dlrm_model(tables: Sequence[TableSpec], bottom_mlp: Sequence[int],
               top_mlp: Sequence[int], interaction: str = "dot") -> OnlineModel:
    return OnlineModel(DLRM(tuple(tables), tuple(bottom_mlp), tuple(top_mlp), interaction))


def embmlp_model(vocab: dict, dim: int = 8, mlp: Sequence[int] = (40, 20, 10, 1)) -> OnlineModel:
    return OnlineModel(EmbMLP(dict(vocab), dim, tuple(mlp)))
