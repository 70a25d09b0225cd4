"""Multi-process training: 2 processes on localhost (2 simulated CPU devices each, gloo
collectives) train a planned model as 1 process with the same 4 devices, global batch and plan
does (equal up to the order of the cross-process gradient sums); killed mid-run, they resume
bit-identically; when the newest checkpoint cannot be read, both fall back to the same earlier
step; a dead peer ends the run with an error instead of a hang."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import PLANNED_TABLES, override, write_planned_inputs

from autoshard_jax.data.criteo_tsv import CriteoTSVReader
from autoshard_jax.data.synthetic import BLOCK_ROWS, SyntheticClickStream
from autoshard_jax.errors import InputError
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train.loop import train_and_evaluate
from launch.configs import synthetic_small

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLES = PLANNED_TABLES
STEPS = 8
TIMEOUT_S = 300  # per launch: nothing may hang
OVERRIDES = {"model.interaction": "cat", "model.bottom_mlp": (32, 16), "model.top_mlp": (32, 1),
             "batch_size": 64, "num_train_steps": STEPS, "log_every": 1, "checkpoint_every": 1,
             "eval_every": 4, "data.num_eval_batches": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _inputs(tmp_path) -> list[str]:
    write_planned_inputs(tmp_path)
    return [f"--config={REPO}/launch/configs/synthetic_small.py",
            f"--config.tables={tmp_path}/tables.json", f"--config.plan={tmp_path}/plan.json",
            *(f"--config.{k}={str(v).replace(' ', '')}" for k, v in OVERRIDES.items())]


def _one_process_run(tmp_path, workdir) -> dict:
    """The same job in this process, on 4 of its simulated devices."""
    config = synthetic_small.get_config()
    config.tables, config.plan = str(tmp_path / "tables.json"), str(tmp_path / "plan.json")
    override(config, OVERRIDES)
    return train_and_evaluate(config, str(workdir))


def _launch(args: list[str], workdir, num_processes: int, extra=(), compile_cache: bool = True
            ) -> list[subprocess.Popen]:
    """Starts the job as `num_processes` processes holding 4 // num_processes devices each.
    Without `compile_cache` they compile afresh, as a user's first run does (the suite's
    persistent cache, `conftest.py`, would take the compilation out of their run time)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if not compile_cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    common = [sys.executable, "-m", "launch.train_dlrm", *args, f"--workdir={workdir}",
              f"--simulate_cpu_devices={4 // num_processes}", *extra]
    if num_processes > 1:
        common += [f"--coordinator_address=localhost:{_free_port()}",
                   f"--num_processes={num_processes}"]
    procs = []
    for i in range(num_processes):
        cmd = common + ([f"--process_id={i}"] if num_processes > 1 else [])
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=TIMEOUT_S) -> list[tuple[int, str, str]]:
    """Waits for every process (killing all of them past `timeout`)."""
    deadline, out = time.monotonic() + timeout, []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"the job did not finish within {timeout} s")
    return out


def _final_eval(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])["final_eval"]


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _curves(workdir) -> tuple[dict, dict]:
    records = _records(workdir)
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["eval"] for r in records if "eval" in r})


def _checkpoint_steps(workdir) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                      if n.isdigit())
    except FileNotFoundError:
        return []


