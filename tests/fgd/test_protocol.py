"""The online protocol end to end on a tiny stream: records, resume after a kill, summary."""

import json
import os

import numpy as np
import pytest

from autoshard_jax.errors import ConfigError
from fgd import report
from fgd.online import check_config, run_online
from launch.configs import fgd_synthetic


def tiny_config(methods="bu,fgd,full"):
    c = fgd_synthetic.get_config()
    c.methods = methods
    c.seeds = 1
    c.num_periods = 6
    c.pretrain_periods = 3
    c.pretrain_epochs = 1
    c.diag_rows = 256
    c.data.samples_per_period = 300
    c.model.table_rows = (30, 12)
    c.model.bottom_mlp = (8, 4)
    c.model.top_mlp = (8, 1)
    c.model.embedding_dim = 4
    c.data.num_dense = 3
    c.optim.batch_size = 64
    c.optim.meta_batch = 64  # = batch_size: one compiled gradient shape serves everything
    c.optim.meta_steps = 2
    c.optim.sml_steps = 2
    return c


class Killed(Exception):
    pass


def test_resume_after_kill_loses_nothing_and_matches_uninterrupted_run(tmp_path, monkeypatch):
    config = tiny_config()
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    summary = run_online(config, full_dir)
    rows = [json.loads(x) for x in open(os.path.join(full_dir, "metrics.jsonl"))]
    # 3 methods x (1 first deployment + 2 test periods).
    assert len(rows) == 9 and {r["period"] for r in rows} == {3, 4, 5}
    assert all(r["test"] == (r["period"] > 3) for r in rows)
    assert set(summary["methods"]) == {"bu", "fgd", "full"}
    assert summary["methods"]["bu"]["win_rate_vs_bu"] == 0.5
    assert os.path.exists(os.path.join(full_dir, "auc.png"))
    assert "| fgd |" in open(os.path.join(full_dir, "results.md")).read()
    for r in rows:
        if r["test"]:
            assert 0.0 < r["bayes_ne"] < 1.0 and "grad_variation" in r
        if r["method"] == "fgd" and r["test"]:
            assert r["forecast_error"] > 0.0 and np.isfinite(r["meta_loss"])

    # Kill the second run in the middle of fgd (after its first test period).
    from fgd import protocol

    real_add = protocol.Records.add

    def add_then_die(self, record):
        out = real_add(self, record)
        if record["method"] == "fgd" and record["period"] == 4:
            raise Killed()
        return out

    monkeypatch.setattr(protocol.Records, "add", add_then_die)
    with pytest.raises(Killed):
        run_online(config, killed_dir)
    monkeypatch.setattr(protocol.Records, "add", real_add)
    run_online(config, killed_dir)
    again = [json.loads(x) for x in open(os.path.join(killed_dir, "metrics.jsonl"))]
    key = lambda r: (r["method"], r["period"])  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, rows))  # no duplicates, nothing lost
    want = {key(r): r["auc"] for r in rows}
    assert all(r["auc"] == want[key(r)] for r in again)  # resumed run is identical

    # A finished run says so and writes nothing new.
    run_online(config, killed_dir)
    assert len(open(os.path.join(killed_dir, "metrics.jsonl")).readlines()) == 9


