"""Online training under temporal shift: `python -m launch.fgd_online --config=... --workdir=DIR`.

Overrides: `--config.methods=bu,fgd,...`, `--config.seeds=N`, `--config.data.path=DIR`, any other
`--config.key=value`. Writes metrics.jsonl (one record per seed, method and period), summary.json,
results.md and auc.png into the workdir; re-running the same command resumes a killed run at the
period it was in, and a finished run only rewrites the summary.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from autoshard_jax.train.runtime import configure_cpu_runtime
from launch.common import run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "FGD study configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_string("jax_cache_dir", "", "Persistent XLA compilation cache (reused across runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    configure_cpu_runtime()
    if FLAGS.jax_cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from fgd.online import run_online  # after the runtime flags: importing it starts JAX

    summary = run_online(FLAGS.config, FLAGS.workdir)
    print(json.dumps({m: {"mean_test_auc": e["mean_test_auc"], "mean_test_ne": e["mean_test_ne"],
                          "win_rate_vs_bu": e.get("win_rate_vs_bu")}
                      for m, e in summary["methods"].items()}, indent=1))


if __name__ == "__main__":
    run(main)
