"""Shards a set of tables onto devices with one placement method; writes plan.json.

python -m launch.shard --tables=tables.json --num_devices=8 --memory_gb=4 \
    --method=spmd_greedy --objective=spmd --out=plan.json
python -m launch.shard --tables=tables.json --num_devices=8 --memory_gb=4 --method=autoshard \
    --policy=/tmp/sharder --out=plan.json

Methods: random, dim_greedy, size_greedy, lookup_greedy, size_lookup_greedy, torchrec_greedy,
spmd_greedy, autoshard (needs --policy), autoshard_search (with --policy: the policy's plan
refined by local search on the cost model, moves predicted to gain >= 1% only; without: local
search from the plan the cost model predicts best among the heuristics' and its own greedy's;
for max_device both then split tables row-wise over all devices where the cost model predicts
the slowest device gets 10% faster, `--norow_wise` keeps every table whole).
Prints the sharding time; the plan's `meta` records method, objective and time.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from autoshard_jax.errors import InputError, check_range
from autoshard_jax.placement.api import DEFAULT_BATCH_SIZE, METHODS, shard
from autoshard_jax.placement.costs import OBJECTIVES
from autoshard_jax.sharding.plan import save_plan
from autoshard_jax.tables.spec import load_tables
from launch.common import run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import several launchers."""
    flags.DEFINE_string("tables", None, "tables.json of the tables to shard.")
    flags.DEFINE_integer("num_devices", None, "Number of devices D.")
    flags.DEFINE_float("memory_gb", None, "Memory per device for tables + optimizer state, GiB.")
    flags.DEFINE_string("method", "spmd_greedy", f"One of {', '.join(METHODS)}.")
    flags.DEFINE_string("objective", "spmd", f"One of {', '.join(OBJECTIVES)}.")
    flags.DEFINE_string("policy", None, "Workdir of launch.train_sharder (autoshard methods).")
    flags.DEFINE_string("out", None, "Where to write plan.json.")
    flags.DEFINE_string("cost_model", None, "Cost network workdir, or comma-separated workdirs "
                        "(their mean); default: the policy's (with the pessimism it trained "
                        "with), else the analytical estimator.")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Batch size the costs refer to.")
    flags.DEFINE_string("row_optimizer", "sgd", "Embedding optimizer whose state counts in memory.")
    flags.DEFINE_integer("seed", 0, "Seed of the random method.")
    flags.DEFINE_bool("row_wise", True, "autoshard_search, max_device: may split tables "
                      "row-wise over all devices where that is predicted to make the slowest "
                      "device 10% faster (placement.split); false keeps them whole.")


def check_flags(f) -> None:
    for name in ("tables", "out"):
        if not f[name]:
            raise InputError(f"--{name} is required")
    if f["num_devices"] is None or f["memory_gb"] is None:
        raise InputError("--num_devices and --memory_gb are required")
    check_range("num_devices", f["num_devices"], low=1, high=65536, integer=True)
    check_range("memory_gb", f["memory_gb"], low=1e-6, high=1e6)
    check_range("batch_size", f["batch_size"], low=1, integer=True)
    if f["method"] not in METHODS:
        raise InputError(f"--method must be one of {list(METHODS)}, got {f['method']!r}")
    if f["objective"] not in OBJECTIVES:
        raise InputError(f"--objective must be one of {list(OBJECTIVES)}, got "
                         f"{f['objective']!r}")
    if f["method"] == "autoshard" and not f["policy"]:
        raise InputError("--method=autoshard needs --policy=DIR (a launch.train_sharder workdir)")


def shard_main(f: dict, out=sys.stdout) -> dict:
    """The job: returns the plan's meta. `f` holds the flag values by name."""
    check_flags(f)
    if not os.path.isfile(f["tables"]):
        raise InputError(f"--tables: file {f['tables']!r} does not exist")
    specs = load_tables(f["tables"])
    from autoshard_jax.placement.inference import load_policy, planning_cost
    policy = load_policy(f["policy"]) if f["policy"] and not f["cost_model"] else None
    cost = planning_cost(f["batch_size"], f["cost_model"], policy)
    plan = shard(specs, f["num_devices"], int(f["memory_gb"] * 2**30), f["method"],
                 objective=f["objective"], policy_dir=f["policy"], cost=cost, seed=f["seed"],
                 row_optimizer=f["row_optimizer"], row_wise=f.get("row_wise", True))
    save_plan(f["out"], plan)
    m = plan.meta
    print(f"sharded {len(specs)} tables onto {f['num_devices']} devices with {f['method']} in "
          f"{m['time_s']:.3f} s (objective {f['objective']}, {m['cost_model']} cost: "
          f"max_device {m['predicted_max_ms']:.3f} ms, spmd {m['predicted_spmd_ms']:.3f} ms) "
          f"-> {f['out']}", file=out)
    return m


def main(argv):
    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    shard_main({name: FLAGS[name].value for name in
                ("tables", "num_devices", "memory_gb", "method", "objective", "policy", "out",
                 "cost_model", "batch_size", "row_optimizer", "seed", "row_wise")})


if __name__ == "__main__":
    define_flags()
    run(main)
