"""Every launch config builds, and the TSV path of the training job works end to end."""

import importlib

import pytest

from autoshard_jax.data import SyntheticClickStream
from autoshard_jax.train.loop import build_dense_model, build_tables, train_and_evaluate
from launch.configs import criteo_kaggle

CONFIGS = ["synthetic_small", "criteo_kaggle", "criteo_1tb_dcnv2"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_model_and_tables(name):
    config = importlib.import_module(f"launch.configs.{name}").get_config()
    tables = build_tables(config)
    assert len(tables) == 26
    assert all(t.dim == config.model.embedding_dim for t in tables)
    build_dense_model(config)
    module = importlib.import_module(f"launch.configs.{name}")
    assert "python -m launch.train_dlrm" in module.__doc__


def test_missing_data_path_is_a_clear_error(tmp_path):
    config = criteo_kaggle.get_config()
    config.data.path = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_and_evaluate(config, str(tmp_path / "work"))


def _tsv_config(path, skip_bad_lines=False):
    config = criteo_kaggle.get_config()
    config.data.path = str(path)
    config.data.skip_bad_lines = skip_bad_lines
    config.model.rows_cap = 1000
    config.model.bottom_mlp = (32, 16)
    config.model.top_mlp = (32, 1)
    config.batch_size = 128
    config.num_train_steps = 20
    config.log_every = 5
    return config


def test_criteo_tsv_day_split_and_a_malformed_line(tmp_path):
    """A bad line stops the run naming file and line; skipping it, the job trains on days 0-5
    and evaluates day 6 whole (one training run: the TSV path end to end)."""
    config = _tsv_config(tmp_path / "train.txt")
    SyntheticClickStream(build_tables(config)).write_tsv(config.data.path, 7 * 256)
    lines = open(config.data.path).read().splitlines(keepends=True)
    lines[100] = "1\t2\tnot-a-line\n"
    open(config.data.path, "w").writelines(lines)
    with pytest.raises(ValueError, match=r"train\.txt:101"):
        train_and_evaluate(config, str(tmp_path / "work"))
    result = train_and_evaluate(_tsv_config(config.data.path, True), str(tmp_path / "work2"))
    assert result["num_examples"] == 256  # day 6 of 7 equal days, evaluated whole
    assert 0.0 < result["log_loss"] < 1.0


@pytest.mark.parametrize("train_days, eval_days", [((0, 1, 6), (6,)), ((), (6,))])
def test_eval_days_never_train(tmp_path, train_days, eval_days):
    config = _tsv_config(tmp_path / "train.txt")
    SyntheticClickStream(build_tables(config)).write_tsv(config.data.path, 7 * 16)
    config.data.train_days, config.data.eval_days = train_days, eval_days
    with pytest.raises(ValueError, match="eval"):
        train_and_evaluate(config, str(tmp_path / "work"))
