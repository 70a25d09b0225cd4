"""Cost-model-guided search: NeuroShard-style greedy and local search (moves and swaps).

`cost_greedy` places tables by descending predicted single cost, each on the legal device that
minimises the predicted objective after placing it (max_device: one cost_fn call gives every
device's what-if cost; spmd: the plan cost with the table on each device, vmapped).
`local_search` then improves any start plan (a heuristic's, or the policy's: "policy +
refinement", which takes only moves with a clear predicted gain) by the best legal
single-table move or two-table swap among tables on the critical devices, all candidates
scored in batched cost_fn calls, until no candidate improves or the round budget is spent.

For max_device both searches work against a monotone floor: a device costs at least its
costliest table alone (`floor_D`). Adding work never makes a device faster, but the network is not
monotone in a device's set of tables, and a search finds where it is not: on session 27's
held-out max_device tasks of 8 and 16 devices the refinement put tables beside the one that
alone sets the slowest device, predicted 3-6% below that table alone and measured 3-5% above.

With `shared` (and the floor) the max_device searches minimise the slowest *shared* device, one
holding two or more tables. A table alone costs the same on any device, so with the floor a
plan's maximum is max(slowest shared device, costliest single table): the shared maximum orders
plans as the maximum does and breaks its ties. The ties matter where one table alone sets the
slowest device, which no plan can lower: the maximum then sees nothing of the other devices, and
a search (or policy) may leave them filled to just under it, where the network's error on a
lone table (log spread 0.145 on session 28's held-out plans, against 0.06-0.10 on devices of
four or more tables) puts them above it when measured. Judged on 45 development tasks (session
29, README) against the maximum: autoshard_search -0.5% ± 0.6%, greedy_search -0.6% ± 0.5%,
paired (-3.6% and -3.2% on 16 devices, one plan 24% lower); `api.place` uses it by default.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.placement.costs import (
    Cost,
    class_onehot,
    floor_D,
    max_device_score,
    single_costs,
    table_features,
    width_classes,
)
from autoshard_jax.placement.memory import MemoryModel
from autoshard_jax.tables.spec import TableSpec

_CHUNK = 256


def _device_costs(cost_fn, feats, assign, cls, single_T, objective: str):
    """cost_fn's (device_ms_D, spmd_ms); for max_device floored by `floor_D` (module doc)."""
    dev_D, spmd = cost_fn(feats, assign, cls)
    if objective == "max_device" and single_T is not None:
        dev_D = jnp.maximum(dev_D, floor_D(assign, single_T))
    return dev_D, spmd


def _objective(cost_fn, feats, assign, cls, objective: str, single_T=None, sigma: float = 0.0,
               shared: bool = False):
    dev_D, spmd = _device_costs(cost_fn, feats, assign, cls, single_T, objective)
    if objective == "spmd":
        main = spmd
    else:  # with sigma, the slowest device a measurement will report (`costs.expected_max`)
        main = max_device_score(dev_D, assign, sigma, shared)
    # Secondary: spread of device costs, so plateaus (several devices at the max) still move.
    return main, jnp.sum(dev_D**2) / jnp.maximum(jnp.sum(dev_D) ** 2, 1e-12)


@functools.partial(jax.jit, static_argnames=("cost_fn", "objective", "sigma", "shared"))
def _whatif(cost_fn, feats, assign, cls, t, objective: str, single_T=None, sigma: float = 0.0,
            shared: bool = False):
    """Objective with table t added on each device d ([D] main, [D] secondary)."""
    d = assign.shape[1]

    def one(dev):
        a = assign.at[t].set((jnp.arange(d) == dev).astype(assign.dtype))
        return _objective(cost_fn, feats, a, cls, objective, single_T, sigma, shared)

    return jax.vmap(one)(jnp.arange(d))