def test_criteo_day_directory_runs_end_to_end(tmp_path):
    """The shipped fgd_criteo config on a directory of Criteo-format day files (written here from
    the synthetic teacher stream, cut into consecutive days), with the tiny model and optimiser
    of tiny_config so the compiled programs are shared: every day is a period (kaggle_days
    applies to a single file only) and FGD's gate is backtested from the second update on."""
    from autoshard_jax.data.synthetic import SyntheticClickStream
    from autoshard_jax.tables.spec import criteo_tables
    from launch.configs import fgd_criteo

    tiny = tiny_config()
    days, rows = 5, 150
    data = tmp_path / "days"
    data.mkdir()
    SyntheticClickStream(criteo_tables(tiny.model.table_rows, 4), num_dense=3, seed=0).write_tsv(
        tmp_path / "all.tsv", days * rows)
    lines = (tmp_path / "all.tsv").read_text().splitlines(keepends=True)
    for d in range(days):
        (data / f"day_{d}").write_text("".join(lines[d * rows:(d + 1) * rows]))
    config = fgd_criteo.get_config()
    assert config.data.kaggle_days > 0
    config.data.path, config.data.num_dense = str(data), 3
    config.model, config.optim = tiny.model, tiny.optim
    config.methods, config.seeds, config.pretrain_epochs = "bu,fgd", 1, 1
    work = str(tmp_path / "w")
    summary = run_online(config, work)
    recs = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
    assert sorted({r["period"] for r in recs}) == [2, 3, 4]  # pretrain on days 0-1
    fgd = {r["period"]: r for r in recs if r["method"] == "fgd"}
    assert "backtest_gain" in fgd[4] and 0.0 <= fgd[4]["gate"] <= 1.0
    assert set(summary["methods"]) == {"bu", "fgd"} and summary["test_periods"] == [3, 4]
    assert all(0.0 < r["auc"] < 1.0 for r in recs)


def test_summary_statistics_against_hand_computation():
    rows = []
    aucs = {("bu", 0): [0.6, 0.7], ("fgd", 0): [0.65, 0.7], ("bu", 1): [0.5, 0.6],
            ("fgd", 1): [0.55, 0.5]}
    for (m, s), vals in aucs.items():
        for p, a in zip((5, 6), vals, strict=True):
            rows.append({"seed": s, "method": m, "period": p, "auc": a, "ne": 1 - a,
                         "log_loss": 1.0})
    out = report.summarize(rows, ["bu", "fgd"], [0, 1], [5, 6])
    fgd = out["methods"]["fgd"]
    # Per-seed means: bu 0.65, 0.55; fgd 0.675, 0.525 -> diffs +0.025, -0.025.
    assert fgd["mean_test_auc"]["mean"] == pytest.approx(0.6)
    assert fgd["mean_test_auc"]["std"] == pytest.approx(np.std([0.675, 0.525], ddof=1))
    assert fgd["auc_diff_vs_bu"]["mean"] == pytest.approx(0.0)
    assert fgd["auc_diff_vs_bu"]["se"] == pytest.approx(np.std([0.025, -0.025], ddof=1) / 2 ** .5)
    assert fgd["win_rate_vs_bu"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert fgd["mean_test_ne"]["mean"] == pytest.approx(0.4)
    assert report.summarize(rows, ["bu", "fgd"], [0, 1, 2], [5, 6])["incomplete_seeds"] == [2]


@pytest.mark.parametrize("key,value,match", [
    ("methods", "bu,magic", "config.methods"),
    ("seeds", 0, "config.seeds"),
    ("optim.lr", -1.0, "config.optim.lr"),
    ("data.drift", "sideways", "config.data.drift"),
    ("pretrain_periods", 1, "config.pretrain_periods"),
])
def test_bad_config_names_the_key(key, value, match):
    config = tiny_config()
    node = config
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    node[leaf] = value
    if key == "pretrain_periods":
        config.optim.history = 2
    with pytest.raises(ConfigError, match=match):
        check_config(config)


def test_sml_transfer_is_the_fine_tuned_model_at_init():
    from fgd.methods import sml_init, sml_transfer

    rng = np.random.default_rng(0)
    old = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    hat = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    np.testing.assert_array_equal(sml_transfer(sml_init(), old, hat)["w"], hat["w"])
    psi = dict(sml_init(), b2=np.float32(0.5))
    moved = sml_transfer(psi, old, hat)["w"]
    scale = np.sqrt(np.mean(hat["w"] ** 2))
    np.testing.assert_allclose(moved, hat["w"] + 0.5 * scale, rtol=1e-5)


@pytest.mark.parametrize("name", ["fgd_synthetic", "fgd_movielens", "fgd_criteo"])
def test_shipped_configs_pass_the_checks_and_carry_their_command(name):
    import importlib

    module = importlib.import_module(f"launch.configs.{name}")
    config = module.get_config()
    config.data.path = config.data.path or "/data/criteo"
    assert check_config(config)
    assert "python -m launch.fgd_online" in module.__doc__
