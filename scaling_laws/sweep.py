"""Sweeps: runs along one axis with everything else fixed, one results file per run.

A sweep config is a DLRM training config (launch/configs/default.py fields) plus `axis` and a
`scaling` section that lists each axis's values. Every run is an ordinary call of the project's
`train_and_evaluate` in its own workdir (`DIR/<axis>/runs/<name>/`), with the learning rates
replaced by warmup + cosine schedules over that run's own length; its final held-out metrics,
parameters, FLOPs and wall time go to `DIR/<axis>/<name>.json`, written atomically once the run
is done. So a re-run skips finished runs, a killed run resumes from its last checkpoint, and
`shard_index / num_shards` split the runs into independent jobs with nothing shared but files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from autoshard_jax.atomic import write_json
from autoshard_jax.errors import ConfigError, DataError, ResumeError, check_range
from autoshard_jax.host import cpu_name, host_cpu
from autoshard_jax.train.loop import train_and_evaluate
from scaling_laws.accounting import count_flops, count_params

AXES = ("data", "embedding", "over_arch", "mlp", "depth")
# What each axis's fit is a function of: its resource.
X_NAMES = {"data": "train_samples", "embedding": "embedding_params", "over_arch": "dense_params",
           "mlp": "dense_params", "depth": "dense_params"}
VALUE_KEYS = {"data": "data_samples", "embedding": "embedding_dims",
              "over_arch": "over_arch_widths", "mlp": "mlp_widths", "depth": "depths"}
HELD_OUT_FRACTION = 10  # a single TSV file: its last 1/10 of lines is the evaluation set


@dataclasses.dataclass
class RunSpec:
    axis: str
    index: int
    value: float
    config: ml_collections.ConfigDict  # what train_and_evaluate receives (schedules added later)
    params: dict
    flops: dict

    @property
    def name(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.axis}_{self.index:02d}_{v}"

    @property
    def train_flops(self) -> float:
        return float(self.flops["per_step"]) * self.config.num_train_steps

    @property
    def x(self) -> float:
        s = self.config
        return {"train_samples": s.num_train_steps * s.batch_size,
                "embedding_params": self.params["embedding"],
                "dense_params": self.params["dense"]}[X_NAMES[self.axis]]

    def identity(self) -> dict:
        """Everything that decides the run's result; a results file must match it to be reused."""
        return json.loads(json.dumps(self.config.to_dict(), default=str))


def validate(config: ml_collections.ConfigDict) -> list[str]:
    """Checks every numeric field before anything compiles; returns the axes to sweep."""
    s = config.scaling
    if config.axis != "all" and config.axis not in AXES:
        raise ConfigError(f"config.axis must be one of {'|'.join(AXES)} or all, "
                          f"got {config.axis!r}")
    axes = list(s.axes) if config.axis == "all" else [config.axis]
    for axis in axes:
        if axis not in AXES:
            raise ConfigError(f"config.scaling.axes holds {axis!r}; choose from {AXES}")
    check_range("batch_size", config.batch_size, low=1, integer=True)
    check_range("scaling.param_samples", s.param_samples, low=config.batch_size, integer=True)
    check_range("scaling.warmup_fraction", s.warmup_fraction, low=0.0, high=0.5)
    check_range("scaling.final_lr_fraction", s.final_lr_fraction, low=0.0, high=1.0)
    check_range("scaling.checkpoint_every", s.checkpoint_every, low=1, integer=True)
    check_range("optim.dense_lr", config.optim.dense_lr, low=0.0)
    check_range("optim.embedding_lr", config.optim.embedding_lr, low=0.0)
    check_range("data.num_eval_batches", config.data.num_eval_batches, low=1, integer=True)
    for axis in axes:
        key = VALUE_KEYS[axis]
        values = tuple(s[key])
        if not values:
            raise ConfigError(f"config.scaling.{key} is empty: list the values of axis {axis}")
        for v in values:
            integer = axis in ("data", "embedding", "depth")
            low = config.batch_size if axis == "data" else (1 if integer else 1e-3)
            check_range(f"scaling.{key}", v, low=low, integer=integer)
        if list(values) != sorted(set(values)):
            raise ConfigError(f"config.scaling.{key} must be strictly increasing, got {values}")
    if config.model.interaction == "dot" and config.model.bottom_mlp[-1] != \
            config.model.embedding_dim:
        raise ConfigError("config.model.bottom_mlp must end in config.model.embedding_dim "
                          "for the dot interaction")
    return axes


