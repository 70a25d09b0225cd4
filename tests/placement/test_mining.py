"""placement.mining: planners' plans on training tasks measured into a cost collection,
resumable, readable by the cost dataset; bad configs refused."""

import pytest

from autoshard_jax.cost import dataset, oracle
from autoshard_jax.errors import ConfigError, InputError
from autoshard_jax.placement import api
from autoshard_jax.placement.mining import SKIPPED_FILE, MineConfig, mine, tasks
from autoshard_jax.tables.pools import synthetic_pool
from tests.launch.test_shard import cli, last_error

POOL = synthetic_pool(8, seed=3, max_rows=2000)
FAST = dict(batch_size=32, warmup=0, repeats=1, trim=0, normalize=False, search_time_s=0.5,
            table_counts=(3, 5), device_counts=(1, 2), num_tasks=2)


def place(task, method):
    if method == "random" and task.num_devices == 1:
        raise InputError("no plan")  # a failing planner is skipped, not fatal
    return api.place(task.specs, task.num_devices, task.memory_bytes, method, seed=1)


@pytest.mark.parametrize("objective,kind", [("spmd", "plan"), ("max_device", "set")])
def test_mines_each_distinct_plan_once_and_resumes(tmp_path, monkeypatch, objective, kind):
    monkeypatch.setattr(oracle, "_references", {})
    monkeypatch.setattr(oracle, "_nominal_ms", {})
    config = MineConfig(objective=objective, methods=("spmd_greedy", "random", "dim_greedy"),
                        **FAST)
    work = str(tmp_path / "m")
    first = mine(work, config, POOL, place, log=lambda _: None)
    records = dataset.read_records(f"{work}/{dataset.DATA_FILE}")
    assert first["records"] == len(records) > 0
    assert {r["kind"] for r in records} == {kind}
    names = {s.name for s in POOL}
    for r in records:
        assert set(r["tables"]) <= names and r["total_ms"] > 0
        assert r["style"] == f"mined:{r['method']}"
    # distinct (task, plan) pairs: methods that agree on a task are measured once
    per_task = {}
    for task_i, task in enumerate(tasks(config, POOL)):
        plans = {tuple(api.place(task.specs, task.num_devices, task.memory_bytes, m, seed=1))
                 for m in config.methods if not (m == "random" and task.num_devices == 1)}
        per_task[task_i] = len(plans)
    if objective == "spmd":
        assert first["measured_plans"] == sum(per_task.values()) == len(records)
    assert len({dataset.entry_key(r) for r in records}) == len(records)
    planned = []

    def counting_place(task, method):
        planned.append(method)
        return place(task, method)

    again = mine(work, config, POOL, counting_place, log=lambda _: None)
    assert again["measured_plans"] == 0 and again["records"] == len(records)
    # a resume re-plans nothing: failures and duplicates are on record beside the collection
    assert planned == []
    skipped = dataset.read_records(f"{work}/{SKIPPED_FILE}")
    recorded = {(r["task"], r["method"]) for r in records}
    assert {(r["task"], r["method"]) for r in skipped} | recorded == {
        (i, m) for i in range(config.num_tasks) for m in config.methods}
    failures = [r for r in skipped if r["reason"] == "no plan"]
    assert len(failures) == sum(t.num_devices == 1 for t in tasks(config, POOL))
    assert all(r["method"] == "random" for r in failures)
    read, pool = dataset.read_collections([work])
    assert len(read) == len(records) and set(pool) == names


def test_tasks_draw_from_the_pool_only_and_are_deterministic():
    config = MineConfig(**FAST)
    a, b = tasks(config, POOL), tasks(config, POOL)
    assert [t.specs for t in a] == [t.specs for t in b]
    assert all(len(t.specs) in (3, 5) and t.num_devices in (1, 2) for t in a)


@pytest.mark.parametrize("kw,culprit", [
    ({"objective": "fast"}, "fast"), ({"methods": ("dim_greedy", "magic")}, "magic"),
    ({"table_counts": (99,)}, "table_counts"), ({"device_counts": (3,)}, "divisible")])
def test_bad_config(tmp_path, kw, culprit):
    with pytest.raises((ConfigError, InputError), match=culprit):
        mine(str(tmp_path / "m"), MineConfig(**{**FAST, **kw}), POOL, place,
             log=lambda _: None)
    assert not (tmp_path / "m" / "collection.json").exists()


def test_cli_without_policy_for_autoshard_exits_2(tmp_path):
    proc = cli("launch.mine_plan_costs", f"--workdir={tmp_path}/m", "--num_tasks=1",
               "--device_counts=2")
    assert "--policy" in last_error(proc)
