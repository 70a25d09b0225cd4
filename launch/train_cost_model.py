"""Trains the neural cost model: `python -m launch.train_cost_model --workdir=DIR`.

Reads the oracle's measurements (`--data`, collection directories from launch.collect_costs;
default DIR itself), trains the DeepSets network for both cost settings on the train split,
picks its step on the val split (with --restarts=N, the best of N seeds by val: one seed's fit
can stall, session 16 measured val MAPE 0.072 against another seed's 0.044) and writes, into DIR:
  cost_model/ + cost_model.json   what `launch.measure_costs --cost_model=DIR` loads
  report.json, report.md          held-out MAPE / R^2 / Kendall tau of the network and baselines
                                  (sum of singles, linear on summed features, analytical), noise
  scatter.png                     predicted vs measured, per setting

  python -m launch.collect_costs --workdir=/tmp/costs --num_sets=300 --num_plans=60
  python -m launch.train_cost_model --workdir=/tmp/cost_model --data=/tmp/costs
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from launch.common import run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program: launch.train_sharder imports
    `train_cost_model` to fit the network it measures for itself."""
    flags.DEFINE_string("workdir", None, "Output directory of the model and its report.")
    flags.DEFINE_list("data", None, "Cost collection directories or costs.jsonl files "
                      "(default: --workdir).")
    flags.DEFINE_integer("steps", 3000, "Training steps.")
    flags.DEFINE_float("learning_rate", 1e-2, "Peak Adam learning rate (cosine decay).")
    flags.DEFINE_float("weight_decay", 1e-4, "AdamW's decoupled weight decay.")
    flags.DEFINE_float("reuse_noise", 0.0, "Log-normal noise (sd) on the reuse-histogram bins "
                       "of the tables in each training batch (0: none), against learning "
                       "per-table corrections.")
    flags.DEFINE_integer("seed", 0, "Initialisation and batch-order seed.")
    flags.DEFINE_list("unseen", [], "Cost collections of tables the training data never had "
                      "(e.g. collect_costs --pool=synthetic --pool_seed=1): the report adds the "
                      "network's scores on them, how it generalises to new tables.")
    flags.DEFINE_bool("unique_rows", True, "Inputs include the rows a batch touches "
                      "(`cost.network.encode_features`); --nounique_rows fits the inputs of the "
                      "networks of sessions up to 29.")
    flags.DEFINE_integer("restarts", 1, "Fits with seeds seed .. seed+restarts-1; the one with "
                         "the lowest val MAPE is kept (test is only reported).")
    flags.mark_flags_as_required(["workdir"])


def train_cost_model(workdir: str, data: list[str], steps: int = 3000,
                     learning_rate: float = 1e-2, seed: int = 0, restarts: int = 1,
                     log=logging.info, weight_decay: float = 1e-4,
                     reuse_noise: float = 0.0, unseen: list[str] = (),
                     unique_rows: bool = True) -> dict:
    """Trains (`restarts` seeds, the best by val kept), evaluates and saves; returns the
    report dict."""
    import numpy as np

    from autoshard_jax.cost import dataset, fit, report
    from autoshard_jax.cost.network import save_cost_model
    from autoshard_jax.errors import DataError, check_range

    check_range("steps", steps, low=1, integer=True)
    check_range("learning_rate", learning_rate, low=1e-7, high=1.0)
    check_range("weight_decay", weight_decay, low=0.0, high=10.0)
    check_range("reuse_noise", reuse_noise, low=0.0, high=10.0)
    check_range("restarts", restarts, low=1, high=100, integer=True)
    records, pool = dataset.read_collections(data)
    if not records:
        raise DataError(f"no cost records in {data}")
    envs, cpus = _settings(records)
    if len(envs) > 1:
        raise DataError(f"cost data mixes backends / batch sizes / optimizers {sorted(envs)}: "
                        "train one model per setting")
    backend, batch_size, row_optimizer = envs.pop()
    if len(cpus) > 1:
        raise DataError(f"cost data mixes CPU types {cpus}: their costs differ by composition, "
                        "not by one scale; train one model per CPU type")
    timing = dataset.spmd_timings(records, ",".join(data)) or dataset.EVERY_DEVICE
    unseen_data = (_unseen_data(list(data), list(unseen), pool,
                                (backend, batch_size, row_optimizer), cpus, timing)
                   if unseen else None)
    has_sets = any(r["kind"] == "set" for r in records)
    sets = fit.set_data(records, pool) if has_sets else None
    plans = fit.plan_data(records, pool)
    meta = {"backend": backend, "cpu": cpus[0] if cpus else None, "batch_size": batch_size,
            "row_optimizer": row_optimizer,
            "num_sets": 0 if sets is None else len(sets.index),
            "num_plans": sum(len(p.index) for p in plans.values()), "data": list(data),
            "weight_decay": weight_decay, "reuse_noise": reuse_noise, "unique_rows": unique_rows,
            # the unit predictions are in (oracle.use_model_unit pins measurements to it)
            "reference_ms": dataset.collections_unit(list(data)),
            # how its plans' compute was timed (what measures beside it times the same way)
            "spmd_timing": timing}
    log(f"training on {meta['num_sets']} sets and {meta['num_plans']} plans ({backend}, "
        f"batch {batch_size})")
    fits = []
    for s in range(seed, seed + restarts):
        model, history = fit.fit_cost_model(
            sets, plans, fit.FitConfig(steps=steps, learning_rate=learning_rate,
                                       weight_decay=weight_decay, reuse_noise=reuse_noise,
                                       seed=s), meta,
            log=log)
        val = min((h["val_mape"] for h in history if np.isfinite(h["val_mape"])),
                  default=float("inf"))
        if restarts > 1:
            log(f"seed {s}: best val MAPE {val:.4f}")
        fits.append((val, s, model, history))
    _, meta["seed"], model, history = min(fits, key=lambda f: f[0])
    meta["restarts"] = [{"seed": s, "val_mape": v} for v, s, _, _ in fits]
    model.meta = meta  # what is saved with it
    os.makedirs(workdir, exist_ok=True)
    save_cost_model(workdir, model)
    singles = fit.singles_of(records)
    scores = fit.evaluate(model, sets, plans, batch_size, singles)
    noise = fit.noise(records)
    out = {"meta": meta, "test": scores, "noise": noise, "history": history}
    if unseen_data is not None:
        out["unseen"] = {"data": list(unseen), **fit.unseen_scores(model, *unseen_data)}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(report.markdown(scores, noise, meta, out.get("unseen")))
    panels = {}
    if sets is not None:
        te = fit.split_mask(sets.index, "test")
        if te.any():
            panels["max_device (sets)"] = (sets.total[te], fit.predict_sets(model, sets, te))
    measured, predicted = [], []
    for p in plans.values():
        te = fit.split_mask(p.index, "test")
        if te.any():
            measured.append(p.total[te])
            predicted.append(fit.predict_plans(model.cost_fn, p, te))
    if measured:
        panels["spmd (plans)"] = (np.concatenate(measured), np.concatenate(predicted))
    if panels:
        report.scatter_png(os.path.join(workdir, "scatter.png"), panels)
    return out


