"""The AutoShard evaluation: every method on held-out tasks, base + transfer settings, both
objectives; Markdown tables, results JSONL and a per-device bar chart in --workdir.

python -m launch.reproduce_autoshard --workdir=/tmp/repro --policy=/tmp/sharder,/tmp/sharder_md
python -m launch.reproduce_autoshard --workdir=/tmp/repro_demo --policy=/tmp/sharder \
    --num_tasks=5 --settings=base,T=100,D=8,unseen=50%   # demo
python -m launch.reproduce_autoshard --workdir=/tmp/repro_m --measure=oracle --num_tasks=10 \
    --max_rows=100000 --policy=...   # plans measured by the cost oracle on this machine

--policy takes launch.train_sharder workdirs (one per objective; each policy.json names its
objective); objectives without a policy get heuristic and search rows only. --measure=predicted
scores with the cost model (the policy's, --cost_model, or the analytical estimator);
--measure=oracle times every plan (and the reference search's proposals) with the cost oracle.
Tasks come from the test half of the pool (`--tables`, or the synthetic 856-table pool with
`--max_rows`), split as in training. `--split=train` draws them from the training half instead:
the development split on which a method change is judged before it meets the test tasks (every
table of a task from that half, so no setting may mix halves). Rerunning with the same workdir
skips finished tasks (and refuses flags that would draw other tasks: `run.json`);
results.md covers every finished task in the workdir, whichever run finished it, and
`--report_only` rewrites it without measuring (after runs split across processes; of
`--settings` and `--objectives` only, when they name some);
`--reference_from` re-evaluates changed methods against an earlier run's reference plans.
Each objective ends with a summary: per setting, the learned methods' paired gap to the best
heuristic with its standard error, and the verdict (`harness.summary`).
"""

from __future__ import annotations

import json
import os

from absl import flags

