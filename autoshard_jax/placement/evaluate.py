"""Plan evaluation: per-device cost, max, min/max balance, SPMD cost and padding of a plan.

Three ways to get the numbers, same fields:
* "oracle": measured by the cost oracle (`cost/oracle.py`): each device's own tables fused on one
  device (`measure_set`, papers' protocol) and the plan's SPMD step (`measure_plan`);
* "step": the oracle's numbers plus `step_ms`, the full sharded DLRM train step timed on the
  plan's devices, with the code of `benchmarks/sharded_step.py`;
* "predicted": a cost model (`placement/costs.py`), no timing (fast; for search and training).
A row-wise table counts on each device as a 1/D shard seeing 1/D of the ids, a replicated one as
the whole table seeing 1/D of the ids (the local batch).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
from collections.abc import Sequence

import numpy as np

from autoshard_jax.errors import InputError
from autoshard_jax.optim.sparse import state_kinds
from autoshard_jax.placement.costs import Cost, plan_costs
from autoshard_jax.placement.split import ROW_WISE, expand, row_wise_shard
from autoshard_jax.sharding.plan import ShardingPlan
from autoshard_jax.tables.spec import TableSpec

MEASURES = ("oracle", "step")
_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "sharded_step.py")


def device_tables(specs: Sequence[TableSpec], plan: ShardingPlan) -> list[list[TableSpec]]:
    """The tables (or shards) each device holds, as specs a per-device measurement takes."""
    d_count = plan.num_devices
    out: list[list[TableSpec]] = [[] for _ in range(d_count)]
    for s in specs:
        p = plan.placements[s.name]
        if p["type"] == "table_wise":
            out[p["device"]].append(s)
            continue
        shard = (row_wise_shard(s, d_count) if p["type"] == "row_wise" else
                 dataclasses.replace(s, pooling_factor=s.pooling_factor / d_count))
        for d in range(d_count):
            out[d].append(shard)
    return out


def summarize(device_ms: Sequence[float], spmd_ms: float, padding: float) -> dict:
    dev = [float(x) for x in device_ms]
    return {"device_ms": dev, "max_ms": max(dev),
            "min_max_ratio": min(dev) / max(dev) if max(dev) > 0 else 1.0,
            "spmd_ms": float(spmd_ms), "padding_overhead": padding}


def padding_overhead(specs, plan: ShardingPlan, row_optimizer: str = "sgd") -> float:
    layout = plan.validate(specs, row_optimizer)
    return float(layout.padding_overhead(state_kinds(row_optimizer)))


def evaluate_predicted(specs: Sequence[TableSpec], plan: ShardingPlan, cost: Cost,
                       row_optimizer: str = "sgd") -> dict:
    """Cost-model numbers of a plan of table_wise and row_wise tables (`split.expand`)."""
    kinds = {plan.placements[s.name]["type"] for s in specs}
    if "replicated" in kinds:
        raise InputError("predicted evaluation covers table_wise and row_wise plans only")
    device_T = np.asarray([plan.placements[s.name].get("device", ROW_WISE) for s in specs])
    dev_D, spmd = plan_costs(cost, *expand(specs, device_T, plan.num_devices),
                             plan.num_devices)
    return summarize(dev_D, spmd, padding_overhead(specs, plan, row_optimizer))


def evaluate_measured(specs: Sequence[TableSpec], plan: ShardingPlan, batch_size: int,
                      measure: str = "oracle", row_optimizer: str = "sgd", seed: int = 0,
                      protocol=None, every_device: bool = True) -> dict:
    """Oracle-measured numbers (and `step_ms` when measure == "step"); `every_device`: the
    step's compute is its slowest device's (False: the busiest device's alone;
    `oracle.measure_plan`)."""
    from autoshard_jax.cost import oracle

    pad = padding_overhead(specs, plan, row_optimizer)
    kw = {"row_optimizer": row_optimizer, "seed": seed}
    if protocol is not None:
        kw["protocol"] = protocol
    dev = [oracle.measure_set(tables, batch_size, **kw).total_ms if tables else 0.0
           for tables in device_tables(specs, plan)]
    spmd = oracle.measure_plan(specs, plan, batch_size, every_device=every_device, **kw).total_ms
    out = summarize(dev, spmd, pad)
    if measure == "step":
        out["step_ms"] = step_ms(specs, plan, batch_size, row_optimizer, seed)
    return out


def ensure_devices(n: int) -> None:
    """On CPU, simulate at least n devices (possible only before JAX's backend starts)."""
    import jax

    try:
        if jax.config.jax_num_cpu_devices < n:
            jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already up: the device count is what it is
    if jax.device_count() < n:
        raise InputError(f"a plan needs {n} devices, this backend has {jax.device_count()}")


def _bench_module():
    spec = importlib.util.spec_from_file_location("sharded_step_bench", os.path.abspath(_BENCH))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def step_ms(specs: Sequence[TableSpec], plan: ShardingPlan, batch_size: int,
            row_optimizer: str = "sgd", seed: int = 0, steps: int = 5) -> float:
    """Median ms of the full sharded train step (benchmarks/sharded_step.py's `time_plan`)."""
    import jax

    bench = _bench_module()
    args = types.SimpleNamespace(optimizer=row_optimizer, seed=seed, batch=batch_size,
                                 steps=steps)
    devices = jax.devices()[:plan.num_devices]
    return 1e3 * bench.time_plan(list(specs), plan, args, devices)
