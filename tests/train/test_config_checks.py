"""validate_config names the bad key of every field; run identity covers what changes a run."""

import importlib

import ml_collections
import optax
import pytest

from autoshard_jax.errors import ConfigError, ResumeError
from autoshard_jax.train.config_checks import validate_config
from autoshard_jax.train.run_identity import check_same_run, run_identity
from launch.configs import synthetic_small


def config_with(key, value):
    config = ml_collections.ConfigDict(synthetic_small.get_config().to_dict())
    node = config
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    node[leaf] = None  # drop the field's type lock so any value can be tried
    node[leaf] = value
    return config


@pytest.mark.parametrize("name", ["synthetic_small", "criteo_kaggle", "criteo_1tb_dcnv2"])
def test_shipped_configs_pass(name):
    validate_config(importlib.import_module(f"launch.configs.{name}").get_config())


BAD = [
    ("log_every", 0, "config.log_every must be >= 1, got 0"),
    ("checkpoint_every", 0, "config.checkpoint_every must be >= 1"),
    ("eval_every", -5, "config.eval_every must be >= 0"),
    ("batch_size", 2.5, "config.batch_size must be an integer"),
    ("num_train_steps", 0, "config.num_train_steps must be >= 1"),
    ("keep_checkpoints", 0, "config.keep_checkpoints"),
    ("seed", -1, "config.seed"),
    ("data.zipf_a", -1.0, "config.data.zipf_a"),
    ("data.kind", "parquet", "config.data.kind must be one of synthetic, criteo_tsv"),
    ("data.train_days", (0, -1), r"config.data.train_days\[1\] must be >= 0"),
    ("data.train_days", (0, 0), "lists a value twice"),
    ("data.eval_days", "6", "must be a list of integers"),
    ("data.num_eval_batches", 0, "config.data.num_eval_batches"),
    ("data.workers", 0, "config.data.workers must be >= 1"),
    ("data.skip_bad_lines", "yes", "config.data.skip_bad_lines must be true or false"),
    ("model.embedding_dim", 0, "config.model.embedding_dim"),
    ("model.table_rows", (10, 0), r"config.model.table_rows\[1\] must be >= 1"),
    ("model.bottom_mlp", (64, 32, 8), "must end in config.model.embedding_dim=16"),
    ("model.top_mlp", (64, 2), "config.model.top_mlp must end in 1"),
    ("model.interaction", "mul", "config.model.interaction must be one of"),
    ("model.pooling_factor", 0.0, "config.model.pooling_factor"),
    ("optim.embedding", "adam", "config.optim.embedding must be one of adagrad"),
    ("optim.dense", "adamm", "config.optim.dense must name an optax optimizer"),
    ("optim.dense_lr", -0.1, "config.optim.dense_lr must be >= 0"),
]


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_field_is_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(config_with(key, value))


def test_overlapping_and_out_of_range_days():
    config = config_with("data.train_days", (0, 1, 6))
    config.data.eval_days = (6,)
    with pytest.raises(ConfigError, match="overlap"):
        validate_config(config)
    config = config_with("data.kaggle_days", 7)
    config.data.train_days, config.data.eval_days = (0, 1), (7,)
    with pytest.raises(ConfigError, match=r"eval_days \(7,\) names a day past .*kaggle_days=7"):
        validate_config(config)


def test_schedules_are_valid_learning_rates_and_part_of_the_identity():
    config = config_with("optim.dense_lr", optax.cosine_decay_schedule(0.1, 100))
    validate_config(config)
    same = config_with("optim.dense_lr", optax.cosine_decay_schedule(0.1, 100))
    other = config_with("optim.dense_lr", optax.cosine_decay_schedule(0.1, 200))
    check_same_run(run_identity(config), run_identity(same), "here")
    with pytest.raises(ResumeError, match="optim.dense_lr"):
        check_same_run(run_identity(config), run_identity(other), "here")


CHANGES = [("data.zipf_a", 1.5), ("data.num_dense", 12), ("data.train_days", (0,)),
           ("model.embedding_dim", 8), ("model.bottom_mlp", (64, 16)), ("model.rows_cap", 100),
           ("model.interaction", "cat"), ("model.combiner", "mean"), ("optim.embedding", "sgd"),
           ("optim.embedding_lr", 0.5), ("optim.dense", "sgd"), ("seed", 3), ("batch_size", 64)]


@pytest.mark.parametrize("key, value", CHANGES, ids=[k for k, _ in CHANGES])
def test_every_field_that_changes_the_run_is_in_its_identity(key, value):
    saved = run_identity(synthetic_small.get_config())
    with pytest.raises(ResumeError, match=rf"{key}: checkpoint .*, config "):
        check_same_run(saved, run_identity(config_with(key, value)), "/w/checkpoints")


@pytest.mark.parametrize("key, value", [("num_train_steps", 10), ("log_every", 7),
                                        ("eval_every", 3), ("data.eval_days", (6,)),
                                        ("data.num_eval_batches", 2), ("data.workers", 4)])
def test_fields_a_resume_may_change_are_not(key, value):
    check_same_run(run_identity(synthetic_small.get_config()),
                   run_identity(config_with(key, value)), "here")


def test_tables_and_plan_files_count_by_content(tmp_path):
    tables, plan = tmp_path / "tables.json", tmp_path / "plan.json"
    tables.write_text('{"a": 1}')
    plan.write_text('{"p": 1}')
    config = config_with("tables", str(tables))
    config.plan = str(plan)
    saved = run_identity(config)
    plan.write_text('{"p": 2}')
    with pytest.raises(ResumeError, match=r"\(plan: checkpoint \"[0-9a-f]{40}\", config"):
        check_same_run(saved, run_identity(config), "here")
    tables.write_text('{"a": 2}')
    with pytest.raises(ResumeError, match="tables: checkpoint"):
        check_same_run(saved, run_identity(config), "here")


def test_url_workdir_is_refused_not_made_locally(tmp_path, monkeypatch):
    from autoshard_jax.train.loop import train_and_evaluate
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="gs://bucket/run.*mount"):
        train_and_evaluate(synthetic_small.get_config(), "gs://bucket/run")
    assert not (tmp_path / "gs:").exists()