def _settings(records: list[dict]) -> tuple[set[tuple], list[str]]:
    """The (backend, batch size, optimizer) triples and the CPU types of cost records (records
    collected before session 23 carry no CPU; those that do must agree on its type)."""
    from autoshard_jax.cost import dataset

    return ({(r["backend"], r["batch_size"], r["row_optimizer"]) for r in records},
            sorted({dataset.cpu_name(r["cpu"]) for r in records if r.get("cpu")}))


def _unseen_data(data: list[str], unseen: list[str], train_pool: dict, env: tuple,
                 cpus: list[str], timing: str) -> tuple:
    """(sets, plans) of the --unseen collections, in the training data's unit; refused where
    one of their tables is a training table, or their setting (backend, batch size, optimizer,
    CPU type, the plans' spmd `timing`) is not the training data's."""
    from autoshard_jax.cost import dataset, fit
    from autoshard_jax.errors import DataError

    records, pool = dataset.read_collections(unseen, unit_of=data)
    if not records:
        raise DataError(f"--unseen: no cost records in {unseen}")
    envs, unseen_cpus = _settings(records)
    if envs != {env} or (cpus and set(unseen_cpus) - set(cpus)):
        raise DataError(f"--unseen: {unseen} were measured in another setting "
                        f"({sorted(envs - {env}) or unseen_cpus}) than the training data "
                        f"({env}{', ' + cpus[0] if cpus else ''})")
    if dataset.spmd_timings(records, ",".join(unseen)) not in (None, timing):
        raise DataError(f"--unseen: the plans of {unseen} were not timed as the training "
                        f"data's ({timing}): collect them with the same --spmd_every_device")
    seen = sorted({n for r in records for n in r["tables"] if train_pool.get(n) == pool[n]})
    if seen:
        raise DataError(f"--unseen: {len(seen)} of its tables are in the training data "
                        f"(e.g. {seen[0]!r}); give collections of other tables (another pool "
                        "seed)")
    has_sets = any(r["kind"] == "set" for r in records)
    return (fit.set_data(records, pool) if has_sets else None), fit.plan_data(records, pool)


def main(argv):
    del argv
    result = train_cost_model(FLAGS.workdir, FLAGS.data or [FLAGS.workdir], FLAGS.steps,
                              FLAGS.learning_rate, FLAGS.seed, FLAGS.restarts,
                              weight_decay=FLAGS.weight_decay, reuse_noise=FLAGS.reuse_noise,
                              unseen=FLAGS.unseen, unique_rows=FLAGS.unique_rows)
    from autoshard_jax.cost.report import markdown

    print(markdown(result["test"], result["noise"], result["meta"], result.get("unseen")))


if __name__ == "__main__":
    define_flags()
    run(main)
