"""Power law plus constant, NE(x) = a * x^(-b) + c, fitted the Chinchilla way (approach 3).

The fit minimises a Huber loss (delta 1e-3) between log NE and the log of the model, written as
log-sum-exp(log a - b log x, log c) so that a, c > 0 and the optimiser works on well-scaled
numbers; L-BFGS (optax.lbfgs) runs from a grid of starts, vectorised with vmap, in float64. x is
divided by its geometric mean inside the fit (a is reported in the original units).

Confidence intervals come from a residual bootstrap: resample the log-space residuals of the fit,
add them to the fitted curve, refit. With the handful of runs a sweep has, resampling the runs
themselves would leave many resamples with fewer distinct x than parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from autoshard_jax.errors import InputError

HUBER_DELTA = 1e-3
MIN_POINTS = 4  # three parameters and at least one degree of freedom


def check_series(axis: str, x, y, tolerance: float = 0.005, min_points: int = MIN_POINTS) -> None:
    """Refuses series a power law plus constant cannot meaningfully describe.

    Needs `min_points` runs with distinct positive x, and NE falling with x: no step may raise NE
    by more than `tolerance` (relative), and NE must fall by at least 2 x `tolerance` from the
    first run to the last; a flatter series is within noise of a constant (the paper's "out of
    steam"), and its fitted exponent and constant would mean nothing.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < min_points:
        raise InputError(f"axis {axis}: {n} finished runs, a fit needs at least {min_points}; "
                         "run more of the sweep")
    if np.any(x <= 0) or not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise InputError(f"axis {axis}: x and NE must be positive and finite")
    order = np.argsort(x)
    x, y = x[order], y[order]
    if np.any(np.diff(x) <= 0):
        raise InputError(f"axis {axis}: two runs share x={x[np.argmin(np.diff(x))]:g}")
    rises = np.flatnonzero(y[1:] > y[:-1] * (1 + tolerance))
    if len(rises) or y[-1] >= y[0]:
        i = int(rises[0]) if len(rises) else n - 2
        raise InputError(f"axis {axis}: NE is not decreasing over its {n} runs (NE {y[i]:.5f} at "
                         f"x={x[i]:g} -> {y[i + 1]:.5f} at x={x[i + 1]:g}; tolerance "
                         f"{tolerance:g}): a power law would be meaningless here")
    drop = 1 - y[-1] / y[0]
    if drop < 2 * tolerance:
        raise InputError(f"axis {axis}: NE is flat over its {n} runs ({y[0]:.5f} -> {y[-1]:.5f}, "
                         f"{100 * drop:.2f}% < 2 x tolerance {tolerance:g}): within noise of a "
                         "constant, no power law to fit")


def _power_log(theta, u_NxM):
    """log of a' e^(-b u) + c for theta = (log a', b, log c), u = log(x / x_ref)."""
    return jnp.logaddexp(theta[0] - theta[1] * u_NxM[:, 0], theta[2])


def _joint_log(theta, u_NxM):
    """log(E + A/N^alpha + B/D^beta), theta = (log A', alpha, log B', beta, log E)."""
    parts_3xN = jnp.stack([theta[0] - theta[1] * u_NxM[:, 0], theta[2] - theta[3] * u_NxM[:, 1],
                           jnp.full(u_NxM.shape[:1], theta[4])])
    return jax.scipy.special.logsumexp(parts_3xN, axis=0)


MODELS = {"power": _power_log, "joint": _joint_log}
CHUNK = 512  # problems per call (latency-bound on CPU): one compilation serves every fit


def _objective(model: str, loss: str, theta, u_NxM, logy_N, w_N):
    pred_N = MODELS[model](theta, u_NxM)
    if loss == "huber":
        per_N = optax.huber_loss(pred_N, logy_N, delta=HUBER_DELTA)
    else:  # plain least squares on NE itself: the baseline
        per_N = (jnp.exp(pred_N) - jnp.exp(logy_N)) ** 2
    return jnp.sum(w_N * per_N)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _solve_chunk(model, loss, steps, starts_PxK, u_PxNxM, logy_PxN, w_PxN):
    """L-BFGS (optax, backtracking line search) on P independent problems in parallel."""

    def one(theta0, u_NxM, logy_N, w_N):
        fun = functools.partial(_objective, model, loss, u_NxM=u_NxM, logy_N=logy_N, w_N=w_N)
        opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(
            max_backtracking_steps=25, store_grad=True))
        value_and_grad = optax.value_and_grad_from_state(fun)

        def body(carry, _):
            theta, state = carry
            value, grad = value_and_grad(theta, state=state)
            updates, state = opt.update(grad, state, theta, value=value, grad=grad,
                                        value_fn=fun)
            return (optax.apply_updates(theta, updates), state), None

        (theta, _), _ = jax.lax.scan(body, (theta0, opt.init(theta0)), None, length=steps)
        value = fun(theta)
        return theta, jnp.where(jnp.isfinite(value), value, jnp.inf)

    return jax.vmap(one)(starts_PxK, u_PxNxM, logy_PxN, w_PxN)


