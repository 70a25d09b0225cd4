"""launch.fit_scaling end to end on a sweep directory of known power laws; bad input exits 2."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_axis(sweep, axis, x, ne, x_name="train_samples"):
    os.makedirs(sweep / axis, exist_ok=True)
    for i, (xi, yi) in enumerate(zip(x, ne, strict=True)):
        record = {"axis": axis, "name": f"{axis}_{i:02d}", "index": i, "value": xi,
                  "x_name": x_name, "x": float(xi), "train_samples": int(xi),
                  "params": {"embedding": 1000, "dense": 500, "total": 1500},
                  "train_flops": 3000.0 * xi, "wall_time_s": 1.0,
                  "eval": {"ne": float(yi), "log_loss": 0.5 * yi, "auc": 0.7},
                  "teacher": {"teacher_ne": 0.8, "teacher_auc": 0.8},
                  "host": {"cpu": "test", "backend": "cpu"}}
        (sweep / axis / f"{axis}_{i:02d}.json").write_text(json.dumps(record))


def _run(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "launch.fit_scaling", f"--workdir={workdir}", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})


def test_fits_and_reports_every_axis(tmp_path):
    x = 4096 * 2.0 ** np.arange(7)
    write_axis(tmp_path, "data", x, 2.0 * x ** -0.4 + 0.8)
    proc = _run(tmp_path, "--bootstrap=50", "--joint=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fits = json.loads((tmp_path / "fits.json").read_text())
    data = fits["data"]
    assert {"a", "b", "c", "ci", "extrapolation_error", "least_squares"} <= set(data)
    assert abs(data["c"] - 0.8) < 1e-3 and abs(data["b"] - 0.4) < 1e-2
    assert data["extrapolation_error"] < 1e-3 and data["ci"]["c"][0] <= 0.8 + 1e-6
    for name in ("report.md", "ne_vs_data.png", "scaling_efficiency.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_non_monotone_axis_exits_2_naming_axis(tmp_path):
    write_axis(tmp_path, "embedding", [1e3, 2e3, 4e3, 8e3, 1.6e4], [0.9, 0.88, 0.91, 0.87, 0.9],
               x_name="embedding_params")
    proc = _run(tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "axis embedding" in last and "not decreasing" in last
    assert "error" in json.loads((tmp_path / "fits.json").read_text())["embedding"]


def test_bad_input_exits_2(tmp_path):
    write_axis(tmp_path, "data", [1e3, 2e3, 4e3], [0.9, 0.88, 0.87])
    proc = _run(tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "axis data: 3 finished runs" in last
    proc = _run(tmp_path, "--holdout=0")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: --holdout")
