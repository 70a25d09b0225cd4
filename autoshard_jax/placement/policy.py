"""AutoShard's policy and value networks (pure-functional Flax) and the batched episode rollout.

Device-count agnostic: every device gets a score from the same MLP over [the table's embedding,
the DeepSets sum of embeddings already on the device, the device's scalars (predicted cost now
and with the table, memory, width-class load, ...)], so one policy serves any D. The value head
reads the mean and max over devices of the score MLP's hidden layer. Shared table encoder
21 -> 64 -> 32, as in the papers (smaller: CPU budget).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autoshard_jax.placement import env as env_lib

EMB = 32


class PolicyNet(nn.Module):
    """encode(featn_TxF) -> emb_TxE; __call__(table_E, dev_DxE, scalars_DxS, valid_D)."""

    hidden: int = 128

    def setup(self):
        self.enc0 = nn.Dense(64)
        self.enc1 = nn.Dense(EMB)
        self.dev0 = nn.Dense(self.hidden)
        self.dev1 = nn.Dense(64)
        self.logit = nn.Dense(1)
        self.val0 = nn.Dense(64)
        self.val1 = nn.Dense(1)

    def encode(self, featn_TxF):
        return nn.relu(self.enc1(nn.relu(self.enc0(featn_TxF))))

    def __call__(self, table_E, dev_DxE, scalars_DxS, valid_D):
        d = dev_DxE.shape[0]
        x_DxI = jnp.concatenate([jnp.broadcast_to(table_E[None, :], (d, EMB)), dev_DxE,
                                 dev_DxE * table_E[None, :], scalars_DxS], axis=1)
        h_DxH = nn.relu(self.dev1(nn.relu(self.dev0(x_DxI))))
        logits_D = self.logit(h_DxH)[:, 0]
        w_D = valid_D / jnp.maximum(jnp.sum(valid_D), 1.0)
        pooled = jnp.concatenate([w_D @ h_DxH,
                                  jnp.max(jnp.where(valid_D[:, None] > 0, h_DxH, -1e9), axis=0)])
        value = self.val1(nn.relu(self.val0(pooled)))[0]
        return logits_D, value


    def init_all(self, featn_TxF, scalars_DxS):
        """Touches every layer (for `init`)."""
        emb_TxE = self.encode(featn_TxF)
        d = scalars_DxS.shape[0]
        return self(emb_TxE[0], jnp.zeros((d, EMB)), scalars_DxS, jnp.ones((d,)))


def init_params(key: jax.Array, net: PolicyNet, num_features: int) -> dict:
    return net.init(key, jnp.zeros((2, num_features)), jnp.zeros((3, env_lib.NUM_SCALARS)),
                    method=PolicyNet.init_all)


def rollout(net: PolicyNet, params: dict, task: dict, key: jax.Array, cost_fn: Callable,
            greedy: bool) -> dict:
    """One episode of one task (vmap it over tasks / keys; scan over steps).

    Returns per-step logp_T, entropy_T, value_T, action_T, the final assign_TxD, `dead` (a step
    had no legal device: only possible on an infeasible task) and the final costs.
    """
    task = jax.tree.map(jnp.asarray, task)
    emb_TxE = net.apply(params, task["featn_TxF"], method=PolicyNet.encode)
    bound = env_lib.bind(cost_fn, task)
    state = env_lib.init_state(task, bound)
    d = task["valid_D"].shape[0]
    carry0 = (state, jnp.zeros((d, EMB)), jnp.zeros((), bool))

    def body(carry, xs):
        state, dev_DxE, dead = carry
        t, k = xs
        scalars, with_D, legal_D = env_lib.observe(task, state, t, bound)
        per_dev = task["num_tables"] / jnp.sum(task["valid_D"])
        logits_D, value = net.apply(params, emb_TxE[t], dev_DxE / per_dev, scalars,
                                    task["valid_D"])
        none_legal = ~jnp.any(legal_D)
        mask_D = jnp.where(none_legal, task["valid_D"] > 0, legal_D)
        logits_D = jnp.where(mask_D, logits_D, -1e9)
        logp_D = jax.nn.log_softmax(logits_D)
        a = jnp.argmax(logits_D) if greedy else jax.random.categorical(k, logits_D)
        p_D = jnp.exp(logp_D)
        entropy = -jnp.sum(jnp.where(mask_D, p_D * logp_D, 0.0))
        valid = task["valid_T"][t] > 0
        state = env_lib.step(task, state, t, a, with_D, bound)
        hot_D = (jnp.arange(d) == a).astype(jnp.float32) * task["valid_T"][t]
        dev_DxE = dev_DxE + hot_D[:, None] * emb_TxE[t][None, :]
        out = {"logp": logp_D[a], "entropy": entropy, "value": value, "action": a}
        return (state, dev_DxE, dead | (none_legal & valid)), out

    t_count = task["feats_TxF"].shape[0]
    (state, _, dead), per_step = jax.lax.scan(
        body, carry0, (jnp.arange(t_count), jax.random.split(key, t_count)))
    device_ms_D, max_ms, spmd_ms = env_lib.final_cost(task, state["assign_TxD"], bound)
    return {**per_step, "assign_TxD": state["assign_TxD"], "dead": dead,
            "device_ms_D": device_ms_D, "max_ms": max_ms, "spmd_ms": spmd_ms}


@functools.lru_cache(maxsize=8)
def make_optimizer(learning_rate: float, total_steps: int, clip: float = 40.0
                   ) -> optax.GradientTransformation:
    """Adam with AutoShard's linear decay to 0 and grad-norm clip 40 (memoised: one object per
    setting, so jitted steps closing over it compile once per process)."""
    schedule = optax.linear_schedule(learning_rate, 0.0, max(1, total_steps))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))
