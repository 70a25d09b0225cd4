"""Sharded DLRM training equals single-device training for any plan and device count;
the sharded state checkpoints and resumes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32_rtol, random_batches

from autoshard_jax.models.dlrm import DLRMDense
from autoshard_jax.optim import sparse
from autoshard_jax.sharding.plan import plan_from_mapping
from autoshard_jax.sharding.stage import ShardedEmbeddingStage
from autoshard_jax.sharding.synthetic_plans import random_plan, skewed_plan, unlimited_memory
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train import step as step_lib
from autoshard_jax.train.checkpoint import Checkpointer, abstract_state

# Dims 4..128 (12 does not divide 128: padded packing), rows 10..60k, pooling 1..100.
TABLES = [
    TableSpec("big", 60_000, 8, 2.0), TableSpec("wide", 300, 128, 1.0),
    TableSpec("hot", 40, 4, 100.0), TableSpec("odd", 77, 12, 3.5),
    TableSpec("tiny", 10, 16, 1.0), TableSpec("mid", 1_000, 32, 7.0),
    TableSpec("narrow", 500, 4, 1.0), TableSpec("deep", 2_000, 64, 4.0),
]
BATCH, DENSE_DIM, STEPS = 16, 5, 3
DENSE = DLRMDense((8, 4), (8, 1), interaction="cat")
DENSE_TX = optax.adam(1e-2)


def make_batches(n: int, specs=TABLES, seed: int = 0, batch: int = BATCH) -> list[dict]:
    return random_batches(specs, n, batch, DENSE_DIM, seed)


def make_opt(name: str) -> sparse.RowOptimizer:
    return sparse.make_row_optimizer(name, 0.5)


@functools.cache
def reference_init():
    """The single-device initial TrainState (host numpy), shared by every run."""
    stage = step_lib.LocalEmbeddingStage(TABLES, make_opt("sgd"))
    batch = jax.tree.map(jnp.asarray, make_batches(1)[0])
    state = jax.jit(lambda r, b: step_lib.init_train_state(r, DENSE, stage, DENSE_TX, b))(
        jax.random.key(0), batch)
    return jax.tree.map(np.asarray, state.params)


@functools.cache
def reference_run(opt_name: str, combiner: str = "sum", steps: int = STEPS):
    """Losses, params and row state of the single-device model after `steps` steps."""
    stage = step_lib.LocalEmbeddingStage(TABLES, make_opt(opt_name), combiner)
    params = jax.tree.map(jnp.asarray, reference_init())
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state={"embedding": stage.init_state(params["embedding"]),
                   "dense": DENSE_TX.init(params["dense"])})
    train_step = jax.jit(step_lib.make_train_step(DENSE, stage, DENSE_TX))
    losses = []
    for b in make_batches(steps):
        state, metrics = train_step(state, jax.tree.map(jnp.asarray, b))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params), \
        jax.tree.map(np.asarray, state.opt_state["embedding"])


def initial_state(stage: ShardedEmbeddingStage) -> step_lib.TrainState:
    """The reference's initial values laid out by `stage` (init itself is tested once)."""
    params = reference_init()
    tables = stage.tables_from_dict(params["embedding"])
    dense = jax.device_put(params["dense"], stage.replicated)
    return step_lib.TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), stage.replicated),
        params={"embedding": tables, "dense": dense},
        opt_state={"embedding": stage.init_state(tables),
                   "dense": jax.device_put(DENSE_TX.init(dense), stage.replicated)})


def sharded_run(plan, opt_name: str, combiner: str = "sum", steps: int = STEPS):
    stage = ShardedEmbeddingStage(TABLES, plan, make_opt(opt_name), combiner)
    state = initial_state(stage)
    train_step = step_lib.jit_train_step(DENSE, stage, DENSE_TX, state)
    losses = []
    for b in make_batches(steps):
        state, metrics = train_step(state, stage.prepare_batch(b))
        losses.append(float(metrics["loss"]))
    return stage, state, losses, train_step


# Sharded and single-device runs sum the same terms in other orders (and another compiler
# reorders again), so they agree to float32 rounding of the largest sum, not bit for bit: an
# embedding row's gradient sums up to BATCH x hotness terms, once per step.
RTOL = f32_rtol(BATCH * max(s.hotness for s in TABLES), ops=STEPS)


