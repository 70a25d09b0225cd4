"""The cost oracle's noise floor under timing protocols, side by side in one run.

  .venv/bin/python benchmarks/oracle_noise.py [--sets=40] [--batch=512] [--clock=cpu|wall]

Draws random table sets (1-15 tables) from the CPU cost pool and measures each one twice with
every protocol (the order of protocols rotates per set, so slow phases of a shared machine hit
all alike): the raw protocols, and the default repeats normalized by the reference step
(`timing.Reference`). The floor is the mean relative difference of the two measurements, the figure
`launch.train_cost_model` reports from a collection's repeats; the ceiling is Kendall's tau
between them. With `--clock=cpu` the process is pinned to one core, as the collector runs.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROTOCOLS = {  # name: (warmup, repeats, trim, normalize)
    "5/10/2 raw": (5, 10, 2, False),
    "10/60/12 raw": (10, 60, 12, False),
    "5/10/2 normalized": (5, 10, 2, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", type=int, default=40)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from autoshard_jax.train.runtime import configure_cpu_runtime
    configure_cpu_runtime()
    if args.clock == "cpu":
        from autoshard_jax.cost.timing import pin_one_core
        pin_one_core()
    import numpy as np

    from autoshard_jax.cost.fit import kendall_tau
    from autoshard_jax.cost.oracle import measure_set
    from autoshard_jax.cost.timing import Protocol
    from autoshard_jax.tables.pools import synthetic_pool

    pool = synthetic_pool(120, seed=0, max_rows=100_000)
    rng = np.random.default_rng(args.seed)
    names = list(PROTOCOLS)
    pairs = {n: [] for n in names}
    for i in range(args.sets):
        members = rng.choice(len(pool), int(rng.integers(1, 16)), replace=False)
        specs = [pool[j] for j in sorted(members)]
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            warmup, repeats, trim, normalize = PROTOCOLS[name]
            protocol = Protocol(warmup, repeats, trim, args.clock, normalize)
            pairs[name].append([measure_set(specs, args.batch, protocol=protocol, seed=i).total_ms
                                for _ in range(2)])
        print(f"set {i}: {len(specs)} tables, " + ", ".join(
            f"{n}: {pairs[n][-1][0]:.3f}/{pairs[n][-1][1]:.3f} ms" for n in names), flush=True)
    from autoshard_jax.cost.oracle import reference_ms
    print(f"\n{args.sets} sets, batch {args.batch}, clock {args.clock}, reference step "
          f"{reference_ms(args.clock):.3f} ms")
    print(f"{'protocol':18s} {'floor (mean rel. diff)':>22s} {'median':>8s} {'ceiling tau':>12s}")
    for name in names:
        a = np.asarray(pairs[name])
        rel = np.abs(a[:, 0] - a[:, 1]) / a[:, 0]
        print(f"{name:18s} {rel.mean():22.3f} {np.median(rel):8.3f} "
              f"{kendall_tau(a[:, 0], a[:, 1]):12.3f}")


if __name__ == "__main__":
    main()