from autoshard_jax.atomic import write_json
from autoshard_jax.errors import InputError, check_range
from autoshard_jax.placement import harness
from autoshard_jax.placement.costs import OBJECTIVES
from autoshard_jax.placement.tasks import evaluation_pool, split_pool
from autoshard_jax.train.run_identity import check_same_run, file_digest
from launch.common import define_spmd_every_device_flag, run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import several launchers."""
    flags.DEFINE_string("workdir", None, "Output directory (results.jsonl, results.md, "
                        "bars_*.png).")
    flags.DEFINE_string("policy", "", "Comma-separated launch.train_sharder workdirs.")
    flags.DEFINE_string("cost_model", None, "Cost network workdir, or comma-separated workdirs "
                        "(their mean; default: the policy's, with the pessimism it trained "
                        "with, else the analytical estimator).")
    flags.DEFINE_string("tables", None, "Pool tables.json (default: synthetic 856-table pool).")
    flags.DEFINE_integer("max_rows", 1_000_000, "Row cap of the synthetic pool.")
    flags.DEFINE_integer("pool_seed", 0, "Seed of the synthetic pool and of its train/test split.")
    flags.DEFINE_enum("measure", "predicted", ["predicted", "oracle"], "How plans are scored.")
    flags.DEFINE_enum("clock", "cpu", ["cpu", "wall"], "Oracle clock: this process's CPU time "
                      "(robust on a shared machine) or wall time.")
    flags.DEFINE_integer("batch_size", 512, "Batch size the costs refer to.")
    flags.DEFINE_integer("num_tasks", 50, "Test tasks per setting.")
    flags.DEFINE_integer("base_tables", 50, "T of the base setting.")
    flags.DEFINE_integer("base_devices", 4, "D of the base setting.")
    flags.DEFINE_string("settings", "all", "Comma-separated settings: base, T=<tables>, "
                        "D=<devices>, unseen=<percent>%; 'all' = base, T=10,100,200, "
                        "D=2,8,16, unseen=0%,50%.")
    flags.DEFINE_string("objectives", "spmd,max_device", "Objectives to evaluate.")
    flags.DEFINE_float("mem_factor", 1.5, "Memory cap: x max(balanced share, largest table).")
    flags.DEFINE_integer("reference_budget", 30, "Scored proposals of the reference search.")
    flags.DEFINE_float("search_time_s", 20.0, "Time budget of autoshard_search per task "
                       "(max_device: as much again for its row-wise splits).")
    flags.DEFINE_integer("rounds", 3, "With --measure=oracle: the final plans of a task are "
                         "measured afresh this many times, interleaved, and report the median "
                         "(0: the single measurement that chose them).")
    flags.DEFINE_float("reference_ms", 0.0, "With --measure=oracle: the unit measured ms are "
                       "normalized to (the oracle's reference step, ms). 0: the cost model's "
                       "unit when its cost_model.json records one (for older models pass the "
                       "collection.json `reference_ms` of its first --data), else "
                       "calibrated in this process, which makes ms of separate runs "
                       "incomparable (ratios still hold).")
    flags.DEFINE_float("tie_rel", 0.02, "Relative difference counted as a tie (the noise).")
    flags.DEFINE_integer("seed", 0, "Seed of the test tasks.")
    flags.DEFINE_enum("split", "test", ["test", "train"], "Pool half the tasks are drawn from: "
                      "test (the evaluation) or train (development: judge a method change on "
                      "tables the policy and cost model were fitted on, never on the test half).")
    flags.DEFINE_string("reference_from", None, "results.jsonl of an earlier run on the same "
                        "pool, seed and settings: each task's reference plan is taken from it "
                        "(and measured afresh) instead of searched again, so a changed method "
                        "is re-evaluated at the cost of measuring plans.")
    define_spmd_every_device_flag()
    flags.DEFINE_bool("report_only", False, "Measure nothing: rewrite results.md from the "
                      "finished tasks of --settings and --objectives in --workdir's "
                      "results.jsonl (after runs split across processes, one setting each).")


def check_flags(f) -> None:
    if not f.workdir:
        raise InputError("--workdir is required")
    for name, low, high in (("num_tasks", 1, 10_000), ("base_tables", 1, 100_000),
                            ("base_devices", 1, 4096), ("batch_size", 1, 1 << 24),
                            ("reference_budget", 0, 100_000), ("max_rows", 100, 1 << 31),
                            ("rounds", 0, 1000)):
        check_range(name, getattr(f, name), low=low, high=high, integer=True)
    check_range("mem_factor", f.mem_factor, low=1.0, high=1000.0)
    check_range("search_time_s", f.search_time_s, low=0.0, high=86400.0)
    check_range("tie_rel", f.tie_rel, low=0.0, high=1.0)
    check_range("reference_ms", f.reference_ms, low=0.0, high=1e6)
    for obj in f.objectives.split(","):
        if obj not in OBJECTIVES:
            raise InputError(f"--objectives: unknown objective {obj!r}; choose from "
                             f"{list(OBJECTIVES)}")


def chosen_settings(f) -> list[harness.Setting]:
    """--settings parsed; a name that is no setting is refused, --report_only included."""
    if f.settings == "all":
        return harness.settings(f.base_tables, f.base_devices)
    try:
        return [harness.parse_setting(n, f.base_tables, f.base_devices)
                for n in f.settings.split(",")]
    except InputError as e:
        raise InputError(f"--settings: {e}") from e


def task_identity(f) -> dict:
    """What decides a workdir's tasks and how their plans are scored. A resumed run skips the
    tasks it finds by (setting, objective, index), so resuming with another seed, split or pool
    would mix two evaluations in one table without a word; `check_workdir` refuses that."""
    return {"tables": file_digest(f.tables) if f.tables else f"synthetic max_rows={f.max_rows}",
            "pool_seed": f.pool_seed, "split": f.split, "seed": f.seed,
            "mem_factor": f.mem_factor, "base_tables": f.base_tables,
            "base_devices": f.base_devices, "measure": f.measure, "clock": f.clock,
            "batch_size": f.batch_size, **_host(f)}


def _host(f) -> dict:
    """Oracle times are only comparable on one CPU type (`dataset.cpu_name`) and one spmd
    timing, so a measuring workdir is bound to the host's and the flag's."""
    if f.measure != "oracle":
        return {}
    from autoshard_jax.cost.dataset import cpu_name, host_cpu
    return {"cpu": cpu_name(host_cpu()), "spmd_every_device": f.spmd_every_device}


def check_workdir(f, log=print) -> None:
    """Records the workdir's task identity (run.json) on its first run and refuses a resume
    with flags that would draw or score other tasks. A workdir of an earlier version, with
    results but no run.json, takes this run's identity (it cannot be checked)."""
    path = os.path.join(f.workdir, "run.json")
    current = task_identity(f)
    if os.path.isfile(path):
        with open(path) as fh:
            saved = json.load(fh)
        if f.measure == "oracle":  # written before the flag: the busiest device alone
            saved.setdefault("spmd_every_device", False)
        if "spmd" not in f.objectives.split(","):  # measures no spmd step: either resumes
            current.pop("spmd_every_device", None)
        if "cpu" in current and "cpu" not in saved:  # written before the CPU was recorded
            log(f"{f.workdir}/run.json records no CPU type: recording this host's "
                f"({current['cpu']}); its earlier results are taken to be measured on it")
            saved["cpu"] = current["cpu"]
            write_json(path, saved)
        check_same_run(saved, current, f.workdir, saved_as="workdir's run.json",
                       current_as="flags")
        return
    if os.path.isfile(os.path.join(f.workdir, "results.jsonl")):
        log(f"{f.workdir} has results but no run.json (an earlier version): recording these "
            "flags as its task identity")
    write_json(path, current)


