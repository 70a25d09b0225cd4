"""Fits every swept axis of a sweep directory and writes fits.json, report.md and PNG plots."""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np

from autoshard_jax.errors import InputError
from scaling_laws import fit as fitlib


def load_results(sweep_dir: str) -> dict[str, list[dict]]:
    """{axis: finished run records sorted by x} from DIR/<axis>/<run>.json."""
    if not os.path.isdir(sweep_dir):
        raise InputError(f"--workdir {sweep_dir!r} is not a directory (run launch.scaling_sweep "
                         "into it first)")
    out: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "*.json"))):
        try:
            with open(path) as f:
                record = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}); delete it to re-run that run") from e
        if not isinstance(record, dict) or "axis" not in record or "eval" not in record:
            continue
        out.setdefault(record["axis"], []).append(record)
    if not out:
        raise InputError(f"{sweep_dir} holds no finished runs (DIR/<axis>/<run>.json)")
    return {k: sorted(v, key=lambda r: r["x"]) for k, v in out.items()}


def fit_axis(axis: str, records: list[dict], *, holdout: int = 1, bootstrap: int = 1000,
             tolerance: float = 0.005, max_ne: float = 1.0) -> tuple[dict, dict]:
    """The fits.json entry of one axis, and the fit objects the plots need.

    Runs with NE >= max_ne have not beaten the constant base-rate predictor (NE 1): they sit in
    Hestness et al.'s small-data region, before the power law starts, and are left out of the fit
    (listed under "excluded_runs" and drawn grey).
    """
    excluded = [r for r in records if r["eval"]["ne"] >= max_ne]
    records = [r for r in records if r["eval"]["ne"] < max_ne]
    x = np.array([r["x"] for r in records], float)
    y = np.array([r["eval"]["ne"] for r in records], float)
    fitlib.check_series(axis, x, y, tolerance)
    full = fitlib.fit_power_law(x, y, bootstrap=bootstrap)
    squares = fitlib.fit_power_law(x, y, loss="squares", bootstrap=0)
    ext = fitlib.extrapolation_check(x, y, holdout, bootstrap=bootstrap)
    ext_sq = fitlib.extrapolation_check(x, y, holdout, loss="squares", bootstrap=0)
    a0, b0 = fitlib.fit_no_constant(x, y)
    teacher = [r["teacher"]["teacher_ne"] for r in records if r.get("teacher")]
    entry = {
        **full.to_json(), "x_name": records[0]["x_name"], "num_runs": len(records),
        "x": x.tolist(), "ne": y.tolist(),
        "auc": [r["eval"]["auc"] for r in records],
        "train_flops": [r["train_flops"] for r in records],
        "params_total": [r["params"]["total"] for r in records],
        "wall_time_s": float(sum(r["wall_time_s"] for r in records)),
        "extrapolation_error": ext["relative_error"],
        "extrapolation": {k: v for k, v in ext.items() if k != "fit"},
        "least_squares": {**squares.to_json(), "extrapolation_error": ext_sq["relative_error"]},
        "no_constant": {"a": a0, "b": b0},
        "excluded_runs": [{"x": r["x"], "ne": r["eval"]["ne"]} for r in excluded],
    }
    if "fit" in ext:
        entry["extrapolation"]["fit"] = ext["fit"].to_json()
        entry["extrapolation"]["predicted_ne"] = ext["predicted_ne"]
    if teacher:
        t = float(np.mean(teacher))
        entry["teacher_ne"] = t
        entry["c_minus_teacher"] = full.c - t
        entry["teacher_in_ci"] = bool(full.ci and full.ci["c"][0] <= t <= full.ci["c"][1])
    return entry, {"full": full, "ext": ext.get("fit"), "squares": squares}


def fit_joint_entry(results: dict[str, list[dict]], max_ne: float = 1.0) -> dict | None:
    """Joint L(N, D) over the data axis and the dense-parameter axes (N = dense parameters)."""
    runs = list(results.get("data", []))
    for axis in ("mlp", "over_arch", "depth"):
        runs += results.get(axis, [])
    runs = [r for r in runs if r["eval"]["ne"] < max_ne]
    if "data" not in results or len(runs) <= len(results["data"]) or len(runs) < 6:
        return None
    n = np.array([r["params"]["dense"] for r in runs], float)
    d = np.array([r["train_samples"] for r in runs], float)
    y = np.array([r["eval"]["ne"] for r in runs], float)
    joint = fitlib.fit_joint(n, d, y)
    k = float(np.median([r["train_flops"] / (r["params"]["dense"] * r["train_samples"])
                         for r in runs]))
    c_max = max(r["train_flops"] for r in runs)
    allocation = {}
    for mult in (1, 10, 100):
        n_opt, d_opt = joint.compute_optimal(c_max * mult, k)
        allocation[f"{c_max * mult:.3g}"] = {"dense_params": n_opt, "train_samples": d_opt}
    pred = joint.predict(n, d)
    return {**joint.to_json(), "num_runs": len(runs), "flops_per_param_sample": k,
            "n_opt_exponent": joint.beta / (joint.alpha + joint.beta),
            "max_relative_residual": float(np.max(np.abs(pred - y) / y)),
            "compute_optimal": allocation,
            "note": "N = dense parameters; C = k N D with k the median of FLOPs / (N D) over runs"}


