"""Sharding tasks as in the papers: disjoint train / test halves of a table pool, T tables on D
devices under a memory cap, with a chosen fraction of tables from the unseen half.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from autoshard_jax.placement import heuristics
from autoshard_jax.placement.memory import PlacementError, memory_model
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import TableSpec


@dataclasses.dataclass(frozen=True)
class Task:
    specs: tuple[TableSpec, ...]
    num_devices: int
    memory_bytes: int


def split_pool(pool: Sequence[TableSpec], seed: int = 0
               ) -> tuple[list[TableSpec], list[TableSpec]]:
    """Shuffles with `seed` (DreamShard's protocol) and halves: (train pool, test pool)."""
    perm = np.random.default_rng(seed).permutation(len(pool))
    half = len(pool) // 2
    return [pool[i] for i in perm[:half]], [pool[i] for i in perm[half:]]


def evaluation_pool(max_rows: int, seed: int = 0) -> tuple[list[TableSpec], list[TableSpec]]:
    """(train, test) halves of the synthetic 856-table pool the evaluation draws from. Cost
    data, mined plans and training tasks use the train half only, so test tables stay unseen."""
    return split_pool(synthetic_pool(856, seed=seed, max_rows=max_rows), seed)


def memory_for(specs: Sequence[TableSpec], num_devices: int, mem_factor: float,
               row_optimizer: str = "sgd") -> int:
    """A cap of `mem_factor` x max(balanced share of packed bytes, largest table), raised by 25%
    steps until size-greedy finds a legal plan: binding but feasible."""
    mem = memory_model(specs, 1, row_optimizer)
    table_bytes = mem.phys_T * mem.bytes_per_phys + mem.keys_T * mem.bytes_per_key
    budget = int(mem_factor * max(table_bytes.sum() / num_devices, table_bytes.max())
                 + mem.bytes_per_phys + mem.bytes_per_key)
    for _ in range(100):
        try:
            heuristics.lpt(specs, num_devices, memory_model(specs, budget, row_optimizer),
                           heuristics.greedy_key(specs, "size_greedy"))
            return budget
        except PlacementError:
            budget = int(budget * 1.25)
    raise AssertionError("unreachable: a budget of all tables always fits")


def sample_task(train_pool: Sequence[TableSpec], test_pool: Sequence[TableSpec],
                num_tables: int, num_devices: int, rng: np.random.Generator,
                unseen: float = 0.0, mem_factor: float = 1.5,
                row_optimizer: str = "sgd") -> Task:
    """T distinct tables, round(unseen x T) of them from the test pool, the rest from train."""
    n_unseen = int(round(unseen * num_tables))
    n_seen = num_tables - n_unseen
    if n_seen > len(train_pool) or n_unseen > len(test_pool):
        raise ValueError(f"cannot draw {n_seen} seen and {n_unseen} unseen tables from pools of "
                         f"{len(train_pool)} and {len(test_pool)}")
    picked = [train_pool[i] for i in rng.choice(len(train_pool), n_seen, replace=False)]
    picked += [test_pool[i] for i in rng.choice(len(test_pool), n_unseen, replace=False)]
    picked = [picked[i] for i in rng.permutation(len(picked))]
    return Task(tuple(picked), num_devices,
                memory_for(picked, num_devices, mem_factor, row_optimizer))
