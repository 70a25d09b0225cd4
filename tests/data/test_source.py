"""DataSource: ids checked once against the tables, eval padding, config errors."""

import numpy as np
import pytest

from autoshard_jax.data import DataSource, pad_batch
from autoshard_jax.data.batch import check_ids
from autoshard_jax.errors import ConfigError, InputError
from autoshard_jax.tables.spec import TableSpec
from launch.configs import synthetic_small

TABLES = [TableSpec("users", 50, 4, 1.0), TableSpec("ads", 9, 4, 2.0)]


def config(**data):
    c = synthetic_small.get_config()
    c.batch_size = 8
    c.data.num_eval_batches = 2
    for k, v in data.items():
        c.data[k] = v
    return c


def test_check_ids_names_feature_and_table():
    ok = (np.array([[-1], [49]], np.int32), np.array([[0, -1], [8, 8]], np.int32))
    check_ids(ok, TABLES)
    with pytest.raises(InputError, match=r"feature 1 \(table 'ads', 9 rows\): id 9 is out of"):
        check_ids((ok[0], np.array([[9, 0]], np.int32)), TABLES)
    with pytest.raises(InputError, match=r"feature 0 \(table 'users'.*id -2"):
        check_ids((np.array([[-2]], np.int32), ok[1]), TABLES)
    with pytest.raises(InputError, match="ids for 1 features"):
        check_ids(ok[:1], TABLES)


def test_source_refuses_a_bad_id_instead_of_clipping_it():
    source = DataSource(config(), TABLES)
    good = source.stream.batch(0, 8)
    assert next(source.train(0))["ids"][1].max() < 9
    bad = dict(good, ids=(good["ids"][0], np.full_like(good["ids"][1], 9)))
    source.stream.batches = lambda *a, **k: iter([good, bad])
    batches = source.train(0)
    next(batches)
    with pytest.raises(InputError, match="table 'ads'"):
        next(batches)


def test_eval_batches_are_padded_with_a_mask():
    batch = {"dense": np.ones((3, 2), np.float32), "ids": (np.zeros((3, 1), np.int32),),
             "label": np.ones(3, np.float32)}
    padded = pad_batch(batch, 5)
    assert padded["mask"].tolist() == [True] * 3 + [False] * 2
    assert padded["ids"][0][3:].tolist() == [[-1], [-1]]
    assert padded["dense"].shape == (5, 2) and padded["label"][3:].tolist() == [0, 0]
    evals = list(DataSource(config(), TABLES).eval())
    assert len(evals) == 2 and all(b["mask"].all() for b in evals)


def test_config_errors():
    with pytest.raises(ConfigError, match="data.kind"):
        DataSource(config(kind="parquet"), TABLES)
    with pytest.raises(ConfigError, match="data.path"):
        DataSource(config(kind="criteo_tsv", path=""), TABLES)
