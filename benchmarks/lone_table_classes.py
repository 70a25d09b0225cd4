"""A width class of one slot against the same class padded to two, side by side in one run.

  .venv/bin/python benchmarks/lone_table_classes.py [--rounds=3] [--batch=512]

`lookup_meta.MIN_SLOTS` pads every width class to two slots: with one, XLA:CPU lowered the
backward's gather of slot gradients into a broadcast with a transposing layout copy feeding the
scatter, and the step took up to twice as long. This times both layouts (MIN_SLOTS 1 and 2) with the
cost oracle's programs, alternating them over rounds (compiled afresh each time, CPU clock,
this process pinned to one core):
  * sets: one table alone on a device (its class has one real slot), by dim and ids per sample,
    for SGD and row-wise Adagrad (forward + backward + update, ms);
  * plans: the SPMD step of a class-balancing plan (spmd_greedy spreads each class one table
    per device) and of size_lookup_greedy's, for 50 tables of the 856-table pool on 8 devices.
Ratios below 1 mean the padding helps.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

if __name__ == "__main__":  # the simulated device count is fixed before JAX initialises
    jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoshard_jax.cost import oracle  # noqa: E402
from autoshard_jax.cost.timing import Protocol, pin_one_core  # noqa: E402
from autoshard_jax.placement import api  # noqa: E402
from autoshard_jax.placement.tasks import sample_task  # noqa: E402
from autoshard_jax.sharding import lookup_meta  # noqa: E402
from autoshard_jax.tables.pools import synthetic_pool  # noqa: E402
from autoshard_jax.tables.spec import TableSpec  # noqa: E402

PROTOCOL = Protocol(warmup=3, repeats=10, trim=2, clock="cpu", normalize=False)


def timed(measure, min_slots: int) -> float:
    """One measurement under MIN_SLOTS = min_slots, its programs built afresh."""
    lookup_meta.MIN_SLOTS = min_slots
    oracle._programs.clear()  # the programs' cache key does not hold MIN_SLOTS
    return measure()


def compare(name: str, measure, rounds: int) -> None:
    ms = {1: [], 2: []}
    for r in range(rounds):
        for k in ((1, 2), (2, 1))[r % 2]:  # alternate which layout runs first
            ms[k].append(timed(measure, k))
    one, two = np.median(ms[1]), np.median(ms[2])
    print(f"| {name} | {one:.2f} | {two:.2f} | {two / one:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=512)
    a = p.parse_args()
    pin_one_core()
    print("| case | 1 slot ms | 2 slots ms | ratio |\n|---|---|---|---|")
    for optimizer in ("sgd", "rowwise_adagrad"):
        for dim, ids in ((32, 10), (128, 10), (32, 100), (128, 100)):
            spec = TableSpec(f"lone{dim}x{ids}", 60_000, dim, float(ids))
            compare(f"set: dim {dim}, {ids} ids/sample, {optimizer}",
                    lambda s=spec, o=optimizer: oracle.measure_set(
                        [s], a.batch, row_optimizer=o, protocol=PROTOCOL).total_ms, a.rounds)
    pool = synthetic_pool(856, seed=0, max_rows=100_000)
    rng = np.random.default_rng(2)
    for t in range(2):
        task = sample_task(pool[:428], pool[428:], 50, 8, rng, 1.0, 1.5)
        for method in ("spmd_greedy", "size_lookup_greedy"):
            plan = api.plan_of(task.specs, api.place(task.specs, 8, task.memory_bytes, method),
                               8, task.memory_bytes)
            compare(f"plan: task {t}, {method}, 8 devices, sgd",
                    lambda p=plan, s=task.specs: oracle.measure_plan(
                        s, p, a.batch, protocol=PROTOCOL).total_ms, a.rounds)


if __name__ == "__main__":
    main()
