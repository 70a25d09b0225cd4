"""Sparse row optimizers against dense references on small tables."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autoshard_jax.models.embedding import embedding_bag, pool_backward
from autoshard_jax.optim import sparse

ROWS, DIM, BATCH, HOT = 12, 4, 6, 3


def make_batches(n_steps: int, seed: int = 0):
    """Batches with duplicate ids (within and across bags), -1 padding and untouched rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        ids_BxH = rng.integers(0, ROWS - 3, size=(BATCH, HOT)).astype(np.int32)  # rows 9.. unused
        ids_BxH[rng.random(ids_BxH.shape) < 0.3] = -1
        ids_BxH[0] = [2, 2, -1]  # duplicate inside a bag
        ids_BxH[1, 0] = 2  # ... and across bags
        ids_BxH[-1] = -1  # all padding
        target_BxE = rng.normal(size=(BATCH, DIM)).astype(np.float32)
        out.append((jnp.asarray(ids_BxH), jnp.asarray(target_BxE)))
    return out


def loss_of_pooled(pooled_BxE, target_BxE):
    return jnp.sum((jnp.tanh(pooled_BxE) - target_BxE) ** 2)


def sparse_step(opt, table, state, ids_BxH, target_BxE, step, combiner):
    """What the train step does: grad w.r.t. the pooled vectors, then per-row grads."""
    pooled = embedding_bag(table, ids_BxH, combiner)
    g_pooled = jax.grad(loss_of_pooled)(pooled, target_BxE)
    g_rows = pool_backward(g_pooled, ids_BxH, combiner).reshape(-1, table.shape[1])
    return opt.update(table, state, ids_BxH.reshape(-1), g_rows, jnp.asarray(step, jnp.int32))


def dense_grad(table, ids_BxH, target_BxE, combiner):
    return jax.grad(lambda t: loss_of_pooled(embedding_bag(t, ids_BxH, combiner), target_BxE))(
        table)


def init_table(seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(ROWS, DIM)).astype(np.float32))


def schedule(step):
    return 0.3 / (1.0 + step)


LRS = [0.1, schedule]


def run_sparse(opt, batches, combiner):
    table = init_table()
    state = opt.init(table)
    update = jax.jit(lambda t, s, i, y, k: sparse_step(opt, t, s, i, y, k, combiner))
    for step, (ids, target) in enumerate(batches):
        table, state = update(table, state, ids, target, step)
    return table, state


def run_optax(tx, batches, combiner):
    table = init_table()
    opt_state = tx.init(table)
    for ids, target in batches:
        g = dense_grad(table, ids, target, combiner)
        updates, opt_state = tx.update(g, opt_state, table)
        table = optax.apply_updates(table, updates)
    return table, opt_state


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("lr", LRS)
def test_sgd_matches_dense_optax(lr, combiner):
    batches = make_batches(4)
    got, state = run_sparse(sparse.sgd(lr), batches, combiner)
    want, _ = run_optax(optax.sgd(lr), batches, combiner)
    assert state == {}
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[ROWS - 3:], np.asarray(init_table())[ROWS - 3:])


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("lr", LRS)
def test_adagrad_matches_dense_optax(lr, combiner):
    batches = make_batches(4)
    got, state = run_sparse(sparse.adagrad(lr), batches, combiner)
    tx = optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7)
    want, opt_state = run_optax(tx, batches, combiner)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    (rss,) = [s for s in jax.tree.leaves(opt_state) if s.shape == (ROWS, DIM)]
    np.testing.assert_allclose(np.asarray(state["accumulator"]), np.asarray(rss), rtol=1e-5)


def rowwise_adagrad_reference(batches, lr, combiner, eps=1e-8, init_acc=0.0):
    """Dense row-wise Adagrad in numpy over *all* rows.

    acc[r] += mean_e(g[r]^2); w[r] -= lr * g[r] / (sqrt(acc[r]) + eps). A row the batch never
    touched has g[r] = 0: acc unchanged, no update. A touched row whose gradients cancel to exactly
    zero behaves the same way, so the dense formula covers every row (no NaN from 0/0 either, as
    eps > 0).
    """
    table = np.asarray(init_table(), np.float64)
    acc = np.full(ROWS, init_acc, np.float64)
    for step, (ids, target) in enumerate(batches):
        g = np.asarray(dense_grad(jnp.asarray(table, jnp.float32), ids, target, combiner),
                       np.float64)
        acc += np.mean(g**2, axis=1)
        rate = lr(step) if callable(lr) else lr
        table -= rate * g / (np.sqrt(acc)[:, None] + eps)
    return table, acc


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("lr,init_acc", [(0.1, 0.0), (schedule, 0.5)])
def test_rowwise_adagrad_matches_dense_reference(lr, combiner, init_acc):
    batches = make_batches(4)
    got, state = run_sparse(sparse.rowwise_adagrad(lr, initial_accumulator_value=init_acc),
                            batches, combiner)
    want, acc = rowwise_adagrad_reference(batches, lr, combiner, init_acc=init_acc)
    assert state["accumulator"].shape == (ROWS,)
    np.testing.assert_allclose(np.asarray(state["accumulator"]), acc, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state["accumulator"])[ROWS - 3:], init_acc)


