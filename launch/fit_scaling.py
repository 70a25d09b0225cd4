"""Fits a scaling sweep: `python -m launch.fit_scaling --workdir=DIR`.

Reads DIR/<axis>/<run>.json (written by launch.scaling_sweep) and writes DIR/fits.json
(`{"data": {"a", "b", "c", "ci", "extrapolation_error", ...}, ...}`, one entry per swept axis,
plus "joint" and "study"), DIR/report.md, DIR/ne_vs_<axis>.png and DIR/scaling_efficiency.png.
An axis whose runs are too few or not decreasing is recorded with its error and makes the job
exit with status 2 after the other axes are written (`--allow_unfit` to exit 0).
"""

import json

from absl import app, flags

from autoshard_jax.errors import ConfigError, InputError
from launch.common import run
from scaling_laws.report import fit_sweep, write_outputs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Sweep directory written by launch.scaling_sweep.")
flags.DEFINE_integer("holdout", 1, "Largest runs per axis held out by the extrapolation check.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the confidence intervals.")
flags.DEFINE_float("tolerance", 0.005, "Largest relative NE rise between neighbouring runs.")
flags.DEFINE_float("max_ne", 1.0, "Runs with NE >= this (small-data region) are not fitted.")
flags.DEFINE_bool("joint", True, "Also fit L(N, D) = E + A/N^alpha + B/D^beta.")
flags.DEFINE_bool("allow_unfit", False, "Exit 0 even if an axis could not be fitted.")
flags.mark_flags_as_required(["workdir"])


def fit_and_report(workdir: str, holdout: int = 1, bootstrap: int = 1000,
                   tolerance: float = 0.005, max_ne: float = 1.0, joint: bool = True) -> dict:
    """The job: checks the flags, fits every axis, writes the outputs; returns fits."""
    if not isinstance(holdout, int) or holdout < 1:
        raise ConfigError(f"--holdout must be an integer >= 1, got {holdout!r}")
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"--bootstrap must be an integer >= 0, got {bootstrap!r}")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance must be in [0, 1), got {tolerance!r}")
    if not max_ne > 0:
        raise ConfigError(f"--max_ne must be > 0, got {max_ne!r}")
    fits, objects, results = fit_sweep(workdir, holdout=holdout, bootstrap=bootstrap,
                                       tolerance=tolerance, max_ne=max_ne, joint=joint)
    write_outputs(workdir, fits, objects, results)
    return fits


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    fits = fit_and_report(FLAGS.workdir, FLAGS.holdout, FLAGS.bootstrap, FLAGS.tolerance,
                          FLAGS.max_ne, FLAGS.joint)
    summary = {axis: {k: e.get(k) for k in ("a", "b", "c", "ci", "extrapolation_error",
                                            "teacher_ne", "error") if k in e}
               for axis, e in fits.items() if axis not in ("study", "joint")}
    print(json.dumps({"fits": summary, "study": fits["study"]}, indent=1))
    errors = [f"axis {a}: {e['error']}" for a, e in fits.items() if "error" in e]
    if errors and not FLAGS.allow_unfit:
        raise InputError(f"{len(errors)} axis could not be fitted ({FLAGS.workdir}/fits.json "
                         f"has the others): {'; '.join(errors)}")


if __name__ == "__main__":
    run(main)
