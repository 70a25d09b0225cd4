"""The AutoShard loop's refinement: measure some of the policy's sampled plans with the oracle
and fine-tune the learned cost model on them, so the policy trains against a model that is
accurate where the policy actually goes.

Measurements are records in the cost-dataset format (`cost/dataset.py`): {"kind": "set",
"tables", "specs", "forward_ms", "backward_ms", "total_ms", "spread"} per device (papers'
cost) or {"kind": "plan", "tables", "specs", "num_devices", "placements", "total_ms",
"compute_ms", "exchange_ms"} per plan (spmd), and go to `CostModel.update(records)`, which
returns the fine-tuned model. They are also appended
to `<workdir>/refine_costs.jsonl` so nothing measured is lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from autoshard_jax.cost.network import times_every_device
from autoshard_jax.placement.api import plan_of
from autoshard_jax.placement.costs import Cost, learned_cost
from autoshard_jax.placement.evaluate import device_tables
from autoshard_jax.placement.tasks import Task

REFINE_FILE = "refine_costs.jsonl"


def plans_of_batch(tasks: Sequence[Task], built: Sequence[tuple[dict, np.ndarray]],
                   assign_BxExTxD: np.ndarray, count: int) -> list[tuple[Task, np.ndarray]]:
    """(task, device_T) of the first sampled episode of the first `count` tasks."""
    out = []
    for b in range(min(count, len(tasks))):
        task, (_, order) = tasks[b], built[b]
        assign_TxD = assign_BxExTxD[b, 0, :len(order), :task.num_devices]
        device_T = np.zeros(len(order), np.int64)
        device_T[order] = assign_TxD.argmax(1)
        out.append((task, device_T))
    return out


def measure_records(task: Task, device_T: np.ndarray, objective: str, batch_size: int,
                    measure_set: Callable | None = None, measure_plan: Callable | None = None,
                    every_device: bool = True) -> list[dict]:
    """Oracle measurements of one plan (injectable measure functions for tests);
    `every_device`: a plan's compute is its slowest device's (False: the busiest's)."""
    if measure_set is None or measure_plan is None:
        from autoshard_jax.cost import oracle
        measure_set = measure_set or oracle.measure_set
        measure_plan = measure_plan or oracle.measure_plan
    plan = plan_of(task.specs, device_T, task.num_devices, task.memory_bytes)
    base = {"batch_size": batch_size, "source": "refine"}
    if objective == "spmd":
        cost = measure_plan(task.specs, plan, batch_size, every_device=every_device)
        return [{**base, "kind": "plan", "tables": [s.name for s in task.specs],
                 "specs": [s.to_json() for s in task.specs],
                 "num_devices": plan.num_devices, "placements": plan.placements,
                 **dataclasses.asdict(cost)}]
    return [{**base, "kind": "set", "tables": [s.name for s in group],
             "specs": [s.to_json() for s in group],
             **dataclasses.asdict(measure_set(group, batch_size))}
            for group in device_tables(task.specs, plan) if group]


def make_refine_fn(workdir: str, log=print, **measure_kw) -> Callable:
    """`refine_fn(cost, tasks, built, assign, config) -> Cost` for `trainer.train`."""

    def refine(cost: Cost, tasks, built, assign, c) -> Cost:
        if cost.model is None or not hasattr(cost.model, "update"):
            log("refine: the cost model is not a refinable learned model; skipped")
            return cost
        if not measure_kw:  # the oracle's measurements go in the unit the model predicts in
            from autoshard_jax.cost.oracle import DEFAULT_PROTOCOL, use_model_unit
            use_model_unit(cost.model.meta, DEFAULT_PROTOCOL.clock)
        records = []
        every_device = times_every_device(cost.model.meta)  # timed as its data was
        for task, device_T in plans_of_batch(tasks, built, assign, c.refine_plans):
            records += measure_records(task, device_T, c.objective, c.batch_size,
                                       every_device=every_device, **measure_kw)
        with open(os.path.join(workdir, REFINE_FILE), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        updated = cost.model.update(records)
        model = updated if updated is not None else cost.model
        log(f"refine: {len(records)} oracle measurements, cost model updated")
        return learned_cost(model, cost.name.split(":", 1)[-1], cost.batch_size)

    return refine
