"""AutoShard training: actor-critic on batched episodes against the cost model, many tasks.

Each iteration samples `tasks_per_batch` training tasks (tables from the train half of the pool)
and runs `episodes_per_task` sampled episodes of each, all in one jitted call (`jax.vmap` over
tasks and episodes, `jax.lax.scan` over steps). The terminal reward (-predicted cost / balanced
load, or AutoShard's min/max ratio) is every step's return (discount 1); advantage = return -
value, normalised over the batch; loss = policy gradient + value MSE - entropy bonus (A2C).
Every `refine_every` iterations some sampled plans are measured by the oracle and the learned
cost model is refined on them (AutoShard's loop; `refine.py`). Checkpoints (orbax), metrics JSONL
and a learning-curve PNG go to the workdir; a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.errors import ConfigError, check_range
from autoshard_jax.placement import env as env_lib
from autoshard_jax.placement import heuristics
from autoshard_jax.placement.costs import (
    OBJECTIVES,
    Cost,
    class_onehot,
    get_cost,
    plan_costs,
    single_costs,
    table_features,
    width_classes,
)
from autoshard_jax.placement.inference import CHECKPOINTS, POLICY_JSON
from autoshard_jax.placement.jsonl import read_jsonl
from autoshard_jax.placement.memory import memory_model
from autoshard_jax.placement.policy import PolicyNet, init_params, make_optimizer, rollout
from autoshard_jax.placement.refine import make_refine_fn
from autoshard_jax.placement.tasks import Task, sample_task, split_pool
from autoshard_jax.tables.features import NUM_FEATURES
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import load_tables
from autoshard_jax.train.checkpoint import Checkpointer, abstract_state

METRICS = "metrics.jsonl"
CURVE = "learning_curve.png"
REWARDS = ("cost", "ratio")


def max_device_sigma(c) -> float:
    """The config's `max_device_sigma` (`env.scored_max_ms`); configs before it have none: 0."""
    return float(c.get("max_device_sigma", 0.0))


def max_device_shared(c) -> bool:
    """The config's `max_device_shared` (`env.scored_max_ms`); configs before it: False."""
    return bool(c.get("max_device_shared", False))


def check_config(c) -> None:
    """Every numeric field range-checked (and names validated) before anything compiles."""
    if c.objective not in OBJECTIVES:
        raise ConfigError(f"config.objective must be one of {list(OBJECTIVES)}, got "
                          f"{c.objective!r}")
    if c.reward not in REWARDS:
        raise ConfigError(f"config.reward must be one of {list(REWARDS)}, got {c.reward!r}")
    for key, low in (("num_iterations", 1), ("tasks_per_batch", 1), ("episodes_per_task", 1),
                     ("log_every", 1), ("eval_every", 1), ("num_eval_tasks", 1),
                     ("checkpoint_every", 1), ("refine_every", 0), ("refine_plans", 1),
                     ("batch_size", 1), ("hidden", 8), ("pool.num_tables", 4),
                     ("pool.max_rows", 100)):
        obj, name = (c.pool, key.split(".")[1]) if key.startswith("pool.") else (c, key)
        check_range(key, obj[name], low=low, integer=True)
    for key, low, high in (("learning_rate", 1e-8, 1.0), ("entropy_coef", 0.0, 10.0),
                           ("value_coef", 0.0, 100.0), ("mem_factor", 1.0, 1000.0),
                           ("unseen", 0.0, 1.0), ("cost_pessimism", 0.0, 100.0),
                           ("max_device_sigma", 0.0, 1.0)):
        value = max_device_sigma(c) if key == "max_device_sigma" else c[key]
        check_range(key, value, low=low, high=high)
    if not isinstance(c.get("max_device_shared", False), bool):
        raise ConfigError("config.max_device_shared must be True or False, got "
                          f"{c.max_device_shared!r}")
    if not c.train_shapes:
        raise ConfigError("config.train_shapes must list at least one (num_tables, devices)")
    for shape in c.train_shapes:
        if len(shape) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                  for x in shape):
            raise ConfigError(f"config.train_shapes entries must be (tables, devices) positive "
                              f"integers, got {tuple(shape)!r}")
        if shape[0] > c.pool.num_tables // 2:
            raise ConfigError(f"config.train_shapes {tuple(shape)}: more tables than the "
                              f"train half of the pool ({c.pool.num_tables // 2})")


