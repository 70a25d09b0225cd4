"""Tests of the synthetic click stream: contract, determinism, skew, teacher and TSV round trip."""

import math

import numpy as np
import pytest

from autoshard_jax.data import CriteoTSVReader, SyntheticClickStream, check_batch
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train.metrics import auc, bayes_reference

TABLES = (
    TableSpec("small", 3, 4),
    TableSpec("multi", 1000, 4, pooling_factor=2.5),
    TableSpec("huge", 40_000_000, 4),
    TableSpec("sparse", 50, 4, pooling_factor=0.5),
)


@pytest.fixture(scope="module")
def stream():
    return SyntheticClickStream(TABLES, num_dense=5, seed=3)


def _equal(a, b) -> bool:
    return (np.array_equal(a["dense"], b["dense"]) and np.array_equal(a["label"], b["label"])
            and all(np.array_equal(x, y) for x, y in zip(a["ids"], b["ids"], strict=True)))


def test_contract_shapes_and_dtypes(stream):
    batch = stream.batch(0, 256)
    check_batch(batch, TABLES, num_dense=5)
    assert [ids.shape for ids in batch["ids"]] == [(256, 1), (256, 3), (256, 1), (256, 1)]
    assert np.all(batch["dense"] >= 0)


def test_deterministic_random_access(stream):
    again = SyntheticClickStream(TABLES, num_dense=5, seed=3)
    assert _equal(stream.batch(7, 128), again.batch(7, 128))
    assert not _equal(stream.batch(7, 128), stream.batch(8, 128))
    assert not _equal(stream.batch(7, 128), stream.batch(7, 128, split="eval"))
    other_seed = SyntheticClickStream(TABLES, num_dense=5, seed=4)
    assert not _equal(stream.batch(7, 128), other_seed.batch(7, 128))
    resumed = list(stream.batches(64, start=3, num_batches=2))
    assert len(resumed) == 2 and _equal(resumed[1], stream.batch(4, 64))


@pytest.mark.parametrize("rows", [None, (5, 40)])
def test_worker_threads_generate_the_same_stream(stream, rows):
    one = list(stream.batches(64, start=2, num_batches=7, rows=rows))
    many = list(stream.batches(64, start=2, num_batches=7, rows=rows, workers=3))
    assert len(many) == 7 and all(_equal(a, b) for a, b in zip(one, many, strict=True))
    endless = stream.batches(64, start=2, rows=rows, workers=3)  # no num_batches: forever
    assert all(_equal(next(endless), b) for b in one)
    endless.close()  # closed early, with batches generated ahead: returns


def test_padding_is_trailing_and_counts(stream):
    batch = stream.batch(1, 4096)
    small, multi, huge, sparse = batch["ids"]
    assert np.all(small >= 0) and np.all(huge >= 0)  # pooling factor 1: exactly one id
    real = multi >= 0
    assert np.all(real[:, 0]) and np.all(real[:, :-1] >= real[:, 1:])  # -1 only after real ids
    # count = min(1 + Poisson(1.5), 3)
    p = [math.exp(-1.5) * 1.5**k / math.factorial(k) for k in range(2)]
    expected = 1 * p[0] + 2 * p[1] + 3 * (1 - p[0] - p[1])
    assert abs(real.sum(1).mean() - expected) < 0.05
    assert abs((sparse >= 0).mean() - 0.5) < 0.05  # pooling factor 0.5: empty bags half the time


def test_zipf_skew_and_hot_rows_spread():
    tables = [TableSpec("t", 100_000, 4)]
    ids = SyntheticClickStream(tables, seed=0).batch(0, 20000)["ids"][0][:, 0]
    counts = np.bincount(ids, minlength=100_000)
    top10 = np.sort(counts)[::-1][:10]
    assert top10.sum() / ids.size > 0.3  # bounded Zipf(1.2) puts ~42% of mass on 10 ranks
    assert set(np.argsort(counts)[::-1][:10]) != set(range(10))
    flat = SyntheticClickStream(tables, seed=0, zipf_a=0.0).batch(0, 20000)["ids"][0][:, 0]
    assert np.sort(np.bincount(flat))[::-1][:10].sum() / flat.size < 0.01


def test_teacher_stats_are_sane(stream):
    labels, logits = stream.teacher_predictions(40000)
    stats = bayes_reference(labels, logits)
    assert 0.2 < stats["ctr"] < 0.3 and 0.2 < stats["mean_p"] < 0.3
    assert auc(labels, logits) > 0.7
    assert stats["bayes_logloss"] < stats["constant_logloss"]
    assert 0 < stats["bayes_ne"] < 1


@pytest.mark.parametrize("suffix", ["tsv", "tsv.gz"])
def test_write_tsv_round_trip(tmp_path, suffix):
    tables = [TableSpec("a", 1000, 4), TableSpec("b", 7, 4, pooling_factor=0.7),
              TableSpec("c", 2**31 - 1, 4)]
    stream = SyntheticClickStream(tables, num_dense=13, seed=1)
    path = tmp_path / f"synth.{suffix}"
    stream.write_tsv(path, num_samples=1000, batch_size=256)
    reader = CriteoTSVReader(path, tables, drop_last=False)
    got = list(reader.batches(256))
    assert [len(b["label"]) for b in got] == [256, 256, 256, 232]
    for i, batch in enumerate(got):
        want = stream.batch(i, 256)
        want = {"dense": want["dense"][:232] if i == 3 else want["dense"],
                "label": want["label"][:232] if i == 3 else want["label"],
                "ids": tuple(x[:232] if i == 3 else x for x in want["ids"])}
        assert _equal(batch, want)


def test_write_tsv_rejects_multi_hot(tmp_path, stream):
    with pytest.raises(ValueError, match="hotness 1"):
        stream.write_tsv(tmp_path / "x.tsv", 10)


def test_bad_arguments():
    with pytest.raises(ValueError):
        SyntheticClickStream([])
    with pytest.raises(ValueError, match="split"):
        SyntheticClickStream(TABLES[:1]).batch(0, 8, split="test")