def oracle_unit(f, cost) -> str:
    """Pins the oracle's unit (--reference_ms, else the cost model's) and says which it is."""
    from autoshard_jax.cost import oracle
    if f.reference_ms:
        oracle.set_reference_ms(f.reference_ms, f.clock)
        return f"{f.reference_ms:.3f} ms (--reference_ms)"
    model_ms = oracle.use_model_unit(cost.model.meta, f.clock) if cost.model else None
    if model_ms:
        return f"{model_ms:.3f} ms (the cost model's)"
    return f"{oracle.reference_ms(f.clock):.3f} ms (calibrated in this process)"


def reproduce(f, log=print) -> str:
    """The job; returns the Markdown report (also written to <workdir>/results.md)."""
    check_flags(f)
    if f.report_only:
        return write_report(f.workdir, report_from_results(f), log)
    from autoshard_jax.placement.inference import load_policy, planning_cost
    from autoshard_jax.tables.spec import load_tables

    if f.tables and not os.path.isfile(f.tables):
        raise InputError(f"--tables: file {f.tables!r} does not exist")
    train_pool, test_pool = (split_pool(load_tables(f.tables), f.pool_seed) if f.tables
                             else evaluation_pool(f.max_rows, f.pool_seed))
    chosen = chosen_settings(f)
    for s in chosen:
        if s.num_tables > len(test_pool) or not 0 <= s.unseen <= 1 or s.num_devices < 1:
            raise InputError(f"--settings: {s.name} needs 1 <= D, unseen in 0..100% and at "
                             f"most {len(test_pool)} tables (half the pool)")
        if f.split == "train" and 0 < s.unseen < 1:
            raise InputError(f"--settings: {s.name} mixes tables of both halves; --split=train "
                             "takes settings that draw from one (base, T=, D=, unseen=0%)")
    if f.split == "train":  # a task's tables all come from one pool: here both are the train half
        test_pool = train_pool
    if f.measure == "oracle":  # plans are timed on D (simulated, on CPU) devices
        from autoshard_jax.placement.evaluate import ensure_devices
        ensure_devices(max(s.num_devices for s in chosen))
    policies, paths = {}, {}
    for path in [p for p in f.policy.split(",") if p]:
        pol = load_policy(path)
        objective = pol.meta["objective"]
        if objective in policies:
            raise InputError(f"--policy: {paths[objective]} and {path} are both trained for "
                             f"objective {objective}; give one policy per objective")
        policies[objective], paths[objective] = pol, path
    cost = planning_cost(f.batch_size, f.cost_model, next(iter(policies.values()), None))
    os.makedirs(f.workdir, exist_ok=True)
    check_workdir(f, log)
    results = os.path.join(f.workdir, "results.jsonl")
    stored = None
    if f.reference_from:
        if not os.path.isfile(f.reference_from):
            raise InputError(f"--reference_from: file {f.reference_from!r} does not exist")
        if os.path.abspath(f.reference_from) == os.path.abspath(results):
            raise InputError("--reference_from: give an earlier run's results.jsonl, not this "
                             "--workdir's")
        stored = {(r["setting"], r["objective"], r["task"]): r
                  for r in harness.read_results(f.reference_from)}

    unit = ""
    if f.measure == "oracle":
        where = oracle_unit(f, cost)
        log(f"measured ms are normalized to the reference step at {where}")
        timed = "every device" if f.spmd_every_device else "the busiest device alone"
        unit = f"; oracle unit {where}; spmd compute timed on {timed}"
        from autoshard_jax.cost.dataset import cpu_mismatch
        mismatch = cost.model is not None and cpu_mismatch(cost.model.meta)
        if mismatch:
            log(f"WARNING: {mismatch}")
            unit += f"; WARNING: {mismatch}"

    def make_score(task, objective):
        if f.measure == "oracle":
            from autoshard_jax.cost.timing import Protocol
            return harness.oracle_scorer(task, f.batch_size, Protocol(clock=f.clock), objective,
                                         f.spmd_every_device)
        return harness.predicted_scorer(task, cost)

    split = "" if f.split == "test" else "; training-half tasks (development split)"
    title = (f"# AutoShard evaluation ({f.measure}; cost model {cost.name}; "
             f"{f.num_tasks} tasks per setting in this run{unit}{split})\n")
    for objective in f.objectives.split(","):
        if f.policy and objective not in policies:
            log(f"no --policy was trained for objective {objective}: its tables have no "
                "autoshard rows")
        for s in chosen:
            recs = harness.run_setting(s, objective, train_pool, test_pool, f.num_tasks,
                                       f.mem_factor, f.seed, make_score, cost,
                                       policies.get(objective), results, f.reference_budget,
                                       f.search_time_s, log,
                                       f.rounds if f.measure == "oracle" else 0, stored)
            if s.name == "base":
                harness.bar_chart(recs[0], objective,
                                  os.path.join(f.workdir, f"bars_{objective}.png"))
    # The report covers every finished task in the workdir, so a run of some settings does
    # not drop the sections of settings that earlier runs (or other processes) finished.
    finished = harness.read_results(results)
    return write_report(f.workdir, [title, *sections_from_results(finished, f)], log)


