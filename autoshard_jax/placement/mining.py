"""Cost data where the planners go: the plans of heuristics, policy and search, measured.

A cost network trained on random plans is least accurate where planners end up, near-optimal
plans, and a search that trusts it walks toward the plans it underrates (within a task, the
session-6 network ranked the planners' plans at Kendall tau 0.34-0.39; README, session 7).
This is the AutoShard loop's refinement at evaluation scale: draw tasks from the *training*
tables only (pass the pool's train half as the pool; the test half stays unseen), let every
planner place them, and measure each distinct plan with the oracle, into a cost collection
(`cost/dataset.py` format) that `launch.train_cost_model --data=...,DIR` trains on.

For `spmd` a plan is one "plan" record (its padded program + exchange); for `max_device`
each device's tables are one "set" record (the papers' per-device cost). A kill loses at most
the plan being measured; a rerun skips every (task, method) on disk: measured ones in the
collection, and those that failed or repeated another method's plan in SKIPPED_FILE beside it,
so a resume re-plans nothing it has already planned.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from autoshard_jax.cost import dataset
from autoshard_jax.cost.collect import check_spmd_timing, pin_reference_unit, prepare_workdir
from autoshard_jax.cost.oracle import measure_plan, measure_set
from autoshard_jax.cost.timing import Protocol
from autoshard_jax.errors import ConfigError, InputError, check_range
from autoshard_jax.placement.api import EVAL_METHODS, plan_of
from autoshard_jax.placement.costs import check_objective
from autoshard_jax.placement.evaluate import device_tables
from autoshard_jax.placement.tasks import Task, sample_task
from autoshard_jax.tables.spec import TableSpec

# Index of a record: (task * len(methods) + method) * _PER_PLAN + device (sets) or 0 (plans).
_PER_PLAN = 1024
# (task, method) pairs with nothing to measure, as {"kind": "skipped", "reason": "duplicate" |
# "no plan", ...} records: not cost data, so outside the collection's DATA_FILE.
SKIPPED_FILE = "skipped.jsonl"


@dataclasses.dataclass(frozen=True)
class MineConfig:
    """What a mined collection measures; stored in the workdir and checked on resume."""

    objective: str = "spmd"
    num_tasks: int = 30
    table_counts: tuple[int, ...] = (30, 50, 75, 100, 150, 200)
    device_counts: tuple[int, ...] = (2, 4, 8, 16)
    methods: tuple[str, ...] = ("spmd_greedy", "lookup_greedy", "size_lookup_greedy",
                                "autoshard", "autoshard_search", "greedy_search")
    mem_factor: float = 1.5
    search_time_s: float = 5.0
    batch_size: int = 512
    row_optimizer: str = "sgd"
    seed: int = 0
    warmup: int = 5
    repeats: int = 10
    trim: int = 2
    clock: str = "wall"
    normalize: bool = True
    every_device: bool = True  # spmd: the slowest device's program (False: the busiest's)

    RESUME_KEYS = ("objective", "table_counts", "device_counts", "methods", "mem_factor",
                   "batch_size", "row_optimizer", "seed", "warmup", "repeats", "trim", "clock",
                   "normalize")

    def check(self, pool_size: int) -> None:
        check_objective(self.objective)
        check_range("num_tasks", self.num_tasks, low=1, integer=True)
        check_range("mem_factor", self.mem_factor, low=1.0)
        check_range("search_time_s", self.search_time_s, low=0.0)
        check_range("batch_size", self.batch_size, low=1, integer=True)
        for t in self.table_counts:
            check_range("table_counts", t, low=1, high=pool_size, integer=True)
        for d in self.device_counts:
            check_range("device_counts", d, low=1, high=_PER_PLAN, integer=True)
            if self.batch_size % d:
                raise ConfigError(f"batch_size {self.batch_size} is not divisible by "
                                  f"device_counts entry {d}")
        unknown = [m for m in self.methods if m not in EVAL_METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"methods must be among {list(EVAL_METHODS)}, got "
                              f"{list(self.methods)}")
        if self.num_tasks * len(self.methods) * _PER_PLAN >= dataset.INDEX_STRIDE:
            raise ConfigError(f"{self.num_tasks} tasks x {len(self.methods)} methods is more "
                              "than one collection indexes; split it into collections")
        try:
            Protocol(self.warmup, self.repeats, self.trim, self.clock, self.normalize)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def tasks(config: MineConfig, pool: Sequence[TableSpec]) -> list[Task]:
    """The collection's tasks, a fixed function of the config and pool (every table 'seen')."""
    rng = np.random.default_rng([config.seed, 77])
    out = []
    for _ in range(config.num_tasks):
        t = int(rng.choice(config.table_counts))
        d = int(rng.choice(config.device_counts))
        out.append(sample_task(pool, [], t, d, rng, 0.0, config.mem_factor,
                               config.row_optimizer))
    return out


