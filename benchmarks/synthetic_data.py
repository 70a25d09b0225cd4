"""Host-side synthetic data rate: samples/s of the training stream with 1..N generator threads.

An accelerator's training loop can run no faster than its batches are made: the demo's loop ran
at 52-65k samples/s on an H200 whose train step does millions. This times
`SyntheticClickStream.batches` (the demo's tables) with `workers` threads, interleaved in rounds
so the machine's drift hits every setting alike, and prints each rate beside the 1-thread one.

python benchmarks/synthetic_data.py [--batch_size 512] [--workers 1,2,4] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoshard_jax.data.synthetic import SyntheticClickStream  # noqa: E402
from autoshard_jax.tables.spec import TableSpec  # noqa: E402
from benchmarks.dlrm_throughput import cpu_model, load  # noqa: E402
from launch.configs import synthetic_small  # noqa: E402


def rate(stream: SyntheticClickStream, batch_size: int, workers: int, seconds: float,
         start: int) -> float:
    """Samples/s of one pass of about `seconds` through the stream from batch `start`."""
    batches = stream.batches(batch_size, start=start, workers=workers)
    next(batches)  # threads started, first batches under way
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(batches)
        n += 1
    elapsed = time.perf_counter() - t0
    batches.close()
    return n * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    config = synthetic_small.get_config()
    tables = [TableSpec(f"t{i}", rows, config.model.embedding_dim)
              for i, rows in enumerate(config.model.table_rows)]
    stream = SyntheticClickStream(tables, num_dense=config.data.num_dense, seed=config.seed)
    print(f"{cpu_model()}; {os.cpu_count()} CPUs; load {load()}; batch {args.batch_size}")
    taken = {w: [] for w in counts}
    for r in range(args.rounds):
        for w in counts[r % len(counts):] + counts[:r % len(counts)]:
            taken[w].append(rate(stream, args.batch_size, w, args.seconds, 1000 * r))
    base = np.median(taken[counts[0]])
    for w in counts:
        med = np.median(taken[w])
        print(f"workers={w}: {med:,.0f} samples/s (rounds: "
              f"{', '.join(f'{x:,.0f}' for x in taken[w])}); {med / base:.2f}x workers="
              f"{counts[0]}")


if __name__ == "__main__":
    main()
