"""Timing protocol of the cost oracle: warm-up, interleaved timed repeats, trimmed mean.

Interleaving (program A, B, C, A, B, C, ...) spreads slow phases of a noisy machine over every
program instead of biasing whichever ran during them; trimming drops the `trim` fastest and slowest
repeats (AutoShard: 5 warm-ups, 10 timed, 2 dropped at each end).

On a shared CPU host, wall time measures the neighbours as much as the program. With XLA:CPU
restricted to one thread (`single_thread_xla_flags`), the "cpu" clock (this process's CPU time)
counts the program's own work and is far less disturbed by other processes (measured: see the
README's cost-oracle section); accelerators keep the wall clock.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a program is timed."""

    warmup: int = 5
    repeats: int = 10
    trim: int = 2
    clock: str = "wall"  # "wall", or "cpu": this process's CPU time (see module docstring)

    def __post_init__(self):
        if self.warmup < 0 or self.repeats < 1 or self.trim < 0 or 2 * self.trim >= self.repeats:
            raise ValueError(f"need warmup >= 0, repeats >= 1 and 2 * trim < repeats, got {self}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {self.clock!r}")


@dataclasses.dataclass(frozen=True)
class Timed:
    """Trimmed mean and relative spread ((max - min) / mean of the kept repeats), in ms."""

    ms: float
    spread: float
    raw_ms: tuple[float, ...]


def trimmed(samples_ms: list[float], trim: int) -> Timed:
    kept = np.sort(np.asarray(samples_ms))[trim:len(samples_ms) - trim]
    mean = float(kept.mean())
    return Timed(mean, float((kept.max() - kept.min()) / mean) if mean > 0 else 0.0,
                 tuple(float(x) for x in samples_ms))


def time_programs(programs: Mapping[str, Callable[[object], object]], carries: Mapping[str, object],
                  protocol: Protocol) -> dict[str, Timed]:
    """Times each `program(carry) -> carry` (carries thread donated buffers between calls)."""
    carries = dict(carries)
    samples: dict[str, list[float]] = {name: [] for name in programs}
    clock = CLOCKS[protocol.clock]
    for r in range(protocol.warmup + protocol.repeats):
        for name, fn in programs.items():
            jax.block_until_ready(carries[name])
            start = clock()
            carries[name] = jax.block_until_ready(fn(carries[name]))
            if r >= protocol.warmup:
                samples[name].append((clock() - start) * 1e3)
    return {name: trimmed(s, protocol.trim) for name, s in samples.items()}


def pin_one_core() -> None:
    """Pins this process to its last allowed core, for the "cpu" clock. Call before JAX starts
    its threads (they inherit the affinity of the thread that creates them)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


def single_thread_xla_flags() -> str:
    """XLA_FLAGS that keep XLA:CPU's work on one thread, for the "cpu" clock."""
    return "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
