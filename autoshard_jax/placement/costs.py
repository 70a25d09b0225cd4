"""The cost a placer optimises: the learned cost network when given, else the analytical one.

Both share one signature, `cost_fn(feats_TxF, assign_TxD, class_TxK) -> (device_ms_D, spmd_ms)`
(`cost/network.py`), so heuristics, RL and search never know which model they run on. Features
come from `tables/features.py`; width classes from `cost/network.py` (computed here the same
way until that module lands).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autoshard_jax.cost.analytical import CostFn, analytical_cost_fn
from autoshard_jax.errors import InputError
from autoshard_jax.sharding.layout import padded_width
from autoshard_jax.tables.features import FEATURE_NAMES, table_features  # noqa: F401
from autoshard_jax.tables.spec import TableSpec

OBJECTIVES = ("spmd", "max_device")

try:
    from autoshard_jax.cost.network import width_classes
except ImportError:  # the cost-oracle issue's network module has not landed yet
    def width_classes(specs: Sequence[TableSpec]) -> tuple[np.ndarray, tuple[int, ...]]:
        """(class of each table, the distinct packed widths), widths ascending."""
        width = max(s.dim for s in specs)
        packed = [padded_width(s.dim, width) for s in specs]
        widths = tuple(sorted(set(packed)))
        return np.asarray([widths.index(w) for w in packed], np.int32), widths


def class_onehot(specs: Sequence[TableSpec], widths: Sequence[int] | None = None) -> np.ndarray:
    """[T, K] one-hot width class; `widths` fixes K and the order (e.g. a pool's widths)."""
    cls_T, own = width_classes(specs)
    if widths is None:
        widths = own
    index = [list(widths).index(own[c]) for c in cls_T]
    out = np.zeros((len(specs), len(widths)), np.float32)
    out[np.arange(len(specs)), index] = 1.0
    return out


@dataclasses.dataclass(frozen=True)
class Cost:
    """A cost function plus where it came from (recorded in plan meta and reports)."""

    fn: CostFn
    name: str
    batch_size: int
    model: object = None  # the learned CostModel (for refinement), if any


def get_cost(batch_size: int, cost_model_dir: str | None = None, pessimism: float = 0.0
             ) -> Cost:
    """The learned cost network from `cost_model_dir` (comma-separated workdirs: the mean of
    their networks plus `pessimism` standard deviations, `cost.network.CostEnsemble`), else the
    analytical estimator."""
    if not cost_model_dir:
        if pessimism:
            raise InputError(f"cost pessimism {pessimism} needs an ensemble of cost networks, "
                             "not the analytical estimator")
        return Cost(analytical_cost_fn(batch_size), "analytical", batch_size)
    try:
        from autoshard_jax.cost.network import load_cost_models
    except ImportError as e:
        raise InputError(f"cost model {cost_model_dir!r} given but autoshard_jax.cost.network "
                         "is not available in this checkout") from e
    model = load_cost_models(cost_model_dir, pessimism)
    return learned_cost(model, cost_model_dir, batch_size)


def learned_cost(model, name: str, batch_size: int) -> Cost:
    """A Cost over a CostModel. The function is a fresh closure: hashable (jit static args),
    and a new one after the model is refined, so jitted callers retrace with the new weights."""

    def fn(feats_TxF, assign_TxD, class_TxK):
        return model.cost_fn(feats_TxF, assign_TxD, class_TxK)

    if hasattr(model, "bind"):  # per-device sums instead of [T, D] products (env.bind)
        fn.bind = model.bind
    return Cost(fn, f"learned:{name}", batch_size, model)


def single_costs(cost: Cost, feats_TxF: np.ndarray, class_TxK: np.ndarray) -> np.ndarray:
    """Predicted cost of each table alone on a device ([T]), in chunks of <= 256 tables."""
    t = feats_TxF.shape[0]
    out = []
    fn = jax.jit(cost.fn)
    for lo in range(0, t, 256):
        hi = min(t, lo + 256)
        assign = np.zeros((t, hi - lo), np.float32)
        assign[np.arange(lo, hi), np.arange(hi - lo)] = 1.0
        dev, _ = fn(jnp.asarray(feats_TxF), jnp.asarray(assign), jnp.asarray(class_TxK))
        out.append(np.asarray(dev))
    return np.concatenate(out)


def plan_costs(cost: Cost, specs: Sequence[TableSpec], device_T: np.ndarray, num_devices: int
               ) -> tuple[np.ndarray, float]:
    """(predicted device_ms_D, predicted spmd_ms) of a table-wise assignment."""
    assign = np.zeros((len(specs), num_devices), np.float32)
    assign[np.arange(len(specs)), device_T] = 1.0
    dev, spmd = jax.jit(cost.fn)(jnp.asarray(table_features(specs)), jnp.asarray(assign),
                                 jnp.asarray(class_onehot(specs)))
    return np.asarray(dev, np.float64), float(spmd)


def floor_D(assign_TxD: jax.Array, single_T: jax.Array) -> jax.Array:
    """Each device's costliest table alone ([D]; 0 on an empty device): a floor on its cost,
    since adding work never makes a device faster (`search` module doc)."""
    return jnp.max(jnp.where(assign_TxD > 0, single_T[:, None], 0.0), axis=0)


_DRAWS = 64


def expected_max(device_ms_D: jax.Array, sigma: float, valid_D: jax.Array | None = None
                 ) -> jax.Array:
    """E[max_d c_d exp(sigma z_d - sigma^2 / 2)], z_d iid N(0, 1): the max_device cost a
    measurement reports when each device's prediction errs by about `sigma` (log scale).

    A plan with several devices just under its slowest one measures slower than one whose other
    devices are well below it, though both predict the same maximum. A sigma near 0.06 combines
    the network's error on unseen tables (log spread 0.044-0.068 on Zen 5, session 26) with one
    measurement's noise (2.5-4%). The draws are fixed, so plans are compared under common random
    numbers (deterministic, smooth in the costs). Judged in session 28 and not the default
    (README).
    """
    valid_D = jnp.ones_like(device_ms_D) if valid_D is None else valid_D
    z_SxD = jax.random.normal(jax.random.key(0), (_DRAWS, device_ms_D.shape[-1]))
    noisy_SxD = device_ms_D[None, :] * jnp.exp(sigma * z_SxD - 0.5 * sigma**2)
    return jnp.mean(jnp.max(jnp.where(valid_D[None, :] > 0, noisy_SxD, 0.0), axis=1))


def max_device_score(device_ms_D: jax.Array, assign_TxD: jax.Array, sigma: float = 0.0,
                     shared: bool = False, valid_D: jax.Array | None = None) -> jax.Array:
    """The max_device cost a plan is scored by (device costs as given, e.g. floored): the
    slowest valid device, or with `sigma` > 0 the expected measured maximum; with `shared`
    only devices holding two or more tables count (`search` module doc)."""
    valid_D = jnp.ones_like(device_ms_D) if valid_D is None else valid_D
    if shared:
        valid_D = valid_D * (jnp.sum(assign_TxD, 0) >= 2)
    if sigma > 0:
        return expected_max(device_ms_D, sigma, valid_D)
    return jnp.max(jnp.where(valid_D > 0, device_ms_D, 0.0))


def objective_value(device_ms_D: np.ndarray, spmd_ms: float, objective: str) -> float:
    return float(spmd_ms) if objective == "spmd" else float(np.max(device_ms_D))


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
