"""Future Gradient Descent as an optax transformation, its generators and its meta objectives.

At the end of period t the model step sees g_t (a batch of the newest period) and the gradients
g_{t-1}, ..., g_{t-H} of batches of the H periods before, all at the current parameters. A
generator G_phi maps that history to a forecast of the gradient of period t+1, and the wrapped
base optimizer consumes the forecast instead of g_t. Every generator outputs exactly g_t at its
initial meta parameters, so FGD then *is* Batch Update, bit for bit.

FGD's generators are gated (`GatedGenerator`): g_t + c (G_phi - g_t). Gradient matching rewards
any forecast that beats g_t at predicting a *sample* gradient of the next period; on a
stationary stream mixing in the previous period's gradient does (for pure sampling noise the
matching optimum is lambda = -1/2, an average), yet training on it re-fits data the model has
already seen and loses a little. So c is not fitted
by the matching objective: it is set from a backtest of the forecast on past periods (the loss
of the next period after training with vs without it), shrunk toward 0 by that gain's noise.

Meta objectives (both causal: the newest pair they fit ends at D_t, then G is applied to D_t):
  match:  || G_phi(g_{t-1}, ..., g_{t-1-H}) - g_t ||^2 at the current parameters, divided by
          || g_{t-1} - g_t ||^2 (Batch Update's forecast error), so 1.0 means "no better than BU";
  unroll: the loss on D_t after K base-optimizer steps driven by G_phi on D_{t-1}, ... from the
          parameters deployed one period earlier, differentiated through `jax.lax.scan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgd.models import OnlineModel

PyTree = Any
GENERATORS = ("extrap", "l2o")


def _tree_sq_norm(tree: PyTree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class ExtrapGenerator:
    """G = g_t + sum_k lambda_k (g_{t-k+1} - g_{t-k}), one scalar lambda_k per tensor and lag.

    lambda = 0 is Batch Update; lambda_1 = 1 (H = 1) is the fixed optimistic hint; on a period-p
    cycle lambda_1..lambda_{p-1} = -1 telescopes to g_{t+1-p}, the gradient of the same regime.
    """

    history: int

    def init(self, params: PyTree, rng: jax.Array | None = None) -> PyTree:
        del rng
        return jax.tree.map(lambda p: jnp.zeros((self.history,), jnp.float32), params)

    def __call__(self, meta: PyTree, grads: Sequence[PyTree]) -> PyTree:
        def leaf(lam_H, *g):
            out = g[0]
            for k in range(self.history):
                out = out + lam_H[k] * (g[k] - g[k + 1])
            return out

        return jax.tree.map(leaf, meta, *grads)


@dataclasses.dataclass(frozen=True)
class L2OGenerator:
    """G = g_t + s * MLP([g_t, g_t - g_{t-1}, ...] / s), coordinate-wise, one MLP shared by all
    tensors (learned-optimizer style); s = RMS of the tensor's g_t. The output layer starts at
    zero, so G = g_t exactly until the meta objective moves it."""

    history: int
    hidden: int = 16

    def init(self, params: PyTree, rng: jax.Array | None = None) -> PyTree:
        del params
        rng = jax.random.key(0) if rng is None else rng
        fan_in = self.history + 1
        w1 = jax.random.normal(rng, (fan_in, self.hidden), jnp.float32) / jnp.sqrt(fan_in)
        return {"w1": w1, "b1": jnp.zeros((self.hidden,)), "w2": jnp.zeros((self.hidden,)),
                "b2": jnp.zeros(())}

    def __call__(self, meta: PyTree, grads: Sequence[PyTree]) -> PyTree:
        def leaf(*g):
            scale = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(g[0]))) + 1e-12)
            feats = [g[0]] + [g[k] - g[k + 1] for k in range(self.history)]
            x_NxF = jnp.stack([f.reshape(-1) for f in feats], axis=1) / scale
            h_NxK = jnp.tanh(x_NxF @ meta["w1"] + meta["b1"][None, :])
            out_N = h_NxK @ meta["w2"] + meta["b2"]
            return g[0] + scale * out_N.reshape(g[0].shape)

        return jax.tree.map(leaf, *grads)


@dataclasses.dataclass(frozen=True)
class GatedGenerator:
    """G = g_t + c (G_inner - g_t): a gate c in [0, 1] on the inner generator's correction.

    The meta objectives fit the inner generator at c = 1; c itself is set from the stream's
    history by backtesting the forecast (`gate_from_evidence`), so a forecast that does not help
    the next period's loss (e.g. on a stationary stream, where it only fits sampling noise) is
    switched off. c = 0 returns g_t itself (not g_t + 0 * ...), so FGD is then Batch Update.
    """

    inner: ExtrapGenerator | L2OGenerator

    @property
    def history(self) -> int:
        return self.inner.history

    def init(self, params: PyTree, rng: jax.Array | None = None) -> PyTree:
        return {"inner": self.inner.init(params, rng), "gate": jnp.zeros((), jnp.float32)}

    def __call__(self, meta: PyTree, grads: Sequence[PyTree]) -> PyTree:
        forecast = self.inner(meta["inner"], grads)
        gate = meta["gate"]
        return jax.tree.map(lambda f, g: jnp.where(gate == 0, g, g + gate * (f - g)),
                            forecast, grads[0])


def gate_from_evidence(stats: dict) -> float:
    """Positive-part shrinkage of the backtested gain: c = max(0, 1 - se^2 / mean^2) when the
    mean gain is positive, else 0, so c -> 1 when the gain is many standard errors above zero
    and c = 0 when it is within one of it or negative.

    `stats` accumulates per-row loss gains delta = loss(BU) - loss(forecast) on past periods:
    rows, sum, sumsq over rows; periods, psum, psumsq over per-period means. The standard error
    is the larger of the row-level one and (with two or more periods) the between-period one.
    """
    rows, periods = float(stats["rows"]), float(stats["periods"])
    if rows < 2:
        return 0.0
    mean = float(stats["sum"]) / rows
    if mean <= 0.0:
        return 0.0
    var_rows = max(float(stats["sumsq"]) / rows - mean * mean, 0.0) * rows / (rows - 1)
    se2 = var_rows / rows
    if periods >= 2:
        pmean = float(stats["psum"]) / periods
        pvar = max(float(stats["psumsq"]) - periods * pmean * pmean, 0.0) / (periods - 1)
        se2 = max(se2, pvar / periods)
    return max(0.0, 1.0 - se2 / (mean * mean))


GATE_STATS = ("rows", "sum", "sumsq", "periods", "psum", "psumsq")


def add_evidence(stats: dict, delta_N) -> dict:
    """stats (GATE_STATS) plus one backtested period's per-row gains delta_N."""
    d = np.asarray(delta_N, np.float64)
    add = {"rows": d.size, "sum": d.sum(), "sumsq": np.square(d).sum(), "periods": 1.0,
           "psum": d.mean(), "psumsq": d.mean() ** 2}
    return {k: jnp.asarray(float(stats[k]) + float(add[k]), jnp.float32) for k in GATE_STATS}


