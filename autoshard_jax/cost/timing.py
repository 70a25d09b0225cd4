"""Timing protocol of the cost oracle: warm-up, interleaved timed repeats, trimmed mean.

Interleaving (program A, B, C, A, B, C, ...) spreads slow phases of a noisy machine over every
program instead of biasing whichever ran during them; trimming drops the `trim` fastest and slowest
repeats (AutoShard: 5 warm-ups, 10 timed, 2 dropped at each end).

On a shared CPU host, wall time measures the neighbours as much as the program. With XLA:CPU
restricted to one thread (`single_thread_xla_flags`), the "cpu" clock (this process's CPU time)
counts the program's own work and is far less disturbed by other processes (measured: see the
README's cost-oracle section); accelerators keep the wall clock.

Neither clock removes the host's slow phases: a memory-bound gather runs up to a third slower for
seconds at a time on a shared cloud VM (other tenants' memory traffic), and a program re-timed
later in the same process moves with them. A `Reference`, a fixed embedding program timed once in
every round, moves with them too; each repeat is divided by the reference's time in the same
round and scaled by the reference's calibrated time, which cancels the phase (measured: the
relative spread between measurements of one set fell 3x; `benchmarks/oracle_noise.py`).
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
    normalize: bool = True  # divide by the reference program's time in the same round

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


@dataclasses.dataclass
class Reference:
    """A fixed program run beside the measured ones, and its calibrated time (ms).

    Measurements normalized by it are in "ms at the calibrated speed": comparable within one
    calibration (one process, or one cost collection, which stores its `nominal_ms`).
    """

    program: Callable[[object], object]
    carry: object
    nominal_ms: float


REFERENCE = "reference"  # key of the reference's own (raw) timing in time_programs' result


def time_programs(programs: Mapping[str, Callable[[object], object]], carries: Mapping[str, object],
                  protocol: Protocol, reference: Reference | None = None) -> dict[str, Timed]:
    """Times each `program(carry) -> carry` (carries thread donated buffers between calls).

    With a `reference`, it runs after the programs in every round, and each program's repeat is
    `ms / reference ms of that round * reference.nominal_ms`; the result then also holds the
    reference's raw timing under REFERENCE (how fast the machine was during the measurement).
    """
    if reference is not None and REFERENCE in programs:
        raise ValueError(f"{REFERENCE!r} is the reference's key; rename that program")
    carries = dict(carries)
    samples: dict[str, list[float]] = {name: [] for name in programs}
    reference_ms: list[float] = []
    clock = CLOCKS[protocol.clock]
    for r in range(protocol.warmup + protocol.repeats):
        for name, fn in programs.items():
            carries[name], ms = _timed_call(clock, fn, carries[name])
            if r >= protocol.warmup:
                samples[name].append(ms)
        if reference is not None:
            reference.carry, ms = _timed_call(clock, reference.program, reference.carry)
            if r >= protocol.warmup:
                reference_ms.append(ms)
    if reference is None:
        return {name: trimmed(s, protocol.trim) for name, s in samples.items()}
    scale = [reference.nominal_ms / max(ms, 1e-9) for ms in reference_ms]
    out = {name: trimmed([x * k for x, k in zip(s, scale, strict=True)], protocol.trim)
           for name, s in samples.items()}
    return {**out, REFERENCE: trimmed(reference_ms, protocol.trim)}


def calibrate(program: Callable[[object], object], carry: object, clock: str,
              rounds: int = 60) -> Reference:
    """Times a reference program alone (`rounds` repeats after 5 warm-ups, a fifth trimmed at
    each end); its trimmed mean is the `nominal_ms` normalized measurements are expressed in."""
    reference, samples = Reference(program, carry, 0.0), []
    for r in range(5 + rounds):
        reference.carry, ms = _timed_call(CLOCKS[clock], program, reference.carry)
        if r >= 5:
            samples.append(ms)
    reference.nominal_ms = trimmed(samples, rounds // 5).ms
    return reference


def _timed_call(clock: Callable[[], float], fn: Callable[[object], object], carry: object
                ) -> tuple[object, float]:
    jax.block_until_ready(carry)
    start = clock()
    carry = jax.block_until_ready(fn(carry))
    return carry, (clock() - start) * 1e3


def pin_one_core() -> None:
    """Pins this process to its last allowed core, for the "cpu" clock. Call before JAX starts
    its threads (they inherit the affinity of the thread that creates them)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


def single_thread_xla_flags() -> str:
    """XLA_FLAGS that keep XLA:CPU's work on one thread, for the "cpu" clock."""
    return "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
