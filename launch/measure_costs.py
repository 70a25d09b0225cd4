"""Measures embedding costs with the oracle: `python -m launch.measure_costs --tables=T --sets=S`.

  python -m launch.measure_costs --tables=tables.json --sets=sets.json [--batch_size=512]
      [--cost_model=DIR]
  python -m launch.measure_costs --tables=tables.json --plans=a.json,b.json

`sets.json` is a JSON list of lists of table names; each set is fused on one device and one JSON
object is printed per set, in order: total_ms, forward_ms, backward_ms, spread (and predicted_ms
with --cost_model, a directory written by launch.train_cost_model). With --plans, one object per
plan: plan, total_ms, compute_ms, exchange_ms (the SPMD cost; see autoshard_jax/cost/oracle.py).
On CPU the clock is this process's CPU time on one pinned core, and plans run on simulated devices.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags

from launch.common import define_spmd_every_device_flag, run

FLAGS = flags.FLAGS
flags.DEFINE_string("tables", None, "tables.json with every table named in the sets or plans.")
flags.DEFINE_string("sets", None, "JSON list of lists of table names.")
flags.DEFINE_list("plans", None, "plan.json files (instead of --sets).")
flags.DEFINE_integer("batch_size", 512, "Samples per step.")
flags.DEFINE_string("cost_model", None, "Directory of a trained cost model, or comma-separated "
                    "directories (their mean; adds predicted_ms).")
flags.DEFINE_string("row_optimizer", "sgd", "sgd | rowwise_adagrad | adagrad.")
flags.DEFINE_integer("repeats", 10, "Timed repeats per measurement.")
flags.DEFINE_enum("clock", "auto", ["auto", "wall", "cpu"], "Timing clock (see collect_costs).")
flags.DEFINE_integer("seed", 0, "Seed of the id draw.")
define_spmd_every_device_flag()
flags.mark_flags_as_required(["tables"])


def load_sets(path: str, known: set[str]) -> list[list[str]]:
    """The sets file, validated: errors name the entry and the table."""
    from autoshard_jax.errors import InputError

    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    try:
        with open(path) as f:
            sets = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(sets, list) or not sets:
        raise InputError(f"{path}: must hold a non-empty JSON list of lists of table names")
    for i, names in enumerate(sets):
        if not isinstance(names, list) or not names:
            raise InputError(f"{path}: sets[{i}] must be a non-empty list of table names, got "
                             f"{names!r}")
        for j, name in enumerate(names):
            if name not in known:
                raise InputError(f"{path}: sets[{i}][{j}] names unknown table {name!r} (not in "
                                 "--tables)")
        if len(set(names)) != len(names):
            raise InputError(f"{path}: sets[{i}] lists a table twice")
    return sets


def measure(tables_path: str, sets_path: str | None, plan_paths: list[str] | None,
            batch_size: int, cost_model: str | None, row_optimizer: str, repeats: int,
            clock: str, seed: int, every_device: bool | None = None) -> list[dict]:
    """One result dict per set or plan, in order. A plan's compute is its slowest device's
    program (`every_device`, the default; the busiest's alone where False); with a cost model,
    as the model's data timed it (`network.times_every_device`)."""
    import jax.numpy as jnp
    import numpy as np

    from autoshard_jax.cost.network import class_onehot, load_cost_models, times_every_device
    from autoshard_jax.cost.oracle import measure_plan, measure_set, use_model_unit
    from autoshard_jax.cost.timing import Protocol
    from autoshard_jax.errors import ConfigError, check_range
    from autoshard_jax.sharding.plan import load_plan
    from autoshard_jax.tables.features import table_features
    from autoshard_jax.tables.spec import load_tables

    if (sets_path is None) == (not plan_paths):
        raise ConfigError("give exactly one of --sets or --plans")
    check_range("batch_size", batch_size, low=1, integer=True)
    check_range("repeats", repeats, low=5, integer=True)
    if row_optimizer not in ("sgd", "rowwise_adagrad", "adagrad"):
        raise ConfigError(f"--row_optimizer must be sgd, rowwise_adagrad or adagrad, got "
                          f"{row_optimizer!r}")
    specs = {s.name: s for s in load_tables(tables_path)}
    model = load_cost_models(cost_model) if cost_model else None
    if model is not None and model.meta.get("batch_size") != batch_size:
        raise ConfigError(f"--cost_model was trained at batch size {model.meta.get('batch_size')}"
                          f", --batch_size is {batch_size}: measure at the model's batch size")
    protocol = Protocol(repeats=repeats, trim=2, clock=clock)
    if model is not None:  # measured and predicted ms in one unit, of one timing
        use_model_unit(model.meta, clock)
        if every_device not in (None, times_every_device(model.meta)):
            raise ConfigError(f"--cost_model predicts plans timed with spmd_every_device="
                              f"{times_every_device(model.meta)}, but the flag asks for "
                              f"{every_device}: measure as the model's data was timed")
        every_device = times_every_device(model.meta)
    every_device = True if every_device is None else every_device
    out = []
    if sets_path is not None:
        for names in load_sets(sets_path, set(specs)):
            group = [specs[n] for n in names]
            cost = measure_set(group, batch_size, row_optimizer=row_optimizer,
                               protocol=protocol, seed=seed)
            result = {"tables": names, "total_ms": cost.total_ms, "forward_ms": cost.forward_ms,
                      "backward_ms": cost.backward_ms, "spread": cost.spread}
            if model is not None:
                result["predicted_ms"] = float(model.predict_sets([table_features(group)])[0])
            out.append(result)
        return out
    plans = [(p, load_plan(p)) for p in plan_paths]
    for path, plan in plans:
        group = [specs[n] for n in plan.placements if n in specs]
        missing = sorted(set(plan.placements) - set(specs))
        if missing:
            raise ConfigError(f"{path}: places tables {missing} that --tables does not define")
        cost = measure_plan(group, plan, batch_size, row_optimizer=row_optimizer,
                            protocol=protocol, seed=seed, every_device=every_device)
        result = {"plan": path, "total_ms": cost.total_ms, "compute_ms": cost.compute_ms,
                  "exchange_ms": cost.exchange_ms, "spread": cost.spread,
                  "device_compute_ms": list(cost.device_compute_ms)}
        if model is not None:
            assign = np.zeros((len(group), plan.num_devices), np.float32)
            for i, s in enumerate(group):
                p = plan.placements[s.name]
                if p["type"] == "table_wise":
                    assign[i, p["device"]] = 1.0
                else:
                    assign[i] = 1.0
            _, spmd = model.cost_fn(jnp.asarray(table_features(group)), jnp.asarray(assign),
                                    jnp.asarray(class_onehot(group)))
            result["predicted_ms"] = float(spmd)
        out.append(result)
    return out


def main(argv):
    del argv
    for result in measure(FLAGS.tables, FLAGS.sets, FLAGS.plans, FLAGS.batch_size,
                          FLAGS.cost_model, FLAGS.row_optimizer, FLAGS.repeats, _clock(),
                          FLAGS.seed, FLAGS.spmd_every_device
                          if FLAGS["spmd_every_device"].present else None):
        print(json.dumps(result), flush=True)


def _clock() -> str:
    if FLAGS.clock != "auto":
        return FLAGS.clock
    return "cpu" if jax.default_backend() == "cpu" else "wall"


def _configure(argv):
    """Before JAX starts: CPU runtime flags, enough simulated devices for the plans, pinning."""
    from autoshard_jax.train.runtime import configure_cpu_runtime

    configure_cpu_runtime()
    devices = 1
    for path in FLAGS.plans or []:
        try:
            with open(path) as f:
                devices = max(devices, int(json.load(f).get("num_devices", 1)))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # load_plan reports it properly
    jax.config.update("jax_num_cpu_devices", devices)
    if _clock() == "cpu" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    return main(argv)


if __name__ == "__main__":
    run(_configure)
