"""The online methods: one `update(state, t, ...)` per method, built on shared jitted pieces.

Batch Update (bu) fine-tunes the deployed model on the newest period; bu_w on the last w periods;
full retrains from the initial parameters on every period so far; hint is FGD with the fixed
optimistic extrapolation g_t + (g_t - g_{t-1}); sml is a reconstruction of SML's transfer (a
coordinate-wise network fusing the old and the fine-tuned parameters, trained on the next
period); fgd* learn a generator online (fgd/transform.py), behind a gate set by backtesting
the forecast on the stream's history (`backtest_gain`). The base optimizer starts fresh each
period, so a period's update is a pure function of (deployed parameters, data, meta state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from autoshard_jax.data.batch import Batch
from fgd.models import OnlineModel
from fgd.streams import concat_batches, num_rows, take_rows
from fgd.transform import (
    ExtrapGenerator,
    GatedGenerator,
    future_gradient,
    future_gradient_descent,
    make_generator,
    match_loss,
    unroll_loss,
)

BASELINES = ("bu", "bu_w", "full", "hint", "sml")
FGD_VARIANTS = {"fgd": ("extrap", "match"), "fgd_unroll": ("extrap", "unroll"),
                "fgd_l2o": ("l2o", "match"), "fgd_l2o_unroll": ("l2o", "unroll")}
METHODS = BASELINES + tuple(FGD_VARIANTS)


def padded_batches(period: Batch, batch_size: int,
                   rng: np.random.Generator | None) -> list[Batch]:
    """A pass over the period (shuffled by rng; in order when rng is None) in fixed-size
    batches; the last is padded with rows of weight 0 so every batch has one shape."""
    n = num_rows(period)
    order_N = rng.permutation(n) if rng is not None else np.arange(n)
    out = []
    for start in range(0, n, batch_size):
        rows = order_N[start:start + batch_size]
        weight = np.ones(batch_size, np.float32)
        if len(rows) < batch_size:
            weight[len(rows):] = 0.0
            rows = np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)])
        b = take_rows(period, rows)
        b["weight"] = weight
        out.append(b)
    return out


def stack(batches: list[Batch]) -> Batch:
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


@dataclasses.dataclass(frozen=True)
class Hyper:
    batch_size: int = 256
    lr: float = 3e-3
    epochs: int = 1
    window: int = 3
    history: int = 1
    meta_lr: float = 0.05
    meta_steps: int = 20
    meta_batch: int = 1024
    unroll_steps: int = 5
    sml_steps: int = 20
    sml_lr: float = 1e-3  # SML's transfer learning rate (TR_lr in zyang1580/SML)


class Pieces:
    """Jitted functions shared by every method of one (model, hyperparameters) run."""

    def __init__(self, model: OnlineModel, hp: Hyper):
        self.model, self.hp = model, hp
        self.base = optax.adam(hp.lr, eps_root=1e-16)  # eps_root: differentiable for unroll
        self.meta_tx = optax.adam(hp.meta_lr)
        self.sml_tx = optax.adam(hp.sml_lr)
        grad_fn = jax.grad(model.loss)
        self.grad = jax.jit(grad_fn)
        self.logits = jax.jit(model.logits)
        self.init = jax.jit(model.init)  # one compilation, however many runs re-initialise

        # Every method's gradients come from this one compiled program, and the update is a
        # second one; so FGD at its initial meta parameters feeds the base optimizer exactly the
        # bits Batch Update feeds it (one fused program per method would round differently).
        def apply(params, opt_state, grads):
            updates, opt_state = self.base.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self._apply = jax.jit(apply)
        self._fgd_steps: dict[Any, Any] = {}
        self._meta_steps: dict[Any, Any] = {}

    def bu_step(self, params, opt_state, batch):
        return self._apply(params, opt_state, self.grad(params, batch))

    def fgd_step(self, generator):
        """(params, opt_state, batches newest-first, meta) -> (params, opt_state) for FGD (the
        chain forecast -> base; init with the returned transformation's init). The two stages
        run as two compiled programs, the second being Batch Update's very own: one program
        fusing both would contract multiply-adds differently and round differently."""
        if generator not in self._fgd_steps:
            tx = future_gradient_descent(self.base, generator)
            forecast_stage = future_gradient(generator)
            forecast = jax.jit(lambda g, hist, meta: forecast_stage.update(
                g, optax.EmptyState(), history=hist, meta=meta)[0])

            def step(params, opt_state, batches, meta):
                grads = [self.grad(params, b) for b in batches]
                g = forecast(grads[0], tuple(grads[1:]), meta)
                params, base_state = self._apply(params, opt_state[1], g)
                return params, (opt_state[0], base_state)

            self._fgd_steps[generator] = (step, tx)
        return self._fgd_steps[generator]

    def meta_step(self, generator, objective: str):
        if (generator, objective) in self._meta_steps:
            return self._meta_steps[generator, objective]
        grad_fn = jax.grad(self.model.loss)
        if objective == "match":
            def loss(meta, params, batches, target):
                inputs = [grad_fn(params, b) for b in batches]
                return match_loss(generator, meta, inputs, grad_fn(params, target))
        else:
            def loss(meta, params, batches, target):
                return unroll_loss(generator, meta, self.model, self.base, params, batches,
                                   target)

        def step(meta, meta_opt, params, batches, target):
            value, g = jax.value_and_grad(loss)(meta, params, batches, target)
            updates, meta_opt = self.meta_tx.update(g, meta_opt, meta)
            return optax.apply_updates(meta, updates), meta_opt, value

        self._meta_steps[generator, objective] = jax.jit(step)
        return self._meta_steps[generator, objective]

    def full_grad(self, params, period: Batch, max_rows: int) -> Any:
        """Gradient of the mean loss over (up to max_rows of) a period, in fixed-size chunks."""
        n = min(num_rows(period), max_rows)
        chunks = padded_batches(take_rows(period, np.arange(n)), self.hp.meta_batch, None)
        total = None
        for c in chunks:
            w = float(c["weight"].sum()) / n
            g = jax.tree.map(lambda x, w=w: x * w, self.grad(params, c))
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        return total

    def predict(self, params, period: Batch) -> np.ndarray:
        chunks = padded_batches(period, self.hp.meta_batch, None)
        out = np.concatenate([np.asarray(self.logits(params, c)) for c in chunks])
        return out[:num_rows(period)].astype(np.float64)


def _rng(seed: int, t: int, lag: int, epoch: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, t + 1, lag, epoch, 17])  # t = -1: pretraining


def train_epochs(pieces: Pieces, params, data: Batch, seed: int, t: int, epochs: int):
    """Fresh base optimizer, `epochs` shuffled passes over `data` (Batch Update's update)."""
    opt_state = pieces.base.init(params)
    for e in range(epochs):
        for b in padded_batches(data, pieces.hp.batch_size, _rng(seed, t, 0, e)):
            params, opt_state = pieces.bu_step(params, opt_state, b)
    return params


def train_fgd(pieces: Pieces, generator, meta, params, history: list[Batch], seed: int, t: int):
    """Like train_epochs on history[0] = D_t, but step j also sees batch j (cycled) of each
    older period and the base optimizer consumes G_meta(g_t, g_{t-1}, ...)."""
    step, tx = pieces.fgd_step(generator)
    opt_state = tx.init(params)
    for e in range(pieces.hp.epochs):
        cur = padded_batches(history[0], pieces.hp.batch_size, _rng(seed, t, 0, e))
        older = [padded_batches(h, pieces.hp.batch_size, _rng(seed, t, k + 1, e))
                 for k, h in enumerate(history[1:])]
        for j, b in enumerate(cur):
            batches = (b, *(o[j % len(o)] for o in older))
            params, opt_state = step(params, opt_state, batches, meta)
    return params


def meta_update(pieces: Pieces, generator, objective: str, meta, meta_opt, params, prev_params,
                history: list[Batch], seed: int, t: int):
    """Fits phi on the newest causal pair: inputs D_{t-1..t-1-H} -> target D_t (history[0])."""
    hp = pieces.hp
    step = pieces.meta_step(generator, objective)
    loss = float("nan")
    for m in range(hp.meta_steps):
        rng = _rng(seed, t, 100 + m)
        target = _sample(history[0], hp.meta_batch, rng)
        if objective == "match":
            inputs = tuple(_sample(h, hp.meta_batch, rng) for h in history[1:])
            meta, meta_opt, loss = step(meta, meta_opt, params, inputs, target)
        else:
            inputs = tuple(stack([_sample(h, hp.batch_size, rng) for _ in range(hp.unroll_steps)])
                           for h in history[1:])
            meta, meta_opt, loss = step(meta, meta_opt, prev_params, inputs, target)
    return meta, meta_opt, float(loss)


def _sample(period: Batch, size: int, rng: np.random.Generator) -> Batch:
    rows = rng.integers(0, num_rows(period), size)
    b = take_rows(period, rows)
    b["weight"] = np.ones(size, np.float32)
    return b


# ---- SML: coordinate-wise transfer of (old, fine-tuned) parameters ------------------------

def sml_init(hidden: int = 8) -> dict:
    w1 = jax.random.normal(jax.random.key(1), (3, hidden), jnp.float32) / jnp.sqrt(3.0)
    return {"w1": w1, "b1": jnp.zeros((hidden,)), "w2": jnp.zeros((hidden,)), "b2": jnp.zeros(())}


def sml_transfer(psi: dict, old, hat):
    """hat + s * MLP([old, hat, hat - old] / s) per coordinate; equals hat at init (w2 = 0)."""
    def leaf(o, h):
        s = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(h))) + 1e-12)
        x_NxF = jnp.stack([o.reshape(-1), h.reshape(-1), (h - o).reshape(-1)], axis=1) / s
        out_N = jnp.tanh(x_NxF @ psi["w1"] + psi["b1"][None, :]) @ psi["w2"] + psi["b2"]
        return h + s * out_N.reshape(h.shape)

    return jax.tree.map(leaf, old, hat)


