"""The cost models' held-out report: a Markdown table and a predicted-vs-measured scatter."""

from __future__ import annotations

import os

import numpy as np

SETTINGS = {"max_device": "max_device (one device's fused tables; the papers')",
            "spmd": "spmd (padded SPMD program + exchange; this project's)"}


def markdown(report: dict, noise: dict, meta: dict, unseen: dict | None = None) -> str:
    lines = [f"# Cost models, held-out test split ({meta.get('backend')}, batch "
             f"{meta.get('batch_size')}, {meta.get('num_sets', 0)} sets, "
             f"{meta.get('num_plans', 0)} plans)", ""]
    for key, kind in (("max_device", "set"), ("spmd", "plan")):
        if key not in report:
            continue
        n = noise.get(kind)
        floor = (f"noise floor (two measurements of one entry): MAPE {n['floor_mape']:.3f}, "
                 f"Kendall tau {n['ceiling_tau']:.3f} over {n['pairs']} pairs") if n else \
            "noise floor: no repeated measurements"
        lines += [f"## {SETTINGS[key]}", "", floor, "",
                  "| model | MAPE | R^2 | Kendall tau | n |", "|---|---|---|---|---|"]
        for model, s in report[key].items():
            lines.append(f"| {model} | {s['mape']:.4f} | {s['r2']:.4f} | "
                         f"{s['kendall_tau']:.4f} | {s['n']} |")
        lines.append("")
    if unseen:
        where = ", ".join(unseen["data"])
        lines += [f"## The network on tables the training data never had ({where})",
                  "", "spread: sd of log(predicted / measured) about its mean (a common scale, "
                  "such as the collection's unit, drops out)", "",
                  "| setting | MAPE | spread | Kendall tau | n |", "|---|---|---|---|---|"]
        for key in ("max_device", "spmd"):
            if key in unseen:
                s = unseen[key]
                lines.append(f"| {key} | {s['mape']:.4f} | {s['spread']:.4f} | "
                             f"{s['kendall_tau']:.4f} | {s['n']} |")
        lines.append("")
    return "\n".join(lines)


def scatter_png(path: str | os.PathLike, panels: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """One log-log panel per setting: predicted against measured ms, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, (measured, predicted)) in zip(axes[0], panels.items(), strict=True):
        ax.scatter(measured, predicted, s=6, alpha=0.6)
        lo = min(measured.min(), predicted.min())
        hi = max(measured.max(), predicted.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured ms")
        ax.set_ylabel("predicted ms")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
