"""launch.shard: every method writes a validated plan with its meta; bad input exits 2."""

import dataclasses
import os
import subprocess
import sys

import pytest

from autoshard_jax.errors import InputError
from autoshard_jax.sharding.plan import load_plan
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import load_tables, save_tables
from launch.shard import shard_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})


def last_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shard") / "tables.json")
    save_tables(path, synthetic_pool(24, seed=3, max_rows=20_000))
    return path


def flags(tables_path, out, **kw):
    f = {"tables": tables_path, "num_devices": 3, "memory_gb": 0.5, "method": "spmd_greedy",
         "objective": "spmd", "policy": None, "out": out, "cost_model": None,
         "batch_size": 512, "row_optimizer": "sgd", "seed": 0}
    f.update(kw)
    return f


@pytest.mark.parametrize("method,objective", [
    ("random", "spmd"), ("size_lookup_greedy", "max_device"), ("torchrec_greedy", "spmd"),
    ("spmd_greedy", "spmd"), ("autoshard_search", "max_device")])
def test_methods_write_valid_plans(tables, tmp_path, method, objective):
    out = str(tmp_path / "plan.json")
    meta = shard_main(flags(tables, out, method=method, objective=objective),
                      out=open(os.devnull, "w"))
    plan = load_plan(out)
    plan.validate(load_tables(tables))
    assert plan.num_devices == 3 and plan.memory_bytes_per_device == int(0.5 * 2**30)
    assert plan.meta["method"] == method and plan.meta["objective"] == objective
    assert plan.meta["time_s"] == meta["time_s"] >= 0


def test_max_device_search_splits_a_dominant_table_unless_told_not_to(tmp_path):
    """One table with 50x the others' lookups sets the slowest device of any table-wise plan:
    autoshard_search splits it row-wise over the devices; --norow_wise keeps it whole."""
    specs = synthetic_pool(12, seed=3, max_rows=20_000)
    specs[0] = dataclasses.replace(specs[0], pooling_factor=50 * max(s.pooling_factor
                                                                    for s in specs))
    path = str(tmp_path / "tables.json")
    save_tables(path, specs)
    kinds = {}
    for row_wise in (True, False):
        out = str(tmp_path / f"plan_{row_wise}.json")
        meta = shard_main(flags(path, out, method="autoshard_search", objective="max_device",
                                num_devices=4, row_wise=row_wise), out=open(os.devnull, "w"))
        plan = load_plan(out)
        plan.validate(specs)
        kinds[row_wise] = (plan.placements[specs[0].name]["type"], meta["predicted_max_ms"])
    assert kinds[True][0] == "row_wise" and kinds[False][0] == "table_wise"
    assert kinds[True][1] < 0.9 * kinds[False][1]


def test_cli_prints_the_sharding_time(tables, tmp_path):
    out = tmp_path / "p.json"
    proc = cli("launch.shard", f"--tables={tables}", "--num_devices=2", "--memory_gb=1",
               "--method=size_lookup_greedy", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with size_lookup_greedy in" in proc.stdout and out.exists()


@pytest.mark.parametrize("args,culprit", [
    (["--num_devices=0", "--memory_gb=1"], "num_devices"),
    (["--num_devices=2", "--memory_gb=0.000001"], "does not fit"),
])
def test_bad_input_exits_2_naming_the_culprit(tables, tmp_path, args, culprit):
    proc = cli("launch.shard", f"--tables={tables}", f"--out={tmp_path / 'p.json'}", *args)
    assert culprit in last_error(proc)


@pytest.mark.parametrize("kw,culprit", [({"method": "best"}, "--method"),
                                        ({"method": "autoshard"}, "--policy"),
                                        ({"memory_gb": -1.0}, "memory_gb"),
                                        ({"tables": "/nonexistent.json"}, "nonexistent.json")])
def test_bad_flags_are_input_errors(tables, tmp_path, kw, culprit):
    with pytest.raises(InputError, match=culprit):
        shard_main(flags(tables, str(tmp_path / "p.json"), **kw))


def test_missing_tables_file(tmp_path):
    proc = cli("launch.shard", f"--tables={tmp_path / 'none.json'}", "--num_devices=2",
               "--memory_gb=1", f"--out={tmp_path / 'p.json'}")
    assert "none.json" in last_error(proc)
