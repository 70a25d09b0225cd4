"""collect_costs, train_cost_model and measure_costs as a user runs them: good and bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from autoshard_jax.cost.collect import CollectConfig, collect
from autoshard_jax.sharding.plan import plan_from_mapping, save_plan
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import save_tables

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POOL = synthetic_pool(5, seed=2, max_rows=1000)


def _run(module, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _error_line(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def _collect(work, pool, **config) -> str:
    """A small, quickly timed collection of `pool`'s costs in `work`."""
    collect(str(work), CollectConfig(batch_size=32, max_tables=3, plan_devices=(2,), warmup=1,
                                     repeats=3, trim=0, **config), pool, log=lambda _: None)
    return str(work)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return _collect(tmp_path_factory.mktemp("costs"), POOL, num_sets=30, num_plans=8,
                    plan_tables=(2, 5), repeat_every=5)


@pytest.fixture(scope="module")
def unseen_collection(tmp_path_factory):
    """A few costs of other tables (another pool seed and names)."""
    return _collect(tmp_path_factory.mktemp("unseen"),
                    synthetic_pool(4, seed=3, max_rows=1000, prefix="u"), num_sets=6,
                    num_plans=2, plan_tables=(2, 4), repeat_every=0)


def test_collect_costs_runs_and_resumes(tmp_path):
    args = [f"--workdir={tmp_path}", "--pool=synthetic", "--pool_size=4", "--max_rows=500",
            "--num_sets=5", "--num_plans=1", "--batch_size=16", "--max_tables=2",
            "--plan_tables=2,3", "--plan_devices=2", "--repeats=3", "--trim=0", "--warmup=1"]
    proc = _run("launch.collect_costs", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5 set records, 1 plan records (6 measured now)" in proc.stdout
    lines = (tmp_path / "costs.jsonl").read_text().splitlines()
    again = _run("launch.collect_costs", *args)
    assert "(0 measured now)" in again.stdout
    assert (tmp_path / "costs.jsonl").read_text().splitlines() == lines


def test_collect_costs_measures_the_redimmed_pool(tmp_path):
    proc = _run("launch.collect_costs", f"--workdir={tmp_path}", "--pool=synthetic",
                "--pool_size=4", "--max_rows=500", "--augment_dims=4,128", "--num_sets=5",
                "--num_plans=0", "--batch_size=16", "--max_tables=2", "--repeats=3", "--trim=0",
                "--warmup=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    source = synthetic_pool(4, seed=0, max_rows=500)
    tables = json.loads((tmp_path / "tables.json").read_text())["tables"]
    assert [(t["name"], t["rows"], t["dim"]) for t in tables] == [
        (f"{s.name}_d{d}", s.rows, d) for s in source for d in (4, 128) if d != s.dim]
    singles = [json.loads(line)["tables"] for line in
               (tmp_path / "costs.jsonl").read_text().splitlines()][:len(tables)]
    assert all(len(names) == 1 and names[0].endswith(("_d4", "_d128")) for names in singles)


@pytest.mark.parametrize("args, culprit", [
    (["--batch_size=30", "--plan_devices=4"], "not divisible by plan_devices entry 4"),
    (["--plan_tables=3"], "--plan_tables takes MIN,MAX"),
    (["--plan_devices=two"], "--plan_devices must be integers"),
    (["--max_tables=500"], "config.max_tables must be <= 428"),
    (["--min_tables=20", "--max_tables=10", "--nosingles"], "config.min_tables must be <= 10"),
    (["--tables=/nonexistent/tables.json"], "/nonexistent/tables.json"),
    (["--augment_dims=0,64"], "--augment_dims must be positive widths"),
    (["--augment_dims=64", "--augment_min_pooling=-1"], "augment_min_pooling must be >= 0"),
    (["--augment_dims=64", "--augment_min_pooling=1000"], "leaves no table"),
])
def test_collect_costs_bad_input(tmp_path, args, culprit):
    assert culprit in _error_line(_run("launch.collect_costs", f"--workdir={tmp_path}", *args))


def test_train_then_measure_with_the_model(collection, unseen_collection, tmp_path):
    model_dir = tmp_path / "model"
    proc = _run("launch.train_cost_model", f"--workdir={model_dir}", f"--data={collection}",
                "--steps=30", f"--unseen={unseen_collection}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((model_dir / "report.json").read_text())
    unseen = report["unseen"]  # scored on every entry of the other tables' collection
    assert unseen["data"] == [unseen_collection]
    assert unseen["max_device"]["n"] == 6 and unseen["spmd"]["n"] == 2  # its 4 singles included
    assert all(0 <= unseen[k]["spread"] < 5 for k in ("max_device", "spmd"))
    assert "tables the training data never had" in (model_dir / "report.md").read_text()
    assert {"network", "linear", "analytical"} <= set(report["test"].get("max_device", {})) \
        or report["meta"]["num_sets"] > 0
    assert (model_dir / "report.md").exists() and (model_dir / "cost_model.json").exists()
    saved = json.loads((model_dir / "cost_model.json").read_text())
    assert saved["spmd_timing"] == "every_device"  # as its plans were timed
    unit = saved["reference_ms"]
    assert unit == json.loads(open(os.path.join(collection, "collection.json")).read())[
        "reference_ms"]  # the unit its predictions are in

    tables = tmp_path / "tables.json"
    save_tables(tables, POOL)
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps([[POOL[0].name], [POOL[1].name, POOL[2].name]]))
    proc = _run("launch.measure_costs", f"--tables={tables}", f"--sets={sets}",
                "--batch_size=32", f"--cost_model={model_dir}", "--repeats=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [o["tables"] for o in out] == json.loads(sets.read_text())
    for o in out:
        assert {"total_ms", "forward_ms", "backward_ms", "spread", "predicted_ms"} <= set(o)
        assert o["total_ms"] > 0 and o["predicted_ms"] > 0

    plan_a = tmp_path / "a.json"
    save_plan(plan_a, plan_from_mapping({s.name: i % 2 for i, s in enumerate(POOL)}, 2, 1 << 30))
    shutil.copytree(model_dir, tmp_path / "model_copy")  # an ensemble of two (equal) fits
    proc = _run("launch.measure_costs", f"--tables={tables}", f"--plans={plan_a}",
                "--batch_size=32", "--repeats=5",
                f"--cost_model={model_dir},{tmp_path / 'model_copy'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (plan_out,) = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert plan_out["plan"] == str(plan_a) and plan_out["predicted_ms"] > 0
    assert plan_out["total_ms"] == pytest.approx(plan_out["compute_ms"] +
                                                 plan_out["exchange_ms"])
    assert max(plan_out["device_compute_ms"]) == plan_out["compute_ms"]
    # beside a model, plans are timed as its data was
    proc = _run("launch.measure_costs", f"--tables={tables}", f"--plans={plan_a}",
                "--batch_size=32", f"--cost_model={model_dir}", "--nospmd_every_device")
    assert "measure as the model's data was timed" in _error_line(proc)


def test_restarts_keep_the_seed_with_the_lowest_val_mape(collection, tmp_path):
    from launch.train_cost_model import train_cost_model
    out = train_cost_model(str(tmp_path), [collection], steps=20, seed=3, restarts=2,
                           log=lambda _: None)
    tried = out["meta"]["restarts"]
    assert [t["seed"] for t in tried] == [3, 4]
    assert out["meta"]["seed"] == min(tried, key=lambda t: t["val_mape"])["seed"]
    assert min(h["val_mape"] for h in out["history"]) == min(t["val_mape"] for t in tried)
    saved = json.loads((tmp_path / "cost_model.json").read_text())
    assert saved["seed"] == out["meta"]["seed"] and saved["restarts"] == tried


@pytest.mark.parametrize("args, culprit", [
    (["--data=/nonexistent"], "/nonexistent"),
    (["--steps=0"], "config.steps must be >= 1"),
    (["--restarts=0"], "restarts must be >= 1"),
    (["--weight_decay=-1"], "weight_decay must be >= 0"),
    (["--reuse_noise=-0.5"], "reuse_noise must be >= 0"),
])
def test_train_cost_model_bad_input(collection, tmp_path, args, culprit):
    args = [a if a != "--data=COLL" else f"--data={collection}" for a in args]
    if not any(a.startswith("--data") for a in args):
        args.append(f"--data={collection}")
    assert culprit in _error_line(_run("launch.train_cost_model", f"--workdir={tmp_path}",
                                       *args))


def test_unseen_data_must_be_of_other_tables_and_of_the_same_setting(
        collection, unseen_collection, tmp_path):
    proc = _run("launch.train_cost_model", f"--workdir={tmp_path}", f"--data={collection}",
                f"--unseen={collection}")
    assert "--unseen: 5 of its tables are in the training data" in _error_line(proc)
    assert not (tmp_path / "cost_model.json").exists()  # refused before training
    other = tmp_path / "batch64"  # the unseen tables' costs at another batch size
    shutil.copytree(unseen_collection, other)
    records = [json.loads(line) for line in (other / "costs.jsonl").read_text().splitlines()]
    (other / "costs.jsonl").write_text("".join(json.dumps({**r, "batch_size": 64}) + "\n"
                                               for r in records))
    proc = _run("launch.train_cost_model", f"--workdir={tmp_path}", f"--data={collection}",
                f"--unseen={other}")
    assert "were measured in another setting" in _error_line(proc)
    busiest = tmp_path / "busiest"  # its plans timed on the busiest device alone
    shutil.copytree(unseen_collection, busiest)
    (busiest / "costs.jsonl").write_text("".join(
        json.dumps({**r, "device_compute_ms": []}) + "\n" for r in records))
    proc = _run("launch.train_cost_model", f"--workdir={tmp_path}", f"--data={collection}",
                f"--unseen={busiest}")
    assert "were not timed as the training data's" in _error_line(proc)


@pytest.mark.parametrize("sets_text, extra, culprit", [
    ("not json", [], "sets.json: not valid JSON"),
    ("[]", [], "must hold a non-empty JSON list"),
    ('[["t000"], "t001"]', [], "sets[1] must be a non-empty list"),
    ('[["t000", "nope"]]', [], "sets[0][1] names unknown table 'nope'"),
    ('[["t000", "t000"]]', [], "sets[0] lists a table twice"),
    ('[["t000"]]', ["--plans=x.json"], "give exactly one of --sets or --plans"),
    ('[["t000"]]', ["--batch_size=0"], "config.batch_size must be >= 1"),
])
def test_measure_costs_bad_sets(tmp_path, sets_text, extra, culprit):
    tables = tmp_path / "tables.json"
    save_tables(tables, POOL)
    sets = tmp_path / "sets.json"
    sets.write_text(sets_text)
    proc = _run("launch.measure_costs", f"--tables={tables}", f"--sets={sets}", *extra)
    assert culprit in _error_line(proc)


def test_measure_costs_bad_plan_names_the_field(tmp_path):
    tables = tmp_path / "tables.json"
    save_tables(tables, POOL)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"version": 1, "num_devices": 2, "memory_bytes_per_device": 1 << 30,
                                "placements": {s.name: {"type": "table_wise", "device": 5}
                                               for s in POOL}}))
    line = _error_line(_run("launch.measure_costs", f"--tables={tables}", f"--plans={plan}"))
    assert "device 5 is out of range for 2 devices" in line and "p.json" in line


def test_costs_carry_the_cpu_and_two_cpu_types_are_not_mixed(collection, tmp_path):
    # Costs of two CPU types differ by composition, so a model is fit on one type's costs and
    # says which; machines of one type (the name) but other detail mix.
    from autoshard_jax.cost import dataset
    from autoshard_jax.errors import DataError
    from launch.train_cost_model import train_cost_model

    rows = dataset.read_records(os.path.join(collection, dataset.DATA_FILE))
    assert {r["cpu"] for r in rows} == {dataset.host_cpu()}
    name = dataset.cpu_name(dataset.host_cpu())

    def copy(tag, cpu):
        other = tmp_path / tag
        shutil.copytree(collection, other)
        (other / dataset.DATA_FILE).write_text("".join(json.dumps({**r, "cpu": cpu}) + "\n"
                                               for r in rows))
        return str(other)

    quiet = lambda _: None  # noqa: E731
    out = train_cost_model(str(tmp_path / "model"), [collection, copy("same", f"{name} (x)")],
                           steps=2, log=quiet)
    assert out["meta"]["cpu"] == name
    assert dataset.cpu_mismatch(out["meta"]) is None
    moved = dataset.cpu_mismatch({**out["meta"], "cpu": "Another CPU (model 1)"})
    assert "'Another CPU'" in moved and repr(name) in moved
    assert dataset.cpu_mismatch({"backend": "cpu"}) is None  # older models record none
    with pytest.raises(DataError, match="mixes CPU types .*'Another CPU'"):
        train_cost_model(str(tmp_path / "mixed"), [collection, copy("other", "Another CPU")],
                         steps=2, log=quiet)
