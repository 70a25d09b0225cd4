"""The sharding MDP (AutoShard's, with DreamShard's masking) as pure JAX over padded task arrays.

One episode places one task's tables, one per step, in descending order of predicted single-table
cost; the action is a device. Devices the table would overflow are masked (exact memory formula
of `memory.py`, in float32 with a 1e-5 safety margin), so every finished episode is legal.
Tasks are padded to a batch's (T, D) with `valid_T` / `valid_D`, so `jax.vmap` runs many tasks
and `jax.lax.scan` runs the steps. Costs come from an injected `cost_fn` (learned or
analytical), bound to the task's tables once per episode (`bind`); one call per step gives every
device's "what if the table goes here" cost, because a device's cost depends only on its own
tables (through per-device sums the episode keeps): the table is added to every device at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.cost.analytical import BoundCost
from autoshard_jax.placement.costs import floor_D, max_device_score
from autoshard_jax.placement.memory import MemoryModel
from autoshard_jax.tables.spec import TableSpec

MEMORY_MARGIN = 1e-5
NUM_SCALARS = 10
_EPS = 1e-9


def normalised_features(feats_TxF: np.ndarray) -> np.ndarray:
    """Scale-free encoder input: log rows, log2 dim, log pooling, log size, reuse bins as given.

    Fixed transforms rather than pool statistics, so unseen tables need no refit.
    """
    f = np.asarray(feats_TxF, np.float32)
    out = f.copy()
    out[:, 0] = np.log10(np.maximum(f[:, 0], 1.0)) / 4.0
    out[:, 1] = np.log2(np.maximum(f[:, 1], 1.0)) / 4.0
    out[:, 2] = np.log1p(f[:, 2]) / 2.0
    out[:, 3] = np.log10(np.maximum(f[:, 3] * 2**30, 1.0)) / 5.0
    return out


def build_task(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel,
               feats_TxF: np.ndarray, class_TxK: np.ndarray, single_T: np.ndarray,
               pad_T: int | None = None, pad_D: int | None = None,
               order: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """(padded task arrays, order) with tables sorted by descending predicted single cost,
    unless `order` is given.

    `order[i]` is the spec index placed at step i; the arrays follow that order.
    """
    t_count = len(specs)
    pad_T, pad_D = pad_T or t_count, pad_D or num_devices
    if order is None:
        order = np.asarray(sorted(range(t_count), key=lambda t: (-single_T[t], t)), np.int64)
    work_T = np.asarray([math.ceil(specs[t].pooling_factor) * specs[t].dim for t in order],
                        np.float32)

    def pad(x, n, fill=0.0):
        x = np.asarray(x, np.float32)
        width = [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
        return np.pad(x, width, constant_values=fill)

    phys_T = np.asarray(mem.phys_T[order], np.float64)
    # Remaining tables after each step: their packed rows in total and the largest of them.
    rest_sum_T = np.concatenate([np.cumsum(phys_T[::-1])[::-1][1:], [0.0]])
    rest_max_T = np.concatenate([np.maximum.accumulate(phys_T[::-1])[::-1][1:], [0.0]])
    cls = class_TxK[order]
    class_work_K = (cls * work_T[:, None]).sum(0)
    task = {
        "feats_TxF": pad(feats_TxF[order], pad_T),
        "featn_TxF": pad(normalised_features(feats_TxF[order]), pad_T),
        "class_TxK": pad(cls, pad_T),
        "work_T": pad(work_T, pad_T),
        "single_T": pad(single_T[order], pad_T),
        "phys_T": pad(mem.phys_T[order], pad_T),
        "keys_T": pad(mem.keys_T[order], pad_T),
        "rest_sum_T": pad(rest_sum_T, pad_T),
        "rest_max_T": pad(rest_max_T, pad_T),
        "valid_T": pad(np.ones(t_count), pad_T),
        "valid_D": pad(np.ones(num_devices), pad_D),
        "budget": np.float32(mem.budget * (1.0 - MEMORY_MARGIN)),
        "bytes_per_phys": np.float32(mem.bytes_per_phys),
        "bytes_per_key": np.float32(mem.bytes_per_key),
        "norm": np.float32(max(single_T.sum() / num_devices, single_T.max(), _EPS)),
        "norm_work_K": np.maximum(class_work_K / num_devices, _EPS).astype(np.float32),
        "norm_work": np.float32(max(work_T.sum() / num_devices, _EPS)),
        "num_tables": np.float32(t_count),
    }
    return task, order


def stack_tasks(tasks: Sequence[dict]) -> dict:
    return {k: np.stack([t[k] for t in tasks]) for k in tasks[0]}


def bind(cost_fn, task: dict) -> BoundCost:
    """The cost function fixed to the task's tables. A learned one offers `bind` (see
    `placement.costs.learned_cost`): its device costs follow from per-device sums of table rows,
    which the episode keeps, so a step costs O(D) instead of a [T, D] product (856 tables on
    128 devices: the product was most of a rollout's time)."""
    feats_TxF, class_TxK = task["feats_TxF"], task["class_TxK"]
    if hasattr(cost_fn, "bind"):
        return cost_fn.bind(feats_TxF, class_TxK)
    return BoundCost.of(cost_fn, feats_TxF, class_TxK)


def init_state(task: dict, bound: BoundCost) -> dict:
    """The empty assignment; `bound` is `bind(cost_fn, task)`."""
    t, d = task["feats_TxF"].shape[0], task["valid_D"].shape[0]
    k = task["class_TxK"].shape[1]
    sums = jnp.zeros((d, bound.rows_TxR.shape[1]), jnp.float32)
    return {"assign_TxD": jnp.zeros((t, d), jnp.float32), "sums_DxR": sums,
            "phys_D": jnp.zeros(d), "keys_D": jnp.zeros(d), "cur_D": bound.device_ms(sums),
            "class_KxD": jnp.zeros((k, d)), "work_D": jnp.zeros(d), "count_D": jnp.zeros(d)}


def fits_D(task: dict, state: dict, t) -> jax.Array:
    """Devices table t fits on (exact slab formula, padded devices excluded)."""
    phys = jnp.maximum(jnp.max(state["phys_D"]), state["phys_D"] + task["phys_T"][t])
    keys = jnp.maximum(jnp.max(state["keys_D"]), state["keys_D"] + task["keys_T"][t])
    alloc = (1.0 + phys) * task["bytes_per_phys"] + jnp.maximum(1.0, keys) * task["bytes_per_key"]
    return (alloc <= task["budget"]) & (task["valid_D"] > 0)


def action_mask(task: dict, state: dict, t) -> jax.Array:
    """Legal devices, narrowed to those that keep two necessary conditions for placing the rest:
    the largest remaining table still fits somewhere and the free rows add up to the remaining
    rows. (Tables come in cost order, not size order, so a legal move can dead-end later.) Falls
    back to plain legality when no device passes."""
    legal_D = fits_D(task, state, t)
    valid_D = task["valid_D"] > 0
    keys = jnp.maximum(1.0, jnp.max(state["keys_D"] + task["keys_T"][t]))
    cap = (task["budget"] - keys * task["bytes_per_key"]) / task["bytes_per_phys"] - 1.0
    free_D = jnp.where(valid_D, cap - state["phys_D"], 0.0)
    hot_DxD = jnp.eye(free_D.shape[0]) * task["phys_T"][t]
    free_after_DxD = free_D[None, :] - hot_DxD  # row a: free rows if t goes to device a
    largest_ok = jnp.max(free_after_DxD, axis=1) >= task["rest_max_T"][t]
    total_ok = jnp.sum(free_after_DxD, axis=1) >= task["rest_sum_T"][t]
    safe_D = legal_D & largest_ok & total_ok
    return jnp.where(jnp.any(safe_D), safe_D, legal_D)


def observe(task: dict, state: dict, t, bound: BoundCost
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-device scalars [D, NUM_SCALARS], what-if device costs [D], legal mask [D])."""
    valid_D = task["valid_D"] > 0
    with_D = bound.device_ms(state["sums_DxR"]
                             + task["valid_D"][:, None] * bound.rows_TxR[t][None, :])
    norm = task["norm"]
    cur_D = state["cur_D"]
    max_cur = jnp.max(jnp.where(valid_D, cur_D, -jnp.inf))
    min_with = jnp.min(jnp.where(valid_D, with_D, jnp.inf))
    cls_K = task["class_TxK"][t]
    load_D = cls_K @ state["class_KxD"]
    norm_c = cls_K @ task["norm_work_K"]
    max_load = jnp.max(jnp.where(valid_D, load_D, -jnp.inf))
    mem_D = (1.0 + state["phys_D"] + task["phys_T"][t]) * task["bytes_per_phys"] / task["budget"]
    per_dev = task["num_tables"] / jnp.sum(task["valid_D"])
    frac = jnp.full_like(cur_D, t / task["num_tables"])
    scalars = jnp.stack([
        cur_D / norm, with_D / norm, (with_D - max_cur) / norm, (with_D - min_with) / norm,
        mem_D, load_D / norm_c, (load_D + task["work_T"][t] - max_load) / norm_c,
        state["work_D"] / task["norm_work"], state["count_D"] / per_dev, frac], axis=1)
    return scalars, with_D, action_mask(task, state, t)


def step(task: dict, state: dict, t, a, with_D, bound: BoundCost) -> dict:
    """Places table t on device a (no-op for padding tables)."""
    v = task["valid_T"][t]
    d = task["valid_D"].shape[0]
    hot_D = (jnp.arange(d) == a).astype(jnp.float32) * v
    onehot_T = (jnp.arange(task["feats_TxF"].shape[0]) == t).astype(jnp.float32)
    return {
        "assign_TxD": state["assign_TxD"] + onehot_T[:, None] * hot_D[None, :],
        "sums_DxR": state["sums_DxR"] + hot_D[:, None] * bound.rows_TxR[t][None, :],
        "phys_D": state["phys_D"] + hot_D * task["phys_T"][t],
        "keys_D": state["keys_D"] + hot_D * task["keys_T"][t],
        "cur_D": jnp.where(hot_D > 0, with_D, state["cur_D"]),
        "class_KxD": state["class_KxD"] + task["class_TxK"][t][:, None] * hot_D[None, :]
        * task["work_T"][t],
        "work_D": state["work_D"] + hot_D * task["work_T"][t],
        "count_D": state["count_D"] + hot_D,
    }


def final_cost(task: dict, assign_TxD, bound: BoundCost
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(device_ms_D, max over real devices, spmd_ms) of a finished assignment."""
    device_ms_D, spmd_ms = bound.cost_of(assign_TxD)
    max_ms = jnp.max(jnp.where(task["valid_D"] > 0, device_ms_D, -jnp.inf))
    return device_ms_D, max_ms, spmd_ms


def scored_max_ms(task: dict, device_ms_D, max_ms, assign_TxD, sigma: float,
                  shared: bool = False) -> jax.Array:
    """The max_device cost an episode is rewarded by: its slowest device's predicted cost, or,
    as the searches score a plan, of its device costs floored at their costliest table alone
    (`costs.floor_D`): with `sigma` > 0 the expected measured maximum (`costs.expected_max`),
    with `shared` only over devices holding two or more tables (`search` module doc)."""
    if sigma <= 0 and not shared:
        return max_ms
    dev_D = jnp.maximum(device_ms_D, floor_D(assign_TxD, task["single_T"]))
    return max_device_score(dev_D, assign_TxD, sigma, shared, task["valid_D"])


def reward(task: dict, device_ms_D, max_ms, spmd_ms, objective: str, kind: str) -> jax.Array:
    """'cost': -(objective cost) / (balanced single-cost load); 'ratio': AutoShard's
    min / max per-device cost (higher is better)."""
    if kind == "ratio":
        min_ms = jnp.min(jnp.where(task["valid_D"] > 0, device_ms_D, jnp.inf))
        return min_ms / jnp.maximum(max_ms, _EPS)
    cost = spmd_ms if objective == "spmd" else max_ms
    return -cost / task["norm"]