def solve(model: str, loss: str, starts_PxK, u_PxNxM, logy_PxN, steps: int = 100):
    """Fits P problems (rows) from their starts; returns (thetas_PxK, losses_P) as numpy.

    Problems are padded to a fixed number of points and of problems per call, so every fit in a
    process (grid, bootstrap, held-out, any series length up to 16) reuses one compilation.
    """
    p, n = logy_PxN.shape
    width = max(16, 1 << (n - 1).bit_length())
    pad_n = width - n
    u = np.pad(u_PxNxM, ((0, 0), (0, pad_n), (0, 0)))
    logy = np.pad(logy_PxN, ((0, 0), (0, pad_n)))
    w = np.pad(np.ones((p, n)), ((0, 0), (0, pad_n)))
    pad_p = -p % CHUNK
    arrays = [np.pad(a, ((0, pad_p),) + ((0, 0),) * (a.ndim - 1), mode="edge")
              for a in (np.asarray(starts_PxK, np.float64), u, logy, w)]
    thetas, losses = [], []
    with jax.enable_x64(True):
        for i in range(0, p + pad_p, CHUNK):
            t, v = _solve_chunk(model, loss, steps, *(jnp.asarray(a[i:i + CHUNK])
                                                      for a in arrays))
            thetas.append(np.asarray(t))
            losses.append(np.asarray(v))
    return np.concatenate(thetas)[:p], np.concatenate(losses)[:p]


def _best(model, loss, starts_SxK, u_NxM, logy_N, steps=100):
    s = len(starts_SxK)
    thetas, losses = solve(model, loss, starts_SxK, np.repeat(u_NxM[None], s, 0),
                           np.repeat(logy_N[None], s, 0), steps)
    return thetas[int(np.argmin(losses))]


def init_grid(logy: np.ndarray) -> np.ndarray:
    """Starts: log a' over four decades, b from 0.05 to 2, c from 20% to 99% of the lowest NE."""
    ymin = float(np.exp(np.min(logy)))
    grid = itertools.product((-7.0, -5.0, -3.0, -1.0, 0.5), (0.05, 0.15, 0.3, 0.6, 1.0, 2.0),
                             np.log(ymin * np.array([0.2, 0.5, 0.8, 0.95, 0.99])))
    return np.array(list(grid), dtype=np.float64)


@dataclasses.dataclass
class PowerLawFit:
    a: float
    b: float
    c: float
    x_ref: float
    ci: dict | None = None  # {"a": [lo, hi], "b": ..., "c": ..., "level": ...}
    bootstrap_params: np.ndarray | None = None  # [resamples, 3]: a, b, c of each refit

    def predict(self, x) -> np.ndarray:
        return self.a * np.asarray(x, float) ** (-self.b) + self.c

    def band(self, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap refits' predictions at x."""
        x = np.asarray(x, float)
        p = self.bootstrap_params
        preds = p[:, :1] * x[None, :] ** (-p[:, 1:2]) + p[:, 2:3]
        return tuple(np.nanpercentile(preds, [(1 - level) / 2 * 100, (1 + level) / 2 * 100],
                                      axis=0))

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c, "ci": self.ci}


def _theta_to_fit(theta, x_ref) -> tuple[float, float, float]:
    la, b, lc = (float(v) for v in theta)
    with np.errstate(over="ignore"):  # a diverged bootstrap refit gives inf, not an exception
        return float(np.exp(la + b * math.log(x_ref))), b, float(np.exp(lc))