@functools.partial(jax.jit, static_argnames=("cost_fn", "objective", "sigma", "shared"))
def _score_candidates(cost_fn, feats, assign, cls, t1_C, d1_C, t2_C, d2_C, objective: str,
                      single_T=None, sigma: float = 0.0, shared: bool = False):
    """Objective of each candidate: t1 -> d1 and (if t2 >= 0) t2 -> d2."""
    d = assign.shape[1]

    def one(t1, d1, t2, d2):
        a = assign.at[t1].set((jnp.arange(d) == d1).astype(assign.dtype))
        t2_row = jnp.maximum(t2, 0)  # a move (t2 < 0) rewrites row 0 with itself
        row2 = jnp.where(t2 >= 0, (jnp.arange(d) == d2).astype(assign.dtype), a[t2_row])
        a = a.at[t2_row].set(row2)
        return _objective(cost_fn, feats, a, cls, objective, single_T, sigma, shared)

    return jax.vmap(one)(t1_C, d1_C, t2_C, d2_C)


def _inputs(specs):
    return jnp.asarray(table_features(specs)), jnp.asarray(class_onehot(specs))


def cost_greedy(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel, cost: Cost,
                objective: str, single_T: np.ndarray, monotone: bool = True,
                sigma: float = 0.0, shared: bool = False) -> np.ndarray:
    """Each table (descending predicted single cost) on the legal device minimising the
    predicted objective after it is placed (ties: lower secondary, lower index); with
    `monotone`, max_device device costs are floored (module doc); with `sigma` > 0 the
    max_device objective is the expected measured maximum (`costs.expected_max`); with
    `shared` (and `monotone`) it is the slowest shared device's (module doc)."""
    floor_T = jnp.asarray(single_T, jnp.float32) if monotone else None
    shared = shared and monotone
    feats, cls = _inputs(specs)
    assign = jnp.zeros((len(specs), num_devices), jnp.float32)
    phys_D = np.zeros(num_devices, np.int64)
    keys_D = np.zeros(num_devices, np.int64)
    device_T = np.full(len(specs), -1, np.int64)
    for t in sorted(range(len(specs)), key=lambda t: (-single_T[t], t)):
        fits = mem.fits_D(t, phys_D, keys_D)
        if not fits.any():
            raise mem.does_not_fit(specs, t, num_devices)
        main, second = (np.asarray(x) for x in
                        _whatif(cost.fn, feats, assign, cls, t, objective, floor_T, sigma,
                                shared))
        d = min(np.flatnonzero(fits), key=lambda d: (main[d], second[d], d))
        device_T[t] = d
        phys_D[d] += mem.phys_T[t]
        keys_D[d] += mem.keys_T[t]
        assign = assign.at[t, d].set(1.0)
    return device_T


def predicted_objective(specs: Sequence[TableSpec], num_devices: int, cost: Cost,
                        objective: str, device_T: np.ndarray,
                        single_T: np.ndarray | None = None, sigma: float = 0.0,
                        shared: bool = False) -> float:
    """The objective the search minimises, of one plan (max_device floored by `single_T`,
    with `sigma` > 0 the expected measured maximum, with `shared` and a floor the slowest
    shared device's)."""
    feats, cls = _inputs(specs)
    assign = np.zeros((len(specs), num_devices), np.float32)
    assign[np.arange(len(specs)), np.asarray(device_T)] = 1.0
    floor_T = None if single_T is None else jnp.asarray(single_T, jnp.float32)
    return float(_objective(cost.fn, feats, jnp.asarray(assign), cls, objective, floor_T,
                            sigma, shared and floor_T is not None)[0])


def _legal(mem: MemoryModel, device_T, phys_D, keys_D, t1, d1, t2, d2) -> np.ndarray:
    """Memory legality of candidate moves / swaps (vectorised over candidates)."""
    c = len(t1)
    dp = np.zeros((c, len(phys_D)), np.int64)
    dk = np.zeros_like(dp)
    rows = np.arange(c)
    for t, d in ((t1, d1), (t2, d2)):
        on = t >= 0
        tt = np.where(on, t, 0)
        for arr, per_T in ((dp, mem.phys_T), (dk, mem.keys_T)):
            np.add.at(arr, (rows[on], device_T[tt][on]), -per_T[tt][on])
            np.add.at(arr, (rows[on], d[on]), per_T[tt][on])
    phys = (phys_D[None] + dp).max(1)
    keys = (keys_D[None] + dk).max(1)
    return mem.allocated(phys, keys) <= mem.budget


