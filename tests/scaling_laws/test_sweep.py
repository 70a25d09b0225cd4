"""Sweeps: the runs an axis plans, config checks, resume without redoing runs, sharding."""

import json
import os

import pytest

from autoshard_jax.errors import ConfigError, ResumeError
from launch.configs import scaling_cpu
from scaling_laws.sweep import plan_runs, run_sweep


def tiny_config(axis="data"):
    c = scaling_cpu.get_config()
    c.axis = axis
    c.model.table_rows = (40, 12)
    c.model.embedding_dim = 4
    c.model.bottom_mlp = (8, 4)
    c.model.top_mlp = (8, 1)
    c.batch_size = 32
    c.data.num_eval_batches = 4
    c.scaling.data_samples = (64, 128, 256)
    c.scaling.param_samples = 64
    c.scaling.embedding_dims = (2, 4)
    c.scaling.mlp_widths = (0.5, 2.0)
    c.scaling.over_arch_widths = (1.0, 2.0)
    c.scaling.depths = (1, 3)
    return c


def test_axes_move_one_thing_each():
    runs = {r.name: r for r in plan_runs(tiny_config("all"))}
    c = runs["data_02_256"].config
    assert c.num_train_steps == 8 and runs["data_02_256"].x == 256
    e = runs["embedding_00_2"].config.model
    assert e.embedding_dim == 2 and tuple(e.bottom_mlp) == (8, 2)
    m = runs["mlp_01_2"].config.model
    assert tuple(m.bottom_mlp) == (16, 4) and tuple(m.top_mlp) == (16, 1)
    assert runs["mlp_01_2"].x == runs["mlp_01_2"].params["dense"]
    assert runs["embedding_01_4"].x == (40 + 12) * 4
    for r in runs.values():
        if r.axis != "data":
            assert r.config.num_train_steps == 2
    runs = {r.name: r for r in plan_runs(tiny_config("depth"))}
    assert tuple(runs["depth_01_3"].config.model.top_mlp) == (8, 8, 8, 1)
    over = plan_runs(tiny_config("over_arch"))[1].config.model
    assert tuple(over.top_mlp) == (16, 1) and tuple(over.bottom_mlp) == (8, 4)


@pytest.mark.parametrize("key,value,match", [
    ("axis", "width", "config.axis"),
    ("scaling.data_samples", (128, 64), "config.scaling.data_samples"),
    ("scaling.data_samples", (16, 64), "config.scaling.data_samples"),
    ("scaling.param_samples", 8, "config.scaling.param_samples"),
    ("scaling.warmup_fraction", 0.9, "config.scaling.warmup_fraction"),
])
def test_bad_config_names_the_key(key, value, match):
    c = tiny_config()
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
    with pytest.raises(ConfigError, match=match):
        plan_runs(c)


def test_resume_skips_finished_runs_and_shards_split_the_runs(tmp_path):
    """Shards, skipping finished runs, a run killed before its results, a changed config."""
    c = tiny_config()
    c.scaling.data_samples = (64, 128)
    c.scaling.keep_run_checkpoints = True
    d = str(tmp_path)
    first = run_sweep(c, d, shard_index=1, num_shards=2)  # shard 1 of 2: the second run only
    assert first["done"] == 1 and sorted(os.listdir(tmp_path / "data")) == \
        ["data_01_128.json", "runs"]
    record = json.loads((tmp_path / "data" / "data_01_128.json").read_text())
    assert record["train_samples"] == 128 and 0 < record["eval"]["ne"] < 2
    assert {"teacher_ne", "teacher_auc"} <= set(record["teacher"])
    assert record["params"]["embedding"] == 52 * 4 and record["train_flops"] > 0
    mtime = os.path.getmtime(tmp_path / "data" / "data_01_128.json")
    second = run_sweep(c, d)
    assert second["done"] == 1 and second["skipped"] == 1  # only the missing run trained
    assert os.path.getmtime(tmp_path / "data" / "data_01_128.json") == mtime
    assert run_sweep(c, d)["done"] == 0
    # Killed after training but before its results file: the run comes back from its own
    # workdir (checkpoint and final eval) instead of training again.
    (tmp_path / "data" / "data_01_128.json").unlink()
    assert run_sweep(c, d)["done"] == 1
    again = json.loads((tmp_path / "data" / "data_01_128.json").read_text())
    assert again["eval"] == record["eval"]
    metrics = (tmp_path / "data" / "runs" / "data_01_128" / "metrics.jsonl").read_text()
    assert metrics.count('"step": 1,') == 1  # step 1 was trained once
    c.model.top_mlp = (4, 1)  # a different sweep in the same directory is refused
    with pytest.raises(ResumeError, match="data_00_64.json"):
        run_sweep(c, d)


def test_unfinished_run_of_another_config_is_refused(tmp_path):
    c = tiny_config()
    run_dir = tmp_path / "data" / "runs" / "data_00_64"
    run_dir.mkdir(parents=True)
    (run_dir / "run_spec.json").write_text(json.dumps({"other": 1}))
    with pytest.raises(ResumeError, match="unfinished run of a different config"):
        run_sweep(c, str(tmp_path))


def test_tsv_holds_out_its_last_tenth_and_checks_its_length(tmp_path):
    from autoshard_jax.data import SyntheticClickStream
    from autoshard_jax.errors import DataError
    from autoshard_jax.train.loop import build_tables

    c = tiny_config()
    path = tmp_path / "train.tsv"
    SyntheticClickStream(build_tables(c), seed=1).write_tsv(path, 1000)
    c.data.path = str(path)
    c.scaling.data_samples = (64,)
    record = run_sweep(c, str(tmp_path / "sweep")) and json.loads(
        (tmp_path / "sweep" / "data" / "data_00_64.json").read_text())
    assert record["eval"]["num_examples"] == 100 and record["teacher"] == {}
    c.scaling.data_samples = (960,)  # more than the 900 training lines
    with pytest.raises(DataError, match=r"train.tsv: 1000 lines leave 900"):
        run_sweep(c, str(tmp_path / "sweep2"))
