"""The collector: deterministic entries, resume after a kill with nothing lost or repeated."""

import json

import pytest

from autoshard_jax.cost import dataset, oracle
from autoshard_jax.cost.collect import CollectConfig, collect, plan_task, schedule, set_task
from autoshard_jax.errors import ConfigError, DataError, ResumeError
from autoshard_jax.sharding.device_step import PROGRAM_VERSION
from autoshard_jax.tables.pools import synthetic_pool

POOL = synthetic_pool(6, seed=3, max_rows=2000)
CONFIG = CollectConfig(num_sets=8, num_plans=3, batch_size=32, max_tables=3,
                       plan_tables=(2, 4), plan_devices=(2, 4), repeat_every=4, warmup=1,
                       repeats=3, trim=0)


def test_tasks_are_deterministic_and_singles_come_first():
    assert [set_task(i, 6, CONFIG) for i in range(6)] == [[i] for i in range(6)]
    assert set_task(7, 6, CONFIG) == set_task(7, 6, CONFIG)
    assert 2 <= len(set_task(7, 6, CONFIG)) <= 3
    specs, plan = plan_task(1, POOL, CONFIG)
    again = plan_task(1, POOL, CONFIG)
    assert again == (specs, plan) and plan.num_devices in (2, 4)
    top_up = CollectConfig(**{**CONFIG.__dict__, "singles": False, "min_tables": 3,
                              "max_tables": 5})
    assert all(3 <= len(set_task(i, 6, top_up)) <= 5 for i in range(8))
    order = schedule(CONFIG)
    assert len(order) == len(set(order)) == 8 + 2 + 3  # sets 3 and 7 repeated
    assert order.index(("plan", 0, False)) < order.index(("set", 7, False))  # interleaved


def test_collect_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr(oracle, "_references", {})
    monkeypatch.setattr(oracle, "_nominal_ms", {})
    work = str(tmp_path / "c")
    first = collect(work, CONFIG, POOL, log=lambda _: None, stop_after=5)
    assert first["measured"] == 5
    # the unit the collection started in is stored, and a resumed run (a new process) keeps it
    saved = json.loads((tmp_path / "c" / "collection.json").read_text())
    assert saved["reference_ms"] == oracle.reference_ms(CONFIG.clock) > 0
    saved["reference_ms"] = 7.5
    del saved["min_tables"], saved["singles"]  # as written before these keys existed
    (tmp_path / "c" / "collection.json").write_text(json.dumps(saved))
    # a torn last line, as a kill mid-write leaves it
    path = tmp_path / "c" / dataset.DATA_FILE
    with open(path, "a") as f:
        f.write('{"kind": "set", "ind')
    second = collect(work, CONFIG, None, log=lambda _: None)
    records = dataset.read_records(path)
    keys = [dataset.entry_key(r) for r in records]
    assert len(keys) == len(set(keys)) == len(schedule(CONFIG))
    assert second["measured"] == len(schedule(CONFIG)) - 5
    assert all(r["backend"] and r["jax"] and r["batch_size"] == 32 for r in records)
    assert len(dataset.noise_pairs(records, "set")) == 2
    plan = next(r for r in records if r["kind"] == "plan")
    assert plan["compute_ms"] > 0 and set(plan["placements"]) == set(plan["tables"])
    # every device's program timed (the default), the slowest one the compute
    assert len(plan["device_compute_ms"]) == plan["num_devices"]
    assert plan["compute_ms"] == max(plan["device_compute_ms"])
    assert collect(work, CONFIG, None, log=lambda _: None)["measured"] == 0
    assert oracle.reference_ms(CONFIG.clock) == 7.5
    assert all(r["reference_ms"] > 0 for r in records)


