"""The MDP's masking, the policy's rollout (legal plans at any size), and RL learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoshard_jax.placement import env as env_lib
from autoshard_jax.placement import trainer
from autoshard_jax.placement.api import plan_of
from autoshard_jax.placement.costs import class_onehot, get_cost, single_costs, table_features
from autoshard_jax.placement.inference import LoadedPolicy, policy_place
from autoshard_jax.placement.memory import PlacementError, memory_model
from autoshard_jax.placement.policy import EMB, PolicyNet, init_params, make_optimizer, rollout
from autoshard_jax.tables.pools import synthetic_pool
from autoshard_jax.tables.spec import TableSpec
from launch.configs import sharder_runlocal

COST = get_cost(256)


def _task(specs, num_devices, budget, pad_D=None):
    feats, cls = table_features(specs), class_onehot(specs)
    mem = memory_model(specs, budget)
    single = single_costs(COST, feats, cls)
    return env_lib.build_task(specs, num_devices, mem, feats, cls, single, pad_D=pad_D)


def test_mask_excludes_full_and_padding_devices():
    specs = [TableSpec(f"t{i}", 1000, 16, 1.0 + i) for i in range(3)]
    task, _ = _task(specs, 3, (1 + 2000) * 64 + 64, pad_D=4)  # two tables per device
    bound = env_lib.bind(COST.fn, task)
    state = env_lib.init_state(task, bound)
    for t in range(2):
        state = env_lib.step(task, state, t, 0, jnp.zeros(4), bound)
    legal = np.asarray(env_lib.fits_D(task, state, 2))
    assert legal.tolist() == [False, True, True, False]


def test_sampled_episodes_never_overflow_memory():
    # 6 equal tables, 3 devices, room for exactly 2 per device: unmasked sampling overflows
    # in most episodes; masked sampling never does.
    specs = [TableSpec(f"t{i}", 1000, 16, float(1 + i % 3)) for i in range(6)]
    budget = (1 + 2000) * 64 + 64
    task, order = _task(specs, 3, budget)
    net = PolicyNet()
    params = init_params(jax.random.key(0), net, 21)
    run = jax.jit(jax.vmap(lambda k: rollout(net, params, task, k, COST.fn, False)))
    out = run(jax.random.split(jax.random.key(1), 32))
    assert not np.asarray(out["dead"]).any()
    for actions in np.asarray(out["action"]):
        dev = np.zeros(6, int)
        dev[order] = actions
        assert np.bincount(dev, minlength=3).max() == 2
        plan_of(specs, dev, 3, budget).validate(
            specs)


def test_rl_improves_a_fixed_task():
    specs = [TableSpec(f"t{i}", 100 * (i + 1), (8, 16, 32, 64)[i % 4], float(1 + (i * 7) % 9))
             for i in range(10)]
    task, _ = _task(specs, 3, 1 << 30)
    tasks = env_lib.stack_tasks([task])
    c = sharder_runlocal.get_config()
    c.episodes_per_task, c.learning_rate, c.entropy_coef = 32, 3e-3, 0.0
    net = PolicyNet()
    tx = make_optimizer(c.learning_rate, 10**6)
    params = init_params(jax.random.key(0), net, 21)
    opt_state = tx.init(params)
    step = trainer.make_train_step(net, tx, COST.fn, c.objective, c.reward, c.value_coef,
                                   c.entropy_coef, c.episodes_per_task)
    rewards = []
    for it in range(60):
        params, opt_state, m, _ = step(params, opt_state, tasks, jax.random.key(it))
        rewards.append(float(m["reward"]))
    assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.02


@pytest.mark.parametrize("kind", ["ensemble", "analytical"])
def test_episodes_keep_device_sums_as_the_full_cost_would_give(tmp_path, kind):
    # An episode keeps per-device row sums (env.bind) instead of recomputing the cost over
    # the whole assignment: the sums must be the assignment's, and a step's what-if costs the
    # full cost of the assignment with the table added to each device. (A pessimistic
    # ensemble of two: its members' bind is the single network's.)
    from tests.placement.test_inference import _untrained

    specs = synthetic_pool(40, seed=2, max_rows=20_000)[:20]
    cost = (get_cost(512, _untrained(tmp_path, (1, 2)), 1.0) if kind == "ensemble"
            else get_cost(512))
    assert hasattr(cost.fn, "bind")  # not the one-hot fallback (BoundCost.of)
    feats, cls = table_features(specs), class_onehot(specs)
    task, _ = env_lib.build_task(specs, 4, memory_model(specs, 1 << 30), feats, cls,
                                 single_costs(cost, feats, cls))
    task = jax.tree.map(jnp.asarray, task)

    @jax.jit
    def check(state, t, a):
        bound = env_lib.bind(cost.fn, task)
        _, with_D, _ = env_lib.observe(task, state, t, bound)
        each_DxTxD = jnp.broadcast_to(state["assign_TxD"], (4, 20, 4)).at[
            jnp.arange(4), t, jnp.arange(4)].set(1.0)
        full_DxD = jax.vmap(lambda a: cost.fn(task["feats_TxF"], a, task["class_TxK"])[0])(
            each_DxTxD)
        state = env_lib.step(task, state, t, a, with_D, bound)
        return state, with_D, jnp.diagonal(full_DxD), state["assign_TxD"].T @ bound.rows_TxR

    state = env_lib.init_state(task, env_lib.bind(cost.fn, task))
    for t, a in enumerate((0, 3, 3, 1, 0, 2, 2)):
        state, with_D, full_D, sums_DxR = check(state, t, a)
        np.testing.assert_allclose(with_D, full_D, rtol=1e-5)
        np.testing.assert_allclose(state["sums_DxR"], sums_DxR, rtol=1e-5)
    assert float(with_D.min()) > 0  # every device holds tables: no trivial zeros compared


def test_inference_856_tables_on_128_devices_is_valid():
    specs = synthetic_pool(856, seed=1, max_rows=1_000_000)
    budget = 4 * sum(s.param_bytes() for s in specs) // 128
    net = PolicyNet()
    pol = LoadedPolicy(net, init_params(jax.random.key(0), net, 21), {}, 0)
    mem = memory_model(specs, budget)
    dev = policy_place(pol, specs, 128, mem, COST)
    assert dev.shape == (856,) and dev.min() >= 0 and dev.max() < 128
    plan_of(specs, dev, 128, budget).validate(specs)


class _Balancer:
    """A stand-in policy network that always picks the device with the lowest what-if cost
    (what a policy trained on cost learns first): deterministic, so the dead end is known."""

    def apply(self, params, *args, method=None):
        if method is not None:  # PolicyNet.encode
            return jnp.zeros((args[0].shape[0], EMB))
        scalars_DxS = args[2]
        return -scalars_DxS[:, 1], jnp.zeros(())


def test_a_cost_order_dead_end_is_placed_in_size_order():
    # Two small tables with many lookups come first in cost order; the balancer spreads them,
    # which leaves 6000 free rows on each of two devices for three 4000-row tables (the mask's
    # lookahead passes: 12000 free >= 12000 left). Placed largest first, everything fits.
    specs = ([TableSpec(f"small{i}", 2000, 16, 50.0) for i in range(2)]
             + [TableSpec(f"big{i}", 4000, 16, 1.0) for i in range(3)])
    budget = (1 + 8000) * 64 + 32
    task, order = _task(specs, 2, budget)
    assert sorted(order[:2].tolist()) == [0, 1]
    pol = LoadedPolicy(_Balancer(), {}, {}, 0)
    first = jax.jit(lambda task: rollout(pol.net, {}, task, jax.random.key(0), COST.fn, True))
    assert bool(first(task)["dead"])  # the cost order alone dead-ends
    dev = policy_place(pol, specs, 2, memory_model(specs, budget), COST)
    plan_of(specs, dev, 2, budget).validate(specs)
    # No order fits three 4000-row tables and more on two 8000-row devices: the error names one.
    specs.append(TableSpec("big3", 4000, 16, 1.0))
    with pytest.raises(PlacementError, match="does not fit"):
        policy_place(pol, specs, 2, memory_model(specs, budget), COST)


def test_max_device_reward_with_sigma_floors_and_expects_the_measured_maximum():
    """sigma 0: the predicted slowest device. sigma > 0: device 0 is floored at its costliest
    table alone (the network put it 1 ms below that), and near-equal devices cost more than
    one device well below the other; the padding device (cost 9) never counts."""
    task = {"single_T": jnp.asarray([5.0, 1.0, 1.0, 0.0]),
            "valid_D": jnp.asarray([1.0, 1.0, 0.0])}
    assign_TxD = jnp.asarray([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], jnp.float32)

    def scored(dev, sigma):
        dev_D = jnp.asarray(dev)
        return float(env_lib.scored_max_ms(task, dev_D, jnp.max(dev_D[:2]), assign_TxD, sigma))

    assert scored([4.0, 2.0, 9.0], 0.0) == pytest.approx(4.0)
    far = scored([4.0, 2.0, 9.0], 0.06)
    near = scored([4.0, 5.0, 9.0], 0.06)
    assert 5.0 * 0.98 < far < 5.0 * 1.03
    assert near > far * 1.02


def test_max_device_reward_with_shared_scores_the_slowest_device_of_two_or_more_tables():
    """Device 1 holds one table (predicted 6, the slowest): with `shared` the reward scores
    device 0 (two tables, floored at its costliest one, 5) and never the padding device."""
    task = {"single_T": jnp.asarray([5.0, 1.0, 6.0, 0.0]),
            "valid_D": jnp.asarray([1.0, 1.0, 0.0])}
    assign_TxD = jnp.asarray([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], jnp.float32)
    dev_D = jnp.asarray([4.0, 6.0, 9.0])
    for shared, want in ((False, 6.0), (True, 5.0)):
        got = env_lib.scored_max_ms(task, dev_D, jnp.asarray(6.0), assign_TxD, 0.0, shared)
        assert float(got) == pytest.approx(want)
