"""Trains the AutoShard policy: `python -m launch.train_sharder --config=CONFIG --workdir=DIR`.

python -m launch.train_sharder --config=launch/configs/sharder_runlocal.py --workdir=/tmp/sharder

Overrides go on the command line as `--config.key=value` (e.g. `--config.objective=max_device`,
`--config.cost_model=DIR` for a trained cost network). Re-running with the same workdir resumes
from its latest checkpoint. `launch.shard --policy=DIR` takes the workdir.
"""

from __future__ import annotations

import json

from absl import flags, logging
from ml_collections import config_flags

from autoshard_jax.errors import InputError
from autoshard_jax.placement.evaluate import ensure_devices
from autoshard_jax.placement.trainer import train
from launch.common import run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import several launchers."""
    config_flags.DEFINE_config_file("config", None, "Sharder training configuration file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, policy.json.")


def main(argv):
    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None or not FLAGS.workdir:
        raise InputError("--config and --workdir are required")
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    if FLAGS.config.refine_every and FLAGS.config.objective == "spmd":
        ensure_devices(max(d for _, d in FLAGS.config.train_shapes))  # oracle plan timing
    result = train(FLAGS.config, FLAGS.workdir)
    print(json.dumps({"final_eval": result}, indent=1))


if __name__ == "__main__":
    define_flags()
    run(main)
