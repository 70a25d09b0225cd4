"""launch.scaling_sweep end to end: a tiny sweep runs and resumes; bad input exits 2 by name."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = textwrap.dedent("""
    from launch.configs import scaling_cpu

    def get_config():
        c = scaling_cpu.get_config()
        c.axis = "data"
        c.model.table_rows = (40, 12)
        c.model.embedding_dim = 4
        c.model.bottom_mlp = (8, 4)
        c.model.top_mlp = (8, 1)
        c.batch_size = 32
        c.data.num_eval_batches = 2
        c.scaling.data_samples = (64, 128)
        return c
""")


def _run(tmp_path, *args):
    config = tmp_path / "tiny.py"
    config.write_text(TINY)
    return subprocess.run(
        [sys.executable, "-m", "launch.scaling_sweep", f"--config={config}",
         f"--workdir={tmp_path / 'sweep'}", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})


def test_sweep_runs_then_skips_finished_runs(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["sweep"]["done"] == 2
    assert "ETA" in proc.stderr
    assert sorted(p for p in os.listdir(tmp_path / "sweep" / "data") if p.endswith(".json")) == \
        ["data_00_64.json", "data_01_128.json"]
    again = _run(tmp_path)
    assert again.returncode == 0
    summary = json.loads(again.stdout.strip().splitlines()[-1])["sweep"]
    assert summary["done"] == 0 and summary["skipped"] == 2
    assert "nothing to do" in again.stderr


@pytest.mark.parametrize("args,culprit", [
    (["--config.axis=width"], "config.axis"),
    (["--config.data.path=/nonexistent/train.txt"], "/nonexistent/train.txt"),
])
def test_bad_input_exits_2_naming_the_culprit(tmp_path, args, culprit):
    proc = _run(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and culprit in last