def make_sml_step(pieces: Pieces):
    def loss(psi, old, hat, batch):
        return pieces.model.loss(sml_transfer(psi, old, hat), batch)

    def step(psi, opt, old, hat, batch):
        value, g = jax.value_and_grad(loss)(psi, old, hat, batch)
        updates, opt = pieces.sml_tx.update(g, opt, psi)
        return optax.apply_updates(psi, updates), opt, value

    return jax.jit(step), jax.jit(sml_transfer)


def hint_meta(params) -> Any:
    """The fixed optimistic hint: extrap generator, H = 1, lambda = 1 (not learned)."""
    return jax.tree.map(lambda p: jnp.ones((1,), jnp.float32), params)


HINT_GENERATOR = ExtrapGenerator(1)


def generator_for(method: str, history: int):
    if method == "hint":
        return HINT_GENERATOR
    if method in FGD_VARIANTS:
        return GatedGenerator(make_generator(FGD_VARIANTS[method][0], history))
    return None


def row_losses(pieces: Pieces, params, period: Batch) -> np.ndarray:
    """Per-row BCE of the model on every row of a period (float64)."""
    x_N = pieces.predict(params, period)
    y_N = np.asarray(period["label"], np.float64)
    return np.maximum(x_N, 0.0) - x_N * y_N + np.log1p(np.exp(-np.abs(x_N)))


def backtest_gain(pieces: Pieces, generator, meta, start_params, older: list[Batch],
                  target: Batch, seed: int, t: int) -> np.ndarray:
    """Replays the update of period t - 1 (data older[0] = D_{t-1}, older[1:] its history) from
    the parameters deployed before it, once as Batch Update and once with the forecast of
    `generator` at `meta` (fitted on pairs ending at D_{t-1}), and returns the per-row gain
    loss(BU) - loss(forecast) on D_t (`target`). Uses only data up to t: it is the evidence the
    FGD gate is set from."""
    bu = train_epochs(pieces, start_params, older[0], seed, t - 1, pieces.hp.epochs)
    fc = train_fgd(pieces, generator, meta, start_params, older, seed, t - 1)
    return row_losses(pieces, bu, target) - row_losses(pieces, fc, target)


def window_data(history_all: list[Batch]) -> Batch:
    return concat_batches(history_all)