def _scaled(widths, multiplier: float) -> tuple[int, ...]:
    return tuple(max(1, round(w * multiplier)) for w in widths)


def run_config(config: ml_collections.ConfigDict, axis: str, value) -> ml_collections.ConfigDict:
    """The training config of one run: the base with one axis moved and the length set."""
    c = ml_collections.ConfigDict(config.to_dict())
    del c["scaling"], c["axis"]
    m = c.model
    samples = config.scaling.param_samples
    if axis == "data":
        samples = int(value)
    elif axis == "embedding":
        m.embedding_dim = int(value)
        m.bottom_mlp = (*m.bottom_mlp[:-1], int(value))
    elif axis == "over_arch":
        m.top_mlp = (*_scaled(m.top_mlp[:-1], value), 1)
    elif axis == "mlp":
        m.top_mlp = (*_scaled(m.top_mlp[:-1], value), 1)
        m.bottom_mlp = (*_scaled(m.bottom_mlp[:-1], value), m.bottom_mlp[-1])
    elif axis == "depth":
        m.top_mlp = (m.top_mlp[0],) * int(value) + (1,)
    steps = samples // c.batch_size
    c.num_train_steps = steps
    c.log_every = max(1, steps // 5)
    c.eval_every = 0
    c.checkpoint_every = config.scaling.checkpoint_every
    c.keep_checkpoints = 1
    if c.data.path:
        c.data.kind = "criteo_tsv"
        c.data.kaggle_days = HELD_OUT_FRACTION
        c.data.train_days = tuple(range(HELD_OUT_FRACTION - 1))
        c.data.eval_days = (HELD_OUT_FRACTION - 1,)
    return c


def plan_runs(config: ml_collections.ConfigDict) -> list[RunSpec]:
    """Every run of the config's axes, smallest first within each axis."""
    runs = []
    for axis in validate(config):
        for i, value in enumerate(config.scaling[VALUE_KEYS[axis]]):
            c = run_config(config, axis, value)
            runs.append(RunSpec(axis, i, value, c, count_params(c).to_json(),
                                count_flops(c).to_json()))
    return runs


def check_data(config: ml_collections.ConfigDict, runs: list[RunSpec]) -> None:
    """A TSV must hold the largest run's training prefix before the held-out tail."""
    if not config.data.path:
        return
    path = config.data.path
    if not os.path.isfile(path):
        raise DataError(f"config.data.path {path!r} is not a file (one Criteo TSV file: its last "
                        "10% of lines is held out)")
    with open(path, "rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
    train_lines = lines - lines // HELD_OUT_FRACTION
    need = max(r.config.num_train_steps * r.config.batch_size for r in runs)
    if need > train_lines:
        raise DataError(f"{path}: {lines} lines leave {train_lines} for training after the "
                        f"held-out 10%, but a run needs {need}; lower config.scaling.data_samples "
                        "or config.scaling.param_samples")


def with_schedules(c: ml_collections.ConfigDict, warmup_fraction: float,
                   final_fraction: float) -> ml_collections.ConfigDict:
    """Learning rates as warmup + cosine schedules over the run's own number of steps.

    The core optimizers accept a schedule wherever they accept a rate (optim/sparse.py), so the
    run's config carries the schedule function itself.
    """
    steps = c.num_train_steps
    c = ml_collections.ConfigDict(c.to_dict())
    with c.ignore_type():
        for key in ("dense_lr", "embedding_lr"):
            peak = float(c.optim[key])
            c.optim[key] = optax.warmup_cosine_decay_schedule(
                0.0, peak, int(warmup_fraction * steps), max(steps, 1), peak * final_fraction)
    return c


def _eta_seconds(done: list[dict], rest: list[RunSpec]) -> float:
    """Remaining time from a line wall = fixed + per-FLOP cost fitted to the finished runs.

    Small runs are dominated by a fixed cost (compilation, evaluation), so FLOPs alone mislead.
    """
    walls = [d["wall_time_s"] for d in done]
    flops = [d["train_flops"] for d in done]
    per_run, per_flop = sum(walls) / len(walls), 0.0
    if len(done) >= 2 and max(flops) > min(flops):
        per_flop, per_run = (max(v, 0.0) for v in
                             np.polyfit(flops, walls, 1))
    return sum(per_run + per_flop * r.train_flops for r in rest)


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def execute_run(run: RunSpec, sweep_dir: str, scaling: ml_collections.ConfigDict) -> dict:
    """Trains one run (resuming its own checkpoint if a previous attempt was killed)."""
    axis_dir = os.path.join(sweep_dir, run.axis)
    workdir = os.path.join(axis_dir, "runs", run.name)
    os.makedirs(workdir, exist_ok=True)
    spec_path = os.path.join(workdir, "run_spec.json")
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            if json.load(f) != run.identity():
                raise ResumeError(f"{workdir} holds an unfinished run of a different config; use a "
                                  "new --workdir or delete that run directory")
    else:
        write_json(spec_path, run.identity())
    t0 = time.time()
    final = train_and_evaluate(
        with_schedules(run.config, scaling.warmup_fraction, scaling.final_lr_fraction), workdir)
    wall = time.time() - t0
    if "preempted_at" in final:
        return final
    if "ne" not in final:
        raise DataError(f"run {run.name}: the evaluation set is empty")
    c = run.config
    record = {
        "axis": run.axis, "name": run.name, "index": run.index, "value": run.value,
        "x_name": X_NAMES[run.axis], "x": run.x,
        "train_samples": c.num_train_steps * c.batch_size, "train_steps": c.num_train_steps,
        "params": run.params, "flops": run.flops, "train_flops": run.train_flops,
        "eval": {k: final[k] for k in ("ne", "log_loss", "auc", "accuracy", "ctr",
                                       "num_examples")},
        "teacher": {k: final[k] for k in ("teacher_ne", "teacher_auc") if k in final},
        "wall_time_s": wall,
        "host": {"cpu": cpu_name(host_cpu()), "backend": jax.default_backend(),
                 "devices": jax.device_count(), "python": platform.python_version()},
        "run_config": run.identity(),
    }
    write_json(os.path.join(axis_dir, run.name + ".json"), record)
    if not scaling.keep_run_checkpoints:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    return record


def load_result(path: str, run: RunSpec) -> dict | None:
    """A finished run's record, or None; refuses a record written by a different config."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("run_config") != run.identity():
        raise ResumeError(f"{path} was written by a different config; use a new --workdir or the "
                          "original config")
    return record


def run_sweep(config: ml_collections.ConfigDict, sweep_dir: str, shard_index: int = 0,
              num_shards: int = 1) -> dict:
    """Runs this shard's unfinished runs; returns {"done", "skipped", "total_flops", ...}."""
    check_range("num_shards", num_shards, low=1, integer=True)
    check_range("shard_index", shard_index, low=0, high=num_shards - 1, integer=True)
    runs = plan_runs(config)
    check_data(config, runs)
    mine = [r for i, r in enumerate(runs) if i % num_shards == shard_index]
    todo, skipped = [], []
    for r in mine:
        path = os.path.join(sweep_dir, r.axis, r.name + ".json")
        (skipped if load_result(path, r) else todo).append(r)
    total = sum(r.train_flops for r in todo)
    logging.info("sweep %s: %d runs in shard %d/%d, %d already finished, %d to run "
                 "(%.3g training FLOPs)", sweep_dir, len(mine), shard_index, num_shards,
                 len(skipped), len(todo), total)
    if not todo:
        logging.info("every run of this shard is finished; nothing to do")
    t0, records = time.time(), []
    for k, r in enumerate(todo):
        logging.info("[%d/%d] %s: %s=%s, %d steps, %.3g FLOPs", k + 1, len(todo), r.name, r.axis,
                     r.value, r.config.num_train_steps, r.train_flops)
        record = execute_run(r, sweep_dir, config.scaling)
        if "preempted_at" in record:
            logging.warning("preempted during %s; re-run the same command to resume", r.name)
            return {"preempted": r.name, "done": len(records), "skipped": len(skipped)}
        records.append(record)
        eta = _eta_seconds(records, todo[k + 1:])
        logging.info("[%d/%d] %s done in %.1f s: NE %.5f (teacher %s), AUC %.4f; ETA %s",
                     k + 1, len(todo), r.name, record["wall_time_s"], record["eval"]["ne"],
                     f"{record['teacher']['teacher_ne']:.5f}" if record["teacher"] else "n/a",
                     record["eval"]["auc"], _eta(eta))
    return {"done": len(records), "skipped": len(skipped), "total_flops": total,
            "wall_time_s": time.time() - t0}
