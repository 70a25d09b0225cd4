"""The AutoShard evaluation protocol: settings, tasks, every method's plans, scores, tables.

Tasks follow the papers: the pool is split into disjoint train / test halves (`tasks.py`);
test tasks draw `unseen` of their tables from the test half. The base setting is the policy's
training shape; transfer settings vary T (tables), D (devices) and the unseen fraction.
Every plan is scored by `score_fn` (the oracle's measurement, or the cost model), and the
*reference* is a budgeted local search from the best plan of any method, whose moves are
proposed by the cost model and accepted only when the scorer confirms them (oracle-in-the-loop
when the scorer is the oracle; there, a second measurement must confirm it too).
Results go to JSONL one task at a time (a rerun skips finished tasks), then to Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence

import numpy as np

from autoshard_jax.errors import InputError
from autoshard_jax.placement import api, search, split
from autoshard_jax.placement.costs import (
    Cost,
    class_onehot,
    plan_costs,
    single_costs,
    table_features,
)
from autoshard_jax.placement.inference import LoadedPolicy
from autoshard_jax.placement.jsonl import read_jsonl
from autoshard_jax.placement.memory import memory_model
from autoshard_jax.placement.tasks import Task, sample_task
from autoshard_jax.stats import mean_se

HEURISTIC_ROWS = ("random", "dim_greedy", "size_greedy", "lookup_greedy", "size_lookup_greedy",
                  "torchrec_greedy", "spmd_greedy")
# autoshard_search: the policy's plan + local search ("policy + refinement"); greedy_search:
# the same search without the policy's start (api.GREEDY_SEARCH).
SEARCH_ROWS = ("autoshard", "autoshard_search", api.GREEDY_SEARCH)
LEARNED_ROWS = ("autoshard", "autoshard_search")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    num_tables: int
    num_devices: int
    unseen: float


def settings(base_t: int, base_d: int, tables=(10, 100, 200), devices=(2, 8, 16),
             unseen=(0.0, 0.5)) -> list[Setting]:
    """Base (all test tables unseen, as DreamShard) and one transfer axis at a time."""
    out = [Setting("base", base_t, base_d, 1.0)]
    out += [Setting(f"T={t}", t, base_d, 1.0) for t in tables if t != base_t]
    out += [Setting(f"D={d}", base_t, d, 1.0) for d in devices if d != base_d]
    out += [Setting(f"unseen={int(100 * u)}%", base_t, base_d, u) for u in unseen if u != 1.0]
    return out


def parse_setting(name: str, base_t: int, base_d: int) -> Setting:
    """'base', 'T=<tables>', 'D=<devices>' or 'unseen=<percent>%' (one axis off the base)."""
    try:
        if name == "base":
            return Setting(name, base_t, base_d, 1.0)
        key, value = name.split("=")
        if key == "T":
            return Setting(name, int(value), base_d, 1.0)
        if key == "D":
            return Setting(name, base_t, int(value), 1.0)
        if key == "unseen" and value.endswith("%"):
            return Setting(name, base_t, base_d, float(value[:-1]) / 100.0)
    except ValueError:
        pass
    raise InputError(f"unknown setting {name!r}: use base, T=<tables>, D=<devices> or "
                     "unseen=<percent>%")


def objective_of(rec: dict, objective: str) -> float:
    """The record's cost under `objective`; NaN for a method that found no legal plan."""
    if "failed" in rec:
        return float("nan")
    return rec["spmd_ms"] if objective == "spmd" else rec["max_ms"]


