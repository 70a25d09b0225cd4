"""summary.json, the Markdown table and the AUC-per-period plot, from the per-period records.

Per seed, a method's score is its mean over the test periods; the summary gives the mean and
standard deviation of that score over seeds, the per-period win rate against Batch Update (ties
count half) and the paired difference to Batch Update with its standard error over seeds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from autoshard_jax.stats import mean_se


def _mean_std(x: Sequence[float]) -> dict:
    a = np.asarray(x, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "n": int(a.size)}


def _diff(a: Sequence[float], b: Sequence[float]) -> dict:
    mean, se = mean_se(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"mean": mean, "se": se}


def summarize(rows: list[dict], methods: Sequence[str], seeds: Sequence[int],
              periods: Sequence[int]) -> dict:
    """The summary over complete (seed, method) runs; incomplete ones are listed, not scored."""
    by = {(r["seed"], r["method"], r["period"]): r for r in rows}
    complete = [s for s in seeds if all((s, m, p) in by for m in methods for p in periods)]
    out = {"test_periods": list(periods), "seeds": complete,
           "incomplete_seeds": [s for s in seeds if s not in complete], "methods": {}}
    if not complete:
        return out
    per_seed = {m: {k: [float(np.mean([by[s, m, p][k] for p in periods])) for s in complete]
                    for k in ("auc", "ne", "log_loss")} for m in methods}
    for m in methods:
        entry = {"mean_test_auc": _mean_std(per_seed[m]["auc"]),
                 "mean_test_ne": _mean_std(per_seed[m]["ne"]),
                 "mean_test_log_loss": _mean_std(per_seed[m]["log_loss"])}
        if "bu" in methods:
            wins = [1.0 if by[s, m, p]["auc"] > by[s, "bu", p]["auc"] else
                    0.5 if by[s, m, p]["auc"] == by[s, "bu", p]["auc"] else 0.0
                    for s in complete for p in periods]
            entry["win_rate_vs_bu"] = float(np.mean(wins))
            entry["auc_diff_vs_bu"] = _diff(per_seed[m]["auc"], per_seed["bu"]["auc"])
            entry["ne_diff_vs_bu"] = _diff(per_seed[m]["ne"], per_seed["bu"]["ne"])
        if "hint" in methods:
            entry["auc_diff_vs_hint"] = _diff(per_seed[m]["auc"], per_seed["hint"]["auc"])
        diag = [by[s, m, p] for s in complete for p in periods]
        if all("grad_variation" in r for r in diag):
            entry["mean_grad_variation"] = float(np.mean([r["grad_variation"] for r in diag]))
        if all("forecast_error" in r for r in diag):
            entry["mean_forecast_error"] = float(np.mean([r["forecast_error"] for r in diag]))
        if all("gate" in r for r in diag):
            entry["mean_gate"] = float(np.mean([r["gate"] for r in diag]))
        out["methods"][m] = entry
    first = [by[s, methods[0], p] for s in complete for p in periods]
    if all("bayes_ne" in r for r in first):
        out["bayes"] = {"mean_test_ne": _mean_std([np.mean([by[s, methods[0], p]["bayes_ne"]
                                                            for p in periods]) for s in complete]),
                        "mean_test_auc": _mean_std([np.mean([by[s, methods[0], p]["teacher_auc"]
                                                             for p in periods])
                                                    for s in complete])}
    return out


def markdown(summary: dict, title: str) -> str:
    n = len(summary["seeds"])
    lines = [f"## {title}", "",
             f"Mean over test periods {summary['test_periods'][0]}..{summary['test_periods'][-1]}"
             f", mean +- std over {n} seeds; differences are paired per seed, +- one standard "
             "error.", "",
             "| method | AUC | NE | win rate vs BU | AUC - BU (+- SE) | AUC - hint (+- SE) | "
             "forecast err / grad variation | gate |", "|---|---|---|---|---|---|---|---|"]

    def fmt(d, digits=4):
        return f"{d['mean']:.{digits}f} +- {d['std']:.{digits}f}"

    def dfmt(d):
        return "" if d is None else f"{d['mean']:+.4f} +- {d['se']:.4f}"

    for m, e in summary["methods"].items():
        ratio = ""
        if "mean_forecast_error" in e and e.get("mean_grad_variation"):
            ratio = f"{e['mean_forecast_error'] / e['mean_grad_variation']:.3f}"
        gate = f"{e['mean_gate']:.2f}" if "mean_gate" in e else ""
        lines.append(f"| {m} | {fmt(e['mean_test_auc'])} | {fmt(e['mean_test_ne'])} | "
                     f"{e.get('win_rate_vs_bu', float('nan')):.3f} | "
                     f"{dfmt(e.get('auc_diff_vs_bu'))} | {dfmt(e.get('auc_diff_vs_hint'))} | "
                     f"{ratio} | {gate} |")
    if "bayes" in summary:
        b = summary["bayes"]
        lines.append(f"| (Bayes teacher) | {fmt(b['mean_test_auc'])} | {fmt(b['mean_test_ne'])} "
                     "| | | | | |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], methods: Sequence[str], seeds: Sequence[int], path: str,
         title: str) -> None:
    """AUC per period per method (mean over seeds), test periods and the first deployment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in methods:
        pts: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] == m and r["seed"] in seeds:
                pts.setdefault(r["period"], []).append(r["auc"])
        if pts:
            ps = sorted(pts)
            ax.plot(ps, [np.mean(pts[p]) for p in ps], marker=".", label=m)
    ax.set_xlabel("period (deployed model scored on it)")
    ax.set_ylabel(f"AUC (mean over {len(seeds)} seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(workdir: str, rows: list[dict], methods: Sequence[str], seeds: Sequence[int],
              periods: Sequence[int], title: str) -> dict:
    summary = summarize(rows, methods, seeds, periods)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if summary["methods"]:
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(markdown(summary, title))
    plot(rows, methods, summary["seeds"] or list(seeds), os.path.join(workdir, "auc.png"), title)
    return summary