def padded_gather(specs: Sequence[TableSpec], num_devices: int, device_CxT: np.ndarray
                  ) -> np.ndarray:
    """Values the SPMD program gathers per sample, for each of C plans [C, T]: per width class,
    the busiest device's id slots x the class's width (`sharding.lookup_meta` pads every device
    to it), summed over classes. Exact, from the plan alone."""
    cls_T, widths = width_classes(specs)
    hot_T = np.asarray([s.hotness for s in specs], np.float64)
    device_CxT = np.atleast_2d(device_CxT)
    total_C = np.zeros(device_CxT.shape[0])
    for k, width in enumerate(widths):
        members = np.flatnonzero(cls_T == k)
        slots_CxD = np.zeros((device_CxT.shape[0], num_devices))
        for t in members:
            slots_CxD[np.arange(len(total_C)), device_CxT[:, t]] += hot_T[t]
        total_C += slots_CxD.max(axis=1) * width
    return total_C


def _apply(device_T: np.ndarray, cand_Cx4: np.ndarray) -> np.ndarray:
    """[C, T] plans: device_T with each candidate's move (t1 -> d1) or swap applied."""
    out = np.repeat(device_T[None], len(cand_Cx4), axis=0)
    rows = np.arange(len(cand_Cx4))
    t1, d1, t2, d2 = cand_Cx4.T
    out[rows, t1] = d1
    swap = t2 >= 0
    out[rows[swap], t2[swap]] = d2[swap]
    return out


