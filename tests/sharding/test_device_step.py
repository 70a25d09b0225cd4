"""The sharded embedding update against an independent dense reference, and the per-device cost
hook run alone on one device against its slice of the sharded run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F32_EPS, f32_sum_error

from autoshard_jax.optim import sparse
from autoshard_jax.sharding.device_step import device_embedding_step, device_meta
from autoshard_jax.sharding.stage import ShardedEmbeddingStage
from autoshard_jax.sharding.synthetic_plans import random_plan
from autoshard_jax.tables.spec import TableSpec

TABLES = [TableSpec("a", 500, 8, 3.0), TableSpec("b", 40, 32, 1.0), TableSpec("c", 90, 4, 20.0),
          TableSpec("d", 33, 12, 2.0), TableSpec("e", 7, 32, 5.0), TableSpec("f", 64, 16, 1.0)]
B = 8
LR, EPS = 0.3, 1e-8


@pytest.fixture(scope="module")
def run():
    """One sharded update of a random plan (table-wise, row-wise and replicated tables)."""
    opt = sparse.rowwise_adagrad(LR, eps=EPS)
    plan = random_plan(TABLES, 4, seed=11, mix=(0.5, 0.25, 0.25))
    stage = ShardedEmbeddingStage(TABLES, plan, opt)
    assert set(stage.layout.kinds) == {"table_wise", "row_wise", "replicated"}
    rng = np.random.default_rng(0)
    host_tables = {s.name: rng.normal(size=(s.rows, s.dim)).astype(np.float32) for s in TABLES}
    # Accumulators away from 0 keep the update well conditioned in the gradient (see tolerance).
    host_state = {s.name: {"accumulator": rng.uniform(0.5, 1.5, s.rows).astype(np.float32)}
                  for s in TABLES}
    ids = []
    for s in TABLES:
        ids_BxH = rng.integers(-1, s.rows, size=(B, s.hotness)).astype(np.int32)
        ids_BxH[:, 0] = 3  # duplicates within the batch
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
    return dict(opt=opt, stage=stage, host_tables=host_tables, host_state=host_state, ids=ids,
                g_pooled=g_pooled, step=step, tables=tables, state=state,
                new_tables=new_tables, new_state=new_state)


def test_sharded_update_equals_dense_autodiff_and_numpy_adagrad(run):
    """The update of every table (whatever its placement) is row-wise Adagrad on the dense
    gradient of sum(pooled * g_pooled): jax.grad of a plain gather-sum, Adagrad in float64."""
    stage = run["stage"]
    got_tables = stage.tables_to_dict(run["new_tables"])
    got_acc = {t: s["accumulator"] for t, s in stage.state_to_dict(run["new_state"]).items()}
    for t, s in enumerate(TABLES):
        ids_BxH, g_BxE = jnp.asarray(run["ids"][t]), jnp.asarray(run["g_pooled"][t])

        def loss(w_RxE, g_BxE, ids_BxH=ids_BxH):
            rows_BxHxE = jnp.where((ids_BxH >= 0)[..., None], w_RxE[ids_BxH], 0.0)
            return jnp.sum(rows_BxHxE.sum(1) * g_BxE)

        w = run["host_tables"][s.name]
        grad_RxE = np.asarray(jax.grad(loss)(jnp.asarray(w), g_BxE), np.float64)
        abs_RxE = np.asarray(jax.grad(loss)(jnp.asarray(w), jnp.abs(g_BxE)), np.float64)
        acc_R = run["host_state"][s.name]["accumulator"] + (grad_RxE**2).mean(1)
        want_RxE = w - LR * grad_RxE / (np.sqrt(acc_R)[:, None] + EPS)

        # Tolerance from float32 rounding: each row's gradient sums at most B * H terms, in float32
        # on both sides; the update's derivative in the gradient is at most 2 lr / sqrt(acc), and
        # the last few operations round by a few eps of their operands.
        g_err_RxE = 2 * f32_sum_error(B * s.hotness, abs_RxE)
        g_err_R = g_err_RxE.max(1)
        w_tol_RxE = (2 * LR * g_err_R / np.sqrt(acc_R))[:, None] + \
            4 * F32_EPS * (np.abs(w) + np.abs(want_RxE - w))
        acc_tol_R = 2 * (np.abs(grad_RxE) * g_err_RxE).max(1) + 4 * F32_EPS * acc_R
        assert np.all(np.abs(got_tables[s.name] - want_RxE) <= w_tol_RxE), s.name
        assert np.all(np.abs(got_acc[s.name] - acc_R) <= acc_tol_R), s.name
        touched = np.unique(run["ids"][t][run["ids"][t] >= 0])
        assert np.all(np.any(got_tables[s.name][touched] != w[touched], axis=1)), s.name
        untouched = np.setdiff1d(np.arange(s.rows), touched)
        np.testing.assert_array_equal(got_tables[s.name][untouched], w[untouched])


def test_device_step_alone_matches_sharded_slice(run):
    stage, opt, ids, g_pooled = run["stage"], run["opt"], run["ids"], run["g_pooled"]
    lay = stage.layout
    slabs = np.asarray(run["new_tables"]["slab"])
    accs = np.asarray(run["new_state"]["accumulator"])
    hook = jax.jit(device_embedding_step, static_argnames=("row_optimizer", "kinds"))
    old_slabs = np.asarray(run["tables"]["slab"])
    old_accs = np.asarray(run["state"]["accumulator"])
    for d in range(lay.num_devices):
        ids_BxL, g_BxO = lay.device_inputs(ids, g_pooled, d)
        one = jax.devices()[d]
        args = jax.device_put((old_slabs[d], {"accumulator": old_accs[d]}, ids_BxL, g_BxO), one)
        pooled_BxO, slab_RxW, dev_state = hook(
            *args, run["step"], device_meta(lay.all, d), row_optimizer=opt,
            kinds=tuple(stage.kinds.items()))
        assert slab_RxW.devices() == {one}
        np.testing.assert_array_equal(np.asarray(slab_RxW), slabs[d])
        np.testing.assert_array_equal(np.asarray(dev_state["accumulator"]), accs[d])
        # The forward pooled columns of this device's table-wise tables are plain sums.
        for (dev, t), c in lay.all.col.items():
            if dev != d or lay.kinds[t] != "table_wise":
                continue
            s = TABLES[t]
            rows_BxHxE = np.where((ids[t] >= 0)[..., None],
                                  run["host_tables"][s.name][ids[t]].astype(np.float64), 0)
            tol_BxE = 2 * f32_sum_error(s.hotness, np.abs(rows_BxHxE).sum(1))
            got_BxE = np.asarray(pooled_BxO)[:, c:c + s.dim]
            assert np.all(np.abs(got_BxE - rows_BxHxE.sum(1)) <= tol_BxE), s.name
