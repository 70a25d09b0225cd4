"""Measures sharding plans: one JSON object per plan, in the order given.

python -m launch.evaluate_plans --tables=tables.json --plans=a.json,b.json --batch_size=512
python -m launch.evaluate_plans --tables=tables.json --plans=a.json --measure=step

Fields: plan (its path), device_ms (each device's own tables fused and timed on one device, the
papers' protocol), max_ms, min_max_ratio, spmd_ms (the plan's SPMD embedding step: padded
program + exchange), padding_overhead (allocated / real bytes); --measure=step adds step_ms, the
real sharded train step timed on the plan's (simulated, on CPU) devices.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from autoshard_jax.errors import InputError, check_range
from autoshard_jax.placement.evaluate import MEASURES
from launch.common import define_spmd_every_device_flag, run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import several launchers."""
    flags.DEFINE_string("tables", None, "tables.json of the plans' tables.")
    flags.DEFINE_string("plans", None, "Comma-separated plan.json paths.")
    flags.DEFINE_integer("batch_size", 512, "Global batch size of the measured step.")
    flags.DEFINE_enum("measure", "oracle", list(MEASURES), "oracle: cost oracle; step: also the "
                      "full sharded train step.")
    flags.DEFINE_string("row_optimizer", "sgd", "Embedding optimizer of the measured update.")
    flags.DEFINE_integer("seed", 0, "Seed of the id draw.")
    define_spmd_every_device_flag()


def evaluate_main(tables: str, plans: str, batch_size: int = 512, measure: str = "oracle",
                  row_optimizer: str = "sgd", seed: int = 0, out=sys.stdout,
                  protocol=None, spmd_every_device: bool = True) -> list[dict]:
    """The job: validates every input first, then measures; returns the printed records.
    `protocol` (the oracle's timing protocol) lets tests time fewer repeats."""
    if not tables or not plans:
        raise InputError("--tables and --plans are required")
    check_range("batch_size", batch_size, low=1, high=1 << 24, integer=True)
    if measure not in MEASURES:
        raise InputError(f"--measure must be one of {list(MEASURES)}, got {measure!r}")
    from autoshard_jax.sharding.plan import load_plan
    from autoshard_jax.tables.spec import load_tables

    paths = [p for p in plans.split(",") if p]
    for path, what in [(tables, "--tables")] + [(p, "--plans") for p in paths]:
        if not os.path.isfile(path):
            raise InputError(f"{what}: file {path!r} does not exist")
    specs = load_tables(tables)
    loaded = [load_plan(p) for p in paths]
    for path, plan in zip(paths, loaded, strict=True):
        try:
            plan.validate(specs, row_optimizer)
        except InputError as e:
            raise type(e)(f"{path}: {e}") from e
        if batch_size % plan.num_devices:
            raise InputError(f"{path}: --batch_size={batch_size} is not divisible by its "
                             f"{plan.num_devices} devices")
    from autoshard_jax.placement.evaluate import ensure_devices, evaluate_measured

    ensure_devices(max(p.num_devices for p in loaded))

    records = []
    for path, plan in zip(paths, loaded, strict=True):
        rec = {"plan": path, **evaluate_measured(specs, plan, batch_size, measure,
                                                 row_optimizer, seed, protocol,
                                                 spmd_every_device)}
        print(json.dumps(rec), file=out, flush=True)
        records.append(rec)
    return records


def main(argv):
    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    evaluate_main(FLAGS.tables, FLAGS.plans, FLAGS.batch_size, FLAGS.measure,
                  FLAGS.row_optimizer, FLAGS.seed, spmd_every_device=FLAGS.spmd_every_device)


if __name__ == "__main__":
    define_flags()
    run(main)
