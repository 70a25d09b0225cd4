"""Trains a DLRM: `python -m launch.train_dlrm --config=launch/configs/<name>.py --workdir=DIR`.

Overrides go on the command line as `--config.key=value`. Re-running with the same workdir resumes
from its latest checkpoint. Multi-host runs start one process per host with
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (or `--jax_distributed` to
auto-detect them on Cloud TPU / SLURM); `--simulate_cpu_devices=N` gives N CPU devices for local
sharded runs (per process).
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from autoshard_jax.train.loop import train_and_evaluate
from autoshard_jax.train.runtime import configure_cpu_runtime
from launch.common import define_distributed_flags, initialize_distributed, run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.jsonl.")
flags.DEFINE_integer("simulate_cpu_devices", 0, "Simulate this many CPU devices (local runs).")
define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    # Orbax logs every save step at INFO; keep the training log readable.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    configure_cpu_runtime()
    if FLAGS.simulate_cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.simulate_cpu_devices)
    initialize_distributed()
    logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(json.dumps({"final_eval": result}, indent=1))


if __name__ == "__main__":
    run(main)
