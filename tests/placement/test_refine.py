"""The AutoShard loop's refinement: sampled plans measured, records handed to the cost model."""

import dataclasses
import json
import os

import numpy as np

from autoshard_jax.cost.analytical import analytical_cost_fn
from autoshard_jax.placement import env as env_lib
from autoshard_jax.placement import heuristics
from autoshard_jax.placement.costs import class_onehot, learned_cost, table_features
from autoshard_jax.placement.memory import memory_model
from autoshard_jax.placement.refine import REFINE_FILE, make_refine_fn
from autoshard_jax.placement.tasks import Task
from autoshard_jax.tables.spec import TableSpec
from launch.configs import sharder_runlocal


@dataclasses.dataclass
class FakeSet:
    forward_ms: float
    backward_ms: float
    total_ms: float
    spread: float


@dataclasses.dataclass
class FakePlan:
    total_ms: float
    compute_ms: float
    exchange_ms: float


class FakeModel:
    def __init__(self, spmd_timing="every_device"):
        self.updates = []
        self.meta = {"spmd_timing": spmd_timing}
        self.fn = analytical_cost_fn(64)

    def cost_fn(self, f, a, c):
        return self.fn(f, a, c)

    def update(self, records):
        self.updates.append(records)


def _batch():
    specs = [TableSpec(f"t{i}", 50 + 10 * i, (8, 16)[i % 2], 1.0 + i) for i in range(6)]
    task = Task(tuple(specs), 3, 1 << 20)
    mem = memory_model(specs, task.memory_bytes)
    dev = heuristics.lpt(specs, 3, mem, heuristics.greedy_key(specs, "lookup_greedy"))
    feats, cls = table_features(specs), class_onehot(specs)
    arrays, order = env_lib.build_task(specs, 3, mem, feats, cls, np.arange(6.0))
    assign = np.zeros((1, 2, 6, 3), np.float32)
    assign[0, :, np.arange(6), dev[order]] = 1.0
    return [task], [(arrays, order)], assign, dev


def test_refine_measures_sampled_plans_and_updates_the_model(tmp_path):
    tasks, built, assign, dev = _batch()
    seen = []

    def measure_set(specs, batch_size):
        seen.append(sorted(s.name for s in specs))
        return FakeSet(1.0, 2.0, 3.0, 0.1)

    timed = []

    def measure_plan(specs, plan, batch_size, every_device):
        plan.validate(specs)
        seen.append({k: v["device"] for k, v in plan.placements.items()})
        timed.append(every_device)
        return FakePlan(5.0, 4.0, 1.0)

    model = FakeModel()
    cost = learned_cost(model, "fake", 64)
    c = sharder_runlocal.get_config()
    c.refine_plans, c.batch_size = 1, 64
    refine = make_refine_fn(str(tmp_path), log=lambda *_: None, measure_set=measure_set,
                            measure_plan=measure_plan)
    for objective in ("max_device", "spmd"):
        c.objective = objective
        new = refine(cost, tasks, built, assign, c)
        assert new.fn is not cost.fn and new.model is model
    groups = [sorted(f"t{i}" for i in np.flatnonzero(dev == d)) for d in range(3)]
    assert seen[:-1] == [g for g in groups if g]  # one set per non-empty device
    assert seen[-1] == {f"t{i}": int(dev[i]) for i in range(6)}
    assert [r["kind"] for r in model.updates[0]] == ["set"] * (len(seen) - 1)
    assert model.updates[1][0]["kind"] == "plan" and model.updates[1][0]["total_ms"] == 5.0
    assert [d["name"] for d in model.updates[1][0]["specs"]] == [f"t{i}" for i in range(6)]
    lines = open(os.path.join(tmp_path, REFINE_FILE)).read().splitlines()
    assert len(lines) == len(seen) and json.loads(lines[-1])["exchange_ms"] == 1.0
    # plans are timed as the model's data was: every device, or (older models) the busiest
    old = FakeModel(spmd_timing="busiest")
    refine(learned_cost(old, "old", 64), tasks, built, assign, c)
    assert timed == [True, False]


def test_refine_skips_models_that_cannot_update(tmp_path):
    tasks, built, assign, _ = _batch()
    c = sharder_runlocal.get_config()
    from autoshard_jax.placement.costs import get_cost
    cost = get_cost(64)
    assert make_refine_fn(str(tmp_path), log=lambda *_: None)(cost, tasks, built, assign,
                                                              c) is cost