def load_pool(c) -> list:
    if c.tables:
        return load_tables(c.tables)
    return synthetic_pool(c.pool.num_tables, seed=c.pool.seed, dims=tuple(c.pool.dims),
                          max_rows=c.pool.max_rows)


@functools.lru_cache(maxsize=8)
def make_train_step(net: PolicyNet, tx, cost_fn: Callable, objective: str, reward_kind: str,
                    value_coef: float, entropy_coef: float, episodes_per_task: int,
                    sigma: float = 0.0, shared: bool = False) -> Callable:
    """The jitted A2C step; memoised so a resumed or repeated run reuses its compilation.
    `sigma`, `shared`: a max_device episode's cost, `env.scored_max_ms`."""

    def one(params, task, key):
        out = rollout(net, params, task, key, cost_fn, greedy=False)
        scored_ms = out["max_ms"]
        if objective == "max_device":
            scored_ms = env_lib.scored_max_ms(task, out["device_ms_D"], out["max_ms"],
                                              out["assign_TxD"], sigma, shared)
        r = env_lib.reward(task, out["device_ms_D"], scored_ms, out["spmd_ms"], objective,
                           reward_kind)
        cost = out["spmd_ms"] if objective == "spmd" else out["max_ms"]
        return out, jnp.where(out["dead"], r - 1.0, r), cost

    episodes = jax.vmap(jax.vmap(one, (None, None, 0)), (None, 0, 0))

    def loss_fn(params, tasks, keys_BxE):
        out, r_BxE, cost_BxE = episodes(params, tasks, keys_BxE)
        valid = jnp.broadcast_to(tasks["valid_T"][:, None, :], out["logp"].shape)
        n = jnp.sum(valid)
        ret = jnp.broadcast_to(r_BxE[..., None], out["value"].shape)
        adv = jax.lax.stop_gradient(ret - out["value"])
        mean = jnp.sum(adv * valid) / n
        std = jnp.sqrt(jnp.sum((adv - mean) ** 2 * valid) / n) + 1e-6
        pg = -jnp.sum(out["logp"] * (adv - mean) / std * valid) / n
        vloss = 0.5 * jnp.sum((ret - out["value"]) ** 2 * valid) / n
        ent = jnp.sum(out["entropy"] * valid) / n
        loss = pg + value_coef * vloss - entropy_coef * ent
        metrics = {"reward": jnp.mean(r_BxE), "cost_ms": jnp.mean(cost_BxE), "entropy": ent,
                   "value_loss": vloss, "dead": jnp.mean(out["dead"].astype(jnp.float32))}
        return loss, (metrics, out["assign_TxD"])

    @jax.jit
    def train_step(params, opt_state, tasks, key):
        b, e = tasks["valid_T"].shape[0], episodes_per_task
        keys = jax.random.split(key, b * e).reshape(b, e)
        (loss, (metrics, assign)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, tasks, keys)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, opt_state, {**metrics, "loss": loss}, assign

    return train_step


class TaskBuilder:
    """Builds padded task arrays; single-table costs come from one call over the whole pool."""

    def __init__(self, pool, cost: Cost, row_optimizer: str = "sgd"):
        self.cost = cost
        self.row_optimizer = row_optimizer
        self.widths = width_classes(pool)[1]
        self.index = {s.name: i for i, s in enumerate(pool)}
        feats = table_features(pool)
        self.feats = feats
        self.single = single_costs(cost, feats, class_onehot(pool, self.widths))

    def build(self, task: Task) -> tuple[dict, np.ndarray]:
        idx = np.asarray([self.index[s.name] for s in task.specs])
        mem = memory_model(task.specs, task.memory_bytes, self.row_optimizer)
        return env_lib.build_task(task.specs, task.num_devices, mem, self.feats[idx],
                                  class_onehot(task.specs, self.widths), self.single[idx])