def reference_search(task: Task, start_T: np.ndarray, cost: Cost, objective: str,
                     score: Callable[[np.ndarray], dict], budget: int, seed: int = 0,
                     start: dict | None = None, confirm: bool = False
                     ) -> tuple[np.ndarray, dict]:
    """Budgeted local search: each proposal (one cost-model-guided move from the incumbent, or
    a random legal move when the model sees none) is scored and kept only if it is better.

    `start` is the start plan's record if already scored (with a noisy scorer: its median over
    rounds). With `confirm`, a proposal that scores better is measured again in a pair, the
    incumbent then the proposal back to back, and kept only if it beats the incumbent there
    too; it is valued at the mean of its two measurements. One lucky measurement does not move
    the search (session 8 saw it end 10% above its start without a second one), and a pair
    compares both plans in the same state of the machine: session 9's confirmation against the
    incumbent's older value still let the search end above its start on 10 of 23 tasks.
    """
    mem = memory_model(task.specs, task.memory_bytes)
    rng = np.random.default_rng(seed)
    best_T, best = np.asarray(start_T).copy(), start or score(start_T)
    single_T = single_costs(cost, table_features(task.specs), class_onehot(task.specs))
    for _ in range(budget):
        cand = search.local_search(task.specs, task.num_devices, mem, cost, objective, best_T,
                                   max_rounds=1, single_T=single_T)
        if (cand == best_T).all():
            cand = best_T.copy()
            t = int(rng.integers(len(cand)))
            others = [d for d in range(task.num_devices) if d != cand[t]]
            if not others:
                break
            cand[t] = int(rng.choice(others))
            phys = np.bincount(cand, mem.phys_T, task.num_devices)
            keys = np.bincount(cand, mem.keys_T, task.num_devices)
            if mem.allocated(phys.max(), keys.max()) > mem.budget:
                continue
        rec = score(cand)
        bar = objective_of(best, objective)
        if not objective_of(rec, objective) < bar:
            continue
        if confirm:
            incumbent, again = score(best_T), score(cand)
            if not objective_of(again, objective) < objective_of(incumbent, objective):
                continue
            field = "spmd_ms" if objective == "spmd" else "max_ms"
            rec = {**rec, field: (rec[field] + again[field]) / 2}
        best_T, best = cand, rec
    return best_T, best


def plan_methods(task: Task, objective: str, cost: Cost, policy: LoadedPolicy | None,
                 score: Callable[[np.ndarray], dict], search_time_s: float) -> dict:
    """Every method's plan on one task, timed and scored once; returns {method: record}."""
    out = {}
    rows = list(HEURISTIC_ROWS) + [api.GREEDY_SEARCH]
    if policy is not None:
        rows += ["autoshard", "autoshard_search"]
    for method in rows:
        if method == "autoshard":  # compile outside the timed call
            try:
                api.place_method(task.specs, task.num_devices, task.memory_bytes, method,
                                 objective=objective, policy=policy, cost=cost)
            except InputError:
                pass  # the timed call below fails the same way and records it
        t0 = time.perf_counter()
        try:
            device_T = api.place_method(task.specs, task.num_devices, task.memory_bytes, method,
                                        objective=objective, policy=policy, cost=cost,
                                        search_time_s=search_time_s)
        except InputError as e:  # e.g. a dead end on memory: reported, not hidden
            out[method] = {"failed": str(e), "time_s": time.perf_counter() - t0}
            continue
        elapsed = time.perf_counter() - t0
        out[method] = {**score(device_T), "time_s": elapsed, "device_T": device_T.tolist()}
    return out


def run_task(task: Task, objective: str, cost: Cost, policy: LoadedPolicy | None,
             make_score: Callable[[Task, str], Callable[[np.ndarray], dict]],
             reference_budget: int, search_time_s: float, rounds: int = 0,
             stored: dict | None = None) -> dict:
    """Every method's plan and the reference on one task; returns {method: record}.

    With `rounds` > 0 (a noisy scorer, the oracle) the methods' plans are re-measured in
    rounds to choose the reference search's start, the search confirms what it accepts in a
    measured pair against the incumbent, and
    then every plan, the reference's included, is measured afresh in rounds again: the values
    reported never come from the measurements that chose a plan. The reference is settled
    against its start (`settled_reference`).

    `stored` (this task's record from an earlier run) reuses that run's reference plan instead
    of searching again (`stored_reference`): a changed method is then re-evaluated at the cost
    of measuring its task's plans, every one of them afresh, not of the oracle-in-the-loop
    search (20 minutes per 200-table max_device task).
    """
    out = plan_methods(task, objective, cost, policy, cached(make_score(task, objective)),
                       search_time_s)
    if stored is not None:
        ref = stored_reference(stored, out)
        out["reference"] = {**make_score(task, objective)(np.asarray(ref["device_T"])), **ref}
    else:
        if rounds:
            out = remeasure(out, make_score(task, objective), rounds)
        # The reference searches table-wise plans: it starts from the best of them.
        ok = {m: r for m, r in out.items()
              if "failed" not in r and split.ROW_WISE not in r["device_T"]}
        start = min(ok, key=lambda m: objective_of(ok[m], objective))
        score = make_score(task, objective) if rounds else cached(make_score(task, objective))
        ref_T, ref = reference_search(task, np.asarray(ok[start]["device_T"]), cost, objective,
                                      score, reference_budget, start=ok[start],
                                      confirm=rounds > 0)
        out["reference"] = {**ref, "time_s": float("nan"), "device_T": ref_T.tolist(),
                            "start": start}
    if rounds:
        out = remeasure(out, make_score(task, objective), rounds)
        out["reference"] = settled_reference(out, objective)
    return out