PlaceFn = Callable[[Task, str], np.ndarray]


def mine(workdir: str, config: MineConfig, pool: Sequence[TableSpec] | None, place: PlaceFn,
         log: Callable[[str], None] = print) -> dict:
    """Measures every planner's plan of every task not on disk; returns counts.

    `place(task, method) -> device_T` runs a planner (`launch.mine_plan_costs` binds the policy,
    cost model and search budget); a method that fails on a task is logged and skipped, a plan
    another method already produced for the task is measured once. Records keep their plan
    (`device_T`), so a resumed run re-plans only what it has not measured.
    """
    pool = prepare_workdir(workdir, config, pool, keys=MineConfig.RESUME_KEYS)
    path = os.path.join(workdir, dataset.DATA_FILE)
    on_disk = dataset.read_records(path, repair=True)
    dataset.check_program(on_disk, path)
    check_spmd_timing(on_disk, config.every_device, path)
    # (task, method) on disk -> its plan (None in collections written before plans were kept)
    done = {(r["task"], r["method"]): tuple(r["device_T"]) if "device_T" in r else None
            for r in on_disk}
    skip_path = os.path.join(workdir, SKIPPED_FILE)
    skipped = {(r["task"], r["method"]): r["device_T"]
               for r in dataset.read_records(skip_path, repair=True)}
    protocol = Protocol(config.warmup, config.repeats, config.trim, config.clock,
                        config.normalize)
    if config.normalize:
        pin_reference_unit(workdir, config.clock, log, first_shard=True)
    env = dataset.environment()
    start, plans = time.perf_counter(), 0
    with dataset.RecordWriter(path) as writer, dataset.RecordWriter(skip_path) as skips:
        for i, task in enumerate(tasks(config, pool)):
            seen = set()
            for m, method in enumerate(config.methods):
                index = (i * len(config.methods) + m) * _PER_PLAN
                if done.get((i, method)) is not None:  # measured: no need to re-plan
                    seen.add(done[i, method])
                    continue
                if (i, method) in skipped:  # planned before: a failure or a duplicate
                    if skipped[i, method] is not None:
                        seen.add(tuple(skipped[i, method]))
                    continue
                skip = {"kind": "skipped", "index": index, "task": i, "method": method}
                try:
                    device_T = np.asarray(place(task, method))
                except InputError as e:
                    log(f"task {i}: {method} found no plan ({e})")
                    skips.write({**skip, "reason": "no plan", "error": str(e),
                                 "device_T": None})
                    continue
                key = tuple(int(d) for d in device_T)
                if (i, method) in done or key in seen:
                    if (i, method) not in done:
                        skips.write({**skip, "reason": "duplicate", "device_T": list(key)})
                    seen.add(key)
                    continue
                seen.add(key)
                for record in _measure(task, device_T, config, protocol, index):
                    writer.write({**record, **env, "task": i, "method": method,
                                  "device_T": list(key),
                                  "style": f"mined:{method}", "batch_size": config.batch_size,
                                  "row_optimizer": config.row_optimizer, "repeat_of": None})
                plans += 1
            jax.clear_caches()  # every plan compiles new shapes: bound the process's memory
            rate = (time.perf_counter() - start) / (i + 1)
            log(f"task {i + 1}/{config.num_tasks} (T={len(task.specs)}, "
                f"D={task.num_devices}): {len(seen)} distinct plans; ETA "
                f"{rate * (config.num_tasks - i - 1) / 60:.1f} min")
    records = dataset.read_records(path)
    return {"records": len(records), "measured_plans": plans}


def _measure(task: Task, device_T: np.ndarray, config: MineConfig, protocol: Protocol,
             index: int) -> list[dict]:
    plan = plan_of(task.specs, device_T, task.num_devices, task.memory_bytes)
    kw = {"row_optimizer": config.row_optimizer, "protocol": protocol}
    if config.objective == "spmd":
        cost = measure_plan(task.specs, plan, config.batch_size, seed=index,
                            every_device=config.every_device, **kw)
        return [{"kind": "plan", "index": index, "tables": [s.name for s in task.specs],
                 "num_devices": plan.num_devices, "placements": plan.placements,
                 **dataclasses.asdict(cost)}]
    return [{"kind": "set", "index": index + d, "tables": [s.name for s in group],
             **dataclasses.asdict(measure_set(group, config.batch_size, seed=index + d, **kw))}
            for d, group in enumerate(device_tables(task.specs, plan)) if group]
