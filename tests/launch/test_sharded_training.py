"""Training with a plan.json and a tables.json, through the same job as single-device training."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    PLANNED_MAPPING,
    PLANNED_TABLES,
    assert_resumed_without_retraining,
    metrics_lines,
    write_planned_inputs,
)

from autoshard_jax.errors import ResumeError
from autoshard_jax.sharding.plan import PlanError, plan_from_mapping, save_plan
from autoshard_jax.train.loop import train_and_evaluate
from launch.configs import synthetic_small

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TABLES, MAPPING = PLANNED_TABLES, PLANNED_MAPPING
write_inputs = write_planned_inputs


def config_for(tables_path, plan_path="", steps=12, **overrides):
    config = synthetic_small.get_config()
    config.tables = tables_path
    config.plan = plan_path
    config.model.interaction = "cat"  # the tables have different widths
    config.model.bottom_mlp = (32, 16)
    config.model.top_mlp = (32, 1)
    config.batch_size = 64
    config.num_train_steps = steps
    config.log_every = 1
    config.checkpoint_every = 6
    config.data.num_eval_batches = 4
    for k, v in overrides.items():
        config[k] = v
    return config


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_plan_training_matches_single_device(tmp_path):
    tables_path, plan_path = write_inputs(tmp_path)
    local = train_and_evaluate(config_for(tables_path), str(tmp_path / "local"))
    sharded = train_and_evaluate(config_for(tables_path, plan_path), str(tmp_path / "sharded"))
    a, b = losses(tmp_path / "local"), losses(tmp_path / "sharded")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-5)
    assert sharded["auc"] == pytest.approx(local["auc"], abs=1e-3)


def test_plan_training_resumes_bit_identically(tmp_path, caplog, monkeypatch):
    tables_path, plan_path = write_inputs(tmp_path)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_and_evaluate(config_for(tables_path, plan_path), full)
    train_and_evaluate(config_for(tables_path, plan_path, steps=6), split)
    before = metrics_lines(split)
    with caplog.at_level(logging.INFO):
        train_and_evaluate(config_for(tables_path, plan_path), split)
    assert "Resumed from step 6 " in caplog.text
    assert_resumed_without_retraining(before, metrics_lines(split), 6, 12)
    assert losses(full) == losses(split)
    # Another plan (same tables, same device count) is refused before any array is restored.
    save_plan(plan_path, plan_from_mapping({**MAPPING, "ads": 1, "pages": 0}, 4, 1 << 30))
    from autoshard_jax.train import checkpoint
    monkeypatch.setattr(checkpoint.Checkpointer, "_restore_state",
                        lambda *a: pytest.fail("restored before the identity check"))
    with pytest.raises(ResumeError, match=r"plan: checkpoint \"[0-9a-f]+\", config \"[0-9a-f]+"):
        train_and_evaluate(config_for(tables_path, plan_path, steps=18), split)


def test_plan_that_does_not_fit_is_refused(tmp_path):
    tables_path, plan_path = write_inputs(tmp_path, memory=1000)
    with pytest.raises(PlanError, match="device"):
        train_and_evaluate(config_for(tables_path, plan_path), str(tmp_path / "w"))


def test_plan_device_count_mismatch(tmp_path):
    tables_path, plan_path = write_inputs(tmp_path)
    with pytest.raises(ValueError, match="4 devices"):
        train_and_evaluate(config_for(tables_path, plan_path, num_devices=2), str(tmp_path / "w"))


def test_launch_script_with_simulated_devices(tmp_path):
    tables_path, plan_path = write_inputs(tmp_path)
    cmd = [sys.executable, "-m", "launch.train_dlrm",
           "--config=launch/configs/synthetic_small.py", f"--workdir={tmp_path / 'run'}",
           f"--config.tables={tables_path}", f"--config.plan={plan_path}",
           "--config.num_devices=4", "--simulate_cpu_devices=4", "--config.model.interaction=cat",
           "--config.batch_size=64", "--config.num_train_steps=5",
           "--config.data.num_eval_batches=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "padding overhead" in out.stderr
    assert "device 3:" in out.stderr
    assert json.loads(out.stdout)["final_eval"]["num_examples"] == 128
