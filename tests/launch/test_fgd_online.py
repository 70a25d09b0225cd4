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

