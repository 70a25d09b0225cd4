"""launch.train_sharder: trains, checkpoints, resumes without loss; its workdir drives
launch.shard --policy; a bad config exits 2 naming the key."""

import json
import os

import pytest

from autoshard_jax.errors import ConfigError, InputError
from autoshard_jax.placement.trainer import train
from autoshard_jax.sharding.plan import load_plan
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import load_tables, save_tables
from launch.configs import sharder_runlocal
from launch.shard import shard_main
from tests.launch.test_shard import cli, last_error
from tests.launch.test_shard import flags as shard_flags


def tiny_config(**kw):
    c = sharder_runlocal.get_config()
    c.pool.num_tables, c.pool.max_rows = 40, 5000
    c.train_shapes = ((8, 2),)
    c.num_iterations, c.tasks_per_batch, c.episodes_per_task = 4, 2, 2
    c.eval_every, c.num_eval_tasks, c.checkpoint_every, c.log_every = 2, 2, 2, 1
    c.hidden = 16
    c.cost_model = "analytical"
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_trains_resumes_and_shards(tmp_path):
    work = str(tmp_path / "policy")
    train(tiny_config(num_iterations=2), work, log=lambda *_: None)
    metrics = os.path.join(work, "metrics.jsonl")
    with open(metrics, "a") as f:  # a kill after logging past the checkpoint, mid-line
        f.write(json.dumps({"iteration": 2, "reward": 0.0}) + "\n{\"iterat")
    logs = []
    last = train(tiny_config(), work, log=logs.append)
    assert logs[0] == "resumed from iteration 2"
    its = [json.loads(line)["iteration"] for line in open(metrics)]
    assert its == [0, 1, 2, 3]
    assert {"eval_cost_ms", "eval_ratio_to_slg", "eval_ratio_to_spmd_greedy"} <= set(last)
    for name in ("policy.json", "learning_curve.png", "checkpoints"):
        assert os.path.exists(os.path.join(work, name))

    tables = str(tmp_path / "tables.json")
    save_tables(tables, synthetic_pool(12, seed=5, max_rows=5000))
    out = str(tmp_path / "plan.json")
    meta = shard_main(shard_flags(tables, out, method="autoshard", policy=work, num_devices=3),
                      out=open(os.devnull, "w"))
    plan = load_plan(out)
    plan.validate(load_tables(tables))
    assert meta["method"] == "autoshard" and plan.meta["policy"] == work
    with pytest.raises(InputError, match="objective"):
        shard_main(shard_flags(tables, out, method="autoshard", policy=work,
                               objective="max_device"))


@pytest.mark.parametrize("key,value", [("num_iterations", 0), ("objective", "fast"),
                                       ("train_shapes", ((500, 2),)), ("mem_factor", 0.5),
                                       ("cost_pessimism", -1.0), ("max_device_sigma", 1.5)])
def test_config_checks_name_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        train(tiny_config(**{key: value}), str(tmp_path / "w"))


def test_config_check_refuses_a_shared_flag_that_is_not_a_bool(tmp_path):
    c = tiny_config()
    del c.max_device_shared  # a config file that sets it to a string
    c.max_device_shared = "yes"
    with pytest.raises(ConfigError, match="max_device_shared"):
        train(c, str(tmp_path / "w"))


def test_pessimism_needs_an_ensemble(tmp_path):
    with pytest.raises(InputError, match="needs an ensemble"):
        train(tiny_config(cost_pessimism=1.0), str(tmp_path / "w"))


def test_cli_bad_config_exits_2(tmp_path):
    proc = cli("launch.train_sharder", "--config=launch/configs/sharder_runlocal.py",
               f"--workdir={tmp_path / 'w'}", "--config.num_iterations=0")
    assert "config.num_iterations" in last_error(proc)


def _own_costs_args(work, *extra):
    return ("launch.train_sharder", "--config=launch/configs/sharder_runlocal.py",
            f"--workdir={work}", "--config.pool.num_tables=16", "--config.pool.max_rows=2000",
            "--config.train_shapes=((8,2),)", "--config.num_iterations=2",
            "--config.tasks_per_batch=2", "--config.episodes_per_task=2",
            "--config.eval_every=2", "--config.num_eval_tasks=2", "--config.hidden=16",
            "--config.own_costs.num_sets=10", "--config.own_costs.num_plans=2",
            "--config.own_costs.max_tables=3", "--config.own_costs.plan_tables=(4,8)",
            "--config.own_costs.plan_devices=(2,)", "--config.own_costs.steps=20",
            "--config.own_costs.max_processes=2", *extra)


def test_without_a_cost_model_it_measures_and_fits_its_own(tmp_path):
    # runlocal's contract: with no cost model given, the policy trains against a network fitted
    # on oracle costs of its own training tables, measured by one collect_costs per core
    work = tmp_path / "w"
    proc = cli(*_own_costs_args(work))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(work / "costs" / "costs.jsonl")]
    assert sorted((r["kind"], r["index"]) for r in records if r["repeat_of"] is None) == \
        [("plan", 0), ("plan", 1)] + [("set", i) for i in range(10)]
    train_tables = {t["name"] for t in json.load(open(work / "train_tables.json"))["tables"]}
    assert set().union(*(r["tables"] for r in records)) <= train_tables  # no test table
    assert json.load(open(work / "policy.json"))["cost_model"] == f"learned:{work}/cost_model"
    again = cli(*_own_costs_args(work))
    assert again.returncode == 0 and "reusing the cost network" in again.stderr


def test_own_cost_settings_are_checked_before_measuring(tmp_path):
    proc = cli(*_own_costs_args(tmp_path / "w", "--config.own_costs.max_tables=99"))
    assert "config.own_costs" in last_error(proc) and "max_tables" in last_error(proc)
    assert not (tmp_path / "w" / "costs").exists()
