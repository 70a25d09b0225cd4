"""A trained AutoShard policy: loading it from a workdir and one greedy rollout per task.

A policy workdir holds `policy.json` (objective, reward, network width, the cost model it was
trained against) and orbax checkpoints (`checkpoints/`) written by `placement/trainer.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from autoshard_jax.errors import InputError
from autoshard_jax.placement import env as env_lib
from autoshard_jax.placement.costs import (
    Cost,
    class_onehot,
    get_cost,
    single_costs,
    table_features,
)
from autoshard_jax.placement.memory import MemoryModel
from autoshard_jax.placement.policy import PolicyNet, init_params, make_optimizer, rollout
from autoshard_jax.tables.features import NUM_FEATURES
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train.checkpoint import Checkpointer, abstract_state

POLICY_JSON = "policy.json"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class LoadedPolicy:
    net: PolicyNet
    params: dict
    meta: dict
    step: int

    @property
    def cost_model_dir(self) -> str | None:
        """Workdir of the cost network the policy trained against (None: analytical)."""
        name = self.meta.get("cost_model", "analytical")
        return name.split(":", 1)[1] if name.startswith("learned:") else None

    @property
    def cost_pessimism(self) -> float:
        """The standard deviations of its ensemble's members it trained against (0: the mean)."""
        return float(self.meta.get("cost_pessimism", 0.0))


def planning_cost(batch_size: int, cost_model: str | None, policy: LoadedPolicy | None) -> Cost:
    """What the planners score with: the `cost_model` workdirs when given, else the cost the
    policy trained against (its networks and pessimism), else the analytical estimator."""
    if cost_model:
        return get_cost(batch_size, cost_model)
    if policy is not None:
        return get_cost(batch_size, policy.cost_model_dir, policy.cost_pessimism)
    return get_cost(batch_size)


def load_policy(workdir: str) -> LoadedPolicy:
    """The newest checkpoint of a `launch.train_sharder` workdir; errors name what is missing."""
    path = os.path.join(workdir, POLICY_JSON)
    if not os.path.exists(path):
        raise InputError(f"policy directory {workdir!r} has no {POLICY_JSON}: train one with "
                         "`python -m launch.train_sharder --workdir=DIR`")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON: {e}") from e
    net = PolicyNet(hidden=int(meta.get("hidden", 128)))
    target = init_params(jax.random.key(0), net, NUM_FEATURES)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINTS), async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise InputError(f"policy directory {workdir!r} has no checkpoint yet")
        step = ckpt.latest_step()
        tx = make_optimizer(float(meta["learning_rate"]), int(meta["total_steps"]))
        skeleton = {"params": target, "opt_state": tx.init(target), "step": 0}
        state, _ = ckpt.restore(step, abstract_state(skeleton))
    finally:
        ckpt.close()
    return LoadedPolicy(net, state["params"], meta, int(step))


@functools.partial(jax.jit, static_argnames=("net", "cost_fn"))
def _greedy(net, params, task, cost_fn):
    return rollout(net, params, task, jax.random.key(0), cost_fn, greedy=True)


def policy_place(pol: LoadedPolicy, specs: Sequence[TableSpec], num_devices: int,
                 mem: MemoryModel, cost: Cost) -> np.ndarray:
    """Each table's device from one greedy (argmax) rollout against the cost model.

    The rollout takes tables in descending predicted cost. Under a tight memory cap that order
    can dead-end where a legal plan exists (the mask's lookahead is necessary, not sufficient:
    a policy that spreads small costly tables can leave no device room for a large cheap one,
    seen on a 10-table, 4-device training task at 1.5x the balanced memory). The policy then
    places the tables again in descending packed size, first-fit-decreasing's order, which
    packs what the cost order could not; only if that dead-ends too is there no plan.
    """
    feats, cls = table_features(specs), class_onehot(specs)
    single = single_costs(cost, feats, cls)
    task, order = env_lib.build_task(specs, num_devices, mem, feats, cls, single)
    out = _greedy(pol.net, pol.params, task, cost.fn)
    if bool(out["dead"]):
        by_size = np.asarray(sorted(range(len(specs)), key=lambda t: (-mem.phys_T[t], t)))
        task, order = env_lib.build_task(specs, num_devices, mem, feats, cls, single,
                                         order=by_size)
        out = _greedy(pol.net, pol.params, task, cost.fn)
    if bool(out["dead"]):
        _raise_first_misfit(specs, num_devices, mem, order, np.asarray(out["action"]))
    device_T = np.zeros(len(specs), np.int64)
    device_T[order] = np.asarray(out["action"])
    return device_T


def _raise_first_misfit(specs, num_devices, mem, order, actions) -> None:
    phys_D = np.zeros(num_devices, np.int64)
    keys_D = np.zeros(num_devices, np.int64)
    for t, a in zip(order, actions, strict=True):
        if not mem.fits_D(int(t), phys_D, keys_D).any():
            raise mem.does_not_fit(specs, int(t), num_devices)
        phys_D[a] += mem.phys_T[t]
        keys_D[a] += mem.keys_T[t]
    raise mem.does_not_fit(specs, int(order[-1]), num_devices)