def local_search(specs: Sequence[TableSpec], num_devices: int, mem: MemoryModel, cost: Cost,
                 objective: str, device_T: np.ndarray, max_rounds: int = 200,
                 time_budget_s: float = 60.0, max_candidates: int = 4096,
                 keep_padding: bool = True, min_gain: float = 0.0, monotone: bool = True,
                 single_T: np.ndarray | None = None, sigma: float = 0.0,
                 shared: bool = False, pinned_T: np.ndarray | None = None) -> np.ndarray:
    """Best-improvement moves and swaps of tables on the critical devices (the slowest device;
    for spmd also each width class's busiest device by predicted class cost) until none
    improves, `max_rounds` moves, or `time_budget_s`.

    For spmd with `keep_padding`, a candidate must not enlarge the padded program
    (`padded_gather`): the cost network ranks a task's near-optimal plans poorly (within-task
    Kendall tau 0.39 on planners' plans of held-out training tasks, where the padded gather
    alone reaches 0.48), and a search that trusts it walks into plans it underrates (on
    100-table tasks, plans with a padded gather 1-15% above spmd_greedy's). The exact part of
    the cost bounds the search; the network chooses among the plans it allows, which on two
    8-device tasks still measured 8-25% above spmd_greedy's (README, session 7).

    With `min_gain` > 0 a move must lower the predicted objective by that fraction, and moves
    that only even out the devices (the secondary objective) are not made: a refinement of a
    good plan should not follow differences the network cannot resolve.

    With `monotone` (max_device), a device's predicted cost is floored by its costliest table's
    predicted single cost (module doc; `single_T`: those costs, if the caller has them).
    With `sigma` > 0 the max_device objective is the expected measured maximum
    (`costs.expected_max`), and every device within 2 sigma of the slowest is critical.
    With `shared` (and `monotone`) it is the slowest shared device's, and that device is the
    critical one (module doc). Tables where `pinned_T` is true stay where they are (the shards
    of a row-wise table, `split`).
    """
    feats, cls = _inputs(specs)
    floor_T = None
    if monotone and objective == "max_device":
        if single_T is None:
            single_T = single_costs(cost, np.asarray(feats), np.asarray(cls))
        floor_T = jnp.asarray(single_T, jnp.float32)
    shared = shared and floor_T is not None
    cls_np = np.asarray(cls)
    device_T = np.asarray(device_T, np.int64).copy()
    t_count, d_count = len(specs), num_devices
    movable_T = np.ones(t_count, bool) if pinned_T is None else ~np.asarray(pinned_T, bool)
    t0 = time.perf_counter()

    def assign_of(dev):
        a = np.zeros((t_count, d_count), np.float32)
        a[np.arange(t_count), dev] = 1.0
        return jnp.asarray(a)

    cur = tuple(float(x) for x in _objective(cost.fn, feats, assign_of(device_T), cls,
                                             objective, floor_T, sigma, shared))
    guard = keep_padding and objective == "spmd"
    for _ in range(max_rounds):
        if time.perf_counter() - t0 > time_budget_s:
            break
        assign = assign_of(device_T)
        dev_D = np.asarray(_device_costs(cost.fn, feats, assign, cls, floor_T, objective)[0])
        shared_D = np.bincount(device_T, minlength=d_count) >= 2
        if shared and shared_D.any():  # else no device holds two tables: the slowest is critical
            dev_D = np.where(shared_D, dev_D, 0.0)
        critical = {int(np.argmax(dev_D))}
        if objective == "max_device" and sigma > 0:
            critical |= set(np.flatnonzero(dev_D >= dev_D.max() * np.exp(-2 * sigma)).tolist())
        if objective == "spmd":
            for k in range(cls_np.shape[1]):
                members = np.flatnonzero(cls_np[:, k] > 0)
                if len(members):
                    sub = np.zeros((t_count, d_count), np.float32)
                    sub[members, device_T[members]] = 1.0
                    critical.add(int(np.argmax(np.asarray(cost.fn(feats, sub, cls)[0]))))
        crit_T = np.flatnonzero(np.isin(device_T, list(critical)) & movable_T)
        moves = [(t, d, -1, 0) for t in crit_T for d in range(d_count) if d != device_T[t]]
        swaps = [(t, device_T[u], u, device_T[t]) for t in crit_T for u in range(t_count)
                 if device_T[u] != device_T[t] and movable_T[u]]
        cand = np.asarray(moves + swaps, np.int64).reshape(-1, 4)
        if len(cand) > max_candidates:
            keep = np.random.default_rng(len(cand)).choice(len(cand), max_candidates, False)
            cand = cand[np.sort(keep)]
        phys_D = np.bincount(device_T, mem.phys_T, d_count).astype(np.int64)
        keys_D = np.bincount(device_T, mem.keys_T, d_count).astype(np.int64)
        cand = cand[_legal(mem, device_T, phys_D, keys_D, *cand.T)]
        if guard and len(cand):
            bound = padded_gather(specs, d_count, device_T[None])[0] * (1 + 1e-9)
            cand = cand[padded_gather(specs, d_count, _apply(device_T, cand)) <= bound]
        if not len(cand):
            break
        main, second = [], []
        for lo in range(0, len(cand), _CHUNK):
            part = cand[lo:lo + _CHUNK]
            pad = _CHUNK - len(part)
            part = np.concatenate([part, np.repeat(part[:1], pad, 0)])  # one compiled shape
            m, s = _score_candidates(cost.fn, feats, assign, cls,
                                     *(jnp.asarray(c, jnp.int32) for c in part.T), objective,
                                     floor_T, sigma, shared)
            main.append(np.asarray(m)[:_CHUNK - pad])
            second.append(np.asarray(s)[:_CHUNK - pad])
        main, second = np.concatenate(main), np.concatenate(second)
        best = int(np.lexsort((second, main))[0])
        better = main[best] < cur[0] * (1 - max(min_gain, 1e-6)) or (
            min_gain == 0 and main[best] <= cur[0] * (1 + 1e-9) and second[best] < cur[1] - 1e-9)
        if not better:
            break
        t1, d1, t2, d2 = cand[best]
        device_T[t1] = d1
        if t2 >= 0:
            device_T[t2] = d2
        cur = (float(main[best]), float(second[best]))
    return device_T