def section(s: harness.Setting, recs: list[dict], objective: str, tie_rel: float) -> str:
    return (f"## {s.name} (T={recs[0]['T']}, D={recs[0]['D']}, unseen={s.unseen:.0%}; "
            f"{len(recs)} tasks), objective {objective}\n\n"
            + harness.table(recs, objective, tie_rel) + "\n")


def summary_section(by_setting: dict[str, list[dict]], objective: str) -> str:
    return (f"## Summary, objective {objective}: learned methods against each setting's best "
            "heuristic (gap: mean per-task ratio - 1 ± its standard error)\n\n"
            + harness.summary(by_setting, objective) + "\n")


def report_from_results(f) -> list[str]:
    """results.md rebuilt from the finished tasks on disk (--report_only) of --settings (all
    by default) and --objectives: a name with no finished task is refused, not left out."""
    path = os.path.join(f.workdir, "results.jsonl")
    if not os.path.isfile(path):
        raise InputError(f"--report_only: {path} does not exist (no finished tasks to report)")
    records = harness.read_results(path)
    if not records:
        raise InputError(f"--report_only: {path} holds no finished tasks")
    objectives = f.objectives.split(",")
    records = [r for r in records if r["objective"] in objectives]
    if f.settings != "all":
        names = [s.name for s in chosen_settings(f)]
        found = sorted({r["setting"] for r in records})
        missing = [n for n in names if n not in found]
        if missing:
            raise InputError(f"--settings: {path} has no finished task of {missing} for "
                             f"objectives {objectives} (it has {found})")
        records = [r for r in records if r["setting"] in names]
    if not records:
        raise InputError(f"--objectives: {path} has no finished task of {objectives}")
    return [f"# AutoShard evaluation (rebuilt from {path})\n",
            *sections_from_results(records, f)]


def sections_from_results(records: list[dict], f) -> list[str]:
    """results.md's sections from finished task records, settings in the usual order, a
    summary per objective."""
    # A task run twice (two processes on one setting) counts once: the later record, as a
    # resumed run reads it (`harness.run_setting`).
    latest = {(r["objective"], r["setting"], r["task"]): r for r in records}
    grouped: dict[str, dict[str, list[dict]]] = {}
    for (objective, setting, _), rec in sorted(latest.items(), key=lambda kv: kv[0][2]):
        grouped.setdefault(objective, {}).setdefault(setting, []).append(rec)
    order = [s.name for s in harness.settings(f.base_tables, f.base_devices)]
    report = []
    for objective, by_setting in grouped.items():
        names = sorted(by_setting, key=lambda n: (order.index(n) if n in order else len(order), n))
        by_setting = {n: by_setting[n] for n in names}
        report += [section(harness.parse_setting(n, f.base_tables, f.base_devices), recs,
                           objective, f.tie_rel) for n, recs in by_setting.items()]
        report.append(summary_section(by_setting, objective))
    return report


def write_report(workdir: str, report: list[str], log) -> str:
    text = "\n".join(report)
    with open(os.path.join(workdir, "results.md"), "w") as out:
        out.write(text)
    log(text)
    return text


def main(argv):
    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    if FLAGS.measure == "oracle" and FLAGS.clock == "cpu":  # the collector's timing setup
        from autoshard_jax.cost.timing import pin_one_core
        from autoshard_jax.train.runtime import configure_cpu_runtime
        configure_cpu_runtime()
        pin_one_core()
    reproduce(FLAGS)


if __name__ == "__main__":
    define_flags()
    run(main)