def stored_reference(stored: dict, methods: dict) -> dict:
    """The reference plan of an earlier run's record of this task, to be measured afresh.

    The search's own end plan is taken even where that run settled on its start, and settles
    again against the start method's plan of this run. The stored heuristics' plans must equal
    this run's: otherwise the record is of another task (pool, seed, setting or memory).
    """
    for m in HEURISTIC_ROWS:
        old, new = stored["methods"].get(m, {}), methods.get(m, {})
        if old.get("device_T") != new.get("device_T"):
            raise InputError(f"the stored record of {stored['setting']} task {stored['task']} "
                             f"is of another task: its {m} plan differs from this run's (the "
                             "pool, seed, setting and memory cap must be the earlier run's)")
    ref = stored["methods"].get("reference")
    if ref is None or "device_T" not in ref:
        raise InputError(f"the stored record of {stored['setting']} task {stored['task']} has "
                         "no reference plan")
    plan = ref.get("search_end_T") or ref["device_T"]
    start = ref.get("start")
    return {"device_T": list(plan), "time_s": float("nan"), "reused": True,
            **({"start": start} if start in methods else {})}


def remeasure(methods: dict, score: Callable[[np.ndarray], dict], rounds: int) -> dict:
    """Every distinct plan measured afresh `rounds` times, interleaved; each method reports the
    median.

    The plans were chosen with one measurement each, and the reference search keeps the
    proposals whose measurements came out lowest, a winner's curse that flatters it by the
    noise (between rounds on this CPU a plan's measurements spread by 3-6% at the median,
    7-10% at the 90th percentile, for either objective). Fresh
    measurements in rounds over all plans are unbiased, and drift of the machine hits every
    plan of a round alike. Fields: `spmd_ms`,
    `device_ms` and `max_ms` become medians over rounds (per device for `device_ms`),
    `rounds_spmd_ms` / `rounds_max_ms` keep each round's value, `first_*` the selection-time one.
    """
    plans = {}
    for rec in methods.values():
        if "device_T" in rec:
            plans.setdefault(tuple(rec["device_T"]), None)
    keys = list(plans)
    taken: dict[tuple, list[dict]] = {k: [] for k in keys}
    for r in range(rounds):
        # Rotate the order so that no plan is always measured first (cold) or last.
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            taken[k].append(score(np.asarray(k)))
    out = {}
    for name, rec in methods.items():
        if "device_T" not in rec:
            out[name] = rec
            continue
        runs = taken[tuple(rec["device_T"])]
        # A second remeasure keeps the selection-time value, not the first rounds' median.
        new = dict(rec, first_spmd_ms=rec.get("first_spmd_ms", rec["spmd_ms"]),
                   first_max_ms=rec.get("first_max_ms", rec["max_ms"]))
        spmd = [x["spmd_ms"] for x in runs]
        new["rounds_spmd_ms"], new["spmd_ms"] = spmd, float(np.median(spmd))
        if rec["device_ms"]:
            dev_RxD = np.asarray([x["device_ms"] for x in runs])
            new["device_ms"] = np.median(dev_RxD, axis=0).tolist()
            new["rounds_max_ms"] = dev_RxD.max(axis=1).tolist()
            new["max_ms"] = float(max(new["device_ms"]))
        out[name] = new
    return out


