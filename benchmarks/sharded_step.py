"""Step time, padding overhead and imbalance of sharding plans at 1, 2, 4 and 8 devices.

  .venv/bin/python benchmarks/sharded_step.py                  # simulated CPU devices
  .venv/bin/python benchmarks/sharded_step.py --rows_scale=1   # full-size tables (accelerators)
  .venv/bin/python benchmarks/sharded_step.py --parity          # sharded vs local, 1 device

For a 100-table model (dims 4..128, rows 10..1e6 log-uniform, pooling 1..100), builds random,
byte-balanced (greedy) and skewed plans, then times the full DLRM train step (small dense part,
embedding stage in shard_map, sparse updates under donation). On CPU the devices are simulated
(they share the host's cores), so times show the cost of padding and collectives, not speed-up.
Imbalance columns: `bytes_imb` = max / mean packed bytes per device; `ids_imb` = max / mean id
positions per sample per device (what each device gathers; SPMD pads every device to the max);
`ids/dev` = positions each device runs per sample (per width class, padded to the busiest device).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

if __name__ == "__main__":  # the simulated device count is fixed before JAX initialises
    jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoshard_jax.embedding import LocalEmbeddingStage  # noqa: E402
from autoshard_jax.models.dlrm import DLRMDense  # noqa: E402
from autoshard_jax.optim import sparse  # noqa: E402
from autoshard_jax.optim.sparse import state_kinds  # noqa: E402
from autoshard_jax.sharding.layout import build_layout  # noqa: E402
from autoshard_jax.sharding.stage import ShardedEmbeddingStage  # noqa: E402
from autoshard_jax.sharding.synthetic_plans import (  # noqa: E402
    greedy_bytes_plan,
    random_plan,
    random_tables,
    skewed_plan,
)
from autoshard_jax.train.step import setup_training  # noqa: E402


def make_batch(specs, batch: int, dense_dim: int, rng: np.random.Generator) -> dict:
    ids = []
    for s in specs:
        ids_BxH = rng.integers(0, s.rows, size=(batch, s.hotness)).astype(np.int32)
        # Bags hold pooling_factor ids on average: pad the rest of the hotness slots.
        ids_BxH[rng.random(ids_BxH.shape) > s.pooling_factor / s.hotness] = -1
        ids.append(ids_BxH)
    return {"dense": rng.normal(size=(batch, dense_dim)).astype(np.float32), "ids": tuple(ids),
            "label": rng.integers(0, 2, batch).astype(np.float32)}


def imbalance(layout) -> tuple[float, float]:
    used = np.asarray(layout.used_bytes({}), float)
    ids = np.asarray([sum(layout.specs[p.table].hotness for p in m if p.kind != "replicated")
                      for m in layout.placed], float)
    return used.max() / used.mean(), ids.max() / max(ids.mean(), 1e-9)


def plans_for(specs, num_devices: int, seed: int) -> dict:
    return {"random": random_plan(specs, num_devices, seed=seed),
            "random_mixed": random_plan(specs, num_devices, seed=seed, mix=(0.6, 0.2, 0.2)),
            "balanced": greedy_bytes_plan(specs, num_devices),
            "skewed": skewed_plan(specs, num_devices, fraction=0.5, seed=seed)}


def step_program(specs, plan, args, devices, optimizer: str):
    """(program, carry) of the compiled train step with `plan` over fixed batches (cycled);
    plan=None is LocalEmbeddingStage, the single-device reference without routing or packing."""
    opt = sparse.make_row_optimizer(optimizer, 0.01)
    dense = DLRMDense((32, 16), (32, 1), interaction="cat")
    rng = np.random.default_rng(args.seed)
    host_batches = [make_batch(specs, args.batch, 13, rng) for _ in range(4)]
    stage = (LocalEmbeddingStage(specs, opt) if plan is None
             else ShardedEmbeddingStage(specs, plan, opt, devices=devices))
    setup = setup_training(stage, dense, optax.adagrad(0.01), host_batches[0])
    batches = [setup.place(b) for b in host_batches]

    def program(carry):
        state, i = carry
        return setup.train_step(state, batches[i % len(batches)])[0], i + 1

    return program, (setup.init(jax.random.key(args.seed)), 0)


def parity(specs, args) -> None:
    """Sharded step on one device against the local step, per row optimizer: both compiled,
    then timed in interleaved rounds (wall clock, trimmed mean), so the machine's slow phases
    hit both alike."""
    from autoshard_jax.cost.timing import Protocol, time_programs

    protocol = Protocol(warmup=3, repeats=max(args.steps, 10), trim=max(args.steps, 10) // 5,
                        clock="wall", normalize=False)
    device = jax.devices()[:1]
    print(f"\nSharded step on 1 device vs the local step (trimmed mean of {protocol.repeats} "
          "interleaved rounds)")
    print(f"{'optimizer':16s} {'local_ms':>9s} {'sharded_ms':>10s} {'ratio':>6s}")
    for optimizer in args.optimizers.split(","):
        plan = random_plan(specs, 1, seed=args.seed)
        local = step_program(specs, None, args, device, optimizer)
        sharded = step_program(specs, plan, args, device, optimizer)
        timed = time_programs({"local": local[0], "sharded": sharded[0]},
                              {"local": local[1], "sharded": sharded[1]}, protocol)
        ratio = timed["sharded"].ms / timed["local"].ms
        print(f"{optimizer:16s} {timed['local'].ms:9.2f} {timed['sharded'].ms:10.2f} "
              f"{ratio:6.3f}", flush=True)


def time_plan(specs, plan, args, devices) -> float:
    """Median step time of the train step with `plan`; plan=None times LocalEmbeddingStage, the
    single-device reference without routing or packing."""
    opt = sparse.make_row_optimizer(args.optimizer, 0.01)
    dense = DLRMDense((32, 16), (32, 1), interaction="cat")
    tx = optax.adagrad(0.01)
    rng = np.random.default_rng(args.seed)
    host_batches = [make_batch(specs, args.batch, 13, rng) for _ in range(args.steps + 1)]
    stage = (LocalEmbeddingStage(specs, opt) if plan is None
             else ShardedEmbeddingStage(specs, plan, opt, devices=devices))
    setup = setup_training(stage, dense, tx, host_batches[0])  # compiled: one program
    batches = [setup.place(b) for b in host_batches]
    state = setup.init(jax.random.key(args.seed))
    train_step = setup.train_step
    state, m = train_step(state, batches[0])  # warm up
    jax.block_until_ready(m)
    times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        state, m = train_step(state, b)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_tables", type=int, default=100)
    p.add_argument("--rows_scale", type=float, default=0.002,
                   help="multiplies every table's rows (CPU default keeps it small)")
    p.add_argument("--max_pooling", type=float, default=100.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--optimizer", default="rowwise_adagrad")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plans", default="random,random_mixed,balanced,skewed",
                   help="plans to time at D > 1 (1 device: the local reference and one plan)")
    p.add_argument("--parity", action="store_true",
                   help="only the 1-device sharded vs local table, for each of --optimizers")
    p.add_argument("--optimizers", default="sgd,rowwise_adagrad,adagrad",
                   help="row optimizers of --parity")
    args = p.parse_args()
    if args.parity:
        parity(random_tables(args.num_tables, seed=args.seed, max_pooling=args.max_pooling,
                             min_rows=10, max_rows=max(10, int(1e6 * args.rows_scale))), args)
        return

    full = random_tables(args.num_tables, seed=args.seed, max_pooling=args.max_pooling)
    kinds = state_kinds(args.optimizer)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"tables={args.num_tables} batch={args.batch} optimizer={args.optimizer}")
    print("\nPadding overhead (allocated / real bytes) of full-size plans, 8 devices:")
    for name, plan in plans_for(full, 8, args.seed).items():
        lay = build_layout(full, plan.placements, 8)
        print(f"  {name:13s} params {lay.padding_overhead():6.3f}   "
              f"params+{args.optimizer} state {lay.padding_overhead(kinds):6.3f}")
    tw_only = greedy_bytes_plan(full, 8, row_wise_above=float("inf"))
    lay = build_layout(full, tw_only.placements, 8)
    print(f"  {'balanced_tw':13s} params {lay.padding_overhead():6.3f}   "
          "(table_wise only: the largest table alone sets the per-device slab)")

    scaled = random_tables(args.num_tables, seed=args.seed, max_pooling=args.max_pooling,
                           min_rows=10, max_rows=max(10, int(1e6 * args.rows_scale)))
    total_mb = sum(s.param_bytes() for s in scaled) / 2**20
    print(f"\nStep time (full train step, median of {args.steps}); rows scaled by "
          f"{args.rows_scale} -> {total_mb:.1f} MB of tables")
    print(f"{'devices':>7s} {'plan':13s} {'step_ms':>8s} {'padding':>8s} {'bytes_imb':>9s} "
          f"{'ids_imb':>8s} {'ids/dev':>8s}")
    for num_devices in [int(x) for x in args.devices.split(",")]:
        if num_devices > jax.device_count():
            print(f"{num_devices:7d} skipped: only {jax.device_count()} devices")
            continue
        devices = jax.devices()[:num_devices]
        plans = {k: v for k, v in plans_for(scaled, num_devices, args.seed).items()
                 if k in args.plans.split(",")}
        if num_devices == 1:
            ms = 1e3 * time_plan(scaled, None, args, devices)
            print(f"{1:7d} {'local (ref)':13s} {ms:8.1f}   (LocalEmbeddingStage, no plan)",
                  flush=True)
            plans = {"all_on_one": random_plan(scaled, 1, seed=args.seed)}
        for name, plan in plans.items():
            lay = build_layout(scaled, plan.placements, num_devices)
            b_imb, i_imb = imbalance(lay)
            ms = 1e3 * time_plan(scaled, plan, args, devices)
            print(f"{num_devices:7d} {name:13s} {ms:8.1f} {lay.padding_overhead(kinds):8.3f} "
                  f"{b_imb:9.2f} {i_imb:8.2f} {lay.sh.num_positions:8d}", flush=True)


if __name__ == "__main__":
    main()