def make_generator(name: str, history: int) -> ExtrapGenerator | L2OGenerator:
    if name == "extrap":
        return ExtrapGenerator(history)
    if name == "l2o":
        return L2OGenerator(history)
    raise ValueError(f"unknown generator {name!r}; choose from {GENERATORS}")


def future_gradient(generator: Callable[[PyTree, Sequence[PyTree]], PyTree]
                    ) -> optax.GradientTransformationExtraArgs:
    """The forecast stage: update(g_t, state, params, history=(g_{t-1}, ...), meta=phi) returns
    G_phi(g_t, history); with an empty history it returns g_t unchanged. Stateless."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, history=(), meta=None, **extra):
        del params, extra
        return (generator(meta, (updates, *history)) if history else updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def future_gradient_descent(base: optax.GradientTransformation,
                            generator: Callable[[PyTree, Sequence[PyTree]], PyTree]
                            ) -> optax.GradientTransformationExtraArgs:
    """FGD: the forecast stage chained in front of `base` (the wrapped optimizer). Its state is
    (EmptyState, base state); extra args `history` and `meta` reach the forecast stage."""
    return optax.chain(future_gradient(generator), base)


def match_loss(generator, meta: PyTree, inputs: Sequence[PyTree], target: PyTree) -> jax.Array:
    """Forecast error of G on (inputs -> target) relative to Batch Update's (inputs[0])."""
    forecast = generator(meta, inputs)
    err = _tree_sq_norm(jax.tree.map(jnp.subtract, forecast, target))
    base = _tree_sq_norm(jax.tree.map(jnp.subtract, inputs[0], target))
    return err / (base + 1e-20)


def unroll_loss(generator, meta: PyTree, model: OnlineModel, base: optax.GradientTransformation,
                params0: PyTree, batches_KxL: Sequence[Any], target: Any) -> jax.Array:
    """Loss on `target` after K steps from params0; step k uses batch k of each of the L lagged
    periods (newest first, stacked on a leading K axis) and the forecast G_phi."""
    grad_fn = jax.grad(model.loss)

    def step(carry, batches_L):
        params, opt_state = carry
        grads = [grad_fn(params, b) for b in batches_L]
        forecast = generator(meta, grads)
        updates, opt_state = base.update(forecast, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params0, base.init(params0)), tuple(batches_KxL))
    return model.loss(params, target)
