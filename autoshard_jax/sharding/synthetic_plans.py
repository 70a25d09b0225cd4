"""Reference table sets and plans (random, byte-balanced greedy, skewed) for tests and benchmarks.

These are baselines to exercise execution, not placement search (that lives in `placement/`).
"""

from __future__ import annotations

import numpy as np

from autoshard_jax.sharding.plan import ShardingPlan, plan_from_mapping
from autoshard_jax.tables.spec import TableSpec

DIMS = (4, 8, 16, 32, 64, 128)


def random_tables(num_tables: int, seed: int = 0, min_rows: int = 10, max_rows: int = 1_000_000,
                  max_pooling: float = 100.0, dims: tuple[int, ...] = DIMS) -> list[TableSpec]:
    """Random tables for tests and benchmarks.

    Args:
      num_tables: how many (named t000, t001, ...).
      seed: the draw's seed.
      min_rows, max_rows: log-uniform row range.
      max_pooling: pooling factors are log-uniform in [1, max_pooling].
      dims: widths to choose from uniformly.

    Returns:
      The TableSpecs.
    """
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.uniform(np.log(min_rows), np.log(max_rows), num_tables)).astype(int)
    pooling = np.exp(rng.uniform(0.0, np.log(max_pooling), num_tables))
    return [TableSpec(f"t{i:03d}", int(max(1, r)), int(rng.choice(dims)), float(round(p, 2)))
            for i, (r, p) in enumerate(zip(rows, pooling, strict=True))]


def unlimited_memory(specs: list[TableSpec]) -> int:
    """A budget no plan of these tables exceeds (all tables + elementwise state, 8x padded).

    Args:
      specs: the tables.

    Returns:
      Bytes per device.
    """
    return 16 * sum(s.rows * s.dim * 4 for s in specs) + (1 << 20)


def random_plan(specs: list[TableSpec], num_devices: int, seed: int = 0,
                mix: tuple[float, float, float] = (1.0, 0.0, 0.0),
                memory_bytes_per_device: int | None = None) -> ShardingPlan:
    """A random plan: each table table_wise on a uniform random device, or row_wise/replicated.

    Args:
      specs: the tables.
      num_devices: D.
      seed: the draw's seed.
      mix: probabilities of (table_wise, row_wise, replicated).
      memory_bytes_per_device: the budget (default: `unlimited_memory`).

    Returns:
      The ShardingPlan.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(mix, float) / sum(mix)
    mapping = {}
    for s in specs:
        kind = rng.choice(3, p=p)
        mapping[s.name] = (int(rng.integers(num_devices)), "row_wise", "replicated")[kind]
    return plan_from_mapping(mapping, num_devices,
                             memory_bytes_per_device or unlimited_memory(specs),
                             {"placer": "random", "seed": seed, "mix": list(mix)})


def greedy_bytes_plan(specs: list[TableSpec], num_devices: int,
                      memory_bytes_per_device: int | None = None,
                      row_wise_above: float = 0.5) -> ShardingPlan:
    """Byte-balanced plan: largest table first onto the device with the fewest bytes so far.

    A table larger than `row_wise_above` x (total bytes / devices) cannot be balanced as a
    whole, so it is split row_wise over all devices (as TorchRec's planner would).

    Args:
      specs: the tables.
      num_devices: D.
      memory_bytes_per_device: the budget (default: `unlimited_memory`).
      row_wise_above: the share of a device's fair bytes above which a table goes row_wise.

    Returns:
      The ShardingPlan.
    """
    share = sum(s.param_bytes() for s in specs) / num_devices
    load = [0] * num_devices
    mapping: dict[str, int | str] = {}
    for s in sorted(specs, key=lambda s: -s.param_bytes()):
        if num_devices > 1 and s.param_bytes() > row_wise_above * share:
            mapping[s.name] = "row_wise"
            load = [x + s.param_bytes() / num_devices for x in load]
            continue
        d = int(np.argmin(load))
        mapping[s.name] = d
        load[d] += s.param_bytes()
    mapping = {s.name: mapping[s.name] for s in specs}
    return plan_from_mapping(mapping, num_devices,
                             memory_bytes_per_device or unlimited_memory(specs),
                             {"placer": "greedy_bytes", "row_wise_above": row_wise_above})


def skewed_plan(specs: list[TableSpec], num_devices: int, fraction: float = 0.5,
                seed: int = 0, memory_bytes_per_device: int | None = None) -> ShardingPlan:
    """A deliberately imbalanced plan: `fraction` of the tables on device 0, the rest random.

    Args:
      specs: the tables.
      num_devices: D.
      fraction: the expected share of tables on device 0.
      seed: the draw's seed.
      memory_bytes_per_device: the budget (default: `unlimited_memory`).

    Returns:
      The ShardingPlan.
    """
    rng = np.random.default_rng(seed)
    mapping = {s.name: 0 if rng.random() < fraction else int(rng.integers(num_devices))
               for s in specs}
    return plan_from_mapping(mapping, num_devices,
                             memory_bytes_per_device or unlimited_memory(specs),
                             {"placer": "skewed", "fraction": fraction, "seed": seed})
