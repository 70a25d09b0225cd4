"""Both embedding stages implement the EmbeddingStage protocol with its exact signatures."""

import inspect
import typing

import pytest

from autoshard_jax.embedding import EmbeddingStage, LocalEmbeddingStage
from autoshard_jax.optim import sparse
from autoshard_jax.sharding.stage import ShardedEmbeddingStage
from autoshard_jax.sharding.synthetic_plans import random_plan
from autoshard_jax.tables.spec import TableSpec

TABLES = [TableSpec("a", 10, 4, 1.0), TableSpec("b", 20, 8, 2.0)]
METHODS = [name for name, member in vars(EmbeddingStage).items()
           if callable(member) and not name.startswith("_")]


def test_protocol_lists_the_stage_methods():
    assert set(METHODS) == {"init_tables", "abstract_tables", "init_state", "state_shardings",
                            "prepare_batch", "route", "lookup", "update"}


def _hints(fn):
    return typing.get_type_hints(fn)


@pytest.mark.parametrize("cls", [LocalEmbeddingStage, ShardedEmbeddingStage])
@pytest.mark.parametrize("name", METHODS)
def test_same_signature(cls, name):
    want, got = getattr(EmbeddingStage, name), getattr(cls, name)
    assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters)
    assert _hints(got) == _hints(want), f"{cls.__name__}.{name}"


def test_instances_are_stages():
    local = LocalEmbeddingStage(TABLES, sparse.sgd(0.1))
    sharded = ShardedEmbeddingStage(TABLES, random_plan(TABLES, 2), sparse.sgd(0.1))
    assert isinstance(local, EmbeddingStage) and isinstance(sharded, EmbeddingStage)
    assert local.tables == sharded.tables == tuple(TABLES)
    assert not isinstance(object(), EmbeddingStage)