def fit_sweep(sweep_dir: str, *, holdout: int = 1, bootstrap: int = 1000,
              tolerance: float = 0.005, max_ne: float = 1.0,
              joint: bool = True) -> tuple[dict, dict, dict]:
    """(fits, fit objects, errors by axis) for every axis in the sweep directory."""
    results = load_results(sweep_dir)
    fits, objects, errors = {}, {}, {}
    for axis, records in results.items():
        try:
            fits[axis], objects[axis] = fit_axis(axis, records, holdout=holdout,
                                                 bootstrap=bootstrap, tolerance=tolerance,
                                                 max_ne=max_ne)
        except InputError as e:
            errors[axis] = str(e)
            fits[axis] = {"error": str(e), "num_runs": len(records)}
    if joint:
        entry = fit_joint_entry(results, max_ne)
        if entry:
            fits["joint"] = entry
    runs = [r for v in results.values() for r in v]
    fits["study"] = {"num_runs": len(runs),
                     "total_wall_time_s": float(sum(r["wall_time_s"] for r in runs)),
                     "total_train_flops": float(sum(r["train_flops"] for r in runs)),
                     "cpu": runs[0]["host"]["cpu"], "backend": runs[0]["host"]["backend"]}
    return fits, objects, results


def _plot_axis(path, axis, entry, obj, records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array(entry["x"])
    y = np.array(entry["ne"])
    grid = np.geomspace(min([x.min()] + [r["x"] for r in entry["excluded_runs"]]) / 1.5,
                        x.max() * 3, 200)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    held = len(entry["extrapolation"].get("held_out_x", []))
    fit_x, fit_y = (x[:-held], y[:-held]) if held else (x, y)
    ax.plot(fit_x, fit_y, "o", color="C0", label="runs (fitted)")
    if entry["excluded_runs"]:
        ax.plot([r["x"] for r in entry["excluded_runs"]], [r["ne"] for r in entry["excluded_runs"]],
                "x", color="gray", label="NE >= 1: small-data region, not fitted")
    ext = obj["ext"]
    if held and ext is not None:
        ax.plot(x[-held:], y[-held:], "s", color="C3", ms=8, label="held-out runs")
        lo, hi = ext.band(grid)
        ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, label="95% bootstrap band")
        ax.plot(grid, ext.predict(grid), "-", color="C0",
                label=f"fit w/o held-out: {ext.a:.3g} x^-{ext.b:.3g} + {ext.c:.4f}")
    full = obj["full"]
    ax.plot(grid, full.predict(grid), "--", color="k", lw=1,
            label=f"fit on all runs: c = {full.c:.4f}")
    sq = obj["squares"]
    ax.plot(grid, sq.predict(grid), ":", color="C2", lw=1, label="least-squares baseline")
    if "teacher_ne" in entry:
        ax.axhline(entry["teacher_ne"], color="C1", ls="-.", lw=1,
                   label=f"teacher (Bayes) NE {entry['teacher_ne']:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel(entry["x_name"].replace("_", " "))
    ax.set_ylabel("held-out NE")
    ax.set_title(f"{axis} axis: NE = a x^-b + c")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_efficiency(path, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (axis, records) in enumerate(sorted(results.items())):
        ne = [r["eval"]["ne"] for r in records]
        ax1.plot([r["train_flops"] for r in records], ne, "o-", color=f"C{i}", label=axis)
        x0 = records[0]["x"]
        ax2.plot([r["x"] / x0 for r in records], ne, "o-", color=f"C{i}",
                 label=f"{axis} ({records[0]['x_name'].replace('_', ' ')})")
    teacher = [r["teacher"]["teacher_ne"] for v in results.values() for r in v
               if r.get("teacher")]
    for ax in (ax1, ax2):
        if teacher:
            ax.axhline(float(np.mean(teacher)), color="gray", ls="-.", lw=1, label="teacher NE")
        ax.set_xscale("log")
        ax.set_ylabel("held-out NE")
        ax.legend(fontsize=8)
    ax1.set_xlabel("training FLOPs (compute)")
    ax1.set_title("scaling efficiency: NE per unit of compute")
    ax2.set_xlabel("multiple of the axis's smallest resource (samples or parameters)")
    ax2.set_title("NE per doubling of each resource, by scaling scheme")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_ci(ci, key):
    return f"[{ci[key][0]:.4g}, {ci[key][1]:.4g}]" if ci else "-"


def _report(fits: dict, results: dict, plots: list[str]) -> str:
    study = fits["study"]
    lines = ["# Scaling-law fits", "",
             f"{study['num_runs']} runs, {study['total_train_flops']:.3g} training FLOPs, "
             f"{study['total_wall_time_s'] / 60:.1f} min of run wall time on {study['cpu']} "
             f"({study['backend']}).", "",
             "NE(x) = a x^-b + c; Huber (delta 1e-3) in log space, L-BFGS from a grid of starts; "
             "95% residual-bootstrap intervals; extrapolation = fit without the largest run, "
             "relative error of its prediction. Runs with NE >= 1 (no better than the base rate) "
             "are not fitted.", "",
             "| axis | x | runs | a | b | c | c 95% CI | teacher NE | extrap. err | "
             "LS b | LS c | LS extrap. err |", "|" + "---|" * 12]
    for axis, e in fits.items():
        if axis in ("study", "joint"):
            continue
        if "error" in e:
            lines.append(f"| {axis} | | {e['num_runs']} | not fitted: {e['error']} |" + " |" * 8)
            continue
        ls = e["least_squares"]
        err = e["extrapolation_error"]
        ls_err = ls["extrapolation_error"]
        lines.append(
            f"| {axis} | {e['x_name']} | {e['num_runs']} | {e['a']:.4g} | {e['b']:.4f} | "
            f"{e['c']:.4f} | {_fmt_ci(e['ci'], 'c')} | {e.get('teacher_ne', float('nan')):.4f} | "
            f"{'-' if err is None else f'{100 * err:.2f}%'} | {ls['b']:.4f} | {ls['c']:.4f} | "
            f"{'-' if ls_err is None else f'{100 * ls_err:.2f}%'} |")
    if "joint" in fits:
        j = fits["joint"]
        lines += ["", "## Joint fit L(N, D) = E + A/N^alpha + B/D^beta (N = dense parameters)", "",
                  f"E = {j['E']:.4f}, A = {j['A']:.4g}, alpha = {j['alpha']:.4f}, "
                  f"B = {j['B']:.4g}, beta = {j['beta']:.4f} over {j['num_runs']} runs "
                  f"(max relative residual {100 * j['max_relative_residual']:.2f}%). "
                  f"Compute-optimal N_opt ~ C^{j['n_opt_exponent']:.3f} with C = "
                  f"{j['flops_per_param_sample']:.3g} N D:", ""]
        for c, alloc in j["compute_optimal"].items():
            lines.append(f"- C = {c} FLOPs: N_opt = {alloc['dense_params']:.3g} dense "
                         f"parameters, D_opt = {alloc['train_samples']:.3g} samples")
    lines += ["", "## Runs", "", "| axis | run | x | samples | params (emb / dense) | "
              "train FLOPs | NE | log loss | AUC | wall s |", "|" + "---|" * 10]
    for axis, records in results.items():
        for r in records:
            p = r["params"]
            lines.append(f"| {axis} | {r['name']} | {r['x']:.4g} | {r['train_samples']} | "
                         f"{p['embedding']} / {p['dense']} | {r['train_flops']:.3g} | "
                         f"{r['eval']['ne']:.5f} | {r['eval']['log_loss']:.5f} | "
                         f"{r['eval']['auc']:.4f} | {r['wall_time_s']:.1f} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_outputs(sweep_dir: str, fits: dict, objects: dict, results: dict) -> list[str]:
    """fits.json, report.md and the PNGs; returns the paths written."""
    for stale in glob.glob(os.path.join(sweep_dir, "ne_vs_*.png")):
        os.remove(stale)  # from an earlier fit of an axis that no longer fits
    plots = []
    for axis, obj in objects.items():
        name = f"ne_vs_{axis}.png"
        _plot_axis(os.path.join(sweep_dir, name), axis, fits[axis], obj, results[axis])
        plots.append(name)
    _plot_efficiency(os.path.join(sweep_dir, "scaling_efficiency.png"), results)
    plots.append("scaling_efficiency.png")

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    with open(os.path.join(sweep_dir, "fits.json"), "w") as f:
        json.dump(json.loads(json.dumps(fits, default=clean)), f, indent=1)
    with open(os.path.join(sweep_dir, "report.md"), "w") as f:
        f.write(_report(fits, results, plots))
    return [os.path.join(sweep_dir, p) for p in ["fits.json", "report.md", *plots]]