def cached(score: Callable[[np.ndarray], dict]) -> Callable[[np.ndarray], dict]:
    """Scores each distinct plan once (methods often agree; oracle time is the budget)."""
    seen: dict[tuple, dict] = {}

    def score_once(device_T):
        key = tuple(int(d) for d in device_T)
        if key not in seen:
            seen[key] = score(device_T)
        return seen[key]
    return score_once


def predicted_scorer(task: Task, cost: Cost) -> Callable[[np.ndarray], dict]:
    def score(device_T):
        dev_D, spmd = plan_costs(cost, *split.expand(task.specs, device_T, task.num_devices),
                                 task.num_devices)
        return {"device_ms": dev_D.tolist(), "max_ms": float(dev_D.max()), "spmd_ms": spmd}
    return score


def oracle_scorer(task: Task, batch_size: int, protocol=None, objective: str | None = None,
                  every_device: bool = True) -> Callable[[np.ndarray], dict]:
    """Measured costs of a plan. With `objective`, only what it ranks by is timed (oracle time
    is the evaluation's budget): spmd the plan's step, max_device each device's tables; the
    other field is NaN. `every_device`: the step's compute is its slowest device's (False: the
    busiest device's alone; `oracle.measure_plan`)."""
    from autoshard_jax.cost import oracle
    from autoshard_jax.placement.evaluate import device_tables

    kw = {} if protocol is None else {"protocol": protocol}

    def score(device_T):
        plan = api.plan_of(task.specs, device_T, task.num_devices, task.memory_bytes)
        out = {"device_ms": [], "max_ms": float("nan"), "spmd_ms": float("nan")}
        if objective in (None, "max_device"):
            out["device_ms"] = [oracle.measure_set(t, batch_size, **kw).total_ms if t else 0.0
                                for t in device_tables(task.specs, plan)]
            out["max_ms"] = max(out["device_ms"])
        if objective in (None, "spmd"):
            out["spmd_ms"] = oracle.measure_plan(task.specs, plan, batch_size,
                                                 every_device=every_device, **kw).total_ms
        return out
    return score


