"""Measures the planners' own plans on training tasks, as cost data for the cost network.

  python -m launch.mine_plan_costs --workdir=DIR --policy=runs/sharder --objective=spmd \
      [--tables=train_half.json] [--num_tasks=30] [--table_counts=30,50,100,200] \
      [--device_counts=2,4,8,16]

Tasks draw only from --tables (default: the train half of the evaluation's synthetic pool,
`reproduce_autoshard`'s split, so its test tables stay unseen); every method in --methods places
each task and each distinct plan is measured by the oracle into DIR (a cost collection:
costs.jsonl, tables.json, collection.json). Then train on it beside random plans:
`python -m launch.train_cost_model --data=COSTS,DIR ...` (see autoshard_jax/placement/mining.py).
A rerun resumes; a kill loses at most the plan being measured.
"""

from __future__ import annotations

from absl import flags, logging

from launch.common import (
    define_clock_flag,
    define_spmd_every_device_flag,
    int_list,
    run,
    timing_clock,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Collection directory.")
flags.DEFINE_string("tables", None, "Pool of the tasks as tables.json (default: the train half "
                    "of the synthetic evaluation pool of --max_rows / --pool_seed).")
flags.DEFINE_integer("max_rows", 100_000, "Row cap of the synthetic pool.")
flags.DEFINE_integer("pool_seed", 0, "Seed of the synthetic pool and of its train/test split.")
flags.DEFINE_string("policy", "", "launch.train_sharder workdir (autoshard, autoshard_search).")
flags.DEFINE_string("cost_model", None, "Cost network workdir the planners use, or comma-"
                    "separated workdirs (their mean; default: the policy's, with the "
                    "pessimism it trained with).")
flags.DEFINE_enum("objective", "spmd", ["spmd", "max_device"], "What the planners minimise, and "
                  "what is measured: plans (spmd) or each device's tables (max_device).")
flags.DEFINE_integer("num_tasks", 30, "Tasks to draw.")
flags.DEFINE_list("table_counts", ["30", "50", "75", "100", "150", "200"], "T of a task, drawn.")
flags.DEFINE_list("device_counts", ["2", "4", "8", "16"], "D of a task, drawn.")
flags.DEFINE_list("methods", ["spmd_greedy", "lookup_greedy", "size_lookup_greedy", "autoshard",
                              "autoshard_search", "greedy_search"], "Planners whose plans are "
                  "measured (greedy_search: autoshard_search without the policy).")
flags.DEFINE_float("mem_factor", 1.5, "Memory cap: x max(balanced share, largest table).")
flags.DEFINE_float("search_time_s", 5.0, "Time budget of the searches per task.")
flags.DEFINE_integer("batch_size", 512, "Samples per step.")
flags.DEFINE_integer("seed", 0, "Seed of the tasks.")
define_clock_flag()
define_spmd_every_device_flag()
flags.mark_flags_as_required(["workdir"])


def _ints(name: str) -> tuple[int, ...]:
    return int_list(name, FLAGS[name].value)


def main(argv):
    from autoshard_jax.errors import InputError
    from autoshard_jax.placement import api
    from autoshard_jax.placement.inference import load_policy, planning_cost
    from autoshard_jax.placement.mining import MineConfig, mine
    from autoshard_jax.placement.tasks import evaluation_pool
    from autoshard_jax.tables.spec import load_tables

    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    config = MineConfig(
        objective=FLAGS.objective, num_tasks=FLAGS.num_tasks, table_counts=_ints("table_counts"),
        device_counts=_ints("device_counts"), methods=tuple(FLAGS.methods),
        mem_factor=FLAGS.mem_factor, search_time_s=FLAGS.search_time_s,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, clock=timing_clock(),
        every_device=FLAGS.spmd_every_device)
    if FLAGS.tables:
        pool = load_tables(FLAGS.tables)
    else:
        pool = evaluation_pool(FLAGS.max_rows, FLAGS.pool_seed)[0]
    policy = load_policy(FLAGS.policy) if FLAGS.policy else None
    if policy is None and any(m.startswith("autoshard") for m in config.methods):
        raise InputError("--methods has autoshard / autoshard_search: give --policy=DIR "
                         "(launch.train_sharder), or leave them out")
    cost = planning_cost(config.batch_size, FLAGS.cost_model, policy)

    def place(task, method):
        return api.place_method(task.specs, task.num_devices, task.memory_bytes, method,
                                objective=config.objective, policy=policy, cost=cost,
                                search_time_s=config.search_time_s)

    counts = mine(FLAGS.workdir, config, pool, place, log=logging.info)
    print(f"{FLAGS.workdir}: {counts['records']} records ({counts['measured_plans']} plans "
          "measured now)")


def _configure_devices(argv):
    """Before JAX starts: simulated CPU devices for the largest task, the CPU runtime flags,
    and for the cpu clock one pinned core."""
    import jax

    from autoshard_jax.cost.timing import pin_one_core
    from autoshard_jax.train.runtime import configure_cpu_runtime

    configure_cpu_runtime()
    jax.config.update("jax_num_cpu_devices", max(_ints("device_counts") or (1,)))
    if timing_clock() == "cpu":
        pin_one_core()
    return main(argv)


if __name__ == "__main__":
    run(_configure_devices)
