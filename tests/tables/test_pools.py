"""Table pools: dlrm_datasets arrays -> specs, the calibrated synthetic pool, id generation."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from autoshard_jax.errors import DataError
from autoshard_jax.tables.features import FEATURE_NAMES, table_features
from autoshard_jax.tables.ids import generate_ids, reuse_bin, reuse_histogram, unique_rows
from autoshard_jax.tables.pools import (
    DLRM_DATASETS_2021,
    augment_dims,
    load_dlrm_datasets,
    mean_lookups_per_table,
    specs_from_arrays,
    synthetic_pool,
)
from autoshard_jax.tables.spec import TableSpec

STATS_FILE = os.path.join(os.path.dirname(__file__), "../../../shared/data/"
                          "dlrm_datasets_2021_locality_stats.txt")


def _hand_batch():
    # 2 tables x 3 samples. Table 0 bags: [5, 5], [5], [7]; table 1 bags: [], [0, 1, 1, 1], [250].
    bags = [[5, 5], [5], [7], [], [0, 1, 1, 1], [250]]
    lengths = np.array([len(b) for b in bags]).reshape(2, 3)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bags])])
    indices = np.array([i for b in bags for i in b], np.int64)
    return indices, offsets, lengths


def test_specs_from_hand_built_arrays():
    specs = specs_from_arrays(*_hand_batch(), dims=16)
    a, b = specs
    assert (a.rows, b.rows) == (100, 251)  # max id + 1, floored at 100 as the AutoShard tools do
    assert a.pooling_factor == pytest.approx(4 / 3) and b.pooling_factor == pytest.approx(5 / 3)
    # table 0: row 5 seen 3x (bin (2,4]), row 7 once (bin (0,1]) -> half the unique rows each
    assert a.reuse_hist[0] == 0.5 and a.reuse_hist[2] == 0.5 and sum(a.reuse_hist) == 1.0
    # table 1: rows 0 and 250 once, row 1 three times
    assert b.reuse_hist[0] == pytest.approx(2 / 3) and b.reuse_hist[2] == pytest.approx(1 / 3)
    assert {s.dim for s in specs} == {16}


def test_specs_from_arrays_draws_dims_from_a_set():
    specs = specs_from_arrays(*_hand_batch(), dims=(4, 8), seed=3)
    assert all(s.dim in (4, 8) for s in specs)


@pytest.mark.parametrize("mutate, match", [
    (lambda i, o, n: (i, o[:-1], n), "offsets must have"),
    (lambda i, o, n: (i, o, n.reshape(-1)), "lengths must be"),
    (lambda i, o, n: (i[:-1], o, n), "disagree"),
    (lambda i, o, n: (i - 10, o, n), "indices must be >= 0"),
])
def test_specs_from_arrays_rejects_inconsistent_arrays(mutate, match):
    with pytest.raises(DataError, match=match):
        specs_from_arrays(*mutate(*_hand_batch()))


def test_loader_without_torch_says_how_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(DataError, match=r"autoshard-jax\[torch\]"):
        load_dlrm_datasets(tmp_path / "fbgemm_t856_bs65536.pt.gz")


def test_reuse_bins_follow_the_dlrm_datasets_edges():
    counts = np.array([1, 2, 3, 4, 5, 8, 9, 32768, 32769, 10**6])
    assert reuse_bin(counts).tolist() == [0, 1, 2, 2, 3, 3, 4, 15, 16, 16]
    ids = np.array([[3, 3, -1], [3, 9, -1]])
    assert reuse_histogram(ids)[[0, 2]].tolist() == [0.5, 0.5]


def test_synthetic_pool_matches_the_published_statistics():
    pool = synthetic_pool(seed=0)
    assert len(pool) == DLRM_DATASETS_2021["num_tables"]
    pf = np.array([s.pooling_factor for s in pool])
    assert mean_lookups_per_table() == pytest.approx(15.8, abs=0.05)
    assert pf.mean() == pytest.approx(mean_lookups_per_table(), rel=0.01)
    assert np.median(pf) < 0.6 * pf.mean()  # heavy tailed: a few tables carry most lookups
    rows = np.array([s.rows for s in pool])
    assert rows.min() >= 100 and np.percentile(rows, 95) / np.percentile(rows, 5) > 100
    hist = np.array([s.reuse_hist for s in pool])
    np.testing.assert_allclose(hist.mean(0), DLRM_DATASETS_2021["reuse_hist"], atol=0.02)
    assert hist.std(0)[0] > 0.03  # tables differ from each other
    again = synthetic_pool(seed=0)
    assert again == pool and synthetic_pool(seed=1) != pool
    assert {s.dim for s in synthetic_pool(50, dims=(16, 32))} == {16, 32}


def test_augment_dims_redims_the_heavy_tables_and_keeps_the_rest():
    pool = [TableSpec("a", 500, 16, 40.0, tuple([1.0] + [0.0] * 16)),
            TableSpec("b", 900, 128, 30.0), TableSpec("c", 700, 64, 2.0)]
    wide = augment_dims(pool, (128, 64, 64), min_pooling=30.0)
    assert [(s.name, s.dim) for s in wide] == [("a_d64", 64), ("a_d128", 128), ("b_d64", 64)]
    for w, o in zip(wide, [pool[0], pool[0], pool[1]], strict=True):
        assert (w.rows, w.pooling_factor, w.reuse_hist) == (o.rows, o.pooling_factor, o.reuse_hist)
    assert len(augment_dims(pool, (4,))) == 3  # every table when no pooling floor is set
    for dims, floor in [((), 0.0), ((0,), 0.0), ((16.5,), 0.0), ((16,), -1.0), ((16,), np.nan)]:
        with pytest.raises(ValueError):
            augment_dims(pool, dims, floor)


def test_published_histogram_is_the_one_in_the_shared_stats_file():
    if not os.path.exists(STATS_FILE):
        pytest.skip("the shared stats file is not beside this checkout")
    lines = open(STATS_FILE).read().splitlines()
    start = lines.index("Histogram of col sizes:") + 1
    values = [float(line.split(":")[1]) for line in lines[start:start + 17]]
    assert tuple(values) == DLRM_DATASETS_2021["reuse_hist"]
    assert f"Avg # of indices: {DLRM_DATASETS_2021['num_indices']}" in lines


@pytest.mark.parametrize("rows, pf, batch", [(10**6, 15.8, 2048), (10**7, 1.0, 8192),
                                             (5000, 0.4, 16384), (2000, 3.5, 1024)])
def test_generated_ids_match_their_spec(rows, pf, batch):
    spec = synthetic_pool(1, seed=rows)[0]
    spec = TableSpec("x", rows, 8, pf, spec.reuse_hist)
    ids = generate_ids(spec, batch, np.random.default_rng(0))
    assert ids.shape == (batch, spec.hotness) and ids.dtype == np.int32
    assert ids.min() >= -1 and ids.max() < rows
    assert (ids >= 0).sum(1).mean() == pytest.approx(pf, abs=1.0 / batch)
    # -1 only after the real ids of a bag
    assert not np.any((ids[:, :-1] < 0) & (ids[:, 1:] >= 0))
    hist = reuse_histogram(ids)
    unique = len(np.unique(ids[ids >= 0]))
    assert unique >= 500
    tv = 0.5 * np.abs(hist - np.asarray(spec.reuse_hist) / sum(spec.reuse_hist)).sum()
    assert tv < 0.06


def test_unique_rows_is_what_the_draws_touch():
    specs = synthetic_pool(40, seed=7, max_rows=100_000)
    feats = table_features(specs)
    for batch in (64, 512):
        u_T = unique_rows(feats[:, 0], feats[:, 2], feats[:, 4:], batch)
        drawn = []
        for s in specs:
            ids = generate_ids(s, batch, np.random.default_rng(0))
            drawn.append(len(np.unique(ids[ids >= 0])))
        np.testing.assert_allclose(u_T, drawn, rtol=0.02, atol=0.5)
        np.testing.assert_allclose(
            np.asarray(unique_rows(*map(jnp.asarray, (feats[:, 0], feats[:, 2], feats[:, 4:])),
                                   batch, xp=jnp)), u_T, rtol=2e-3)  # float32
    # never more than the table has, never fewer than one
    assert unique_rows(np.float32(10), np.float32(50.0), np.eye(17)[0], 512) == 10
    assert unique_rows(np.float32(100), np.float32(0.001), np.eye(17)[16], 512) == 1


def test_ids_without_a_histogram_are_uniform():
    ids = generate_ids(TableSpec("u", 100, 4, 2.0), 5000, np.random.default_rng(1))
    counts = np.bincount(ids.reshape(-1), minlength=100)
    assert counts.min() > 50 and counts.max() < 150


def test_features_are_raw_and_named():
    spec = TableSpec("f", 1000, 16, 2.5, tuple([1.0] + [0.0] * 16))
    feats = table_features([spec, TableSpec("g", 10, 4)])
    assert feats.shape == (2, len(FEATURE_NAMES)) == (2, 21)
    assert feats[0, :3].tolist() == [1000, 16, 2.5]
    assert feats[0, 3] == pytest.approx(1000 * 16 * 4 / 2**30)
    assert feats[1, 4] == 1.0  # no histogram: every row seen once