def run_setting(setting: Setting, objective: str, train_pool, test_pool, num_tasks: int,
                mem_factor: float, seed: int, make_score, cost: Cost,
                policy: LoadedPolicy | None, results_path: str, reference_budget: int,
                search_time_s: float, log=print, rounds: int = 0,
                stored: dict | None = None) -> list[dict]:
    """All tasks of a setting, appended to `results_path` as they finish (resumable).

    With `rounds` > 0 plans are re-measured in rounds (`run_task`); use it with a noisy
    scorer (the oracle), not with the deterministic cost model. `stored` maps (setting,
    objective, task) to an earlier run's records, whose reference plans are reused.
    """
    done = {(r["setting"], r["objective"], r["task"]): r for r in read_results(results_path)}
    rng = np.random.default_rng([seed, setting.num_tables, setting.num_devices,
                                 int(100 * setting.unseen)])
    records = []
    for i in range(num_tasks):
        task = sample_task(train_pool, test_pool, setting.num_tables, setting.num_devices, rng,
                           setting.unseen, mem_factor)
        key = (setting.name, objective, i)
        if key in done:
            records.append(done[key])
            continue
        if stored is not None and key not in stored:
            raise InputError(f"the stored results have no record of {setting.name} {objective} "
                             f"task {i} to take its reference from")
        res = run_task(task, objective, cost, policy, make_score, reference_budget,
                       search_time_s, rounds, stored[key] if stored is not None else None)
        rec = {"setting": setting.name, "objective": objective, "task": i, "T": len(task.specs),
               "D": task.num_devices, "memory_bytes": task.memory_bytes, "methods": res}
        with open(results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        log(f"{setting.name} {objective} task {i}: " + ", ".join(
            f"{m}={objective_of(r, objective):.3f}" for m, r in res.items()))
    return records


def settled_reference(methods: dict, objective: str) -> dict:
    """The reference, or its start plan where re-measurement shows the search ended above it.

    The reference search accepts a proposal on one or two measurements, so noise can carry it
    to a worse plan; a local search that keeps only improvements cannot end above its start,
    so with re-measured rounds the better of the two is the best-known plan. The start is
    recorded in the reference (`start`); results written before that record none, and their
    search started from the lowest first measurement of any method. Settling twice changes
    nothing.
    """
    ref = methods.get("reference")
    first = "first_spmd_ms" if objective == "spmd" else "first_max_ms"
    if ref is None or first not in ref:  # no re-measured rounds: nothing to settle
        return ref
    if "start" in ref:
        start = methods[ref["start"]]
    else:
        ok = [r for m, r in methods.items() if m != "reference" and first in r
              and not np.isnan(r[first])]
        if not ok:
            return ref
        start = min(ok, key=lambda r: r[first])
    if objective_of(start, objective) < objective_of(ref, objective):
        return {**start, "time_s": float("nan"), "kept_start": True,
                "start": ref.get("start"), "search_end_ms": objective_of(ref, objective),
                "search_end_T": ref.get("device_T")}
    return ref


def read_results(path: str) -> list[dict]:
    return read_jsonl(path)


def table(records: Sequence[dict], objective: str, tie_rel: float) -> str:
    """Markdown: mean cost, mean ratios to size-lookup greedy / spmd_greedy / reference,
    win / tie / loss against size-lookup greedy and against spmd_greedy (tie: within tie_rel),
    sharding time; with re-measured rounds (`remeasure`), the noise they showed. The reference
    row is `settled_reference`."""
    if not records:
        raise InputError("no results to tabulate")
    records = [{**r, "methods": {**r["methods"], "reference": settled_reference(
        r["methods"], objective)}} if "reference" in r["methods"] else r for r in records]
    methods = list(records[0]["methods"])
    lines = [f"| method | mean {objective} ms | / size_lookup_greedy | / spmd_greedy | "
             "/ reference | W/T/L vs SLG | W/T/L vs spmd_greedy | shard time s |",
             "|---" * 8 + "|"]

    def wtl(cost, other):
        base = np.asarray([objective_of(r["methods"][other], objective) for r in records])
        rel = cost / base - 1.0
        out = f"{(rel < -tie_rel).sum()}/{(abs(rel) <= tie_rel).sum()}/{(rel > tie_rel).sum()}"
        fails = int(np.isnan(cost).sum())
        return out + (f" ({fails} failed)" if fails else "")

    for m in methods:
        cost = np.asarray([objective_of(r["methods"][m], objective) for r in records])

        def ratio(other, cost=cost):
            return np.nanmean(cost / np.asarray([objective_of(r["methods"][other], objective)
                                                  for r in records]))
        times = [r["methods"][m]["time_s"] for r in records]
        t = "-" if m == "reference" else f"{np.mean(times):.4f}"
        lines.append(f"| {m} | {np.nanmean(cost):.3f} | {ratio('size_lookup_greedy'):.3f} | "
                     f"{ratio('spmd_greedy'):.3f} | {ratio('reference'):.3f} | "
                     f"{wtl(cost, 'size_lookup_greedy')} | {wtl(cost, 'spmd_greedy')} | {t} |")
    field = "rounds_spmd_ms" if objective == "spmd" else "rounds_max_ms"
    spreads = [(max(x) - min(x)) / np.median(x) for r in records for x in
               {tuple(rec[field]) for rec in r["methods"].values() if field in rec}]
    if spreads:
        lines.append(f"\nRe-measured plans: median relative spread of a plan's rounds "
                     f"{np.median(spreads):.1%} (90th percentile {np.quantile(spreads, 0.9):.1%}); "
                     f"ties are within {tie_rel:.0%}.")
    return "\n".join(lines)


def paired_gap(cost_N: np.ndarray, base_N: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over tasks of `cost / base - 1` (NaN SE for one task).

    Both plans of a task are measured in the same interleaved rounds (`remeasure`), so the
    per-task ratio cancels what the task and the machine's drift share; its spread across
    tasks is the noise a verdict on the mean has to clear.
    """
    return mean_se(np.asarray(cost_N, float) / np.asarray(base_N, float) - 1.0)


def _gap_text(mean: float, se: float) -> str:
    return f"{mean:+.1%}" + ("" if np.isnan(se) else f" ± {se:.1%}")


def summary(by_setting: dict[str, Sequence[dict]], objective: str) -> str:
    """Markdown verdict per setting: each learned method's and the reference's paired gap
    (`paired_gap`) to the setting's best heuristic, and whether a learned method has a lower
    mean plan cost than every heuristic (the issue's acceptance), beyond 2 standard errors
    or within them; then the gaps pooled over all tasks.

    The best heuristic is the one with the lowest mean, chosen after measuring: with noise,
    the minimum of several means reads low, so the verdict leans towards the heuristics. A
    heuristic that failed a task is not a candidate; a learned method that failed one has no
    gap. The reference's gap is the headroom: what the best-known plan gains on the heuristic.
    """
    lines = [f"| setting | tasks | best heuristic, mean {objective} ms | "
             + " | ".join(f"{m} (gap)" for m in LEARNED_ROWS)
             + " | reference (headroom) | lower mean than every heuristic? |",
             "|---" * (len(LEARNED_ROWS) + 5) + "|"]
    pooled: dict[str, list[float]] = {m: [] for m in (*LEARNED_ROWS, "reference")}
    for name, recs in by_setting.items():
        recs = [{**r, "methods": {**r["methods"], "reference": settled_reference(
            r["methods"], objective)}} if "reference" in r["methods"] else r for r in recs]

        def costs(m, recs=recs):
            return np.asarray([objective_of(r["methods"][m], objective)
                               if m in r["methods"] else np.nan for r in recs])
        heur = {m: costs(m).mean() for m in HEURISTIC_ROWS
                if all(m in r["methods"] for r in recs)}
        heur = {m: v for m, v in heur.items() if not np.isnan(v)}
        if not heur:
            lines.append(f"| {name} | {len(recs)} | no heuristic planned every task |"
                         + " - |" * (len(LEARNED_ROWS) + 2))
            continue
        best = min(heur, key=heur.get)
        base = costs(best)
        cells, learned = [], {}
        for m in (*LEARNED_ROWS, "reference"):
            c = costs(m)
            if np.isnan(c).all():
                cells.append("-")
                continue
            if np.isnan(c).any():
                cells.append(f"failed {int(np.isnan(c).sum())} of {len(c)}")
                continue
            gap, se = paired_gap(c, base)
            pooled[m] += (c / base - 1.0).tolist()
            cells.append(f"{c.mean():.2f} ({_gap_text(gap, se)})")
            if m != "reference":
                learned[m] = (c.mean(), gap, se)
        if learned:
            m = min(learned, key=lambda k: learned[k][0])
            _, gap, se = learned[m]
            lower = learned[m][0] < heur[best]
            clear = abs(gap) > 2 * se and (gap < 0) == lower  # the gap agrees, by 2 SE
            verdict = ("yes" if lower else "no") + (
                f" ({m}; 1 task)" if np.isnan(se) else
                f" ({m}; {'beyond' if clear else 'within'} 2 SE)")
        else:
            verdict = "no learned method"
        lines.append(f"| {name} | {len(recs)} | {best} {heur[best]:.2f} | "
                     + " | ".join(cells) + f" | {verdict} |")
    done = [f"{m} {_gap_text(*mean_se(v))} ({len(v)} tasks)" for m, v in pooled.items() if v]
    if done:
        lines.append("\nPooled over the settings, gap to each setting's best heuristic: "
                     + "; ".join(done) + ".")
    return "\n".join(lines)


def bar_chart(record: dict, objective: str, out_png: str) -> None:
    """Per-device costs of one task, one group of bars per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in record["methods"] if record["methods"][m].get("device_ms")]
    if not methods:  # an spmd-only oracle evaluation times no per-device costs
        return
    d = len(record["methods"][methods[0]]["device_ms"])
    fig, ax = plt.subplots(figsize=(max(8, len(methods) * 1.1), 4))
    width = 0.8 / d
    for j in range(d):
        ax.bar(np.arange(len(methods)) + j * width,
               [record["methods"][m]["device_ms"][j] for m in methods], width)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30, ha="right")
    ax.set_ylabel("device ms (own tables)")
    ax.set_title(f"{record['setting']} task {record['task']}: per-device cost, objective "
                 f"{objective} (T={record['T']}, D={record['D']})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