def test_two_processes_train_like_one_and_resume_bit_identically(tmp_path):
    args = _inputs(tmp_path)
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
    want_final = _one_process_run(tmp_path, one)
    done = _finish(_launch(args, two, 2))
    assert [rc for rc, _, _ in done] == [0, 0], done[0][2][-3000:] + done[1][2][-3000:]
    # Both processes computed the same exact eval over all 4 x 64 rows (process 0 adds the
    # synthetic teacher's scores).
    finals = [_final_eval(stdout) for _, stdout, _ in done]
    assert {k: finals[0][k] for k in finals[1]} == finals[1]
    assert finals[0]["num_examples"] == 4 * 64
    want_losses, want_evals = _curves(one)
    got_losses, got_evals = _curves(two)
    assert sorted(got_losses) == sorted(want_losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got_losses[k] for k in sorted(got_losses)],
                               [want_losses[k] for k in sorted(want_losses)], rtol=1e-5)
    assert sorted(got_evals) == sorted(want_evals) == [4, STEPS]
    for step, want in want_evals.items():
        for key, value in want.items():
            assert got_evals[step][key] == pytest.approx(value, rel=1e-5), (step, key)
    assert finals[0]["auc"] == pytest.approx(want_final["auc"], rel=1e-5)
    # Process 0 alone wrote the metrics: one record per step, none twice.
    steps = [r["step"] for r in _records(two) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))

    # Killed (SIGKILL, both) once a few steps are checkpointed, then re-run: the same bits. The
    # eval at step 4 compiles in the middle of an uncached run, which leaves the poll below time
    # to stop it before step 8.
    procs = _launch(args, split, 2, compile_cache=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not [s for s in _checkpoint_steps(split) if s >= 2] and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    killed_at = _checkpoint_steps(split)
    assert killed_at and killed_at[-1] < STEPS, killed_at  # really interrupted mid-run
    done = _finish(_launch(args, split, 2))
    assert [rc for rc, _, _ in done] == [0, 0], done[0][2][-3000:] + done[1][2][-3000:]
    assert "Resumed from step" in done[0][2]
    assert _curves(split) == _curves(two)
    assert _final_eval(done[0][1]) == finals[0]

    # The largest array file process 1 wrote for the last step truncated: both processes fall
    # back to the step before, together, and redo the last step (a process that alone fails is
    # tests/train/test_checkpoint.py's agreement test).
    last = _checkpoint_steps(two)[-1]
    victim = max((two / "checkpoints" / str(last) / "state" / "ocdbt.process_1" / "d").iterdir(),
                 key=lambda f: f.stat().st_size)  # an array data file (the others are index)
    with open(victim, "r+b") as f:
        f.truncate(10)
    done = _finish(_launch(args, two, 2))
    assert [rc for rc, _, _ in done] == [0, 0], done[0][2][-3000:] + done[1][2][-3000:]
    for _, _, stderr in done:
        assert f"resuming from step {last - 1}" in stderr, stderr[-3000:]
    assert _curves(two) == _curves(split)
    assert _final_eval(done[0][1]) == finals[0]
    assert (two / "checkpoints" / f"corrupt.{last}").is_dir()


def test_dead_peer_ends_the_run_with_an_error(tmp_path):
    args = _inputs(tmp_path)
    workdir = tmp_path / "run"
    procs = _launch(args + ["--config.num_train_steps=100000"], workdir, 2,
                    extra=["--heartbeat_timeout_s=5"])
    deadline = time.monotonic() + TIMEOUT_S
    while not _checkpoint_steps(workdir) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    [(rc, _, stderr), _] = _finish(procs)
    assert rc != 0
    assert "error" in stderr.lower() or "terminat" in stderr.lower(), stderr[-3000:]


def _rows_of(batch, lo, hi):
    return {"dense": batch["dense"][lo:hi], "ids": tuple(i[lo:hi] for i in batch["ids"]),
            "label": batch["label"][lo:hi]}


def _assert_same(got, want):
    np.testing.assert_array_equal(got["dense"], want["dense"])
    np.testing.assert_array_equal(got["label"], want["label"])
    for g, w in zip(got["ids"], want["ids"], strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("batch_size", [48, 3 * BLOCK_ROWS + 8])
def test_synthetic_process_rows_are_the_global_batch_rows(batch_size):
    stream = SyntheticClickStream(TABLES[:3], num_dense=4, seed=1)
    full = stream.batch(2, batch_size)
    quarter = batch_size // 4
    for p in range(4):
        lo, hi = p * quarter, (p + 1) * quarter
        _assert_same(stream.batch(2, batch_size, rows=(lo, hi)), _rows_of(full, lo, hi))
    with pytest.raises(ValueError, match="rows"):
        stream.batch(0, batch_size, rows=(5, 5))


def test_criteo_process_rows_are_the_global_batch_rows(tmp_path):
    stream = SyntheticClickStream([TableSpec(f"c{i}", 50, 4, 1.0) for i in range(3)],
                                  num_dense=2, seed=0)
    path = tmp_path / "day_0"
    stream.write_tsv(path, 230, batch_size=64)  # 3 full batches of 64 and a short one of 38
    reader = CriteoTSVReader(path, [50] * 3, num_dense=2, drop_last=False)
    full = list(reader.batches(64))
    assert [len(b["label"]) for b in full] == [64, 64, 64, 38]
    for lo, hi in [(0, 32), (32, 64)]:
        got = list(reader.batches(64, rows=(lo, hi)))
        # Every process yields as many batches; its part of the short one may be short.
        assert len(got) == 4
        for g, f in zip(got, full, strict=True):
            _assert_same(g, _rows_of(f, lo, hi))
        assert reader.stats.lines == sum(len(g["label"]) for g in got)  # parsed its lines only
        # Resuming at batch 2 reads what a full pass reads from there.
        for g, f in zip(reader.batches(64, start_batch=2, rows=(lo, hi)), got[2:], strict=True):
            _assert_same(g, f)
    train = CriteoTSVReader(path, [50] * 3, num_dense=2)
    assert len(list(train.batches(64, rows=(32, 64)))) == 3  # drop_last: no short batch
    bad = CriteoTSVReader(path, [50] * 3, num_dense=2, skip_bad_lines=True)
    with pytest.raises(InputError, match="skip_bad_lines"):
        next(bad.batches(64, rows=(0, 32)))
