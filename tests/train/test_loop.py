"""End-to-end training: learning on the synthetic stream, and bit-identical kill / resume."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import assert_resumed_without_retraining, metrics_lines, override

from autoshard_jax.data import CriteoTSVReader, SyntheticClickStream
from autoshard_jax.train.loop import build_tables, train_and_evaluate
from launch.configs import criteo_kaggle, synthetic_small

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
    config = synthetic_small.get_config()
    config.model.table_rows = (500, 200, 3000, 1000, 50, 24, 800, 300, 3, 2000, 700, 3000)
    config.model.bottom_mlp = (32, 16)
    config.model.top_mlp = (32, 1)
    config.batch_size = 256
    config.num_train_steps = 40
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 10
    config.data.num_eval_batches = 8
    return override(config, overrides)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_learns_most_of_what_the_teacher_knows(tmp_path):
    config = tiny_config(num_train_steps=600, log_every=100, checkpoint_every=1000)
    config.data.num_eval_batches = 40
    result = train_and_evaluate(config, str(tmp_path))
    # The teacher (scored on the same eval batches) is the best any model can do; a constant
    # predictor has AUC 0.5 and NE 1.
    assert result["teacher_auc"] > 0.75, result
    assert result["auc"] > 0.9 * result["teacher_auc"], result
    assert result["ne"] < 1.0 - 0.5 * (1.0 - result["teacher_ne"]), result


def test_resume_continues_bit_identically(tmp_path, caplog):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_and_evaluate(tiny_config(), full)
    train_and_evaluate(tiny_config(num_train_steps=20), split)
    before = metrics_lines(split)
    with caplog.at_level(logging.INFO):
        train_and_evaluate(tiny_config(), split)  # resumes at step 20
    assert "Resumed from step 20 " in caplog.text
    assert_resumed_without_retraining(before, metrics_lines(split), 20, 40)
    assert losses(full) == losses(split)
    final = [r["eval"] for r in read_metrics(full) if r.get("final")][-1]
    assert [r["eval"] for r in read_metrics(split) if r.get("final")][-1] == final


def _launch(workdir, steps, checkpoint_every=25):
    """Starts launch.train_dlrm in a subprocess, its log in workdir.log (never a full pipe)."""
    cmd = [sys.executable, "-m", "launch.train_dlrm",
           "--config=launch/configs/synthetic_small.py", f"--workdir={workdir}",
           f"--config.num_train_steps={steps}", f"--config.checkpoint_every={checkpoint_every}",
           "--config.log_every=1", "--config.batch_size=256",
           "--config.model.bottom_mlp=(32,16)", "--config.model.top_mlp=(32,1)",
           "--config.data.num_eval_batches=8", "--config.eval_every=0"]
    log = open(f"{workdir}.log", "a")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    log.close()
    return proc


def _log(workdir):
    with open(f"{workdir}.log") as f:
        return f.read()


# Hang guards only, sized for a machine several times slower than CI (a loaded shared host).
HANG_S = 1200


def _finish(proc, workdir, timeout=HANG_S):
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, _log(workdir)[-3000:]


def _wait_for_step(workdir, step, proc, timeout=HANG_S):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {_log(workdir)[-3000:]}")
        if os.path.exists(path) and max(losses(workdir), default=0) >= step:
            return
        time.sleep(0.05)
    pytest.fail("training did not reach the step in time")


STEPS = 150


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref") / "run")
    _finish(_launch(workdir, STEPS), workdir)
    return workdir


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_uninterrupted_curve(tmp_path, sig, reference_run):
    """Kill a real training process mid-run, restart it, compare with an unbroken run."""
    broken = str(tmp_path / "broken")
    proc = _launch(broken, STEPS)
    _wait_for_step(broken, 60, proc)
    proc.send_signal(sig)
    proc.wait(timeout=HANG_S)
    if sig == signal.SIGTERM:  # preemption: a clean exit after saving the current step
        assert proc.returncode == 0, _log(broken)[-3000:]
        assert "SIGTERM: saved step" in _log(broken)
    else:
        assert proc.returncode == -signal.SIGKILL
    assert max(losses(broken)) < STEPS, "the run finished before it was killed"
    saved = max(int(p) for p in os.listdir(os.path.join(broken, "checkpoints")) if p.isdigit())
    before = metrics_lines(broken)
    _finish(_launch(broken, STEPS), broken)
    assert f"Resumed from step {saved} " in _log(broken)
    assert_resumed_without_retraining(before, metrics_lines(broken), saved, STEPS)
    assert losses(broken) == losses(reference_run)
    final = [r["eval"] for r in read_metrics(reference_run) if r.get("final")]
    assert final and [r["eval"] for r in read_metrics(broken) if r.get("final")] == final
    assert np.isfinite(final[0]["log_loss"])


def test_resume_with_a_different_config_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(num_train_steps=10), workdir)
    with pytest.raises(ValueError, match="batch_size: checkpoint 256, config 128"):
        train_and_evaluate(tiny_config(num_train_steps=20, batch_size=128), workdir)


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(num_train_steps=10), workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 11, "lo')  # a kill in the middle of a write
    train_and_evaluate(tiny_config(num_train_steps=12), workdir)
    assert sorted(losses(workdir)) == list(range(1, 13))


def test_criteo_resume_skipping_bad_lines_seeks_by_the_stored_line(tmp_path, monkeypatch):
    config = criteo_kaggle.get_config()
    config.data.path = str(tmp_path / "train.txt")
    config.data.skip_bad_lines = True
    config.model.rows_cap = 1000
    config.model.bottom_mlp, config.model.top_mlp = (32, 16), (32, 1)
    config.batch_size, config.num_train_steps, config.log_every = 64, 10, 1
    config.checkpoint_every = 3
    SyntheticClickStream(build_tables(config)).write_tsv(config.data.path, 7 * 128)
    lines = open(config.data.path).read().splitlines(keepends=True)
    lines[40:40] = ["1\t2\tnot-a-line\n"]
    lines[300:300] = ["x\n"]
    open(config.data.path, "w").writelines(lines)
    starts = []
    real = CriteoTSVReader.batches

    def spy(self, batch_size, start_batch=0, start_line=None):
        starts.append((start_batch, start_line))
        return real(self, batch_size, start_batch, start_line)

    monkeypatch.setattr(CriteoTSVReader, "batches", spy)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_and_evaluate(config, full)
    config.num_train_steps = 6
    train_and_evaluate(config, split)
    starts.clear()
    before = metrics_lines(split)
    config.num_train_steps = 10
    train_and_evaluate(config, split)  # resumes at step 6, past the first bad line
    assert_resumed_without_retraining(before, metrics_lines(split), 6, 10)
    assert losses(full) == losses(split)
    # 6 batches of 64 samples end on line 6 * 64 + 2 (both bad lines come before them).
    assert (6, 6 * 64 + 2) in starts