def test_a_resume_keeps_the_plans_spmd_timing(tmp_path):
    # Plans timed on the busiest device alone (collections before session 33) and on every
    # device are different measurements: a resume that would mix them is refused; a collection
    # of sets alone has no spmd timing and resumes either way.
    busiest = CollectConfig(**{**CONFIG.__dict__, "every_device": False, "num_sets": 1})
    work = str(tmp_path / "c")
    collect(work, busiest, POOL, log=lambda _: None)
    records = dataset.read_records(tmp_path / "c" / dataset.DATA_FILE)
    plans = [r for r in records if r["kind"] == "plan"]
    assert plans and all(r["device_compute_ms"] == [] for r in plans)
    assert dataset.spmd_timings(records, work) == dataset.BUSIEST
    with pytest.raises(ResumeError, match="busiest device's program alone, this run times "
                                          "every device's"):
        collect(work, CONFIG, None, log=lambda _: None)
    sets_only = CollectConfig(**{**CONFIG.__dict__, "num_plans": 0, "num_sets": 2})
    collect(str(tmp_path / "s"), sets_only, POOL, log=lambda _: None)
    for every in (True, False):
        collect(str(tmp_path / "s"), CollectConfig(**{**sets_only.__dict__, "num_sets": 3,
                                                      "every_device": every}),
                None, log=lambda _: None)
    timed_each = {**plans[0], "device_compute_ms": [1.0] * plans[0]["num_devices"]}
    with pytest.raises(DataError, match="mixed with plan costs timed on the busiest"):
        dataset.spmd_timings(records + [timed_each], work)


def test_resume_with_other_settings_is_refused(tmp_path):
    work = str(tmp_path / "c")
    collect(work, CONFIG, POOL, log=lambda _: None, stop_after=1)
    path = tmp_path / "c" / dataset.DATA_FILE
    records = dataset.read_records(path)
    assert {r["program"] for r in records} == {PROGRAM_VERSION}
    # records another version of the program measured: resuming would mix two programs' costs
    path.write_text("".join(json.dumps({**r, "program": 1}) + "\n" for r in records))
    with pytest.raises(DataError, match="program version \\[1\\]"):
        collect(work, CONFIG, None, log=lambda _: None)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    other = CollectConfig(**{**CONFIG.__dict__, "batch_size": 64})
    with pytest.raises(ResumeError, match="batch_size: 32 -> 64"):
        collect(work, other, None, log=lambda _: None)
    with pytest.raises(ResumeError, match="differs from the pool"):
        collect(work, CONFIG, synthetic_pool(6, seed=4), log=lambda _: None)


@pytest.mark.parametrize("change, match", [
    ({"batch_size": 30}, "not divisible by plan_devices entry 4"),
    ({"max_tables": 99}, "config.max_tables must be <= 6"),
    ({"min_tables": 4}, "config.min_tables must be <= 3"),
    ({"repeats": 2, "trim": 1}, "2 \\* trim < repeats"),
    ({"plan_tables": (5, 2)}, "plan_tables"),
])
def test_bad_config_is_named(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        collect(str(tmp_path / "c"), CollectConfig(**{**CONFIG.__dict__, **change}), POOL)


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "costs.jsonl"
    good = json.dumps({"kind": "set", "index": 0})
    path.write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(DataError, match="costs.jsonl:2"):
        dataset.read_records(path)


def test_shards_fill_one_collection_together(tmp_path):
    work = str(tmp_path / "c")
    with pytest.raises(ConfigError, match="start shard 0 first"):
        collect(work, CONFIG, POOL, log=lambda _: None, shard=(1, 2))
    with pytest.raises(ConfigError, match="shard_index"):
        collect(work, CONFIG, POOL, log=lambda _: None, shard=(2, 2))
    first = collect(work, CONFIG, POOL, log=lambda _: None, shard=(0, 2))
    second = collect(work, CONFIG, POOL, log=lambda _: None, shard=(1, 2))
    total = len(schedule(CONFIG))
    assert first["measured"] == (total + 1) // 2 and second["measured"] == total // 2
    keys = [dataset.entry_key(r) for r in dataset.read_records(tmp_path / "c" / dataset.DATA_FILE)]
    assert sorted(keys) == sorted(schedule(CONFIG))
