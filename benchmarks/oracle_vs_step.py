"""Does the SPMD cost oracle rank plans as the real sharded train step does?

  .venv/bin/python benchmarks/oracle_vs_step.py [--plans=36] [--devices=4] [--batch=512] [--nopin]

Draws distinct plans (random, skewed, width-class-split, balanced once) of one table set from
the CPU cost pool, then for each plan measures `cost.oracle.measure_plan` (the slowest
device's padded program + exchange; the README's figures of sessions 5-8 timed the busiest
device's alone, as the oracle then did) and times the full DLRM train step with that plan on
D simulated devices (`train.step.setup_training` with a `ShardedEmbeddingStage`: what
training runs). Prints both
per plan and their Spearman rank correlation. On CPU both clocks are this process's CPU time on
one pinned core (the oracle's protocol), so other processes on the host disturb neither much,
and both are normalized by the oracle's reference step run in the same rounds
(`timing.Reference`; `--raw` turns that off).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    # One pinned core, as the oracle's collector runs (--nopin on a crowded host: the CPU-time
    # clock still counts only this process's work, summed over XLA's threads).
    if "--nopin" not in sys.argv and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoshard_jax.cost.collect import CollectConfig, plan_task  # noqa: E402
from autoshard_jax.cost.fit import kendall_tau, spearman  # noqa: E402
from autoshard_jax.cost.oracle import draw_batch, measure_plan, reference_step  # noqa: E402
from autoshard_jax.cost.timing import Protocol, time_programs  # noqa: E402
from autoshard_jax.models.dlrm import DLRMDense  # noqa: E402
from autoshard_jax.optim import sparse  # noqa: E402
from autoshard_jax.sharding.stage import ShardedEmbeddingStage  # noqa: E402
from autoshard_jax.tables.pools import synthetic_pool  # noqa: E402
from autoshard_jax.train.step import setup_training  # noqa: E402


def step_ms(specs, plan, batch: int, seed: int, protocol: Protocol) -> float:
    """Trimmed mean of the full sharded train step (dense half small and fixed across plans)."""
    opt = sparse.make_row_optimizer("sgd", 0.01)
    stage = ShardedEmbeddingStage(specs, plan, opt)
    rng = np.random.default_rng(seed)
    ids, _ = draw_batch(specs, batch, seed)
    host = {"dense": rng.random((batch, 13)).astype(np.float32), "ids": tuple(ids),
            "label": rng.integers(0, 2, batch).astype(np.float32)}
    setup = setup_training(stage, DLRMDense((32, 16), (32, 1), interaction="cat"),
                           optax.sgd(0.01), host)
    placed = setup.place(host)
    state = setup.init(jax.random.key(seed))
    reference = reference_step(jax.devices()[0], protocol.clock) if protocol.normalize else None
    timed = time_programs({"step": lambda st: setup.train_step(st, placed)[0]},
                          {"step": state}, protocol, reference)
    return timed["step"].ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=int, default=36)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--tables", type=int, default=24)
    p.add_argument("--clock", default="cpu" if jax.default_backend() == "cpu" else "wall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nopin", action="store_true", help="do not pin to one core")
    p.add_argument("--raw", action="store_true", help="no reference normalization")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed repeats per measurement on both sides (a fifth trimmed at each "
                        "end): more repeats, less noise in both rankings")
    p.add_argument("--styles", default="random,skewed,balanced,class_split",
                   help="plan styles drawn (collect.PLAN_STYLES)")
    args = p.parse_args()
    pool = synthetic_pool(120, seed=0, max_rows=100_000)
    config = CollectConfig(plan_tables=(args.tables, args.tables),
                           plan_devices=(args.devices,), seed=args.seed + 1000)
    protocol = Protocol(repeats=args.repeats, trim=args.repeats // 5, clock=args.clock,
                        normalize=not args.raw)
    print(f"backend={jax.default_backend()} D={args.devices} tables={args.tables} "
          f"batch={args.batch} clock={args.clock} normalized={not args.raw} "
          f"repeats={args.repeats}")
    print(f"{'plan':>4s} {'style':12s} {'oracle_ms':>10s} {'compute':>8s} {'exchange':>8s} "
          f"{'step_ms':>8s}")
    styles = set(args.styles.split(","))
    oracle, step, seen = [], [], set()
    # The process's first measurement runs cold (one-time runtime start-up counted by the CPU
    # clock): one plan is measured untimed first, so plan 0 is measured like every other.
    specs0, plan0 = plan_task(0, pool, config)
    measure_plan(specs0, plan0, args.batch, protocol=protocol, seed=args.seed)
    i = -1
    while len(step) < args.plans:
        i += 1
        # One table set for every plan: rankings compare placements, not table sets.
        specs, plan = plan_task(i, pool, config)
        if i == 0:
            fixed = specs
        else:
            specs, plan = fixed, _same_style_plan(i, fixed, config)
        # A plan drawn again (the balanced greedy is deterministic) is measured once: the ranks
        # of equal plans among themselves are noise on both sides and say nothing of the oracle.
        key = json.dumps(plan.placements, sort_keys=True)
        if key in seen or plan.meta["style"] not in styles:
            continue
        seen.add(key)
        cost = measure_plan(specs, plan, args.batch, protocol=protocol, seed=args.seed)
        ms = step_ms(specs, plan, args.batch, args.seed, protocol)
        oracle.append(cost.total_ms)
        step.append(ms)
        print(f"{i:4d} {plan.meta['style']:12s} {cost.total_ms:10.2f} {cost.compute_ms:8.2f} "
              f"{cost.exchange_ms:8.2f} {ms:8.2f}", flush=True)
    print(f"\nSpearman(oracle, step) = {spearman(oracle, step):.3f}   Kendall tau = "
          f"{kendall_tau(oracle, step):.3f}   over {len(step)} distinct plans "
          f"({i + 1 - len(step)} repeats or other styles skipped)")


def _same_style_plan(index, specs, config):
    """Plan entry `index`'s placement style applied to the fixed table set."""
    pool_like = list(specs)
    sub = CollectConfig(**{**config.__dict__, "plan_tables": (len(specs), len(specs))})
    _, plan = plan_task(index, pool_like, sub)
    return plan


if __name__ == "__main__":
    main()