@pytest.mark.parametrize("name", ["sgd", "rowwise_adagrad", "adagrad"])
def test_cancelling_gradients_on_a_touched_row(name):
    """Row 3 is touched twice with gradients that sum to exactly zero: no change, no NaN."""
    kwargs = {"initial_accumulator_value": 0.0} if name != "sgd" else {}
    opt = sparse.make_row_optimizer(name, 0.5, **kwargs)
    table = init_table()
    state = opt.init(table)
    ids = jnp.asarray([3, 3, 5, -1], jnp.int32)
    g = jnp.asarray([[1.0, -2.0, 0.5, 0.25], [-1.0, 2.0, -0.5, -0.25], [1.0, 1.0, 1.0, 1.0],
                     [7.0, 7.0, 7.0, 7.0]], jnp.float32)
    new_table, new_state = jax.jit(opt.update)(table, state, ids, g, jnp.int32(0))
    new_table = np.asarray(new_table)
    assert np.all(np.isfinite(new_table))
    # SGD scatter-adds both halves (w - d + d rounds); the adaptive ones combine them first.
    np.testing.assert_allclose(new_table[3], np.asarray(table)[3], rtol=0,
                               atol=1e-6 if name == "sgd" else 0)
    changed = np.flatnonzero(~np.isclose(new_table, np.asarray(table), rtol=0, atol=1e-6).all(1))
    np.testing.assert_array_equal(changed, [5])  # padding (gradient 7) touched nothing
    for v in new_state.values():
        assert np.all(np.isfinite(np.asarray(v)))
        np.testing.assert_array_equal(np.asarray(v)[3], 0.0)


def test_combine_duplicates():
    ids = jnp.asarray([4, -1, 2, 4, 7, 2, 4], jnp.int32)
    g = jnp.arange(7 * 2, dtype=jnp.float32).reshape(7, 2)
    unique, summed = sparse.combine_duplicates(ids, g, rows=5)  # 7 is out of range -> dropped
    unique, summed = np.asarray(unique), np.asarray(summed)
    assert unique.shape == (7,)
    got = {int(u): summed[k] for k, u in enumerate(unique) if u < 5}
    assert set(got) == {2, 4}
    np.testing.assert_array_equal(got[2], np.asarray(g)[[2, 5]].sum(0))
    np.testing.assert_array_equal(got[4], np.asarray(g)[[0, 3, 6]].sum(0))
    assert np.all(unique[unique >= 5] == 5)


@pytest.mark.parametrize("name", ["sgd", "rowwise_adagrad", "adagrad"])
def test_update_donates_table_and_builds_no_table_sized_buffer(name):
    rows, dim = 1_000_000, 16
    table_bytes = rows * dim * 4
    opt = sparse.make_row_optimizer(name, 0.1)
    table = jnp.zeros((rows, dim), jnp.float32)
    state = opt.init(table)
    ids = jnp.asarray(np.arange(512) % 300 - 1, jnp.int32)
    grads = jnp.ones((512, dim), jnp.float32)
    update = jax.jit(opt.update, donate_argnums=(0, 1))
    compiled = update.lower(table, state, ids, grads, jnp.int32(0)).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < table_bytes // 100, mem
        assert mem.alias_size_in_bytes >= table_bytes, mem  # the output reuses the table buffer
    new_table, new_state = update(table, state, ids, grads, jnp.int32(0))
    assert table.is_deleted()
    assert all(v.is_deleted() for v in jax.tree.leaves(state))
    if name == "sgd":  # id 1 appears twice with gradient 1
        np.testing.assert_allclose(np.asarray(new_table[1]), -0.2, rtol=1e-6)
    assert np.all(np.asarray(new_table[1]) < 0)
    assert np.all(np.asarray(new_table[299:302]) == 0)  # untouched rows


def test_make_row_optimizer():
    for name in ("sgd", "rowwise_adagrad", "adagrad"):
        assert sparse.make_row_optimizer(name, 0.1).name == name
    opt = sparse.make_row_optimizer("rowwise_adagrad", 0.1, initial_accumulator_value=0.25)
    np.testing.assert_array_equal(np.asarray(opt.init(jnp.zeros((3, 2)))["accumulator"]), 0.25)
    with pytest.raises(ValueError, match="unknown embedding optimizer 'adam'"):
        sparse.make_row_optimizer("adam", 0.1)


def test_make_dense_optimizer():
    tx = sparse.make_dense_optimizer("adam", 0.01, b1=0.8)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.01, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown optax optimizer"):
        sparse.make_dense_optimizer("not_an_optimizer", 0.1)
    with pytest.raises(ValueError, match="unknown optax optimizer"):
        sparse.make_dense_optimizer("__version__", 0.1)


def test_state_kinds_and_fills():
    want = {"sgd": {}, "rowwise_adagrad": {"accumulator": sparse.ROW},
            "adagrad": {"accumulator": sparse.ELEMENT}}
    for name, kinds in want.items():
        opt = sparse.make_row_optimizer(name, 0.1)
        assert sparse.state_kinds(opt) == sparse.state_kinds(name) == kinds
    assert sparse.state_fills(sparse.rowwise_adagrad(0.1, initial_accumulator_value=0.3)) == {
        "accumulator": pytest.approx(0.3)}
    bad = sparse.RowOptimizer("bad", lambda t: {"x": t[0]}, None)
    with pytest.raises(ValueError, match="only \\[R\\] or \\[R, E\\]"):
        sparse.state_kinds(bad)