def assert_close(got, want, err_msg=""):
    """Within RTOL of the array's scale: an element's rounding error follows the magnitudes that
    were summed into it (the tensor's values), not its own value, which may have cancelled."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max(),
                               err_msg=err_msg)


def assert_matches_reference(stage, state, losses, opt_name, combiner="sum"):
    want_losses, want_params, want_row_state = reference_run(opt_name, combiner)
    np.testing.assert_allclose(losses, want_losses, rtol=RTOL)
    got = stage.tables_to_dict(state.params["embedding"])
    for s in TABLES:
        assert_close(got[s.name], want_params["embedding"][s.name], s.name)
    got_state = stage.state_to_dict(state.opt_state["embedding"])
    for s in TABLES:
        for leaf, want in want_row_state[s.name].items():
            assert_close(got_state[s.name][leaf], want, f"{s.name}/{leaf}")
    for g, w in zip(jax.tree.leaves(state.params["dense"]), jax.tree.leaves(want_params["dense"]),
                    strict=True):
        assert_close(np.asarray(g), w)
    # Every replica of a replicated table received the same updates.
    for d in range(stage.plan.num_devices):
        replica = stage.tables_to_dict(state.params["embedding"], replica_device=d)
        for t, s in enumerate(TABLES):
            if stage.layout.kinds[t] == "replicated":
                np.testing.assert_array_equal(replica[s.name], got[s.name])


MIXED = (0.5, 0.25, 0.25)


# Each device count once, each optimizer on two of them (one compile per case; the tests below
# add row-wise Adagrad on 4 and 8 devices and element-wise Adagrad).
@pytest.mark.parametrize("num_devices,seed,mix,opt_name", [
    (1, 0, MIXED, "rowwise_adagrad"), (2, 1, MIXED, "sgd"), (4, 2, MIXED, "rowwise_adagrad"),
    (8, 3, MIXED, "sgd")])
def test_random_plans_match_single_device(num_devices, seed, mix, opt_name):
    plan = random_plan(TABLES, num_devices, seed=seed, mix=mix)
    stage, state, losses, _ = sharded_run(plan, opt_name)
    assert_matches_reference(stage, state, losses, opt_name)


def test_skewed_table_wise_plan_matches_single_device():
    plan = skewed_plan(TABLES, 8, fraction=0.8, seed=5)
    stage, state, losses, _ = sharded_run(plan, "rowwise_adagrad")
    assert_matches_reference(stage, state, losses, "rowwise_adagrad")


def test_init_equals_local_init():
    plan = random_plan(TABLES, 4, seed=2, mix=MIXED)
    stage = ShardedEmbeddingStage(TABLES, plan, make_opt("rowwise_adagrad"))
    setup = step_lib.setup_training(stage, DENSE, DENSE_TX, make_batches(1)[0])
    state = setup.init(jax.random.key(0))
    assert jax.tree.structure(state) == jax.tree.structure(setup.abstract)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(setup.abstract), strict=True):
        assert (leaf.shape, leaf.dtype, leaf.sharding) == (want.shape, want.dtype, want.sharding)
    want = reference_init()
    got = stage.tables_to_dict(state.params["embedding"])
    for s in TABLES:
        np.testing.assert_array_equal(got[s.name], want["embedding"][s.name])
    for g, w in zip(jax.tree.leaves(state.params["dense"]), jax.tree.leaves(want["dense"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    shardings = stage.state_shardings(state)
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sh
    slab = state.params["embedding"]["slab"]
    assert slab.shape == (4, stage.layout.phys_rows, stage.layout.width)
    assert slab.addressable_shards[0].data.shape == (1, stage.layout.phys_rows, 128)


@pytest.mark.parametrize("kind", ["row_wise", "replicated"])
def test_single_placement_type_plans(kind):
    plan = plan_from_mapping({s.name: kind for s in TABLES}, 4, unlimited_memory(TABLES))
    stage, state, losses, _ = sharded_run(plan, "rowwise_adagrad")
    assert_matches_reference(stage, state, losses, "rowwise_adagrad")


def test_elementwise_adagrad_and_mean_combiner():
    plan = random_plan(TABLES, 4, seed=7, mix=MIXED)
    stage, state, losses, _ = sharded_run(plan, "adagrad", combiner="mean")
    assert_matches_reference(stage, state, losses, "adagrad", combiner="mean")


def test_compiles_once_per_plan():
    """The setup's step is one compiled executable: it refuses any other input shape, so
    running every batch through it proves a single compilation."""
    plan = random_plan(TABLES, 4, seed=2, mix=MIXED)
    stage = ShardedEmbeddingStage(TABLES, plan, make_opt("sgd"))
    batches = make_batches(4)
    setup = step_lib.setup_training(stage, DENSE, DENSE_TX, batches[0])
    state = setup.init(jax.random.key(0))
    for b in batches:
        state, _ = setup.train_step(state, setup.place(b))
    # A batch whose ids are narrower than the hotness is padded to the same static shapes.
    b = make_batches(1, seed=9)[0]
    b["ids"] = tuple(x[:, :1] for x in b["ids"])
    state, metrics = setup.train_step(state, setup.place(b))
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises((TypeError, ValueError)):  # another batch size is another program
        setup.train_step(state, setup.place(make_batches(1, batch=2 * BATCH)[0]))


def test_dict_round_trip_is_exact():
    plan = random_plan(TABLES, 8, seed=3, mix=MIXED)
    stage = ShardedEmbeddingStage(TABLES, plan, make_opt("rowwise_adagrad"))
    rng = np.random.default_rng(0)
    tables = {s.name: rng.normal(size=(s.rows, s.dim)).astype(np.float32) for s in TABLES}
    back = stage.tables_to_dict(stage.tables_from_dict(tables))
    for s in TABLES:
        np.testing.assert_array_equal(back[s.name], tables[s.name])
    state = {s.name: {"accumulator": rng.random(s.rows).astype(np.float32)} for s in TABLES}
    back_state = stage.state_to_dict(stage.state_from_dict(state))
    for s in TABLES:
        np.testing.assert_array_equal(back_state[s.name]["accumulator"],
                                      state[s.name]["accumulator"])


def test_prepare_batch_errors():
    plan = random_plan(TABLES, 4, seed=0)
    stage = ShardedEmbeddingStage(TABLES, plan, make_opt("sgd"))
    batch = make_batches(1, batch=6)[0]
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 devices"):
        stage.prepare_batch(batch)
    batch = make_batches(1)[0]
    ids = list(batch["ids"])
    ids[2] = np.zeros((BATCH, 101), np.int32)
    with pytest.raises(ValueError, match=r"table 'hot': ids must be \[16, <= 100\]"):
        stage.prepare_batch({**batch, "ids": tuple(ids)})


def test_sharded_state_round_trips_and_resumes(tmp_path):
    plan = random_plan(TABLES, 4, seed=2, mix=(0.5, 0.25, 0.25))
    stage = ShardedEmbeddingStage(TABLES, plan, make_opt("rowwise_adagrad"))
    state = initial_state(stage)
    train_step = step_lib.jit_train_step(DENSE, stage, DENSE_TX, state)
    b0, b1 = (stage.prepare_batch(b) for b in make_batches(2))
    state, _ = train_step(state, b0)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {"data_position": 1})
        ckpt.wait_until_finished()
        # The target is a fresh state (other values) with the same shardings.
        restored, meta = ckpt.restore(None, abstract_state(initial_state(stage)))
    assert meta == {"data_position": 1}
    shardings = stage.state_shardings(state)
    for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                             jax.tree.leaves(shardings), strict=True):
        assert got.sharding == sh
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    slab = restored.params["embedding"]["slab"]
    assert slab.sharding.mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    assert len(slab.addressable_shards) == 4
    resumed, m1 = train_step(restored, b1)
    state, m2 = train_step(state, b1)
    assert float(m1["loss"]) == float(m2["loss"])
    np.testing.assert_array_equal(np.asarray(resumed.params["embedding"]["slab"]),
                                  np.asarray(state.params["embedding"]["slab"]))
