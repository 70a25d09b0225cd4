"""Collects cost data for the cost models: `python -m launch.collect_costs --workdir=DIR`.

Measures random table sets (--min_tables to --max_tables tables; every pool table alone first
unless --nosingles) and random plans drawn from a pool, with the cost oracle, into
DIR/costs.jsonl; DIR/tables.json holds the pool. Re-run the same command to resume: entries on
disk are never measured again, a kill loses nothing.

  python -m launch.collect_costs --workdir=/tmp/costs                     # CPU pool, 2000 + 500
  python -m launch.collect_costs --workdir=/tmp/costs --num_sets=100 --num_plans=20   # quick
  python -m launch.collect_costs --workdir=/tmp/gpu --tables=tables.json --batch_size=65536
  python -m launch.collect_costs --workdir=/tmp/wide --augment_dims=64,128 \
      --augment_min_pooling=30 --max_tables=8 --num_plans=0   # the costly corner, re-dimmed
  python -m launch.collect_costs --workdir=/tmp/big --nosingles --min_tables=30 --max_tables=100 \
      --num_plans=0                      # a top-up of large sets, read beside the first collection

Without --tables the pool is the train half of the evaluation's synthetic pool (856 tables,
`reproduce_autoshard`'s split by --pool_seed): the tables the policy's training tasks draw, so
the network learns their costs and the test half stays unseen. `--pool=synthetic` draws
`synthetic_pool(--pool_size, --pool_seed)` instead (small pools for quick runs). Both are
dlrm_datasets-calibrated, rows capped at --max_rows so that CPU measurements fit in memory.
On CPU, plans run on simulated devices (as many as the largest --plan_devices).
"""

from __future__ import annotations

import jax
from absl import flags, logging

