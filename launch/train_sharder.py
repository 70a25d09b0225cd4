"""Trains the AutoShard policy: `python -m launch.train_sharder --config=CONFIG --workdir=DIR`.

python -m launch.train_sharder --config=launch/configs/sharder_runlocal.py --workdir=/tmp/sharder

Overrides go on the command line as `--config.key=value` (e.g. `--config.objective=max_device`,
`--config.cost_model=DIR` for a trained cost network, `--config.cost_model=analytical` for the
estimator). Without a cost model the launcher first measures its own: the oracle times sets and
plans of the training tables (`launch.collect_costs`, one process per core, into DIR/costs) and a
network is fitted on them (DIR/cost_model), both sized by `config.own_costs`. Re-running with the
same workdir resumes from the latest checkpoint (a finished collection or network is reused).
`launch.shard --policy=DIR` takes the workdir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from autoshard_jax.errors import ConfigError, DataError, InputError, check_range
from autoshard_jax.placement.evaluate import ensure_devices
from autoshard_jax.placement.tasks import split_pool
from autoshard_jax.placement.trainer import check_config, load_pool, train
from autoshard_jax.tables.spec import save_tables
from launch.common import run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import several launchers."""
    config_flags.DEFINE_config_file("config", None, "Sharder training configuration file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, policy.json.")


def _collect_command(c, costs_dir: str, tables: str, shard: int, num_shards: int) -> list[str]:
    o = c.own_costs
    return [sys.executable, "-m", "launch.collect_costs", f"--workdir={costs_dir}",
            f"--tables={tables}", f"--num_sets={o.num_sets}", f"--num_plans={o.num_plans}",
            f"--max_tables={o.max_tables}", f"--batch_size={c.batch_size}",
            f"--plan_tables={o.plan_tables[0]},{o.plan_tables[1]}",
            f"--plan_devices={','.join(str(d) for d in o.plan_devices)}",
            f"--num_shards={num_shards}", f"--shard_index={shard}"]


def _start(command: list[str], core: int | None, log_path: str) -> subprocess.Popen:
    """`command` in the background on `core`, output to a file. The child inherits this
    thread's affinity, set around the spawn (a preexec_fn is unsafe beside JAX's threads)."""
    before = os.sched_getaffinity(0) if core is not None else None
    try:
        if core is not None:
            os.sched_setaffinity(0, {core})
        with open(log_path, "ab") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def _failed(proc: subprocess.Popen, log_path: str) -> DataError:
    with open(log_path, errors="replace") as f:
        tail = f.read()[-1500:]
    return DataError(f"the cost collection ({' '.join(proc.args[1:4])}) exited with "
                     f"{proc.returncode}; its log is {log_path}, ending:\n{tail}")


def collect_own_costs(c, workdir: str) -> str:
    """Times sets and plans of the training tables with the oracle, one `launch.collect_costs`
    process per core (shard 0 first: it calibrates the unit the others measure in)."""
    from autoshard_jax.cost.collect import CollectConfig

    o = c.own_costs
    train_pool = split_pool(load_pool(c), c.pool.seed)[0]
    try:  # what collect_costs would refuse, refused before anything starts
        check_range("own_costs.max_processes", o.max_processes, low=1, integer=True)
        CollectConfig(num_sets=o.num_sets, num_plans=o.num_plans, batch_size=c.batch_size,
                      max_tables=o.max_tables, plan_tables=tuple(o.plan_tables),
                      plan_devices=tuple(o.plan_devices)).check(len(train_pool))
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"config.own_costs: {e}") from e
    costs_dir = os.path.join(workdir, "costs")
    tables = os.path.join(workdir, "train_tables.json")
    os.makedirs(workdir, exist_ok=True)
    save_tables(tables, train_pool)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
    shards = min(len(cores), o.max_processes)
    logs = [os.path.join(workdir, f"collect_{k}.log") for k in range(shards)]
    procs = [_start(_collect_command(c, costs_dir, tables, 0, shards), cores[0], logs[0])]
    try:
        calibrated = os.path.join(costs_dir, "collection.json")
        while shards > 1 and procs[0].poll() is None:  # wait for shard 0's unit
            try:
                with open(calibrated) as f:
                    if "reference_ms" in json.load(f):
                        break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        procs += [_start(_collect_command(c, costs_dir, tables, k, shards), cores[k], logs[k])
                  for k in range(1, shards) if procs[0].returncode in (None, 0)]
        for proc, log_path in zip(procs, logs, strict=False):
            if proc.wait():
                raise _failed(proc, log_path)
    finally:  # a failed shard or an interrupt leaves no collector running
        for proc in procs:
            proc.kill()
    return costs_dir


def own_cost_model(c, workdir: str, log=logging.info) -> str:
    """The network `config.cost_model == ""` stands for: fitted on costs this run measures."""
    from launch.train_cost_model import train_cost_model

    model_dir = os.path.join(workdir, "cost_model")
    if os.path.exists(os.path.join(model_dir, "report.md")):  # written last
        log(f"reusing the cost network in {model_dir}")
        return model_dir
    t0 = time.perf_counter()
    costs_dir = collect_own_costs(c, workdir)
    log(f"cost data collected in {costs_dir} ({time.perf_counter() - t0:.0f} s)")
    train_cost_model(model_dir, [costs_dir], steps=c.own_costs.steps, log=log)
    log(f"cost network fitted in {model_dir} ({time.perf_counter() - t0:.0f} s in all)")
    return model_dir


def main(argv):
    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None or not FLAGS.workdir:
        raise InputError("--config and --workdir are required")
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    c = FLAGS.config
    check_config(c)  # before minutes of measurement
    if not c.cost_model:
        c.cost_model = own_cost_model(c, FLAGS.workdir)
    if c.refine_every and c.objective == "spmd":
        ensure_devices(max(d for _, d in c.train_shapes))  # oracle plan timing
    result = train(c, FLAGS.workdir)
    print(json.dumps({"final_eval": result}, indent=1))


if __name__ == "__main__":
    define_flags()
    run(main)