def _baseline_costs(tasks, cost: Cost, objective: str, method: str) -> list[float]:
    out = []
    for t in tasks:
        mem = memory_model(t.specs, t.memory_bytes)
        if method == "spmd_greedy":
            dev_T = heuristics.spmd_greedy(t.specs, t.num_devices, mem, width_classes(t.specs)[0])
        else:
            dev_T = heuristics.lpt(t.specs, t.num_devices, mem,
                                   heuristics.greedy_key(t.specs, method))
        dev_D, spmd = plan_costs(cost, t.specs, dev_T, t.num_devices)
        out.append(spmd if objective == "spmd" else float(dev_D.max()))
    return out


def _train_step_for(net, tx, cost: Cost, c) -> Callable:
    return make_train_step(net, tx, cost.fn, c.objective, c.reward, float(c.value_coef),
                           float(c.entropy_coef), int(c.episodes_per_task),
                           max_device_sigma(c), max_device_shared(c))


@functools.lru_cache(maxsize=8)
def _greedy_batch(net: PolicyNet, cost_fn: Callable) -> Callable:
    return jax.jit(jax.vmap(lambda p, t: rollout(net, p, t, jax.random.key(0), cost_fn, True),
                            (None, 0)))


def _read_metrics(path: str, upto: int) -> list[dict]:
    """Records of iterations < upto (a torn last line or records past a checkpoint dropped)."""
    return [r for r in read_jsonl(path) if r.get("iteration", upto) < upto]


