"""Loop behaviour that a one-line library mutation would break: the eval padding mask, the resumed
step, mid-run evals, data running out, finished runs, and refusals before anything is restored."""

import json
import logging
import os
import threading

import numpy as np
import pytest
from helpers import override

from autoshard_jax.data import SyntheticClickStream, pad_batch
from autoshard_jax.errors import ConfigError, ResumeError
from autoshard_jax.tables.spec import TableSpec, save_tables
from autoshard_jax.train.loop import build_tables, evaluate, train_and_evaluate
from autoshard_jax.train.metrics import evaluate_predictions
from launch.configs import synthetic_small


def tiny_config(**overrides):
    config = synthetic_small.get_config()
    config.model.table_rows = (500, 200, 3000, 1000, 50, 24, 800, 300)
    config.model.bottom_mlp = (32, 16)
    config.model.top_mlp = (32, 1)
    config.batch_size = 128
    config.num_train_steps = 12
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 4
    config.data.num_eval_batches = 2
    return override(config, overrides)


def metric_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.readlines()


def records(workdir):
    return [json.loads(line) for line in metric_lines(workdir)]


def test_evaluate_ignores_padding_rows():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 70).astype(np.float32)
    batches = [pad_batch({"dense": np.zeros((n, 2), np.float32), "ids": (),
                          "label": label[lo:lo + n]}, 32) for lo, n in ((0, 32), (32, 32), (64, 6))]
    prob = rng.uniform(0.05, 0.95, 96).astype(np.float32)

    def eval_step(params, batch):  # padding rows get the worst possible predictions
        i = eval_step.calls
        eval_step.calls += 1
        p = prob[32 * i:32 * i + 32].copy()
        p[batch["label"].shape[0] - (~batches[i]["mask"]).sum():] = 0.999
        return p

    eval_step.calls = 0
    got = evaluate(eval_step, None, iter([dict(b) for b in batches]), place=lambda b: b)
    want = evaluate_predictions(label, np.concatenate([prob[:64], prob[64:70]]))
    assert got["num_examples"] == 70
    for key in ("auc", "log_loss", "ne"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_resume_starts_at_the_checkpoint_and_trains_no_step_twice(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(num_train_steps=8), workdir)
    before = metric_lines(workdir)
    with caplog.at_level(logging.INFO):
        train_and_evaluate(tiny_config(), workdir)
    assert "Resumed from step 8" in caplog.text
    after = metric_lines(workdir)
    # steps 1-8 untouched (a restart from 0 would rewrite them with new timings), then 9-12 once
    assert after[:8] == before[:8]
    assert [r["step"] for r in map(json.loads, after) if "loss" in r] == list(range(1, 13))


def test_mid_run_evals_and_a_finished_run_rerun(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    final = train_and_evaluate(tiny_config(eval_every=5), workdir)
    evals = [(r["step"], bool(r.get("final"))) for r in records(workdir) if "eval" in r]
    assert evals == [(5, False), (10, False), (12, True)]
    before = metric_lines(workdir)
    with caplog.at_level(logging.WARNING):
        again = train_and_evaluate(tiny_config(eval_every=5), workdir)
    assert again == final and "already finished at step 12" in caplog.text
    assert metric_lines(workdir) == before  # no second final record


def test_training_data_running_out(tmp_path, caplog):
    config = tiny_config(num_train_steps=20, checkpoint_every=100)
    config.data.kind, config.data.path = "criteo_tsv", str(tmp_path / "train.txt")
    config.data.num_dense = 13
    config.data.kaggle_days, config.data.train_days, config.data.eval_days = 7, (0, 1), (6,)
    SyntheticClickStream(build_tables(config)).write_tsv(config.data.path, 7 * 256)
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        final = train_and_evaluate(config, workdir)
    assert "training data ran out after step 4 of config.num_train_steps=20" in caplog.text
    assert [r["step"] for r in records(workdir) if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records(workdir) if r.get("final")] == [4]
    assert final["num_examples"] == 256
    before = metric_lines(workdir)
    assert train_and_evaluate(config, workdir) == final
    assert metric_lines(workdir) == before


def test_resume_refused_for_changed_tables_file_before_restoring(tmp_path, monkeypatch):
    tables = tmp_path / "tables.json"
    save_tables(tables, [TableSpec(f"t{i}", 100 + i, 16) for i in range(4)])
    config = tiny_config(num_train_steps=4, tables=str(tables))
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    save_tables(tables, [TableSpec(f"t{i}", 200 + i, 16) for i in range(4)])
    from autoshard_jax.train import checkpoint
    monkeypatch.setattr(checkpoint.Checkpointer, "_restore_state",
                        lambda *a: pytest.fail("restored before the identity check"))
    with pytest.raises(ResumeError, match=r"tables: checkpoint \"[0-9a-f]+\", config \"[0-9a-f]+"):
        train_and_evaluate(tiny_config(num_train_steps=8, tables=str(tables)), workdir)


def test_checkpoint_past_num_train_steps_is_a_config_error(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(num_train_steps=8), workdir)
    with pytest.raises(ConfigError, match="config.num_train_steps=4 but .* holds step 8"):
        train_and_evaluate(tiny_config(num_train_steps=4), workdir)


def test_the_prefetcher_is_closed_when_training_ends(tmp_path, monkeypatch):
    """The loop closes its prefetch generator itself: left to the garbage collector (the frame
    kept by a reference cycle, as after a checkpoint fallback), its finalizer ran inside a JAX
    call under Python 3.13 and deadlocked with the producer thread."""
    from autoshard_jax.train import loop

    made = []

    def kept(*args, **kwargs):  # holds a reference, as a cycle would
        made.append(loop_prefetch(*args, **kwargs))
        return made[-1]

    loop_prefetch = loop.prefetch
    monkeypatch.setattr(loop, "prefetch", kept)
    train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path / "run"))
    assert len(made) == 1 and made[0].gi_frame is None  # closed, not suspended
    assert not [t for t in threading.enumerate() if t.name == "prefetch" and t.is_alive()]
