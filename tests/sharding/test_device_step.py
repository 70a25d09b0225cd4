"""The per-device cost hook runs alone on one device and matches its slice of the sharded run."""

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.optim import sparse
from autoshard_jax.sharding.device_step import device_embedding_step, device_meta
from autoshard_jax.sharding.stage import ShardedEmbeddingStage
from autoshard_jax.sharding.synthetic_plans import random_plan
from autoshard_jax.tables.spec import TableSpec

TABLES = [TableSpec("a", 500, 8, 3.0), TableSpec("b", 40, 32, 1.0), TableSpec("c", 90, 4, 20.0),
          TableSpec("d", 33, 12, 2.0), TableSpec("e", 7, 32, 5.0), TableSpec("f", 64, 16, 1.0)]
B = 8


def test_device_step_alone_matches_sharded_slice():
    opt = sparse.rowwise_adagrad(0.3)
    plan = random_plan(TABLES, 4, seed=11, mix=(0.5, 0.25, 0.25))
    stage = ShardedEmbeddingStage(TABLES, plan, opt)
    lay = stage.layout
    rng = np.random.default_rng(0)
    host_tables = {s.name: rng.normal(size=(s.rows, s.dim)).astype(np.float32) for s in TABLES}
    host_state = {s.name: {"accumulator": rng.random(s.rows).astype(np.float32)}
                  for s in TABLES}
    ids = []
    for s in TABLES:
        ids_BxH = rng.integers(-1, s.rows, size=(B, s.hotness)).astype(np.int32)
        ids_BxH[:, 0] = 3  # duplicates
        ids.append(ids_BxH)
    g_pooled = [rng.normal(size=(B, s.dim)).astype(np.float32) for s in TABLES]
    step = jnp.asarray(2, jnp.int32)

    tables = stage.tables_from_dict(host_tables)
    state = stage.state_from_dict(host_state)
    prepared = stage.prepare_batch({"dense": np.zeros((B, 1), np.float32), "ids": tuple(ids),
                                    "label": np.zeros((B,), np.float32)})
    g_sharded = tuple(jax.device_put(g, stage.sharded) for g in g_pooled)
    routed = jax.jit(stage.route)(prepared["ids"])
    new_tables, new_state = jax.jit(stage.update)(tables, state, routed, g_sharded, step)
    slabs = np.asarray(new_tables["slab"])
    accs = np.asarray(new_state["accumulator"])

    hook = jax.jit(device_embedding_step,
                   static_argnames=("row_optimizer", "kinds"))
    old_slabs = np.asarray(tables["slab"])
    old_accs = np.asarray(state["accumulator"])
    for d in range(lay.num_devices):
        ids_BxL, g_BxO = lay.device_inputs(ids, g_pooled, d)
        one = jax.devices()[d]
        args = jax.device_put((old_slabs[d], {"accumulator": old_accs[d]}, ids_BxL, g_BxO), one)
        pooled_BxO, slab_RxW, dev_state = hook(
            *args, step, device_meta(lay.all, d), row_optimizer=opt,
            kinds=tuple(stage.kinds.items()))
        assert slab_RxW.devices() == {one}
        np.testing.assert_array_equal(np.asarray(slab_RxW), slabs[d])
        np.testing.assert_array_equal(np.asarray(dev_state["accumulator"]), accs[d])
        # The forward pooled columns of this device's table-wise tables are plain sums.
        for (dev, t), c in lay.all.col.items():
            if dev != d or lay.kinds[t] != "table_wise":
                continue
            s = TABLES[t]
            want = np.where((ids[t] >= 0)[..., None], host_tables[s.name][ids[t]], 0).sum(1)
            np.testing.assert_allclose(np.asarray(pooled_BxO)[:, c:c + s.dim], want,
                                       rtol=1e-5, atol=1e-5)
