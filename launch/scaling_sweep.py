"""Runs a scaling-law sweep: `python -m launch.scaling_sweep --config=launch/configs/scaling_cpu.py
--workdir=DIR [--config.axis=data|embedding|over_arch|mlp|depth] [--config.data.path=TSV]
[--shard_index=i --num_shards=n]`.

One results file per run in DIR/<axis>/; re-running skips finished runs and resumes a killed one.
Fit with `python -m launch.fit_scaling --workdir=DIR`.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from autoshard_jax.train.runtime import configure_cpu_runtime
from launch.common import run
from scaling_laws.sweep import run_sweep

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Sweep configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Sweep directory (results, run workdirs).")
flags.DEFINE_integer("shard_index", 0, "This job's shard of the runs (0-based).")
flags.DEFINE_integer("num_shards", 1, "Number of independent jobs the runs are split over.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    configure_cpu_runtime()
    summary = run_sweep(FLAGS.config, FLAGS.workdir, FLAGS.shard_index, FLAGS.num_shards)
    print(json.dumps({"sweep": summary}))


if __name__ == "__main__":
    run(main)
