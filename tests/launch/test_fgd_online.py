"""launch.fgd_online end to end: one good run in a subprocess and user errors as exit 2."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config.num_periods=5", "--config.pretrain_periods=3", "--config.pretrain_epochs=1",
        "--config.data.samples_per_period=200", "--config.model.table_rows=(20,10)",
        "--config.model.embedding_dim=4", "--config.model.bottom_mlp=(8,4)",
        "--config.model.top_mlp=(8,1)", "--config.data.num_dense=3", "--config.diag_rows=128",
        "--config.optim.batch_size=64", "--config.optim.meta_batch=64",
        "--config.optim.meta_steps=1"]


def _run(workdir, *args, config="fgd_synthetic"):
    return subprocess.run(
        [sys.executable, "-m", "launch.fgd_online", f"--config=launch/configs/{config}.py",
         f"--workdir={workdir}", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_good_run_writes_every_output(tmp_path):
    work = tmp_path / "w"
    proc = _run(work, "--config.methods=bu,hint", "--config.seeds=1", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((work / "summary.json").read_text())
    for m in ("bu", "hint"):
        entry = summary["methods"][m]
        assert set(entry["mean_test_auc"]) >= {"mean", "std"}
        assert set(entry["mean_test_ne"]) >= {"mean", "std"}
        assert 0.0 <= entry["win_rate_vs_bu"] <= 1.0
    assert (work / "results.md").exists() and (work / "auc.png").stat().st_size > 1000
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 2 * 2
    assert "ETA" in proc.stdout


@pytest.mark.parametrize("args,culprit", [
    (["--config.methods=bu,oracle"], "config.methods"),
    (["--config.seeds=0"], "config.seeds"),
    (["--config.data.speed=-1.0"], "config.data.speed"),
])
def test_bad_flags_exit_2_naming_the_key(tmp_path, args, culprit):
    proc = _run(tmp_path / "w", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and culprit in last


def test_missing_movielens_data_names_the_path(tmp_path):
    bogus = tmp_path / "no_such_dir" / "ml-100k.whl"
    proc = _run(tmp_path / "w", f"--config.data.path={bogus}", config="fgd_movielens")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "ml-100k.whl" in last


def test_criteo_day_directory_runs_end_to_end(tmp_path):
    """fgd_criteo on a directory of Criteo-format day files (written here from the synthetic
    teacher stream, cut into consecutive days): every day is a period, and FGD's gate is
    backtested from the second update on."""
    from autoshard_jax.data.synthetic import SyntheticClickStream
    from autoshard_jax.tables.spec import criteo_tables

    days, rows = 5, 160
    data = tmp_path / "days"
    data.mkdir()
    whole = tmp_path / "all.tsv"
    SyntheticClickStream(criteo_tables((20, 10), 4), num_dense=3, seed=0).write_tsv(
        whole, days * rows)
    lines = whole.read_text().splitlines(keepends=True)
    for d in range(days):
        (data / f"day_{d}").write_text("".join(lines[d * rows:(d + 1) * rows]))
    work = tmp_path / "w"
    proc = _run(work, f"--config.data.path={data}", "--config.methods=bu,fgd", "--config.seeds=1",
                *[a for a in TINY if not a.startswith(("--config.num_periods",
                                                        "--config.pretrain_periods",
                                                        "--config.data.samples_per_period"))],
                "--config.pretrain_periods=2", "--config.model.rows_cap=0", config="fgd_criteo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["period"] for r in recs}) == [2, 3, 4]  # pretrain on days 0-1
    fgd = {r["period"]: r for r in recs if r["method"] == "fgd"}
    assert "backtest_gain" in fgd[4] and 0.0 <= fgd[4]["gate"] <= 1.0
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["methods"]) == {"bu", "fgd"} and summary["test_periods"] == [3, 4]
