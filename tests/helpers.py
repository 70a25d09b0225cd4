"""Helpers shared by the test modules (imported as `helpers`; conftest puts tests/ on the path)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from autoshard_jax.sharding.plan import plan_from_mapping, save_plan
from autoshard_jax.tables.spec import TableSpec, save_tables

# A small planned model on 4 devices with every placement kind (the sharded-training tests').
PLANNED_TABLES = [TableSpec("ads", 3000, 16, 1.0), TableSpec("users", 5000, 8, 3.0),
                  TableSpec("pages", 200, 32, 2.0), TableSpec("geo", 40, 4, 1.0),
                  TableSpec("hist", 1000, 16, 6.0), TableSpec("device", 12, 8, 1.0)]
PLANNED_MAPPING = {"ads": 0, "users": "row_wise", "pages": 1, "geo": "replicated", "hist": 3,
                   "device": 2}


def write_planned_inputs(tmp_path, num_devices: int = 4, memory: int = 1 << 30
                         ) -> tuple[str, str]:
    """(tables.json, plan.json) paths of the planned model, written into tmp_path."""
    tables_path, plan_path = tmp_path / "tables.json", tmp_path / "plan.json"
    save_tables(tables_path, PLANNED_TABLES)
    save_plan(plan_path, plan_from_mapping(PLANNED_MAPPING, num_devices, memory))
    return str(tables_path), str(plan_path)


def random_batches(specs: Sequence[TableSpec], n: int, batch: int, dense_dim: int,
                   seed: int = 0, pad: float = 0.25) -> list[dict]:
    """Host batches with Zipf-skewed ids, `pad` of the slots -1, duplicates within bags and
    across the batch (sample 0 is one id repeated), and an empty last bag."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = []
        for s in specs:
            ids_BxH = np.minimum(rng.zipf(1.3, (batch, s.hotness)) - 1, s.rows - 1)
            ids_BxH = ids_BxH.astype(np.int32)
            ids_BxH[rng.random(ids_BxH.shape) < pad] = -1
            ids_BxH[0, :] = s.rows - 1
            ids_BxH[-1, :] = -1
            ids.append(ids_BxH)
        out.append({"dense": rng.normal(size=(batch, dense_dim)).astype(np.float32),
                    "ids": tuple(ids),
                    "label": rng.integers(0, 2, batch).astype(np.float32)})
    return out


def override(config, overrides: dict):
    """Sets dotted keys ("data.zipf_a") of an ml_collections config in place; returns it."""
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


F32_EPS = float(np.finfo(np.float32).eps)


def f32_sum_error(num_terms: int, abs_sum):
    """Bound on the float32 rounding error of a sum of `num_terms` products in any order.

    Each of the n - 1 additions (and the product feeding it) rounds by at most u = eps / 2, so the
    computed sum is within gamma_n * sum|terms| of the exact one, gamma_n = n u / (1 - n u)
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). Two float32 programs that sum
    in different orders (another compiler, another sharding) agree within twice that.

    Args:
      num_terms: n, the most terms any one output sums.
      abs_sum: sum of the absolute values of those terms (scalar or per-element array).

    Returns:
      The bound, shaped like abs_sum.
    """
    u = F32_EPS / 2
    n = num_terms + 1  # the product rounding of each term
    return n * u / (1 - n * u) * np.asarray(abs_sum, np.float64)


def f32_rtol(num_terms: int, ops: int = 1) -> float:
    """Tolerance, relative to the magnitude of the summed terms, between two float32 evaluations
    of a computation whose outputs each sum at most `num_terms` terms, through `ops` such
    stages: twice the bound of one sum (both sides round), stages added (first order)."""
    return 2 * ops * float(f32_sum_error(num_terms, 1.0))


def metrics_lines(workdir) -> list[str]:
    """The lines of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.readlines()


def assert_resumed_without_retraining(before: Sequence[str], after: Sequence[str], step: int,
                                      num_steps: int) -> None:
    """A resumed run's metrics.jsonl (`after`) against the lines before it started (`before`).

    The records up to the restored `step` must be byte-identical (a restart from step 0 rewrites
    them with other timings), and each of the steps 1..num_steps must have been logged exactly
    once (log_every=1), so no step was trained twice or skipped.
    """
    def step_of(line):
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # torn by a kill mid-write; the resumed run drops it
            return step + 1

    kept = [line for line in before if step_of(line) <= step]
    assert kept and json.loads(kept[-1])["step"] == step, "the first run never logged the step"
    assert list(after[:len(kept)]) == kept, "records up to the restored step were rewritten"
    steps = [r["step"] for r in map(json.loads, after) if "loss" in r]
    assert steps == list(range(1, num_steps + 1)), steps