def train(c, workdir: str, refine_fn: Callable | None = None, log=print,
          cost: Cost | None = None) -> dict:
    """Trains (or resumes) a policy in `workdir`; returns the last eval record.

    `cost` overrides the config's cost model; `refine_fn` the oracle refinement (by default
    `refine.make_refine_fn`, used when `refine_every` > 0 and the cost model is learned).
    """
    check_config(c)
    os.makedirs(workdir, exist_ok=True)
    if cost is None and not c.cost_model:
        raise ConfigError("config.cost_model is empty: give a cost network workdir or "
                          "'analytical' (launch.train_sharder fills it by measuring one)")
    cost = cost or get_cost(c.batch_size, None if c.cost_model == "analytical" else c.cost_model,
                            c.cost_pessimism)
    if refine_fn is None and c.refine_every:
        refine_fn = make_refine_fn(workdir, log)
    pool = load_pool(c)
    train_pool, test_pool = split_pool(pool, c.pool.seed)
    builder = TaskBuilder(pool, cost)
    net = PolicyNet(hidden=c.hidden)
    tx = make_optimizer(c.learning_rate, c.num_iterations)
    params = init_params(jax.random.key(c.seed), net, NUM_FEATURES)
    state = {"params": params, "opt_state": tx.init(params), "step": 0}
    meta = {"objective": c.objective, "reward": c.reward, "hidden": c.hidden,
            "learning_rate": c.learning_rate, "total_steps": c.num_iterations,
            "cost_model": cost.name, "cost_pessimism": c.cost_pessimism,
            "max_device_sigma": max_device_sigma(c), "max_device_shared": max_device_shared(c),
            "batch_size": c.batch_size,
            "train_shapes": [list(s) for s in c.train_shapes]}
    with open(os.path.join(workdir, POLICY_JSON), "w") as f:
        json.dump(meta, f, indent=1)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINTS), keep=2,
                        save_interval_steps=c.checkpoint_every)
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(None, abstract_state(state))
        log(f"resumed from iteration {int(state['step'])}")
    start = int(state["step"])
    metrics_path = os.path.join(workdir, METRICS)
    records = _read_metrics(metrics_path, start)
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    eval_rng = np.random.default_rng([c.seed, 10**6])
    d0 = c.train_shapes[0]
    eval_tasks = [sample_task(train_pool, test_pool, d0[0], d0[1], eval_rng, c.unseen,
                              c.mem_factor) for _ in range(c.num_eval_tasks)]
    eval_arrays = env_lib.stack_tasks([builder.build(t)[0] for t in eval_tasks])
    slg = _baseline_costs(eval_tasks, cost, c.objective, "size_lookup_greedy")
    spg = _baseline_costs(eval_tasks, cost, c.objective, "spmd_greedy")
    train_step = _train_step_for(net, tx, cost, c)
    greedy = _greedy_batch(net, cost.fn)
    last = {}
    t_start = time.time()
    for it in range(start, c.num_iterations):
        rng = np.random.default_rng([c.seed, it])
        t_count, d_count = c.train_shapes[it % len(c.train_shapes)]
        tasks = [sample_task(train_pool, test_pool, t_count, d_count, rng, c.unseen,
                             c.mem_factor) for _ in range(c.tasks_per_batch)]
        built = [builder.build(t) for t in tasks]
        arrays = env_lib.stack_tasks([b[0] for b in built])
        key = jax.random.fold_in(jax.random.key(c.seed), it)
        params, opt_state, m, assign = train_step(state["params"], state["opt_state"], arrays,
                                                  key)
        state = {"params": params, "opt_state": opt_state, "step": it + 1}
        if c.refine_every and (it + 1) % c.refine_every == 0 and refine_fn is not None:
            new_cost = refine_fn(cost, tasks, built, np.asarray(assign), c)
            if new_cost is not cost:
                cost = new_cost
                builder = TaskBuilder(pool, cost)
                train_step = _train_step_for(net, tx, cost, c)
        rec = None
        if (it + 1) % c.log_every == 0 or (it + 1) % c.eval_every == 0 \
                or it + 1 == c.num_iterations:
            rec = {"iteration": it, "time_s": round(time.time() - t_start, 2),
                   **{k: float(v) for k, v in m.items()}}
        if (it + 1) % c.eval_every == 0 or it + 1 == c.num_iterations:
            out = greedy(state["params"], eval_arrays)
            pol = np.asarray(out["spmd_ms"] if c.objective == "spmd" else out["max_ms"])
            rec.update(eval_cost_ms=float(pol.mean()), eval_slg_ms=float(np.mean(slg)),
                       eval_ratio_to_slg=float(np.mean(pol / np.asarray(slg))),
                       eval_ratio_to_spmd_greedy=float(np.mean(pol / np.asarray(spg))))
            last = rec
        if rec is not None:
            log(json.dumps(rec))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        ckpt.save(it + 1, state, {"iteration": it + 1}, force=it + 1 == c.num_iterations)
    ckpt.wait_until_finished()
    ckpt.close()
    plot_curve(metrics_path, os.path.join(workdir, CURVE))
    return last


def plot_curve(metrics_path: str, out_png: str) -> None:
    """Training reward and the greedy policy's eval cost relative to size-lookup greedy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _read_metrics(metrics_path, 10**12)
    if not recs:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["iteration"] for r in recs], [r["reward"] for r in recs])
    ax[0].set(xlabel="iteration", ylabel="mean episode reward", title="training")
    ev = [r for r in recs if "eval_ratio_to_slg" in r]
    ax[1].plot([r["iteration"] for r in ev], [r["eval_ratio_to_slg"] for r in ev], marker="o")
    ax[1].axhline(1.0, color="gray", ls="--", label="size_lookup_greedy")
    ax[1].set(xlabel="iteration", ylabel="policy cost / size-lookup greedy",
              title="greedy policy on eval tasks")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