def fit_power_law(x, y, *, loss: str = "huber", bootstrap: int = 1000, level: float = 0.95,
                  seed: int = 0, steps: int = 100) -> PowerLawFit:
    """Fits NE = a x^-b + c to (x, y); `loss` is "huber" (log space) or "squares" (NE space).

    With `bootstrap` > 0, `ci` holds the central `level` percentile interval of each parameter
    over that many residual-bootstrap refits (each started from the full fit).
    """
    if loss not in ("huber", "squares"):
        raise ValueError(f"loss must be 'huber' or 'squares', got {loss!r}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_ref = float(np.exp(np.mean(np.log(x))))
    u_Nx1 = np.log(x / x_ref)[:, None]
    logy = np.log(y)
    theta = _best("power", loss, init_grid(logy), u_Nx1, logy, steps)
    fit = PowerLawFit(*_theta_to_fit(theta, x_ref), x_ref)
    if bootstrap:
        with jax.enable_x64(True):
            fitted = np.asarray(_power_log(jnp.asarray(theta), jnp.asarray(u_Nx1)))
        n = len(x)
        resid = logy - fitted
        resid = (resid - resid.mean()) * math.sqrt(n / max(n - 3, 1))
        picks = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
        thetas, _ = solve("power", loss, np.repeat(theta[None], bootstrap, 0),
                          np.repeat(u_Nx1[None], bootstrap, 0), fitted[None, :] + resid[picks],
                          steps)
        params = np.array([_theta_to_fit(t, x_ref) for t in thetas])
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        lo, hi = np.nanpercentile(params, q, axis=0)
        fit.ci = {k: [float(lo[i]), float(hi[i])] for i, k in enumerate("abc")}
        fit.ci["level"] = level
        fit.bootstrap_params = params
    return fit


def fit_no_constant(x, y) -> tuple[float, float]:
    """Pure power law NE = a x^-b by linear least squares in log-log space (Kaplan's form)."""
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(math.exp(intercept)), float(-slope)


def extrapolation_check(x, y, holdout: int = 1, **kw) -> dict:
    """Fits on all but the `holdout` largest x and predicts those; errors are relative NE."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    if len(x) - holdout < MIN_POINTS:
        return {"error": f"{len(x)} runs leave fewer than {MIN_POINTS} after holding out "
                         f"{holdout}", "relative_error": None}
    fx, fy, hx, hy = x[:-holdout], y[:-holdout], x[-holdout:], y[-holdout:]
    fit = fit_power_law(fx, fy, **kw)
    pred = fit.predict(hx)
    rel = np.abs(pred - hy) / hy
    return {"fit": fit, "held_out_x": hx.tolist(), "held_out_ne": hy.tolist(),
            "predicted_ne": pred.tolist(), "relative_error": float(np.max(rel))}


@dataclasses.dataclass
class JointFit:
    """L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla's form)."""

    A: float
    alpha: float
    B: float
    beta: float
    E: float

    def predict(self, n, d) -> np.ndarray:
        return (self.E + self.A * np.asarray(n, float) ** -self.alpha
                + self.B * np.asarray(d, float) ** -self.beta)

    def compute_optimal(self, compute, flops_per_param_sample: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L at C = k N D: N_opt = G (C/k)^(beta/(alpha+beta))."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        budget = compute / flops_per_param_sample
        n_opt = g * budget ** (b / (a + b))
        return float(n_opt), float(budget / n_opt)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fit_joint(n, d, y, steps: int = 100) -> JointFit:
    """Huber fit in log space of the joint form over runs that vary N and/or D."""
    n, d, y = (np.asarray(v, np.float64) for v in (n, d, y))
    n_ref, d_ref = (float(np.exp(np.mean(np.log(v)))) for v in (n, d))
    u_Nx2 = np.stack([np.log(n / n_ref), np.log(d / d_ref)], axis=1)
    logy = np.log(y)
    e_starts = np.log(float(np.min(y)) * np.array([0.5, 0.8, 0.95]))
    grid = np.array(list(itertools.product((-5.0, -3.0, -1.0), (0.1, 0.5, 1.0),
                                           (-5.0, -3.0, -1.0), (0.1, 0.5, 1.0), e_starts)))
    la, alpha, lb, beta, le = (float(v) for v in _best("joint", "huber", grid, u_Nx2, logy,
                                                       steps))
    return JointFit(A=math.exp(la + alpha * math.log(n_ref)), alpha=alpha,
                    B=math.exp(lb + beta * math.log(d_ref)), beta=beta, E=math.exp(le))
