"""FGD as an optax transformation: generator maths, exact reduction to Batch Update, and the
forecast beating the raw gradient variation on a linear-drift toy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autoshard_jax.models.embedding import embedding_bag
from autoshard_jax.tables.spec import TableSpec
from fgd import methods as M
from fgd.models import OnlineModel, dlrm_model
from fgd.streams import synthetic_stream
from fgd.transform import (
    GATE_STATS,
    ExtrapGenerator,
    GatedGenerator,
    L2OGenerator,
    add_evidence,
    future_gradient_descent,
    gate_from_evidence,
    match_loss,
    unroll_loss,
)

TABLES = [TableSpec("a", 40, 4), TableSpec("b", 15, 4)]


def _grads(seed, n):
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)} for _ in range(n)]


def test_extrap_matches_numpy_reference():
    g = _grads(0, 3)
    meta = {"w": jnp.array([0.5, -2.0]), "b": jnp.array([1.0, 0.25])}
    out = ExtrapGenerator(2)(meta, g)
    for k, lam in (("w", (0.5, -2.0)), ("b", (1.0, 0.25))):
        a, b, c = (np.asarray(x[k], np.float64) for x in g)
        np.testing.assert_allclose(out[k], a + lam[0] * (a - b) + lam[1] * (b - c), rtol=1e-5)
    # lambda_1 = -1 on a 2-cycle returns the gradient of the previous period (same regime).
    np.testing.assert_allclose(ExtrapGenerator(1)(jax.tree.map(lambda x: -jnp.ones(1), meta),
                                                  g[:2])["w"], g[1]["w"], rtol=1e-6)


@pytest.mark.parametrize("gen", [ExtrapGenerator(2), L2OGenerator(2)])
def test_generators_are_identity_at_init(gen):
    g = _grads(1, 3)
    out = gen(gen.init(g[0], jax.random.key(0)), g)
    for k in g[0]:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(g[0][k]))


def test_gate_scales_the_correction_and_is_exactly_g_when_closed():
    g = _grads(3, 2)
    gen = GatedGenerator(ExtrapGenerator(1))
    meta = gen.init(g[0])
    meta["inner"] = jax.tree.map(lambda x: jnp.full((1,), 2.0), meta["inner"])
    closed = gen(meta, g)
    for k in g[0]:
        assert np.asarray(closed[k]).tobytes() == np.asarray(g[0][k]).tobytes()
        for c in (0.25, 1.0):
            out = gen(dict(meta, gate=jnp.float32(c)), g)
            a, b = np.asarray(g[0][k], np.float64), np.asarray(g[1][k], np.float64)
            np.testing.assert_allclose(out[k], a + c * 2.0 * (a - b), rtol=1e-5, atol=1e-6)


def test_gate_from_evidence_against_hand_computation():
    zero = {k: 0.0 for k in GATE_STATS}
    assert gate_from_evidence(zero) == 0.0  # no evidence: Batch Update
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1.0, 400), rng.normal(0.1, 1.0, 400)
    stats = add_evidence(add_evidence(zero, a), b)
    d = np.concatenate([a, b])
    se2_rows = d.var(ddof=1) / d.size
    se2_periods = np.var([a.mean(), b.mean()], ddof=1) / 2
    want = 1 - max(se2_rows, se2_periods) / d.mean() ** 2
    assert 0 < want < 1
    assert gate_from_evidence(stats) == pytest.approx(want, rel=1e-4)
    # A negative mean gain, or one within a standard error of zero, closes the gate.
    assert gate_from_evidence(add_evidence(zero, -a)) == 0.0
    assert gate_from_evidence(add_evidence(zero, np.array([0.01, -1.0, 1.0]))) == 0.0
    # Many standard errors above zero: nearly open.
    assert gate_from_evidence(add_evidence(zero, rng.normal(1.0, 0.1, 100))) > 0.99


def test_wrapper_feeds_the_forecast_to_the_base_optimizer():
    g, prev, params = _grads(2, 3)
    gen = ExtrapGenerator(1)
    tx = future_gradient_descent(optax.sgd(0.1), gen)
    u0, _ = tx.update(g, tx.init(params), params)  # no history: the base optimizer alone
    meta = {"w": jnp.array([2.0]), "b": jnp.array([-1.0])}
    u1, _ = tx.update(g, tx.init(params), params, history=(prev,), meta=meta)
    for k, lam in (("w", 2.0), ("b", -1.0)):
        np.testing.assert_allclose(u0[k], -0.1 * np.asarray(g[k]), rtol=1e-6)
        want = -0.1 * (np.asarray(g[k]) + lam * (np.asarray(g[k]) - np.asarray(prev[k])))
        np.testing.assert_allclose(u1[k], want, rtol=1e-5)


class Tiny(nn.Module):
    """Embedding of the first table + dense features -> one logit: cheap to compile."""

    @nn.compact
    def __call__(self, dense_BxD, ids):
        table = self.param("emb", nn.initializers.normal(0.1), (40, 4))
        pooled_BxE = embedding_bag(table, ids[0], "sum")
        return nn.Dense(1)(jnp.concatenate([dense_BxD, pooled_BxE], axis=1))[:, 0]


@pytest.fixture(scope="module")
def tiny():
    stream = synthetic_stream(TABLES, 3, seed=0, zipf_a=1.0, drift="linear", speed=0.3,
                              num_periods=4, samples_per_period=600, initial=4)
    model = OnlineModel(Tiny())
    pieces = M.Pieces(model, M.Hyper(batch_size=128, lr=0.01, history=1, meta_batch=128,
                                     meta_steps=2, unroll_steps=2))
    example = M.padded_batches(stream.period(0), 128, None)[0]
    return stream, pieces, pieces.init(jax.random.key(0), example)


@pytest.fixture(scope="module")
def setup():
    history = 2
    stream = synthetic_stream(TABLES, 3, seed=0, zipf_a=1.0, drift="linear", speed=0.3,
                              num_periods=4, samples_per_period=600, initial=4)
    model = dlrm_model(TABLES, (8, 4), (8, 1))
    pieces = M.Pieces(model, M.Hyper(batch_size=128, lr=0.01, history=history, meta_batch=256,
                                     meta_steps=2, unroll_steps=2))
    example = M.padded_batches(stream.period(0), 128, None)[0]
    return stream, pieces, pieces.init(jax.random.key(0), example)


@pytest.mark.parametrize("method", ["fgd", "fgd_l2o"])
def test_fgd_at_initial_meta_reproduces_batch_update_bit_for_bit(method, setup):
    stream, pieces, params = setup
    hist = [stream.period(3 - k) for k in range(3)]
    bu = M.train_epochs(pieces, params, hist[0], seed=0, t=3, epochs=1)
    gen = M.generator_for(method, 2)
    fgd = M.train_fgd(pieces, gen, gen.init(params, jax.random.key(5)), params, hist, 0, 3)
    for a, b in zip(jax.tree.leaves(bu), jax.tree.leaves(fgd), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if method != "fgd":
        return
    # ... and an open gate on a moved generator does change the trajectory (the test can fail).
    meta = {"inner": jax.tree.map(lambda p: jnp.full((2,), 0.5), params), "gate": jnp.float32(1)}
    moved = M.train_fgd(pieces, gen, meta, params, hist, 0, 3)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(bu), jax.tree.leaves(moved), strict=True))


@pytest.mark.parametrize("gen_name,objectives", [("extrap", ("match", "unroll")),
                                                 ("l2o", ("match",))])  # the study's variants
def test_meta_objectives_move_phi_and_are_finite(gen_name, objectives, tiny):
    stream, pieces, params = tiny
    hist = [stream.period(3 - k) for k in range(3)]
    gen = M.make_generator(gen_name, 1)
    meta0 = gen.init(params, jax.random.key(1))
    for objective in objectives:
        meta, _, loss = M.meta_update(pieces, gen, objective, meta0,
                                      pieces.meta_tx.init(meta0), params, params, hist, 0, 3)
        if objective == "match":
            assert 0 < loss < 10  # relative to Batch Update's forecast error
        assert np.isfinite(loss)
        assert any(not np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(meta), jax.tree.leaves(meta0), strict=True))


def test_unroll_loss_at_init_equals_base_training_loss(tiny):
    stream, pieces, params = tiny
    gen = ExtrapGenerator(1)
    rng = np.random.default_rng(0)
    cur = [M._sample(stream.period(2), 64, rng) for _ in range(2)]
    old = [M._sample(stream.period(1), 64, rng) for _ in range(2)]
    target = M._sample(stream.period(3), 64, rng)
    got = jax.jit(lambda meta, p, batches, tgt: unroll_loss(
        gen, meta, pieces.model, pieces.base, p, batches, tgt))(
        gen.init(params), params, (M.stack(cur), M.stack(old)), target)
    p, s = params, pieces.base.init(params)
    for b in cur:  # Batch Update's own compiled step on the newest period's batches
        p, s = pieces.bu_step(p, s, b)
    np.testing.assert_allclose(got, jax.jit(pieces.model.loss)(p, target), rtol=1e-5)


def test_forecast_error_falls_below_gradient_variation_on_linear_drift():
    """Least squares whose true weights move linearly, fresh samples each period: the gradient
    moves by a predictable step per period, so the generator fitted online by gradient matching
    forecasts the next period's gradient better than Batch Update's g_t."""
    rng = np.random.default_rng(0)
    d, n = 6, 4000
    w0, v = rng.normal(size=d), rng.normal(size=d)
    x = [rng.normal(size=(n, d)) for _ in range(12)]
    y = [xi @ (w0 + 0.4 * t * v) + 0.5 * rng.normal(size=n) for t, xi in enumerate(x)]

    def grad(theta, t):
        return {"w": jnp.asarray(2 * x[t].T @ (x[t] @ theta["w"] - y[t]) / n, jnp.float32)}

    gen = ExtrapGenerator(1)
    meta = gen.init({"w": jnp.zeros(d)})
    tx = optax.adam(0.05)
    opt = tx.init(meta)
    step = jax.jit(jax.grad(lambda m, a, b, c: match_loss(gen, m, [a, b], c)))
    ratios = []
    for t in range(2, 11):  # at the end of period t: fit on (t-1, t-2) -> t, forecast t+1
        theta = {"w": jnp.asarray(w0 + 0.4 * t * v)}  # a model that has caught up with D_t
        for _ in range(30):
            g = step(meta, grad(theta, t - 1), grad(theta, t - 2), grad(theta, t))
            u, opt = tx.update(g, opt, meta)
            meta = optax.apply_updates(meta, u)
        forecast = gen(meta, [grad(theta, t), grad(theta, t - 1)])
        g_next = grad(theta, t + 1)
        err = float(jnp.sum((forecast["w"] - g_next["w"]) ** 2))
        variation = float(jnp.sum((grad(theta, t)["w"] - g_next["w"]) ** 2))
        ratios.append(err / variation)
    assert np.mean(ratios[-4:]) < 0.1, ratios
    assert abs(float(meta["w"][0]) - 1.0) < 0.2  # the exact extrapolation is lambda = 1
