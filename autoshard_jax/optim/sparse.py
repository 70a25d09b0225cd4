"""Sparse, in-place embedding optimizers.

Each optimizer updates only the rows a batch touched. It takes the flat ids of a batch (-1 for
padding) and the gradient of each gathered row, combines duplicate ids, and scatters the update
into the table. Under `jax.jit(..., donate_argnums=...)` the scatter reuses the table's buffer,
so a step costs O(batch) memory and time, never O(table).

The optimizer state of a table is a dict of arrays whose leading axis is the table's rows, so
sharding code can stack and split it exactly like the table itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

RowState = dict[str, jax.Array]
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def _lr(learning_rate: ScalarOrSchedule, step: jax.Array) -> jax.Array:
    return learning_rate(step) if callable(learning_rate) else jnp.asarray(learning_rate)


def dropped_padding(ids_N: jax.Array, rows: int) -> jax.Array:
    """Maps padding (-1, or anything out of range) to `rows`, an index every scatter drops."""
    return jnp.where((ids_N >= 0) & (ids_N < rows), ids_N, rows)


def combine_duplicates(ids_N: jax.Array, grads_NxE: jax.Array, rows: int):
    """Unique ids (out-of-range filler `rows`) and the summed gradient of each.

    Row-wise adaptive optimizers need one gradient per row: updating twice with the two halves
    of a duplicated id would not equal the dense update.
    """
    n = ids_N.shape[0]
    ids_N = dropped_padding(ids_N, rows)
    unique_N, inverse_N = jnp.unique(ids_N, size=n, fill_value=rows, return_inverse=True)
    summed_NxE = jax.ops.segment_sum(grads_NxE, inverse_N.reshape(-1), num_segments=n)
    return unique_N, summed_NxE


@dataclasses.dataclass(frozen=True)
class RowOptimizer:
    """A sparse optimizer: `init(table) -> state`, `update(table, state, ids, grads, step)`."""

    name: str
    init: Callable[[jax.Array], RowState]
    update: Callable[..., tuple[jax.Array, RowState]]


def sgd(learning_rate: ScalarOrSchedule) -> RowOptimizer:
    """Plain SGD; duplicates need no combining because the scatter-add sums them."""

    def init(table_RxE):
        del table_RxE
        return {}

    def update(table_RxE, state, ids_N, grads_NxE, step):
        rows = table_RxE.shape[0]
        delta_NxE = (-_lr(learning_rate, step) * grads_NxE).astype(table_RxE.dtype)
        table_RxE = table_RxE.at[dropped_padding(ids_N, rows)].add(delta_NxE, mode="drop")
        return table_RxE, state

    return RowOptimizer("sgd", init, update)


def rowwise_adagrad(learning_rate: ScalarOrSchedule, eps: float = 1e-8,
                    initial_accumulator_value: float = 0.0) -> RowOptimizer:
    """Row-wise Adagrad (FBGEMM / TorchRec): one accumulator per row of mean(g^2) over the width.

    acc[r] += mean_e(g[r]^2);  w[r] -= lr * g[r] / (sqrt(acc[r]) + eps).  Memory is [R], not [R, E].
    """

    def init(table_RxE):
        return {"accumulator": jnp.full(table_RxE.shape[:1], initial_accumulator_value,
                                        jnp.float32)}

    def update(table_RxE, state, ids_N, grads_NxE, step):
        rows = table_RxE.shape[0]
        unique_N, g_NxE = combine_duplicates(ids_N, grads_NxE.astype(jnp.float32), rows)
        acc_R = state["accumulator"].at[unique_N].add(jnp.mean(g_NxE**2, axis=1), mode="drop")
        acc_N = acc_R.at[unique_N].get(mode="fill", fill_value=1.0)
        delta_NxE = -_lr(learning_rate, step) * g_NxE / (jnp.sqrt(acc_N)[:, None] + eps)
        table_RxE = table_RxE.at[unique_N].add(delta_NxE.astype(table_RxE.dtype), mode="drop")
        return table_RxE, {"accumulator": acc_R}

    return RowOptimizer("rowwise_adagrad", init, update)


def adagrad(learning_rate: ScalarOrSchedule, eps: float = 1e-7,
            initial_accumulator_value: float = 0.1) -> RowOptimizer:
    """Element-wise Adagrad with optax.adagrad's formula, applied to touched rows only.

    Untouched rows have a zero gradient, for which optax's update is zero too, so this equals
    `optax.adagrad` on the dense gradient.
    """

    def init(table_RxE):
        return {"accumulator": jnp.full(table_RxE.shape, initial_accumulator_value, jnp.float32)}

    def update(table_RxE, state, ids_N, grads_NxE, step):
        rows = table_RxE.shape[0]
        unique_N, g_NxE = combine_duplicates(ids_N, grads_NxE.astype(jnp.float32), rows)
        acc_RxE = state["accumulator"].at[unique_N].add(g_NxE**2, mode="drop")
        acc_NxE = acc_RxE.at[unique_N].get(mode="fill", fill_value=1.0)
        scale_NxE = jnp.where(acc_NxE > 0, jax.lax.rsqrt(acc_NxE + eps), 0.0)
        delta_NxE = -_lr(learning_rate, step) * g_NxE * scale_NxE
        table_RxE = table_RxE.at[unique_N].add(delta_NxE.astype(table_RxE.dtype), mode="drop")
        return table_RxE, {"accumulator": acc_RxE}

    return RowOptimizer("adagrad", init, update)


def make_row_optimizer(name: str, learning_rate: ScalarOrSchedule, **kwargs) -> RowOptimizer:
    factories = {"sgd": sgd, "rowwise_adagrad": rowwise_adagrad, "adagrad": adagrad}
    if name not in factories:
        raise ValueError(f"unknown embedding optimizer {name!r}; choose from {sorted(factories)}")
    return factories[name](learning_rate, **kwargs)


def make_dense_optimizer(name: str, learning_rate: ScalarOrSchedule,
                         **kwargs) -> optax.GradientTransformation:
    """Any optax optimizer by name (`sgd`, `adam`, `adagrad`, `adamw`, ...)."""
    factory = getattr(optax, name, None)
    tx = factory(learning_rate, **kwargs) if callable(factory) else None
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"unknown optax optimizer {name!r} (expected e.g. 'sgd', 'adam', "
                         "'adagrad')")
    return tx