from launch.common import (
    define_clock_flag,
    define_spmd_every_device_flag,
    int_list,
    run,
    timing_clock,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Collection directory (costs.jsonl, tables.json).")
flags.DEFINE_string("tables", None, "Pool as tables.json (default: a synthetic pool).")
flags.DEFINE_enum("pool", "train_half", ["train_half", "synthetic"], "Without --tables: the "
                  "train half of the 856-table evaluation pool, or a synthetic pool of "
                  "--pool_size tables.")
flags.DEFINE_integer("pool_size", 120, "Tables in the synthetic pool (--pool=synthetic).")
flags.DEFINE_integer("pool_seed", 0, "Seed of the synthetic pool.")
flags.DEFINE_integer("max_rows", 100_000, "Row cap of the synthetic pool.")
flags.DEFINE_integer("num_sets", 2000, "Table sets to measure (the first pool_size are "
                     "singles, unless --nosingles).")
flags.DEFINE_integer("num_plans", 500, "Plans to measure.")
flags.DEFINE_integer("batch_size", 512, "Samples per step.")
flags.DEFINE_integer("max_tables", 15, "Most tables in one set.")
flags.DEFINE_integer("min_tables", 2, "Fewest tables in one random set.")
flags.DEFINE_bool("singles", True, "Measure every pool table alone first (--nosingles: a top-up "
                  "collection of larger sets only).")
flags.DEFINE_list("plan_devices", ["2", "4", "8"], "Device counts of the random plans.")
flags.DEFINE_list("plan_tables", ["8", "40"], "Min and max tables of a random plan.")
flags.DEFINE_string("row_optimizer", "sgd", "sgd | rowwise_adagrad | adagrad.")
flags.DEFINE_integer("repeat_every", 10, "Measure every N-th entry twice (noise floor; 0 = off).")
flags.DEFINE_integer("repeats", 10, "Timed repeats per measurement.")
flags.DEFINE_integer("warmup", 5, "Warm-up runs per measurement.")
flags.DEFINE_integer("trim", 2, "Fastest and slowest repeats dropped.")
flags.DEFINE_integer("seed", 0, "Seed of the sets and plans.")
define_clock_flag()
define_spmd_every_device_flag()
flags.DEFINE_list("augment_dims", [], "Measure the pool's tables re-dimmed to these widths "
                  "instead (`tables.pools.augment_dims`), e.g. 64,128.")
flags.DEFINE_float("augment_min_pooling", 0.0, "With --augment_dims: only tables looking up at "
                   "least this many ids per sample.")
flags.DEFINE_integer("num_shards", 1, "Processes filling this collection together (one core "
                     "each, e.g. `taskset -c K`); start shard 0 first.")
flags.DEFINE_integer("shard_index", 0, "This process's shard, 0 <= shard_index < num_shards.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from autoshard_jax.cost.collect import CollectConfig, collect
    from autoshard_jax.errors import ConfigError, check_range
    from autoshard_jax.placement.tasks import evaluation_pool
    from autoshard_jax.tables.pools import augment_dims, synthetic_pool
    from autoshard_jax.tables.spec import load_tables

    devices = int_list("plan_devices", FLAGS.plan_devices)
    plan_tables = int_list("plan_tables", FLAGS.plan_tables)
    if len(plan_tables) != 2:
        raise ConfigError(f"--plan_tables takes MIN,MAX, got {FLAGS.plan_tables}")
    check_range("pool_size", FLAGS.pool_size, low=1, integer=True)
    check_range("max_rows", FLAGS.max_rows, low=100, integer=True)
    config = CollectConfig(
        num_sets=FLAGS.num_sets, num_plans=FLAGS.num_plans, batch_size=FLAGS.batch_size,
        max_tables=FLAGS.max_tables, min_tables=FLAGS.min_tables,
        singles=FLAGS.singles, plan_tables=plan_tables, plan_devices=devices,
        row_optimizer=FLAGS.row_optimizer, repeat_every=FLAGS.repeat_every, seed=FLAGS.seed,
        warmup=FLAGS.warmup, repeats=FLAGS.repeats, trim=FLAGS.trim, clock=timing_clock(),
        every_device=FLAGS.spmd_every_device)
    if FLAGS.row_optimizer not in ("sgd", "rowwise_adagrad", "adagrad"):
        raise ConfigError(f"--row_optimizer must be sgd, rowwise_adagrad or adagrad, got "
                          f"{FLAGS.row_optimizer!r}")
    if FLAGS.tables:
        pool = load_tables(FLAGS.tables)
    elif FLAGS.pool == "train_half":
        pool = evaluation_pool(FLAGS.max_rows, FLAGS.pool_seed)[0]
    else:
        pool = synthetic_pool(FLAGS.pool_size, seed=FLAGS.pool_seed, max_rows=FLAGS.max_rows)
    if FLAGS.augment_dims:
        check_range("augment_min_pooling", FLAGS.augment_min_pooling, low=0.0)
        dims = int_list("augment_dims", FLAGS.augment_dims)
        if min(dims) < 1:
            raise ConfigError(f"--augment_dims must be positive widths, got {FLAGS.augment_dims}")
        pool = augment_dims(pool, dims, FLAGS.augment_min_pooling)
        if not pool:
            raise ConfigError(f"--augment_dims={','.join(FLAGS.augment_dims)} with "
                              f"--augment_min_pooling={FLAGS.augment_min_pooling} leaves no table")
    counts = collect(FLAGS.workdir, config, pool, log=logging.info,
                     shard=(FLAGS.shard_index, FLAGS.num_shards))
    print(f"{FLAGS.workdir}: {counts['sets']} set records, {counts['plans']} plan records "
          f"({counts['measured']} measured now)")


def _configure_devices(argv):
    """Before JAX starts: simulated CPU devices (as many as the largest plan), the CPU runtime
    flags, and for the cpu clock one pinned core."""
    from autoshard_jax.cost.timing import pin_one_core
    from autoshard_jax.train.runtime import configure_cpu_runtime

    configure_cpu_runtime()
    wanted = max(int_list("plan_devices", FLAGS.plan_devices) or (1,))
    jax.config.update("jax_num_cpu_devices", max(wanted, 1))
    if timing_clock() == "cpu":
        pin_one_core()
    return main(argv)


if __name__ == "__main__":
    run(_configure_devices)
