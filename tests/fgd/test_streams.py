"""Period streams: the future is refused until deployment; drifting teacher; Criteo days."""

import numpy as np
import pytest

from autoshard_jax.data import SyntheticClickStream
from autoshard_jax.errors import ConfigError, InputError
from autoshard_jax.tables.spec import TableSpec
from fgd.streams import FutureLeakError, PeriodStream, drift_angles, synthetic_stream

TABLES = [TableSpec("a", 50, 4), TableSpec("b", 20, 4)]


def _stream(initial=2, num_periods=5):
    return PeriodStream(lambda t: {"label": np.full(3, t, np.float32)}, num_periods, initial)


def test_refuses_next_period_before_deploy():
    s = _stream()
    assert s.period(1)["label"][0] == 1
    with pytest.raises(FutureLeakError, match="period 2 is not revealed"):
        s.period(2)
    t, data = s.deploy()
    assert t == 2 and data["label"][0] == 2
    assert s.period(2)["label"][0] == 2
    with pytest.raises(FutureLeakError):
        s.period(3)
    with pytest.raises(FutureLeakError):
        s.info(3)
    s.deploy(), s.deploy()
    with pytest.raises(FutureLeakError, match="already revealed"):
        s.deploy()


def test_drift_angles():
    np.testing.assert_allclose(drift_angles("linear", 0.1, 4), [0, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(drift_angles("periodic", 1.0, 5, cycle=2), [0, 1, 0, 1, 0])
    np.testing.assert_allclose(drift_angles("abrupt", 1.0, 5, change_every=2), [0, 0, 1, 1, 2])
    assert not drift_angles("none", 3.0, 3).any()
    with pytest.raises(ConfigError, match="config.data.drift"):
        drift_angles("sideways", 1.0, 3)


def test_synthetic_stream_labels_follow_the_rotated_teacher():
    s = synthetic_stream(TABLES, 3, seed=0, zipf_a=1.0, drift="periodic", speed=1.5,
                         num_periods=4, samples_per_period=4000, initial=4)
    p0, p1, p2 = s.period(0), s.period(1), s.period(2)
    # Same features law, different conditional law: the teacher logits differ between regimes.
    i0, i1, i2 = s.info(0), s.info(1), s.info(2)
    assert i0["angle"] == i2["angle"] == 0.0 and i1["angle"] == 1.5
    assert 0.3 < i0["bayes_ne"] < 1.0 and 0.3 < i1["bayes_ne"] < 1.0
    # At angle 0 the labels' law is exactly the core teacher's.
    core = SyntheticClickStream(TABLES, 3, seed=0, zipf_a=1.0)
    np.testing.assert_allclose(i0["teacher_logit"], core.teacher_logit(p0), rtol=1e-10)
    assert np.corrcoef(i0["teacher_logit"], s._load(1) and i1["teacher_logit"])[0, 1] < 0.5
    # Empirical CTR roughly preserved by the rotation.
    assert abs(p0["label"].mean() - p1["label"].mean()) < 0.08
    assert p2["dense"].shape == (4000, 3)


def test_criteo_days_are_periods_in_order(tmp_path):
    from fgd.streams import criteo_stream

    tables = [TableSpec("a", 50, 4), TableSpec("b", 20, 4)]
    core = SyntheticClickStream(tables, 13, seed=1, zipf_a=1.0)
    days = tmp_path / "days"
    days.mkdir()
    for d, n in enumerate((30, 20, 25)):
        core.write_tsv(days / f"day_{d}", n, split="train" if d % 2 else "eval")
    # kaggle_days (the fgd_criteo default) splits a single file; a directory's days stay files.
    assert criteo_stream(str(days), tables, 13, initial=2, kaggle_days=7).num_periods == 3
    s = criteo_stream(str(days), tables, 13, initial=2)
    assert s.num_periods == 3 and s.revealed == 2
    assert [len(s.period(t)["label"]) for t in range(2)] == [30, 20]
    with pytest.raises(FutureLeakError):
        s.period(2)
    t, day2 = s.deploy()
    assert t == 2 and len(day2["label"]) == 25
    np.testing.assert_array_equal(s.period(1)["label"], core.batch(0, 4096, "train")["label"][:20])
    one = tmp_path / "train.txt"  # one file: kaggle_days equal consecutive chunks
    one.write_text((days / "day_0").read_text())
    k = criteo_stream(str(one), tables, 13, initial=2, kaggle_days=3)
    assert k.num_periods == 3 and [len(k.period(t)["label"]) for t in range(2)] == [10, 10]
    (days / "day_2").write_text("1\tnot-a-number\n")
    with pytest.raises(InputError, match="day_2:1"):  # bad lines behave as in training
        criteo_stream(str(days), tables, 13, initial=2).deploy()
