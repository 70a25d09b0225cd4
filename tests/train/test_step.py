"""The train step (dense autodiff + sparse row updates) against full dense autodiff of DLRM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_batches

from autoshard_jax.models.dlrm import DLRM, DLRMDense
from autoshard_jax.optim import sparse
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train import step as step_lib

TABLES = [TableSpec("t0", 20, 4, 3.0), TableSpec("t1", 9, 4, 1.0), TableSpec("t2", 13, 4, 2.0)]
BOTTOM, TOP = (6, 4), (5, 1)
BATCH, DENSE_DIM, N_STEPS = 8, 3, 3


def make_batches(n, seed=0):
    return [jax.tree.map(jnp.asarray, b) for b in random_batches(TABLES, n, BATCH, DENSE_DIM, seed)]


def models(combiner, **kw):
    full = DLRM(TABLES, BOTTOM, TOP, combiner=combiner, **kw)
    dense = DLRMDense(BOTTOM, TOP, **kw)
    return full, dense


@functools.cache
def _init_params_np(kw_items):
    """Parameters do not depend on the combiner, so one init (and compile) serves both."""
    full = DLRM(TABLES, BOTTOM, TOP, **dict(kw_items))
    batch = make_batches(1)[0]
    params = jax.jit(full.init)(jax.random.key(7), batch["dense"], batch["ids"])["params"]
    # Scale tables up so the embeddings matter for the loss and their updates are visible.
    params = {"embedding": jax.tree.map(lambda t: t * 20.0, params["embedding"]),
              "dense": params["dense"]}
    return jax.tree.map(np.asarray, params)


def init_params(**kw):
    """Fresh device arrays each call (the train step may donate them)."""
    return jax.tree.map(jnp.asarray, _init_params_np(tuple(sorted(kw.items()))))


def full_loss(full, params, batch):
    """Plain autodiff target: the whole DLRM, tables included, as one function of params."""
    logits = full.apply({"params": params}, batch["dense"], batch["ids"])
    return step_lib.bce_with_logits(logits, batch["label"])


def train_with_step(dense_model, stage, dense_tx, params, batches, donate=False):
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state={"embedding": stage.init_state(params["embedding"]),
                   "dense": dense_tx.init(params["dense"])})
    train_step = jax.jit(step_lib.make_train_step(dense_model, stage, dense_tx),
                         donate_argnums=0 if donate else ())
    losses = []
    for batch in batches:
        old = state
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
        if donate:
            assert all(t.is_deleted() for t in jax.tree.leaves(old.params["embedding"]))
    return state, losses


def assert_trees_close(got, want, rtol, atol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for k in path:
            w = w[k.key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("combiner,lr", [("sum", 0.5), ("mean", lambda s: 0.5 / (1.0 + s))])
def test_sgd_step_equals_dense_autodiff(combiner, lr):
    full, dense_model = models(combiner)
    batches = make_batches(N_STEPS)
    params0 = init_params()
    stage = step_lib.LocalEmbeddingStage(TABLES, sparse.sgd(lr), combiner)
    state, losses = train_with_step(dense_model, stage, optax.sgd(lr), params0, batches,
                                    donate=True)

    tx = optax.sgd(lr)
    params0 = init_params()  # the first copy was donated
    params = params0
    opt_state = tx.init(params)

    @jax.jit
    def reference_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(full_loss, argnums=1)(full, params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    want_losses = []
    for batch in batches:
        params, opt_state, loss = reference_step(params, opt_state, batch)
        want_losses.append(float(loss))

    assert int(state.step) == N_STEPS
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_trees_close(state.params, params, rtol=1e-4, atol=1e-5)
    # The embeddings really moved (otherwise the comparison proves little).
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, params0)
    assert all(m > 1e-3 for m in jax.tree.leaves(moved["embedding"]))


def rowwise_adagrad_dense(table, acc, g, lr, eps):
    acc = acc + jnp.mean(g**2, axis=1)
    return table - lr * g / (jnp.sqrt(acc)[:, None] + eps), acc


def test_rowwise_adagrad_and_adam_step_equals_reference(combiner="sum"):
    emb_lr, dense_lr, eps, init_acc = 0.3, 0.01, 1e-8, 0.05
    full, dense_model = models(combiner)
    batches = make_batches(N_STEPS, seed=1)
    params0 = init_params()
    row_opt = sparse.make_row_optimizer("rowwise_adagrad", emb_lr, eps=eps,
                                        initial_accumulator_value=init_acc)
    stage = step_lib.LocalEmbeddingStage(TABLES, row_opt, combiner)
    dense_tx = sparse.make_dense_optimizer("adam", dense_lr)
    state, losses = train_with_step(dense_model, stage, dense_tx, params0, batches)

    tx = optax.adam(dense_lr)
    params = init_params()
    opt_state = tx.init(params["dense"])
    acc = {s.name: jnp.full((s.rows,), init_acc) for s in TABLES}

    @jax.jit
    def reference_step(params, opt_state, acc, batch):
        loss, grads = jax.value_and_grad(full_loss, argnums=1)(full, params, batch)
        updates, opt_state = tx.update(grads["dense"], opt_state, params["dense"])
        tables, new_acc = {}, {}
        for s in TABLES:
            tables[s.name], new_acc[s.name] = rowwise_adagrad_dense(
                params["embedding"][s.name], acc[s.name], grads["embedding"][s.name], emb_lr, eps)
        params = {"embedding": tables, "dense": optax.apply_updates(params["dense"], updates)}
        return params, opt_state, new_acc, loss

    want_losses = []
    for batch in batches:
        params, opt_state, acc, loss = reference_step(params, opt_state, acc, batch)
        want_losses.append(float(loss))

    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_trees_close(state.params, params, rtol=1e-4, atol=1e-5)
    want_acc = {k: {"accumulator": v} for k, v in acc.items()}
    assert_trees_close(state.opt_state["embedding"], want_acc, rtol=1e-4, atol=1e-7)


def test_eval_step_equals_model_apply():
    full, dense_model = models("mean")
    batch = make_batches(1, seed=2)[0]
    params = init_params()
    stage = step_lib.LocalEmbeddingStage(TABLES, sparse.sgd(0.1), "mean")
    eval_step = jax.jit(step_lib.make_eval_step(dense_model, stage))
    got = eval_step(params, batch)
    want = full.apply({"params": params}, batch["dense"], batch["ids"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_init_train_state_layout():
    _, dense_model = models("sum")
    batch = make_batches(1)[0]
    stage = step_lib.LocalEmbeddingStage(TABLES, sparse.rowwise_adagrad(0.1), "sum")
    tx = optax.adam(1e-3)
    state = jax.jit(lambda r: step_lib.init_train_state(r, dense_model, stage, tx, batch))(
        jax.random.key(0))
    assert int(state.step) == 0
    for s in TABLES:
        table = np.asarray(state.params["embedding"][s.name])
        assert table.shape == (s.rows, s.dim)
        assert np.all(np.abs(table) <= (1.0 / s.rows) ** 0.5)
        assert state.opt_state["embedding"][s.name]["accumulator"].shape == (s.rows,)
    assert set(state.params["dense"]) == {"bottom_mlp", "top_mlp"}


def test_local_stage_rejects_bad_combiner():
    with pytest.raises(ValueError, match="combiner"):
        step_lib.LocalEmbeddingStage(TABLES, sparse.sgd(0.1), "max")


def test_bce_with_logits():
    logits = jnp.asarray([-3.0, 0.0, 2.5])
    labels = jnp.asarray([0.0, 1.0, 1.0])
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    want = -np.mean(np.asarray(labels) * np.log(p) + (1 - np.asarray(labels)) * np.log(1 - p))
    np.testing.assert_allclose(float(step_lib.bce_with_logits(logits, labels)), want, rtol=1e-6)
